"""`lorakit bench`: speed, memory and MFU of lorakit against PEFT on the same model and inputs.

    lorakit bench                                   # CPU, SmolLM2-135M shape, batch 4 x 256
    lorakit bench --preset gpu-1b --check           # H200: Llama-3.2-1B shape, correctness too
    lorakit bench --preset gpu-8b --grad-checkpointing --json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

from lorakit.config import dtype_name
from lorakit.values import parse_gib
from lorakit.errors import ConfigError

DESCRIPTION = """\
Train a few steps of the same random-initialised Llama-shaped model with lorakit (fused
LoRA blocks, chunked lm_head + cross-entropy) and with PEFT (defaults; bf16 adapters on GPU;
PEFT + Liger when liger-kernel is installed), on the same seeded inputs, and report the median
step time, tokens/s, peak memory, MFU and the ratios against PEFT. Presets: cpu (SmolLM2-135M
shape, fp32, 4 x 256), gpu-1b (Llama-3.2-1B shape, bf16, 4 x 2048), gpu-8b (Llama-3.1-8B shape,
bf16, 2 x 2048), tiny (a 2-layer smoke test). On CPU every variant runs in its own process
(peak RSS never goes down); on GPU all run in one process with the allocator reset between.
--check also compares step-1 adapter gradients and the loss curve against PEFT from identical
weights (fp32: cosine >= 0.999, losses within 1e-3; bf16: lorakit must be about as close to an
fp32 copy of the model as PEFT is, since bf16 rounding alone moves both further). On CPU the
variants' child processes take their steps in turn (a shared machine's load then hits them
alike); --sequential runs them one after the other. Method and numbers: docs/performance.md."""


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.bench_settings import PRESETS
    from lorakit.bench_table import VARIANTS

    p = subparsers.add_parser(name, help=help_text, description=DESCRIPTION)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model shape, batch and device")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r) on all 7 projections")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="dropout on every adapter's input, in every variant (default 0)")
    p.add_argument("--batch", type=int, help="rows per step (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing, every variant")
    p.add_argument("--packing", action="store_true",
                   help="variable-length examples: lorakit packed (the trainer's batches), PEFT padded")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--variants", type=_variant_list, metavar="LIST",
                   help=f"comma-separated, from {','.join(VARIANTS)} (default: lorakit and the PEFT ones that apply)")
    p.add_argument("--check", action="store_true", help="gradient cosine and loss curve against PEFT")
    p.add_argument("--check-steps", type=int, default=5, help="loss-curve steps of --check")
    p.add_argument("--peak-tflops", type=float, help="matmul peak for MFU (default: measured in this run)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--sequential", dest="interleave", action="store_false", default=None,
                   help="CPU: time each variant's child process alone, one after the other (for a quiet "
                        "machine). Default on CPU: all children built first, then taking their steps in turn, "
                        "so a shared machine's load hits them alike")
    order.add_argument("--interleave", dest="interleave", action="store_true",
                   help="the CPU default (kept for scripts)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the preset's device")
    p.add_argument("--dtype", type=_bench_dtype, metavar="{bf16,fp32}",
                   help="weights dtype for every variant (default: the preset's: bf16 on a GPU, fp32 on the CPU; "
                        "bfloat16 on a CPU with native bf16 is what `lorakit train` picks there)")
    p.add_argument("--chunk-size", type=int,
                   help="tokens per lm_head + loss chunk (lorakit; default: 128 MiB of fp32 logits per chunk, "
                        "256 MiB for an fp32 head on the CPU)")
    p.add_argument("--max-doc-len", type=int, metavar="N",
                   help="with --packing: examples N/8 to N tokens long, several per row (default: the sequence length)")
    p.add_argument("--prompt-fraction", type=float, default=0.0, metavar="F",
                   help="the first F of each example is prompt, without labels, as in instruction data "
                        "(default 0: every token is trained)")
    p.add_argument("--memory-budget", metavar="GIB",
                   help="lorakit variants checkpoint the fewest earliest layers that the memory estimate says "
                        "fit this many GiB (or a size: 8GiB, 512MiB), as `lorakit train --memory-budget` plans it "
                        "(PEFT variants as they are)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--json-file", metavar="PATH",
                   help="also write the results as JSON to PATH, rewritten after each variant, so a run stopped "
                        "part way keeps the rows it measured")
    p.set_defaults(func=run)


def _bench_dtype(text: str) -> str:
    """argparse's choices would name the converted value ('float16' for fp16) in their error."""
    from lorakit.bench_settings import DTYPES

    name = dtype_name(text)
    if name not in DTYPES:
        why = " (float16 training needs loss scaling, which no variant has)" if name == "float16" else ""
        raise argparse.ArgumentTypeError(f"{text!r}: the bench measures bf16 or fp32{why}")
    return name


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")] if text.strip() else []  # none: named as empty later
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; write names like lorakit,peft")
    return names


