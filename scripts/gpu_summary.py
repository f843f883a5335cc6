"""Short plain-text table of `lorakit bench --json` files (for gpu_check.sh; no rich needed).

    python3 scripts/gpu_summary.py out/bench_*.json

One block per file: the setting, the --check verdict, and per variant tokens/s, step time,
peak allocated / reserved memory, MFU and the ratios against PEFT (defaults) and PEFT-bf16,
followed by the PERF.md anchor for PEFT on the same shape where there is one. Last, issue 5's
GPU goals, each met / NOT met / not measured, from the files gpu_check.sh names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# PERF.md, one H200, transformers 5.17 + PEFT 0.21 (defaults), tokens/s and peak GiB
ANCHORS = {("gpu-1b", False): (36490, 35.5), ("gpu-1b", True): (26761, 16.8), ("gpu-8b", True): (6407, 23.4)}
HEADER = f"{'variant':<16}{'tok/s':>9}{'step ms':>9}{'alloc GiB':>10}{'resv GiB':>9}{'MFU':>7}" \
         f"{'x PEFT':>8}{'x bf16':>8}{'mem x PEFT':>11}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:<16}failed: {r['error'].splitlines()[-1][:100]}"
    alloc = r.get("peak_allocated_gib", r["peak_gib"])
    reserved = r.get("peak_reserved_gib")
    return (f"{r['variant']:<16}{r['tokens_per_s']:>9,.0f}{r['step_ms']:>9.0f}{alloc:>10.1f}"
            f"{'-' if reserved is None else f'{reserved:.1f}':>9}{100 * r['mfu']:>6.1f}%"
            f"{_ratio(r.get('speed_vs_peft')):>8}{_ratio(r.get('speed_vs_peft_bf16')):>8}"
            f"{_ratio(r.get('memory_vs_peft')):>11}")


def _budget(settings: dict) -> str:
    budget = settings.get("memory_budget_gib")
    return "" if budget is None else f"lorakit planned for {budget:g} GiB (--memory-budget), "


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
    lines += [f"note: {n}" for n in result.get("notices", [])]  # e.g. the --memory-budget plan's estimates
    lines += [f"note: {r['variant']}: {n}" for r in result["variants"] for n in r.get("notices", [])]
    anchor = ANCHORS.get((s["preset"], s["grad_checkpointing"]))
    # the anchors: every token trained, unpacked rows, the default loss chunk
    if anchor and not (s.get("prompt_fraction") or s.get("packing") or s.get("chunk_size")
                       or s.get("memory_budget_gib")):
        lines.append(f"(PERF.md anchor, PEFT defaults: {anchor[0]:,} tok/s, {anchor[1]} GiB)")
    return lines


# issue 5's GPU goals: (the bench files whose lorakit rows may meet it, lorakit's peak bound GiB,
# PEFT's file and row for the ratio, the ratio, PERF.md's figure for that PEFT setting); the 1b
# memory goal is absolute. The 1b speed goal takes any lorakit setting within 12 GiB: the one
# planned for the budget, or the default when it fits; the 1b memory goal any within 4.4 GiB:
# every layer checkpointed, or the layers the plan for a 4.4 GiB budget checkpoints
GOALS = {
    "1b speed": (("bench_1b_budget12", "bench_1b_check"), 12.0, ("bench_1b_check", "peft"), 2.5, 36490),
    "1b memory": (("bench_1b_ckpt", "bench_1b_budget4"), 4.4, None, None, None),
    "8b": (("bench_8b_ckpt",), 17.8, ("bench_8b_ckpt", "peft"), 2.0, 6407),
}
MEMORY_GOAL_TOKENS = 60000.0
LORAKIT_ROWS = ("lorakit", "lorakit-native", "lorakit-offload")


def goal_lines(results: dict[str, dict]) -> list[str]:
    """Issue 5's GPU goals against the run's bench results ({file stem: result}): each met,
    NOT met or not measured, with the fastest lorakit row within the memory bound."""
    lines = ["--- issue 5's GPU goals"]
    for goal, spec in GOALS.items():
        lines.append(f"{goal}: {_goal_verdict(results, *spec)}")
    return lines + _function_lines((results.get("bench_1b_check") or {}).get("check"))


def _goal_verdict(results, stems, peak_bound, peft_row, ratio, anchor) -> str:
    if not any(stem in results for stem in stems):
        return f"not measured (no {' or '.join(stems)} result)"
    lorakit = [{**r, "variant": f"{r['variant']} ({stem})"} for stem in stems for name in LORAKIT_ROWS
               if (r := _measured(results.get(stem), name)) is not None]
    if not lorakit:  # failed, out of memory or cut short: nothing says whether the goal holds
        return f"not measured (no lorakit row of {' or '.join(s for s in stems if s in results)} ran to the end)"
    within = [r for r in lorakit if r["peak_gib"] <= peak_bound]
    if not within:
        seen = ", ".join(f"{r['variant']} {r['peak_gib']:.1f} GiB" for r in lorakit)
        return f"NOT met: no lorakit row within {peak_bound:g} GiB ({seen})"
    best = max(within, key=lambda r: r["tokens_per_s"])
    targets = _targets(results, peft_row, ratio, anchor)
    # met only against every figure there is: this run's PEFT and PERF.md's
    verdict = "met" if all(best["tokens_per_s"] >= t for t, _ in targets) else "NOT met"
    needs = "; ".join(f">= {t:,.0f} tok/s ({why})" for t, why in targets)
    return (f"{verdict}: {best['variant']} {best['tokens_per_s']:,.0f} tok/s at {best['peak_gib']:.1f} GiB "
            f"(needs {needs}; <= {peak_bound:g} GiB)")


def _targets(results, peft_row, ratio, anchor) -> list[tuple[float, str]]:
    if peft_row is None:
        return [(MEMORY_GOAL_TOKENS, "the goal's figure")]
    stem, variant = peft_row
    targets = [(ratio * anchor, f"{ratio:g}x PERF.md's {anchor:,}")]
    peft = _measured(results.get(stem), variant)
    if peft is not None:
        targets.append((ratio * peft["tokens_per_s"], f"{ratio:g}x this run's {variant} in {stem}"))
    return targets


def _function_lines(check: dict | None) -> list[str]:
    """The bf16 check's own verdict (against an fp32 reference), and the issue's literal one."""
    if not check or "error" in check:
        return ["same function (1b --check): not measured" + (f" ({check['error']})" if check else "")]
    line = f"same function (1b --check, {check['steps']} steps): {'met' if check['passed'] else 'NOT met'}"
    ref = check.get("reference")
    if ref:
        cos, rel = ref["min_grad_cosine"], ref["max_loss_rel_diff"]
        line += (f" against the {ref['matmul']} reference: gradient cosine lorakit {cos['lorakit']:.5f}, "
                 f"PEFT {cos['peft']:.5f}; loss drift lorakit {rel['lorakit']:.1e}, PEFT {rel['peft']:.1e}")
    literal = check["min_grad_cosine"] >= 0.999
    return [line, f"  in the issue's words, lorakit against PEFT directly: min gradient cosine "
                  f"{check['min_grad_cosine']:.5f} ({'at least' if literal else 'below'} 0.999), loss curves "
                  f"at most {check['max_loss_rel_diff']:.1e} apart"]


def _measured(result: dict | None, variant: str) -> dict | None:
    rows = [r for r in (result or {}).get("variants", []) if r["variant"] == variant and "error" not in r]
    return rows[0] if rows else None


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(paths: list[str]) -> int:
    for path in paths:
        print("\n".join(summarize(path)))
    results = {Path(path).stem: _load(path) for path in paths}
    print("\n".join(goal_lines({k: v for k, v in results.items() if v is not None})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
