"""Short trainings over a grid of rank, alpha, targets (and rsLoRA), to measure what they buy.

    CONFIG.yaml ─► for each point (r, alpha, targets, rslora) of the grid:
                     DIR/points/<slug>/   a normal training run (train.run.prepare + Session),
                                          with the point's LoRA values and --max-steps
    then         ─► DIR/sweep.json        grid, every point's summary, the best point, the guide's
                    DIR/sweep.png         eval loss against trainable parameters, training time
                                          and peak memory

Resuming: a point whose folder holds summary.json (written last by every run) and the same
requested config (point.json) is reused, not retrained; a point stopped or killed half-way has
no summary.json and goes on from its newest checkpoint (the stop's own, or one of
--save-every's), to the result of an uninterrupted run, or trains again from its start when it
has none. A finished point whose config differs (another
--max-steps, another base config) is never silently replaced: the sweep stops and asks for
--overwrite or another --output.

Peak memory is per point: the CUDA allocator's peak is reset before each point, and on Linux
the process's resident-set high-water mark is reset through /proc/self/clear_refs (so CPU
figures are the whole process, base model included, during that point); a resumed point's
also counts the run before its stop (saved with its checkpoint).

Alpha tokens: `2r` (any `<k>r`), `r`, or a number. Targets tokens: any lorakit target spec
(all, attention, mlp, qv, all-linear, a module name); join names with `+` (q_proj+v_proj).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lorakit import host
from lorakit.config import TASK_PRESETS, RunConfig, load_yaml, resolve
from lorakit.errors import ConfigError, OutputError
from lorakit.lora.config import lora_scale

GUIDE_TARGETS = ("all", "all-linear")  # on Llama-style models both are the seven projections
_ALPHA = re.compile(r"^(\d+(?:\.\d+)?)?r$")


@dataclass(frozen=True)
class SweepPoint:
    r: int
    alpha: float
    targets: str
    rslora: bool = False

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, "rslora" if self.rslora else "standard")

    @property
    def slug(self) -> str:
        """A folder name: r16-a32-all, r64-a128-q_proj_v_proj-rslora."""
        clean = re.sub(r"[^A-Za-z0-9_-]+", "_", self.targets).strip("_")[:40] or "targets"
        if clean != self.targets:  # keep two specs that clean to the same text apart
            clean += "-" + hashlib.sha256(self.targets.encode()).hexdigest()[:6]
        alpha = f"{self.alpha:g}" if float(f"{self.alpha:g}") == self.alpha else repr(self.alpha)  # 16 vs 16.0000001
        return f"r{self.r}-a{alpha}-{clean}" + ("-rslora" if self.rslora else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": self.scale, "slug": self.slug}


@dataclass
class Grid:
    ranks: list[int]
    alphas: list[str]
    targets: list[str]
    rslora: list[bool]

    def points(self) -> list[SweepPoint]:
        """Every combination in flag order, duplicates (e.g. alpha 2r and 32 at r=16) once."""
        seen: dict[tuple, SweepPoint] = {}
        for targets in self.targets:
            for r in self.ranks:
                for token in self.alphas:
                    for rs in self.rslora:
                        point = SweepPoint(r, alpha_for(token, r), targets, rs)
                        seen.setdefault((point.r, point.alpha, point.targets, point.rslora), point)
        return list(seen.values())

    def to_dict(self) -> dict:
        return asdict(self)


# ---- parsing the grid flags ------------------------------------------------------------------

_LIST_EXAMPLES = {"--r": "4,16,64", "--alpha": "2r,r,16", "--targets": "qv,attention,all"}


def _tokens(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{flag} {text!r} has an empty entry; write a comma-separated list like "
                          f"{flag} {_LIST_EXAMPLES[flag]}")
    return items


def parse_ranks(text: str) -> list[int]:
    ranks = []
    for token in _tokens(text, "--r"):
        if not token.isdigit() or int(token) < 1:
            raise ConfigError(f"--r: {token!r} is not a positive integer rank; write e.g. --r 4,16,64")
        ranks.append(int(token))
    return ranks


def parse_alphas(text: str) -> list[str]:
    tokens = _tokens(text, "--alpha")
    for token in tokens:
        alpha_for(token, 1)
    return tokens


def alpha_for(token: str, r: int) -> float:
    """`2r` -> 2 * r, `r` -> r, `16` -> 16."""
    match = _ALPHA.match(token)
    if match:
        return float(match.group(1) or 1) * r
    try:
        value = float(token)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--alpha: {token!r} is not an alpha; use 2r, r, <k>r, or a positive number like 16")
    return value


def parse_targets(text: str) -> list[str]:
    """`qv,all,q_proj+v_proj`: one target spec per comma, names joined by `+` within one."""
    specs = []
    for token in _tokens(text, "--targets"):
        names = token.split("+")
        if not all(name.strip() for name in names):
            raise ConfigError(f"--targets: {token!r} has an empty name around '+'; join names like q_proj+v_proj")
        specs.append(",".join(name.strip() for name in names))
    return specs


def separate_names_note(specs: list[str]) -> str | None:
    """`--targets q_proj,v_proj` makes two points here, while train reads it as one set of modules:
    said when every spec is one module name, the likely slip."""
    from lorakit.lora.targets import GROUPS

    names = [spec for spec in specs if re.fullmatch(r"[\w.]+", spec) and spec not in (*GROUPS, "all-linear")]
    if len(specs) < 2 or len(names) < len(specs):
        return None
    return (f"sweep: --targets {','.join(specs)} makes {len(specs)} points, one module name each; for one point "
            f"that adapts them together, join them with '+': --targets {'+'.join(specs)}")


def parse_rslora(text: str) -> list[bool]:
    choices = {"off": [False], "on": [True], "both": [False, True]}
    if text not in choices:
        raise ConfigError(f"--rslora must be off, on or both, got {text!r}")
    return choices[text]


def make_grid(r: str, alpha: str, targets: str, rslora: str = "off") -> Grid:
    return Grid(parse_ranks(r), parse_alphas(alpha), parse_targets(targets), parse_rslora(rslora))


# ---- one point -------------------------------------------------------------------------------

def base_values(config_path: str | Path) -> dict[str, dict]:
    """The YAML's values; the sweep needs its data named (no silent demo fallback)."""
    values = load_yaml(config_path)
    if not values.get("data", {}).get("data"):
        raise ConfigError(f"{config_path} names no training data; add `data: {{data: [FILE.jsonl]}}` "
                          "(`lorakit recommend --output FILE.yaml` writes a complete config)")
    return values


