"""`lorakit sweep CONFIG.yaml --r 4,16,64 --alpha 2r,r,16 --targets qv,attention,all --max-steps N`:
short trainings over a grid of LoRA choices, each a normal run in OUTPUT/points/<point>/.

Alpha tokens: 2r, r, <k>r or a number. Targets tokens: lorakit target specs (all, attention,
mlp, qv, all-linear, names joined with +). Rerunning the same command resumes: finished points
are reused. Writes OUTPUT/sweep.json (every point's summary, the best point, the guide's point)
and OUTPUT/sweep.png (eval loss against trainable parameters, training time, peak memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli.placement import thread_count

    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("config_file", metavar="CONFIG.yaml", help="the base training config (e.g. from `lorakit recommend`)")
    p.add_argument("--r", default="4,16,64", help="ranks, comma-separated")
    p.add_argument("--alpha", default="2r", help="alphas: 2r, r, <k>r or numbers, comma-separated")
    p.add_argument("--targets", default="qv,all", help="target specs, comma-separated")
    p.add_argument("--rslora", default="off", choices=["off", "on", "both"], help="rsLoRA scaling")
    p.add_argument("--max-steps", type=int, help="optimizer steps per point (default: train.max_steps of the config)")
    p.add_argument("--output", metavar="DIR", help="sweep folder (default: runs/sweep-<config name>)")
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="CPU threads for torch in every point (default: the config's train.threads, else torch's "
                        "choice); a finished point is reused whatever its threads were")
    p.add_argument("--overwrite", action="store_true", help="retrain finished points whose settings changed, and stopped points from their start")
    p.add_argument("--json", action="store_true", help="print sweep.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.plan.sweep import make_grid, run_sweep, separate_names_note
    from lorakit.train.loop import stop_exit_code

    grid = make_grid(args.r, args.alpha, args.targets, args.rslora)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {args.max_steps}")
    output = args.output or f"runs/sweep-{Path(args.config_file).stem}"
    log = (lambda text: print(text, file=sys.stderr)) if args.json else print
    note = separate_names_note(grid.targets)
    if note:
        log(note)
    report = run_sweep(args.config_file, grid, args.max_steps, output, args.overwrite, log, args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, Path(output))
    if report["interrupted"]:
        again = "the same command" if not args.overwrite else "it without --overwrite (which starts a stopped point again)"
        print(f"sweep stopped by {report['interrupted']}; rerun {again} to continue", file=sys.stderr)
        return stop_exit_code(report["interrupted"])
    return 0


def print_report(report: dict, output: Path) -> None:
    from rich.table import Table

    from lorakit.terminal import Console

    from lorakit.plan.sweep import close_call_note, table_rows, uneven_speed_note

    console = Console()
    if not console.is_terminal:  # logs and files: no need to squeeze the table into 80 columns
        console.width = 160
    table = Table(title=f"sweep: {report['max_steps']} steps per point ({report['metric'].replace('_', ' ')})",
                  header_style="bold")
    for column in ("point", "r", "alpha", "scale", "targets", "params", "eval loss", "train loss", "time s",
                   "peak GiB", ""):
        table.add_column(column, justify="left" if column in ("point", "targets", "") else "right")
    for row in table_rows(report):
        table.add_row(row["point"], str(row["r"]), f"{row['alpha']:g}", f"{row['scale']:.3g}", row["targets"]
                      + (" rsLoRA" if row["rslora"] else ""), f"{row['trainable_params']:,}", _loss(row["eval_loss"]),
                      _loss(row["train_loss"]), f"{row['wall_seconds']:.0f}", f"{row['peak_memory_gib']:.2f}",
                      ", ".join(row["marks"]))
    console.print(table)
    guide = report["guide"]
    if guide["in_grid"]:
        console.print(f"guide's point (--task {guide['task']}: r={guide['r']}, alpha={guide['alpha']:g}, all): {guide['slug']}")
    else:
        console.print(f"the guide's point (--task {guide['task']}: r={guide['r']}, alpha={guide['alpha']:g}, targets all) "
                      "is not in this grid; add it to compare")
    if any(entry["summary"].get("device") == "cpu" for entry in report["points"]):
        console.print("peak GiB on a CPU: the process's resident set during the point, which moves by up to "
                      "~0.1 GiB between points with the C allocator alone; lorakit estimate compares ranks "
                      "without that noise")
    for note in (uneven_speed_note(report), close_call_note(report)):
        if note:
            console.print(f"[yellow]note:[/] {note}")
    plot = output / "sweep.png"  # not drawn for a sweep stopped part way
    best = "best so far" if report["pending"] else "best"
    console.print(f"{best}: {report['best']}   results: {output / 'sweep.json'}"
                  + (f"   plot: {plot}" if plot.is_file() else ""))
    if report["pending"]:
        stopped = report["pending"][0] if report["interrupted"] else None
        waiting = [slug for slug in report["pending"] if slug != stopped]
        console.print(", ".join(([f"stopped: {stopped} (goes on from its last checkpoint, if it reached one)"]
                                 if stopped else []) + ([f"not run yet: {', '.join(waiting)}"] if waiting else [])))


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"
