#!/usr/bin/env bash
# lorakit on one H200, in ONE device run: correctness of the fast paths on CUDA, then
# `lorakit bench` on the shapes of docs/performance.md against PEFT. Capped at 9 minutes (each step has its own
# timeout inside an overall budget), so one call with timeout_s=600 plus the machine's start
# takes most of the 15 minutes of device time: a second call can rerun a few steps only
# (ONLY="step names", e.g. ONLY="bench_8b_ckpt train" bash scripts/gpu_check.sh).
#
#   1. scripts/gpu_kernels.py                    the fused functions on CUDA, bf16, fp32 and fp16, against
#                                                a float64 reference (min cosine >= 0.999, max
#                                                relative error <= 5e-2 bf16, fp16 / 1e-3 fp32)
#   2. lorakit bench --preset gpu-1b --check --check-steps 50
#                                                1b shape, 4 x 2048: speed + gradient parity and
#                                                the loss curve over 50 steps, lorakit and PEFT in
#                                                bf16 each against an fp32 (TF32) reference
#   3. lorakit bench --preset gpu-1b --grad-checkpointing (5 timed steps after 2; step 4 too)
#                                                also lorakit-offload: every layer's
#                                                input in host memory (peak and PCIe cost)
#   4. lorakit bench --preset gpu-8b --grad-checkpointing --variants lorakit,lorakit-offload,peft,peft-liger
#                                                8b shape, 2 x 2048: the 8b goal's comparisons
#   3b. lorakit bench --preset gpu-1b --memory-budget 4.4 --variants lorakit
#                                                the 1b memory goal's operating point: the layers the
#                                                plan for 4.4 GiB checkpoints (15 of 16, 3.93 GiB
#                                                estimated), as `lorakit train --memory-budget 4.4`
#   5. lorakit bench --preset gpu-1b --memory-budget 12 --variants lorakit,lorakit-native,peft-bf16
#                                                the 1b speed goal's operating point (peak <= 12 GiB):
#                                                lorakit checkpoints the earliest layers the estimate
#                                                says it needs (1 of 16: 10.7 GiB estimated, 11.1
#                                                with none, against 90% of 12), as `lorakit train
#                                                --memory-budget 12` plans; the summary prints the
#                                                estimate beside the measured peak
#   6. scripts/gpu_train_smoke.py               `lorakit train` end to end on the GPU: a random
#                                                Llama (hidden 1024, 8 layers), the demo data packed,
#                                                40 steps, then --resume to 60; eval loss must fall
#   7. lorakit bench --preset gpu-1b --variants lorakit,peft-bf16 --prompt-fraction 0.5
#                                                instruction-style labels: lorakit's head skips the
#                                                unlabelled half (~10% of the step's FLOPs predicted)
#   8. lorakit bench --preset gpu-1b --packing --max-doc-len 512 --variants lorakit,lorakit-perdoc,lorakit-4d,peft-bf16
#                                                rows of several documents: torch's varlen kernel
#                                                against an SDPA call per document and the 4D mask,
#                                                packed against PEFT padded
#   9. lorakit bench --preset gpu-1b --variants lorakit --chunk-size 4096
#                                                the loss in 4096-row chunks instead of the default
#                                                256 (128 MiB budget): ~3 GiB more memory predicted;
#                                                is the default slower?
#  10. pytest tests/kernels tests/lora -x        the kernel and engine tests (CPU reference paths,
#                                                which CI runs too: last, with what time is left;
#                                                in one process: the image has no pytest-xdist)
# They run in the order 1, 5, 2, 3, 3b, 4, 6-10 (the goals' benches first: a short BUDGET keeps them).
# A variant or check that raises is reported as a failed row; the other rows still come back.
# On CUDA `lorakit` runs the Triton RMSNorm/SwiGLU/RoPE kernels, as the trainer does (the first GPU
# run measured them 1.3x faster); lorakit-native is the ablation with torch's ops. Step 1 checks the
# kernels compiled for CUDA.
#
# Results in $OUT (at most 8 files come back): gpu_check.log (every command's output, pytest's
# too, and each bench's table), kernels.json, benches.json ({step name: `lorakit bench` result} of
# steps 2-5 and 7-9; a bench writes its JSON after every variant, so a step cut short keeps its
# finished rows), summary.txt. summary.txt and benches.json are rebuilt after every step: a call
# killed at the device's limit still brings back what ran.
# The short table printed last (summary.txt) is what to paste into docs/performance.md.
#
# How to run it (the device tool, repository root; .whl holds the wheels named below):
#     run(command="bash scripts/gpu_check.sh", timeout_s=600, carry=[".whl"])
#
# Wheels: the device image has python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft 0.21,
# triton, pytest, rich, pyyaml, safetensors, numpy, pandas, pyarrow; lorakit runs from src/
# (PYTHONPATH below, no install). `lorakit bench`, tests/kernels and tests/lora need nothing
# more. Carried as wheels (pure Python; .gitignore already ignores /.whl/): liger-kernel for the
# peft-liger variant, and datasets with dill and multiprocess for the trainer (step 6):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 \
#         multiprocess==0.70.19
#     run(command="bash scripts/gpu_check.sh", timeout_s=600, carry=[".whl"])
# Without them the peft-liger row says liger-kernel is not installed and step 6 fails at import.
# This script installs whatever .whl/*.whl it finds into /tmp/site.