def point_config(values: dict[str, dict], point: SweepPoint, max_steps: int, folder: Path,
                 threads: int | None = None) -> RunConfig:
    """The YAML's config with the point's LoRA values, --max-steps, --threads and the point's folder."""
    merged = {section: dict(entries) for section, entries in values.items()}
    merged.setdefault("lora", {}).update(r=point.r, alpha=point.alpha, targets=point.targets, rslora=point.rslora)
    merged.setdefault("train", {})["max_steps"] = max_steps
    if threads is not None:
        merged["train"]["threads"] = threads
    merged.setdefault("output", {}).update(output=str(folder), resume=False, overwrite=False, dry_run=False)
    return resolve(merged, {})


def requested(config: RunConfig) -> dict:
    """What decides a point's result: everything but the output section and the CPU threads."""
    return _decisive(config.to_dict())


def _decisive(settings: dict) -> dict:
    """A point's settings less where and how fast it ran (a point.json of an older lorakit holds
    the threads too): a sweep rerun with other --threads reuses its finished points."""
    kept = {k: v for k, v in settings.items() if k != "output"}
    if isinstance(kept.get("train"), dict):
        kept["train"] = {k: v for k, v in kept["train"].items() if k != "threads"}
    return kept


def finished_summary(folder: Path, config: RunConfig, overwrite: bool) -> dict | None:
    """The saved summary when this exact point already finished; None when it must (re)train."""
    from lorakit.train.saved_run import read_summary

    summary, marker = folder / "summary.json", folder / "point.json"
    if not summary.is_file():
        return None
    saved, result = _json_or_none(marker), read_summary(summary)
    if result is None or (marker.is_file() and saved is None):  # damaged (a kill, a full disk, an edit): train again
        return None
    if saved is not None and _decisive(saved) == requested(config):
        return result
    if overwrite:
        return None
    raise OutputError(f"{folder} holds a finished run with different settings than this sweep asks for "
                      "(another base config or --max-steps); pass --overwrite to retrain it, or choose another --output")


