"""`lorakit recommend --model M --data D [--task T] [--gpu-memory 24GiB | --device cpu] [--output FILE.yaml]`:
a complete training config for your model, data and memory, with a reason for every value.

The guide's presets are the starting point (r by task, alpha = 2r, all seven projections);
the data's token counts, the model's size and the memory budget move them, and every departure
from the guide is named. `--output FILE.yaml` writes a config that `lorakit train FILE.yaml` runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.config import DATA_FORMATS, TASK_PRESETS


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--model", help="local folder, hub id, or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", action="extend", metavar="FILE", help="training data files (default: the built-in demo set)")
    p.add_argument("--eval-data", nargs="+", action="extend", metavar="FILE", help="evaluation data files (default: split off 5%%)")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS, help="data format")
    p.add_argument("--columns", nargs="+", default=[], metavar="FIELD=COLUMN",
                   help="your columns under lorakit's names, as train's --columns (written into the config)")
    p.add_argument("--task", default="domain", choices=list(TASK_PRESETS), help="the guide's preset to start from")
    p.add_argument("--gpu-memory", metavar="SIZE", help="plan for a GPU with this much memory, e.g. 24GiB")
    p.add_argument("--memory", metavar="SIZE", help="plan for CPU training with this much RAM (default: this machine's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="plan for this device (auto: the visible GPU, else CPU RAM)")
    p.add_argument("--output", metavar="FILE.yaml", help="write the config here (run it with `lorakit train FILE.yaml`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--run-output", metavar="DIR", help="the training run's output folder written into the config "
                                                       "(default: runs/<name of FILE.yaml>, or runs/lorakit)")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError, OutputError
    from lorakit.plan.recommend import make_budget, recommend
    from lorakit.safe_io import atomic_write_text, file_in_the_way, translate_os_errors

    if args.output and Path(args.output).suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--output {args.output} must end in .yaml or .yml")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise OutputError(f"--output {args.output} already exists; pass --overwrite to replace it, or choose another name")
    blocking = file_in_the_way(args.run_output) if args.run_output else None
    if blocking is not None:
        raise ConfigError(f"--run-output {args.run_output}: {blocking} is a file, where the run makes its folder; "
                          "choose another path, or leave the flag out")
    run_output = args.run_output or (f"runs/{Path(args.output).stem}" if args.output else "runs/lorakit")
    budget = make_budget(args.device, args.gpu_memory, args.memory)
    rec = recommend(args.model, args.data, args.task, budget, args.format, args.eval_data, run_output, args.columns)
    if args.output:
        with translate_os_errors(args.output):  # a new folder for it, as the other outputs get one
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, rec.yaml())
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
    else:
        _print(rec, args.output)
    return 0


def _print(rec, output: str | None) -> None:
    from rich.table import Table

    from lorakit.terminal import Console

    console = Console()
    d, m = rec.data, rec.model
    console.print(f"model: {m.name} ({m.params / 1e6:,.0f}M parameters)   plan for: {rec.budget.device}, "
                  f"{rec.budget.total_bytes / 2**30:.1f} GiB ({rec.budget.source})")
    held_out = f" ({d.held_out:,} more held out for eval)" if d.held_out else ""
    console.print(f"data: {d.examples:,} examples to train on{held_out} ({d.format}), {d.total_tokens:,} tokens, "
                  f"{d.trained_tokens:,} trained; "
                  f"length p50/p99/max {d.length_p50}/{d.length_p99}/{d.length_max}, "
                  f"response p50/p99 {d.response_p50}/{d.response_p99}")
    table = Table(title="recommended config", header_style="bold", show_lines=False)
    for column in ("parameter", "value", "reason"):
        table.add_column(column, overflow="fold")
    for choice in rec.choices:
        value = f"{choice.value:g}" if isinstance(choice.value, float) else str(choice.value)
        reason = f"[yellow]{choice.reason}[/yellow]" if choice.departs else choice.reason
        table.add_row(choice.key, value, reason)
    console.print(table)
    if rec.memory:
        console.print(f"predicted peak memory {rec.memory['predicted_peak_bytes'] / 2**30:.2f} GiB "
                      f"of {rec.memory['usable_bytes'] / 2**30:.2f} GiB usable (lorakit estimate --device "
                      f"{'cpu' if rec.budget.device == 'cpu' else 'cuda'})")
    departures = [c.key for c in rec.choices if c.departs]
    console.print(f"departs from the guide: {', '.join(departures)} (in yellow)" if departures
                  else "follows the guide's preset everywhere the guide has a rule")
    for note in rec.notes:
        console.print(f"[dim]{note}[/dim]")
    if output:
        console.print(f"written: {output}   run it with: lorakit train {output}")