set -u
OUT="${OUT:-/tmp/lorakit_gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PARTS="${PARTS:-/tmp/lorakit_gpu_parts}"  # each bench's JSON, rewritten after every variant (not in $OUT:
rm -rf "$PARTS" && mkdir -p "$PARTS"      # at most 8 files come back; benches.json gathers them)
BUDGET="${BUDGET:-540}"  # seconds for all steps together; the device call's limit is 600
PLAN="${PLAN:-full}"  # full (the steps above) or quick (a short re-measurement: see the end)
ONLY="${ONLY:-}"  # space-separated step names to run alone, e.g. a rerun: ONLY="bench_8b_ckpt train"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing outside the machine can be reached: fail fast
PY="${PYTHON:-python3}"
STATUS=()

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    date -u
    timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib.metadata as m, platform
names = ["torch", "transformers", "peft", "triton", "liger-kernel", "rich", "pyyaml", "datasets",
         "pyarrow", "fsspec", "huggingface-hub", "xxhash", "dill", "multiprocess"]  # datasets' needs too
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), *(f"{n} {version(n)}" for n in names))
EOF
} >>"$LOG" 2>&1

# step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, what is left of the budget);
# skipped when less than half its cap is left (it would likely time out; later, shorter steps
# may still fit), or when ONLY names other steps
step() {
    local name="$1" cap="$2"
    shift 2
    if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then
        STATUS+=("$name: not in ONLY")
        return
    fi
    local left=$((BUDGET - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30 || 2 * left < cap)); then
        STATUS+=("$name: skipped, ${left}s of the budget left")
        return
    fi
    echo "=== $name (timeout ${limit}s) $*" >>"$LOG"
    echo "=== $name (timeout ${limit}s, ${SECONDS}s in)"  # progress in the device call's output too
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    STATUS+=("$name: rc=$rc in $((SECONDS - start))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIMED OUT)')")
    summarize >/dev/null 2>&1  # after every step: a call killed later still brings back what ran
}

bench() {  # bench NAME CAP ARGS...: JSON to $PARTS/NAME.json (after every variant), table to the log
    local name="$1" cap="$2"
    shift 2
    step "$name" "$cap" bash -c 'out="$1" log="$2"; shift 2; "$0" -m lorakit bench --json-file "$out" "$@" >>"$log" 2>&1' \
        "$PY" "$PARTS/$name.json" "$LOG" "$@"
}

# summary.txt (the table to paste into docs/performance.md) and benches.json ({step name: `lorakit
# bench` result}, partial for a step cut short) from what has run so far
summarize() {
    {
        echo "steps (${SECONDS}s in all):"
        printf '  %s\n' "${STATUS[@]}"
        echo "--- kernels on CUDA"
        grep -E "min cosine|no CUDA" "$LOG" || echo "  (no kernel results)"
        echo "--- lorakit train on the GPU"
        grep -E "^train smoke:|^summary.json:" "$LOG" || echo "  (no train result)"
        echo "--- where a step goes (gpu_profile.py)"
        grep -E "^== (1b|8b)|^  by kind" "$LOG" || echo "  (no profile)"
        echo "--- pytest"
        grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$LOG" | tail -n 1
        shopt -s nullglob  # no bench result at all: the summary says each goal was not measured
        "$PY" scripts/gpu_summary.py "$PARTS"/bench_*.json
        shopt -u nullglob
    } >"$OUT/summary.txt.tmp" 2>&1; mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"  # a failed summary shows its error
    "$PY" - "$PARTS" "$OUT/benches.json" <<'EOF'
import json, os, pathlib, sys
parts, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
results = {}
for path in sorted(parts.glob("bench_*.json")):
    try:
        results[path.stem] = json.loads(path.read_text())
    except ValueError:
        results[path.stem] = {"error": "unreadable: " + path.read_text()[-500:]}
target.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
os.replace(target.with_suffix(".tmp"), target)
EOF
}