def _json_or_none(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def train_point(config: RunConfig, log: Callable[[str], None],
                from_start: bool = False) -> tuple[dict | None, str | None]:
    """(summary, interrupted signal) of one normal training run in this process; a stopped point
    goes on from its checkpoint unless `from_start` (sweep --overwrite)."""
    from lorakit.safe_io import atomic_write_json
    from lorakit.train.distributed import device_of_rank
    from lorakit.train.run import claim_output, prepare, release_run_folder
    from lorakit.train.session import Session

    folder, marker = Path(config.output.output), requested(config)
    config.output.resume = not from_start and _stopped_with_a_checkpoint(folder, marker)  # on from there, exactly
    config.output.overwrite = folder.exists() and not config.output.resume  # any other unfinished point starts again
    _reset_peak_memory(device_of_rank())
    prepared = prepare(config)
    out = claim_output(config)
    try:
        atomic_write_json(out / "point.json", marker)
        hint = ("rerun the sweep without --overwrite to go on (this point from its checkpoint)" if from_start else
                "rerun the same sweep command to go on (this point from its checkpoint)")
        result = Session(prepared, out, log=log, resume_hint=hint).run()
    finally:
        release_run_folder(out)  # the point is done: `lorakit train --output` on it may go on
        del prepared
        _release_memory()
    return (None, result.interrupted) if result.interrupted else (result.summary, None)


def _stopped_with_a_checkpoint(folder: Path, marker: dict) -> bool:
    """A point of these very settings that was stopped (or killed) after a checkpoint."""
    from lorakit.train import checkpoint as ckpt

    saved = _json_or_none(folder / "point.json")
    if saved is None or _decisive(saved) != marker:
        return False
    return ckpt.find_latest_valid(folder / "checkpoints", clean=False) is not None


def _reset_peak_memory(device) -> None:
    """Make the next peak-memory reading this point's own."""
    import torch

    _release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        host.reset_peak_rss()


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    host.return_freed_memory()


# ---- the sweep -------------------------------------------------------------------------------

def check_targets(config: RunConfig, points: list[SweepPoint]) -> None:
    """Fail before training anything when a target spec matches nothing in the model, or a
    point's rank is above a targeted layer's smaller side."""
    from lorakit.lora.model import describe_modules, model_type, output_head_name
    from lorakit.lora.targets import narrow_layers_left_out, select_targets
    from lorakit.models import meta_model

    model = meta_model(config.model.name)
    modules, kind, head = describe_modules(model), model_type(model), output_head_name(model)
    sides = {m.name: min(m.in_features, m.out_features) for m in modules}
    for spec in dict.fromkeys(p.targets for p in points):
        names = select_targets(modules, spec, exclude=config.lora.exclude, model_type=kind, output_head=head)
        for r in sorted({p.r for p in points if p.targets == spec}):
            left_out = set(narrow_layers_left_out(spec, modules, names, lambda _: r))  # all-linear's narrow layers
            kept = [sides[n] for n in names if n not in left_out]
            if not kept:
                widest = max(sides[n] for n in names)
                raise ConfigError(f"--r {r} is above every targeted layer's smaller side (at most {widest}) for "
                                  f"targets {spec!r}; keep the grid's ranks at {widest} or less")
            if r > min(kept):
                raise ConfigError(f"--r {r} is above the smallest targeted layer side ({min(kept)}) for targets "
                                  f"{spec!r}; keep the grid's ranks at {min(kept)} or less")


def guide_point(task: str) -> SweepPoint:
    r = TASK_PRESETS[task]["r"]
    return SweepPoint(r, 2.0 * r, "all", False)


def find_guide(points: list[SweepPoint], task: str) -> SweepPoint | None:
    guide = guide_point(task)
    for point in points:
        if (point.r, point.alpha, point.rslora) == (guide.r, guide.alpha, False) and point.targets in GUIDE_TARGETS:
            return point
    return None


def run_sweep(config_path: str | Path, grid: Grid, max_steps: int | None, output: str | Path,
              overwrite: bool = False, log: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Train (or reuse) every point, then write sweep.json and sweep.png. Returns sweep.json
    (its "interrupted" names the signal when a point was stopped)."""
    values = base_values(config_path)
    max_steps = max_steps or values.get("train", {}).get("max_steps")
    if not max_steps or int(max_steps) < 1:
        raise ConfigError("a sweep needs a step budget: pass --max-steps N (or set train.max_steps in the config)")
    out, points = Path(output), grid.points()
    if out.exists() and not out.is_dir():  # before any point trains
        raise OutputError(f"--output {out} is a file; choose a folder path for the sweep")
    if out.is_dir() and any(out.iterdir()) and not ((out / "sweep.json").exists() or (out / "points").exists()):
        raise OutputError(f"--output {out} holds files that are not a sweep's (a run, a model?); choose a new or "
                          "empty folder, or the folder of the sweep to go on with")
    configs = {p.slug: point_config(values, p, int(max_steps), out / "points" / p.slug, threads) for p in points}
    check_targets(next(iter(configs.values())), points)
    task = next(iter(configs.values())).lora.task
    results: dict[str, dict] = {}
    for point in points:
        summary = finished_summary(out / "points" / point.slug, configs[point.slug], overwrite)
        status = "reused" if summary is not None else "trained"
        if summary is None:
            log(f"sweep: training point {len(results) + 1}/{len(points)}: {point.slug}")
            summary, stopped = train_point(configs[point.slug], log, from_start=overwrite)
            if stopped:  # Ctrl-C: the point goes on from its checkpoint next time
                (out / "sweep.png").unlink(missing_ok=True)  # an earlier grid's: sweep.json now describes this one
                return write_report(out, config_path, grid, max_steps, points, results, task, interrupted=stopped)
        else:
            log(f"sweep: reusing finished point {point.slug}")
        results[point.slug] = {"point": point.to_dict(), "status": status, "summary": summary}
        write_report(out, config_path, grid, max_steps, points, results, task)
    report = write_report(out, config_path, grid, max_steps, points, results, task)
    plot_sweep(report, out / "sweep.png")
    return report


def write_report(out: Path, config_path, grid: Grid, max_steps: int, points: list[SweepPoint],
                 results: dict[str, dict], task: str, interrupted: str | None = None) -> dict:
    """sweep.json, rewritten atomically after every point so a kill leaves a readable file."""
    from lorakit.safe_io import atomic_write_json

    metric = "final_eval_loss" if all(r["summary"].get("final_eval_loss") is not None for r in results.values()) \
        else "train_loss"
    guide = find_guide(points, task)
    report = {
        "config": str(Path(config_path).resolve()), "max_steps": int(max_steps), "grid": grid.to_dict(),
        "metric": metric, "points": list(results.values()),
        "pending": [p.slug for p in points if p.slug not in results],
        "best": _best(results, metric),
        "guide": {"task": task, **guide_point(task).to_dict(), "in_grid": guide is not None,
                  "slug": guide.slug if guide else None},
        "interrupted": interrupted,
    }
    atomic_write_json(out / "sweep.json", report)
    return report


# a point this many times slower than the fastest: more than r and targets change a step (rank 256
# on all seven projections of SmolLM2 adds about as many FLOPs as its frozen layers: at most twice)
UNEVEN_SPEED = 4


def uneven_speed_note(report: dict) -> str | None:
    """Points that trained far slower than the others (the machine was busier while they ran):
    their time is not comparable with the others'."""
    speeds = {entry["point"]["slug"]: entry["summary"].get("tokens_per_second") for entry in report["points"]}
    speeds = {slug: speed for slug, speed in speeds.items() if isinstance(speed, (int, float)) and speed > 0}
    fastest = max(speeds.values(), default=0)
    slow = [f"{slug} ({speed:,.0f})" for slug, speed in speeds.items() if speed * UNEVEN_SPEED < fastest]
    if not slow:
        return None
    return (f"tokens/s: {', '.join(slow)} against {fastest:,.0f} for the fastest point, more than r and targets "
            "explain (was the machine busier then?): their time s is not comparable; rerun the sweep with "
            "--overwrite on a quiet machine to compare times")


# the best point's loss within this share of the runner-up's: a short sweep on a small eval set
# does not tell them apart (the spread between seeds of one point is of this order)
CLOSE_CALL = 0.01


def close_call_note(report: dict) -> str | None:
    """The best point and the next ones within CLOSE_CALL of its loss: named, so that a difference
    of noise is not read as a verdict."""
    metric, best = report["metric"], report["best"]
    losses = {e["point"]["slug"]: e["summary"].get(metric) for e in report["points"]}
    if best is None or len(losses) < 2 or not losses.get(best):
        return None
    near = [f"{slug} ({loss:.4f})" for slug, loss in losses.items()
            if slug != best and loss is not None and loss <= losses[best] * (1 + CLOSE_CALL)]
    if not near:
        return None
    return (f"{best} ({losses[best]:.4f}) is within {CLOSE_CALL:.0%} of {', '.join(near)} on {metric}: too close "
            "to call at this budget; more --max-steps or a larger eval set would tell them apart")


def _best(results: dict[str, dict], metric: str) -> str | None:
    """Lowest loss; ties go to the point with fewer trainable parameters."""
    scored = [(r["summary"][metric], r["summary"]["trainable_params"], slug) for slug, r in results.items()
              if r["summary"].get(metric) is not None]
    return min(scored)[2] if scored else None


# ---- the figure ------------------------------------------------------------------------------

PANELS = (("trainable_params", "trainable parameters", True),
          ("wall_seconds", "training time (s)", False),
          ("peak_memory_bytes", "peak memory (GiB)", False))


def plot_sweep(report: dict, path: Path) -> None:
    """Three panels of loss against cost; the best point starred, the guide's point ringed."""
    from matplotlib.figure import Figure

    from lorakit.safe_io import save_figure

    metric = report["metric"]
    rows = [(p["point"]["slug"], p["summary"]) for p in report["points"] if p["summary"].get(metric) is not None]
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, label, log_x) in zip(axes, PANELS):
        _panel(ax, rows, key, metric, report)
        ax.set_xlabel(label)
        ax.set_xscale("log" if log_x else "linear")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric.replace("_", " "))
    axes[0].legend(loc="best", fontsize=8)
    guide = report["guide"]
    fig.suptitle(f"LoRA sweep, {report['max_steps']} steps per point (star: best; ring: the guide's "
                 f"--task {guide['task']} point{'' if guide['in_grid'] else ', not in this grid'})")
    fig.tight_layout()
    save_figure(fig, path)


