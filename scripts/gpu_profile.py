"""Where a bench variant's GPU step goes: torch.profiler over a few steps of `lorakit bench`'s
variants (the same models, inputs and optimizers), one block per case.

    PYTHONPATH=src python3 scripts/gpu_profile.py OUT_DIR [--cases 1b:lorakit,1b:peft-bf16,...]

A case is PRESET[+ckpt|+budgetN]:VARIANT (1b = gpu-1b, 8b = gpu-8b). Per case: the median wall
time of 3 unprofiled steps, then 3 profiled steps: GPU busy time (the sum of kernel durations)
against wall time (a gap means the GPU waits for the CPU: launch overhead, syncs), and the
kernels taking most GPU time, grouped by kind (GEMM, attention, Triton, elementwise, other).
Writes OUT_DIR/profile.txt and, for the first case, OUT_DIR/trace.json.gz (chrome://tracing).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from lorakit import bench, bench_inputs, bench_variants

DEFAULT_CASES = "1b:lorakit,1b:peft-bf16,1b+budget12:lorakit,1b+ckpt:lorakit,8b+ckpt:lorakit"
KINDS = [("gemm", ("gemm", "sm90_", "cutlass", "cublas", "nvjet", "xmma", "ampere_", "splitk")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("triton", ("triton_", "_rms_norm_", "_swiglu_", "_rope_", "_cross_entropy_rows_")),  # Inductor's, then triton_ops' kernels
         ("elementwise", ("elementwise", "vectorized", "reduce", "copy", "fill", "unrolled", "index", "cat"))]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KINDS if any(m in low for m in marks)), "other")


def parse_case(text: str) -> tuple[bench.BenchSettings, str]:
    shape, variant = text.split(":")
    preset, *options = shape.split("+")
    if not torch.cuda.is_available():  # a rehearsal of this script on a CPU: the tiny shape
        settings = bench.BenchSettings(preset="tiny", device="cpu", variants=[variant], steps=1, warmup=0)
    else:
        settings = bench.BenchSettings(preset={"1b": "gpu-1b", "8b": "gpu-8b"}[preset], variants=[variant],
                                       steps=1, warmup=0)
    for option in options:
        if option == "ckpt":
            settings.grad_checkpointing = True
        elif option.startswith("budget"):
            settings.memory_budget_gib = float(option[len("budget"):])
    return settings, variant


def profile_case(text: str, out: Path, trace: bool) -> list[str]:
    settings, variant = parse_case(text)
    plan = bench.resolve(settings)
    prepared = bench_variants.prepare_variant(variant, plan)
    batch = bench_inputs.make_inputs(plan)[prepared.inputs_key]
    for _ in range(3):
        bench.train_step(prepared, batch, plan.device)
    walls = [bench.train_step(prepared, batch, plan.device)[0] for _ in range(3)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if plan.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(3):
            bench.train_step(prepared, batch, plan.device)
        profiled_wall = (time.perf_counter() - start) / 3
    if trace:
        raw = out / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    lines = _report(text, plan, walls, profiled_wall, prof)
    del prepared
    bench.release_cuda()
    return lines


def _report(text, plan, walls, profiled_wall, prof) -> list[str]:
    per_kernel, per_kind, launches = defaultdict(float), defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us() / 3
        per_kernel[event.name] += us
        launches[event.name] += 1
        per_kind[kind_of(event.name)] += us
    busy_ms = sum(per_kernel.values()) / 1000
    wall_ms = 1000 * statistics.median(walls)
    lines = [f"== {text}: wall {wall_ms:.1f} ms/step (profiled {1000 * profiled_wall:.1f}), GPU busy "
             f"{busy_ms:.1f} ms ({100 * busy_ms / wall_ms:.0f}% of wall), {sum(launches.values()) // 3} kernels/step, "
             f"peak alloc {_peak_gib():.2f} GiB, checkpointed layers "
             f"{plan.checkpoint_layers or ('all' if plan.settings.grad_checkpointing else 0)}",
             "  by kind: " + ", ".join(f"{k} {v / 1000:.1f} ms" for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1]))]
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:28]:
        lines.append(f"  {us / 1000:8.2f} ms {launches[name] // 3:5d}x  {kind_of(name):<11} {name[:150]}")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    return lines + ["  -- ops by self GPU time (3 steps)", table]


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "profile.txt"
    report.write_text("")
    for i, case in enumerate(args.cases.split(",")):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            lines = profile_case(case, args.out, trace=i == 0)
        except Exception as exc:  # one case failing leaves the others' results
            lines = [f"== {case}: failed: {exc.__class__.__name__}: {str(exc)[:300]}"]
            bench.release_cuda()
        text = "\n".join(lines)
        print(text.split("  -- ops")[0], flush=True)
        with report.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
