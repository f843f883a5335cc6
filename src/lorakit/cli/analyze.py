"""`lorakit analyze ADAPTER_DIR`: how much of its rank each module of a trained adapter uses.

    lorakit analyze runs/demo/adapter                   # tables, verdict, effective_rank.png
    lorakit analyze runs/demo/adapter --json            # everything, machine-readable
    lorakit analyze ADAPTER --energy 0.8,0.95 --heatmap rank.png --top 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.errors import ConfigError, OutputError

DESCRIPTION = """\
Singular values of every module's update s·BA, computed from the factors (no base model
needed), the rank holding 90% / 99% of the energy, the stable rank and the norm; a summary
per module type, a heatmap of the effective rank by layer, and a verdict on r:
k95 = the 95th percentile of the modules' rank at the first energy level; "oversized" when
the next power of two >= k95 (at least 4) is below r; "saturated" when k95 >= 3/4 of r and the
spectrum is flat (the median module's smallest singular value at least half its largest);
else "fits"; with a rank_pattern of several ranks, each rank's modules against their own
(docs/choosing-parameters.md)."""


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli import adapter_folder_arg

    p = subparsers.add_parser(name, help=help_text, description=DESCRIPTION)
    p.add_argument("adapter", type=adapter_folder_arg, metavar="ADAPTER_DIR", nargs="?",
                   help="adapter folder (adapter_config.json + adapter_model.safetensors), lorakit's or PEFT's, "
                        "or a training run's folder for its adapter")
    p.add_argument("--adapter", type=adapter_folder_arg, dest="adapter_flag", metavar="DIR",
                   help="the same, spelled as the other commands take it")
    p.add_argument("--energy", default="0.9,0.99",
                   help="energy levels, comma-separated fractions; the first drives the heatmap and verdict")
    heatmap = p.add_mutually_exclusive_group()
    heatmap.add_argument("--heatmap", type=Path, default=None,
                         help="where to write the PNG (default: effective_rank.png in the training run's folder, for "
                              "a run's adapter, else in ADAPTER_DIR)")
    heatmap.add_argument("--no-heatmap", action="store_true", help="do not write the heatmap")
    p.add_argument("--top", type=int, default=15, help="modules listed in the table (highest rank first)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickle adapter_model.bin (with torch.load(weights_only=True))")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=run)


def parse_energies(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--energy must be comma-separated fractions such as 0.9,0.99, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from lorakit.plan.analyze import analyze_adapter, plot_effective_rank

    args.adapter = _one_adapter(args)
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    target = None if args.no_heatmap else _heatmap_target(args)
    analysis = analyze_adapter(args.adapter, parse_energies(args.energy), allow_pickle=args.allow_pickle)
    if target is not None:
        try:
            analysis.heatmap = str(plot_effective_rank(analysis, target))
        except OutputError as exc:  # its fix names --output, which analyze does not have
            what = str(exc).rsplit(": ", 1)[0]
            raise OutputError(f"{what}: write the heatmap elsewhere with --heatmap PATH.png, or pass --no-heatmap") from None
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    else:
        print_report(analysis, args.top)
    return 0


def _one_adapter(args: argparse.Namespace) -> Path:
    if args.adapter == "":  # the flag's empty value is refused with the others' (cli.main)
        raise ConfigError("the adapter folder is empty; pass its path: lorakit analyze runs/NAME/adapter")
    if args.adapter is not None and args.adapter_flag is not None and args.adapter != args.adapter_flag:
        raise ConfigError(f"two adapters given ({args.adapter} and --adapter {args.adapter_flag}); analyze reads one")
    if args.adapter is None and args.adapter_flag is None:
        raise ConfigError("no adapter given; pass its folder: lorakit analyze runs/NAME/adapter")
    return args.adapter if args.adapter is not None else args.adapter_flag


def _default_heatmap(adapter: Path) -> Path:
    """A training run's adapter: its run folder, beside loss.png (the adapter folder stays what
    export and PEFT read); any other adapter: its own folder."""
    from lorakit.lora.adapter_folder import run_of

    return (run_of(adapter) or adapter) / "effective_rank.png"


def _heatmap_target(args: argparse.Namespace) -> Path:
    """Where the heatmap goes, checked before the analysis runs."""
    from lorakit.plan.analyze import HEATMAP_MAKER
    from lorakit.safe_io import figure_made_by

    target = args.heatmap or _default_heatmap(args.adapter)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--heatmap {target} must end in .png (it is a PNG image)")
    if target.exists() and not figure_made_by(target, HEATMAP_MAKER):  # the default path too: a file of the user's
        chosen = f"--heatmap {target}" if args.heatmap is not None else f"the heatmap's default path {target}"
        raise OutputError(f"{chosen} exists and is not a heatmap lorakit analyze wrote; choose another path "
                          "(--heatmap PATH), pass --no-heatmap, or delete the file first")
    return target


def print_report(analysis, top: int) -> None:
    from lorakit.terminal import Console

    console = Console()
    energy = analysis.energies[0]
    levels = [f"{e * 100:g}%" for e in analysis.energies]
    scaling = "alpha/sqrt(r) (rsLoRA)" if analysis.use_rslora else "alpha/r"
    console.print(f"[bold]{analysis.path}[/]: {len(analysis.modules)} modules, r={analysis.r}, "
                  f"alpha={analysis.lora_alpha:g}, scale {scaling}")
    for warning in analysis.warnings:
        console.print(f"[yellow]note:[/] {warning}")
    console.print(_modules_table(analysis, top, levels))
    console.print(_types_table(analysis, energy))
    if analysis.heatmap:
        console.print(f"heatmap: {analysis.heatmap}")
    style = {"saturated": "yellow", "oversized": "cyan", "untrained": "red"}.get(analysis.verdict.kind, "green")
    console.print(f"[bold {style}]verdict:[/] {analysis.verdict.message}")


def _modules_table(analysis, top: int, levels: list[str]):
    from rich.table import Table

    energy = analysis.energies[0]
    ranked = sorted(analysis.modules, key=lambda m: (-m.rank_at(energy), -m.frobenius_norm))
    shown = ranked[: max(0, top)]
    table = Table(title=f"top {len(shown)} of {len(ranked)} modules by rank at {levels[0]} energy")
    widest = max((len(_after_layer(m.name)) for m in shown), default=6)
    table.add_column("layer", justify="right")
    table.add_column("module", min_width=min(widest, 40))
    for column in ("r", *[f"rank@{lv}" for lv in levels], "stable rank", "‖ΔW‖_F"):
        table.add_column(column, justify="right")
    for m in shown:
        layer, suffix = ("-", m.name) if m.layer is None else (str(m.layer), _after_layer(m.name))
        ranks = [str(m.rank_at(e)) for e in analysis.energies]
        table.add_row(layer, suffix, str(m.r), *ranks, f"{m.stable_rank:.2f}", f"{m.frobenius_norm:.3g}")
    return table


def _after_layer(name: str) -> str:
    from lorakit.plan.analyze import parse_module_name

    return parse_module_name(name)[1]


def _types_table(analysis, energy: float):
    from rich.table import Table

    table = Table(title="by module type")
    level, pct = f"{energy:g}", f"{energy * 100:g}%"
    for column in ("type", "n", "r", f"mean rank@{pct}", f"max rank@{pct}", "stable rank", "‖ΔW‖_F"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for row in analysis.by_type():
        table.add_row(row["module_type"], str(row["modules"]), str(row["r"]), f"{row[f'mean_rank@{level}']:.1f}",
                      str(row[f"max_rank@{level}"]), f"{row['mean_stable_rank']:.2f}", f"{row['mean_frobenius_norm']:.3g}")
    return table