def _panel(ax, rows: list[tuple[str, dict]], key: str, metric: str, report: dict) -> None:
    scale = 2**30 if key == "peak_memory_bytes" else 1
    for slug, summary in rows:
        x, y = summary[key] / scale, summary[metric]
        ax.scatter([x], [y], s=30, label=slug)
        ax.annotate(slug, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if slug == report["best"]:
            ax.scatter([x], [y], marker="*", s=260, facecolors="none", edgecolors="black")
        if slug == report["guide"]["slug"]:
            ax.scatter([x], [y], marker="o", s=220, facecolors="none", edgecolors="red", linewidths=1.5)


def table_rows(report: dict) -> list[dict[str, Any]]:
    """One flat row per point, for the CLI table and the docs."""
    rows = []
    for entry in report["points"]:
        p, s = entry["point"], entry["summary"]
        marks = [m for m, on in (("best", p["slug"] == report["best"]), ("guide", p["slug"] == report["guide"]["slug"])) if on]
        rows.append({"point": p["slug"], "r": p["r"], "alpha": p["alpha"], "scale": p["scale"], "targets": p["targets"],
                     "rslora": p["rslora"], "trainable_params": s["trainable_params"],
                     "eval_loss": s.get("final_eval_loss"), "base_eval_loss": s.get("base_eval_loss"),
                     "train_loss": s.get("train_loss"), "wall_seconds": s["wall_seconds"],
                     "peak_memory_gib": s["peak_memory_bytes"] / 2**30, "status": entry["status"], "marks": marks})
    return rows