if [[ "$PLAN" == quick ]]; then
    # a re-measurement after a change (about 6 minutes; run with BUDGET=360 when ~7 minutes of
    # device time are left): the kernels, the 1b check and speed rows, the goals' checkpointed rows
    # (with lorakit-fullrecompute: the recompute skip's share), the trainer end to end, and where
    # a 1b step and an 8b checkpointed step go (profile.txt; trace.json.gz of the 1b step)
    step kernels 75 bash -c "\"$PY\" scripts/gpu_kernels.py --json \"$OUT/kernels.json\" >>\"$LOG\" 2>&1"
    bench bench_1b_check 135 --preset gpu-1b --check --check-steps 30 --variants lorakit,lorakit-unstacked,lorakit-directlaunch,lorakit-graphed,lorakit-native,peft,peft-bf16
    bench bench_1b_ckpt 65 --preset gpu-1b --grad-checkpointing --variants lorakit,lorakit-directlaunch,lorakit-fullrecompute,peft,peft-bf16 --steps 8 --warmup 3
    bench bench_1b_budget4 40 --preset gpu-1b --memory-budget 4.4 --variants lorakit,lorakit-directlaunch --steps 5 --warmup 2
    bench bench_8b_ckpt 75 --preset gpu-8b --grad-checkpointing --variants lorakit,lorakit-fullrecompute,peft --steps 5 --warmup 2
    step train 90 bash -c "\"$PY\" scripts/gpu_train_smoke.py /tmp/lorakit_train_smoke --steps 20 >>\"$LOG\" 2>&1"
    step profile 75 bash -c "\"$PY\" scripts/gpu_profile.py \"$OUT\" --cases 1b:lorakit,8b+ckpt:lorakit >>\"$LOG\" 2>&1"
else
    step kernels 75 bash -c "\"$PY\" scripts/gpu_kernels.py --json \"$OUT/kernels.json\" >>\"$LOG\" 2>&1"
    # the goals' benches first: a call cut short (or a budget set low for a rerun) keeps what matters most
    bench bench_1b_budget12 60 --preset gpu-1b --memory-budget 12 --variants lorakit,lorakit-native,peft-bf16 --steps 5 --warmup 2
    bench bench_1b_check 170 --preset gpu-1b --check --check-steps 50
    bench bench_1b_ckpt 110 --preset gpu-1b --grad-checkpointing --steps 5 --warmup 2
    bench bench_1b_budget4 40 --preset gpu-1b --memory-budget 4.4 --variants lorakit --steps 5 --warmup 2
    bench bench_8b_ckpt 170 --preset gpu-8b --grad-checkpointing --variants lorakit,lorakit-offload,peft,peft-liger --steps 5 --warmup 2
    step train 90 bash -c "\"$PY\" scripts/gpu_train_smoke.py /tmp/lorakit_train_smoke >>\"$LOG\" 2>&1"
    # the rest by importance: what the budget leaves out is skipped, and the summary says so
    bench bench_1b_prompt50 50 --preset gpu-1b --variants lorakit,peft-bf16 --prompt-fraction 0.5 --steps 5 --warmup 2
    bench bench_1b_packed 80 --preset gpu-1b --packing --max-doc-len 512 --variants lorakit,lorakit-perdoc,lorakit-4d,peft-bf16 --steps 5 --warmup 2
    bench bench_1b_chunk4096 60 --preset gpu-1b --variants lorakit --chunk-size 4096
    step pytest 120 bash -c "\"$PY\" -m pytest -o 'addopts=-q --import-mode=importlib' -x -p no:cacheprovider tests/kernels tests/lora -k \"not triton\" >>\"$LOG\" 2>&1"
fi
summarize
cat "$OUT/summary.txt"