def bench_settings(args: argparse.Namespace):
    from lorakit.bench import BenchSettings

    return BenchSettings(
        preset=args.preset, r=args.r, dropout=args.dropout, batch=args.batch, seq_len=args.seq_len, layers=args.layers,
        grad_checkpointing=args.grad_checkpointing, packing=args.packing, steps=args.steps, warmup=args.warmup,
        variants=args.variants, check=args.check, check_steps=args.check_steps, peak_tflops=args.peak_tflops,
        threads=args.threads, interleave=args.interleave, device=args.device,
        chunk_size=args.chunk_size, prompt_fraction=args.prompt_fraction, max_doc_len=args.max_doc_len,
        memory_budget_gib=None if args.memory_budget is None else parse_gib(args.memory_budget, "--memory-budget"),
        dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    from lorakit.bench import run_bench

    settings = bench_settings(args)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, every step
    write_file = None
    if args.json_file:
        write_file = functools.partial(_write_json_file, _checked_json_file(args.json_file))
    result = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True), partial=write_file)
    if write_file is not None:
        write_file(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_report(result)
    check = result["check"]
    if all("error" in row for row in result["variants"]):  # nothing was measured (a shape no variant could run)
        print("bench: every variant failed (above); nothing was measured", file=sys.stderr)
        return 1
    return 1 if check is not None and not check["passed"] else 0


def _checked_json_file(path: str) -> Path:
    """--json-file's path, checked before anything is measured."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json-file {path} is a folder; give a file name such as {target / 'bench.json'}")
    if target.parent.exists() and not target.parent.is_dir():
        raise ConfigError(f"--json-file {path}: {target.parent} is a file, not a folder; choose another path")
    if not target.parent.is_dir():
        raise ConfigError(f"--json-file {path}: the folder {target.parent} does not exist; create it first")
    # an earlier bench's result (or an empty file, as mktemp makes) is replaced, nothing else
    if target.exists() and target.stat().st_size and not _is_bench_result(target):
        raise ConfigError(f"--json-file {path} exists and is not a lorakit bench result; choose another file name")
    return target


def _is_bench_result(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"environment", "settings", "variants"} <= set(data)


def _write_json_file(path: Path, result: dict) -> None:
    from lorakit.safe_io import atomic_write_json

    atomic_write_json(path, result, fix="choose another --json-file")


def _print_report(result: dict) -> None:
    env, s, flops = result["environment"], result["settings"], result["flops"]
    hardware = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads, load {env['load_average']}"
    print(f"{result['environment']['date']}  {hardware}")
    print(f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"lorakit {env['lorakit']}, liger-kernel {env['liger_kernel']}")
    lora = f"r={s['r']}" + (f", dropout {s['dropout']:g}" if s.get("dropout") else "")
    print(f"{s['preset']}: {s['layers']} layers, batch {s['batch']} x {s['seq_len']}, {result['dtype']}, {lora}, "
          f"grad ckpt {'on' if s['grad_checkpointing'] else 'off'}, packing {'on' if s['packing'] else 'off'}; "
          f"{result['tokens_per_step']} real tokens per step ({100 * result['labelled_fraction']:.0f}% labelled), "
          f"median of {s['steps']} steps "
          f"after {s['warmup']} warm-up{', interleaved' if s['interleave'] else ''}")
    print(f"F = {flops['per_token'] / 1e9:.3f} GFLOP/token (N_mm {flops['n_mm'] / 1e6:.1f}M, "
          f"N_lora {flops['n_lora'] / 1e6:.2f}M, s {flops['context']:.0f}); "
          f"peak {result['peak']['tflops']:.2f} TFLOP/s ({result['peak']['source']})")
    print(result["memory_note"])
    gemms = {r["variant"]: r["cpu_gemm"] for r in result["variants"] if r.get("cpu_gemm")}
    if gemms:  # kernels/cpu_gemm.py: what each variant's steps ran
        print("frozen-weight GEMMs: " + ", ".join(f"{name} {backend}" for name, backend in gemms.items()))
    variant_notices = [f"{r['variant']}: {n}" for r in result["variants"] for n in r.get("notices", [])]
    for notice in result["notices"] + variant_notices:
        print(f"note: {notice}")
    if result["check"] is not None:
        print(_check_line(result["check"]))
    _print_table(result)


def _check_line(check: dict) -> str:
    if "error" in check:
        return f"check FAILED: it did not run to the end ({check['error']})"
    verdict = "PASSED" if check["passed"] else "FAILED"
    against_peft = (f"min step-1 gradient cosine {check['min_grad_cosine']:.6f} over {check['tensors']} "
                    f"adapter tensors (worst {check['worst_tensor']}), max loss relative difference "
                    f"{check['max_loss_rel_diff']:.2e} over {check['steps']} steps")
    ref = check.get("reference")
    if ref is None:
        return (f"check {verdict}: {against_peft} (needs cosine >= {check['min_cosine_required']}, "
                f"loss within {check['loss_tolerance']:.0e})")
    cos, rel = ref["min_grad_cosine"], ref["max_loss_rel_diff"]
    return (f"check {verdict}: lorakit vs PEFT {against_peft}.\n"
            f"  against the {ref['matmul']} reference: gradient cosine lorakit {cos['lorakit']:.6f}, PEFT "
            f"{cos['peft']:.6f} (lorakit needs >= {ref['cosine_bound']:.6f}); loss relative difference "
            f"lorakit {rel['lorakit']:.2e}, PEFT {rel['peft']:.2e} (lorakit needs <= {ref['loss_bound']:.2e})")


COLUMNS = ["variant", "step ms", "min ms", "cpu ms", "faults", "tok/s", "peak GiB", "saved GiB", "MFU",
           "x PEFT", "x PEFT cpu", "x PEFT-bf16", "mem x PEFT", "loss first/last"]


def _cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["variant"], "failed: " + row["error"].splitlines()[-1]] + [""] * (len(COLUMNS) - 2)

    def ratio(key):
        return "-" if row.get(key) is None else f"{row[key]:.2f}"

    saved = "-" if row["saved_gib"] is None else f"{row['saved_gib']:.3f}"
    faults = "-" if row.get("page_faults") is None else f"{row['page_faults'] / 1e3:,.0f}k"
    return [row["variant"], f"{row['step_ms']:.0f}", f"{row['min_step_ms']:.0f}", f"{row['cpu_ms']:.0f}", faults,
            f"{row['tokens_per_s']:,.0f}", f"{row['peak_gib']:.2f}", saved, f"{100 * row['mfu']:.1f}%",
            ratio("speed_vs_peft"), ratio("cpu_speed_vs_peft"), ratio("speed_vs_peft_bf16"),
            ratio("memory_vs_peft"), f"{row['first_loss']:.3f}/{row['last_loss']:.3f}"]


def _print_table(result: dict) -> None:
    rows = [_cells(r) for r in result["variants"]]
    try:
        from rich.table import Table

        from lorakit.terminal import Console
    except ImportError:  # the GPU machine may lack rich: plain columns
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        for line in [COLUMNS, *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        return
    table = Table(title="lorakit bench (x PEFT: tokens/s ratio; mem x PEFT: peak memory ratio)")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    Console(width=200).print(table)
