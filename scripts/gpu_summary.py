"""Short plain-text table of `lorakit bench --json` files (for gpu_check.sh; no rich needed).

    python3 scripts/gpu_summary.py out/bench_*.json

One block per file: the setting, the --check verdict, and per variant tokens/s, step time,
peak allocated / reserved memory, MFU and the ratios against PEFT (defaults) and PEFT-bf16,
followed by the PERF.md anchor for PEFT on the same shape where there is one.
"""

from __future__ import annotations

import json
import sys

# PERF.md, one H200, transformers 5.17 + PEFT 0.21 (defaults), tokens/s and peak GiB
ANCHORS = {("gpu-1b", False): (36490, 35.5), ("gpu-1b", True): (26761, 16.8), ("gpu-8b", True): (6407, 23.4)}
HEADER = f"{'variant':<14}{'tok/s':>9}{'step ms':>9}{'alloc GiB':>10}{'resv GiB':>9}{'MFU':>7}" \
         f"{'x PEFT':>8}{'x bf16':>8}{'mem x PEFT':>11}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:<14}failed: {r['error'].splitlines()[-1][:100]}"
    alloc = r.get("peak_allocated_gib", r["peak_gib"])
    reserved = r.get("peak_reserved_gib")
    return (f"{r['variant']:<14}{r['tokens_per_s']:>9,.0f}{r['step_ms']:>9.0f}{alloc:>10.1f}"
            f"{'-' if reserved is None else f'{reserved:.1f}':>9}{100 * r['mfu']:>6.1f}%"
            f"{_ratio(r.get('speed_vs_peft')):>8}{_ratio(r.get('speed_vs_peft_bf16')):>8}"
            f"{_ratio(r.get('memory_vs_peft')):>11}")


def _budget(settings: dict) -> str:
    budget = settings.get("memory_budget_gib")
    return "" if budget is None else f"lorakit within {budget:g} GiB (--memory-budget), "


def _check_lines(check: dict) -> list[str]:
    verdict = "PASSED" if check["passed"] else "FAILED"
    if "error" in check:
        return [f"check FAILED: {check['error']}"]
    lines = [f"check {verdict}: vs PEFT min grad cosine {check['min_grad_cosine']:.5f} "
             f"({check['worst_tensor']}), max loss rel diff {check['max_loss_rel_diff']:.1e} "
             f"over {check['steps']} steps"]
    ref = check.get("reference")
    if ref:
        cos, rel = ref["min_grad_cosine"], ref["max_loss_rel_diff"]
        lines.append(f"  vs {ref['matmul']} reference: grad cosine lorakit {cos['lorakit']:.5f} / PEFT "
                     f"{cos['peft']:.5f} (bound {ref['cosine_bound']:.5f}), loss rel diff lorakit "
                     f"{rel['lorakit']:.1e} / PEFT {rel['peft']:.1e} (bound {ref['loss_bound']:.1e})")
    return lines


def summarize(path: str) -> list[str]:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"== {path}: no result ({exc.__class__.__name__})"]
    s = result["settings"]
    lines = [f"== {s['preset']}, batch {s['batch']} x {s['seq_len']}, grad ckpt "
             f"{'on' if s['grad_checkpointing'] else 'off'}, chunk {s.get('chunk_size') or 'default'}, "
             f"{100 * result.get('labelled_fraction', 1.0):.0f}% labelled, "
             f"{_budget(s)}peak {result['peak']['tflops']:.3g} TFLOP/s, "
             f"{result['environment'].get('gpu', result['environment']['cpu'])}"]
    check = result.get("check")
    if check:
        lines += _check_lines(check)
    lines += [HEADER] + [_row(r) for r in result["variants"]]
    lines += [f"note: {r['variant']}: {n}" for r in result["variants"] for n in r.get("notices", [])]
    anchor = ANCHORS.get((s["preset"], s["grad_checkpointing"]))
    # the anchors: every token trained, unpacked rows, the default loss chunk
    if anchor and not (s.get("prompt_fraction") or s.get("packing") or s.get("chunk_size")
                       or s.get("memory_budget_gib")):
        lines.append(f"(PERF.md anchor, PEFT defaults: {anchor[0]:,} tok/s, {anchor[1]} GiB)")
    return lines


def main(paths: list[str]) -> int:
    for path in paths:
        print("\n".join(summarize(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
