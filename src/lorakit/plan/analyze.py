"""How much of its rank does a trained LoRA adapter use? Singular values per module.

Works on any PEFT-format LoRA adapter folder (lorakit's or PEFT's): `adapter_config.json` +
`adapter_model.safetensors`, no base model needed; lorakit.lora.adapter_folder reads and checks
it, as for loading and export. For each adapted module the update is

    ΔW = s · B A,    B: (out x r),  A: (r x in),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

and its singular values come from the small factors, never from the out x in matrix:

    B = Q_B R_B,  Aᵀ = Q_A R_A  (thin QR)   =>   ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ

Q_B and Q_A have orthonormal columns, so ΔW has the singular values of the r x r core
s · R_B R_Aᵀ: O((out + in) r²) work instead of O(out · in · r).

Per module: the singular values σ, the rank holding a fraction of the energy Σσ² (90% and
99% by default: the smallest k with σ1² + ... + σk² >= fraction · Σσ²), the stable rank
Σσ² / σ1², and the Frobenius norm. The layer index and module type come from the name
(`model.layers.3.self_attn.q_proj` -> layer 3, `q_proj`; GPT-2 `transformer.h.3.attn.c_attn`).

The verdict, over the modules with a non-zero update, at the first energy level (90%), with r the
modules' rank (the config's r, unless a rank_pattern gives them all another one; where it mixes
ranks, each rank's modules get this verdict against their own, and the adapter's is saturated
where any of them is, oversized where all trained ones are):
  k95 = the 95th percentile (nearest rank) of the per-module rank at that energy,
  suggested r = the next power of two >= k95, at least 4 (2r when saturated, r when it fits);
  - "saturated" if k95 >= 3/4 of r and the spectrum is flat (the median module's smallest singular
    value at least half its largest): the adapter spreads over all of its rank, a larger r may
    help (or it trained too briefly to tell: an update that is still mostly noise is flat too).
    One that reaches 3/4 of r at 90% energy while decaying (smallest/largest below 1/2, as every
    adapter lorakit's demo and a one-step run trained showed: 0.2-0.3) "fits": 90% of the energy
    of a decaying spectrum still takes most of its directions;
  - "oversized" if the suggested r is below r: "r=64, but 95% of modules use at most 12
    dimensions (90% energy): r=16 would likely do";
  - "fits" otherwise; "untrained" if every B is zero (no update yet).
A lorakit PiSSA adapter's change s·(BA - B0A0) spans up to 2r dimensions: it is saturated at
3/4 of 2r, and judged against the r it trained with otherwise.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lorakit.errors import ConfigError
from lorakit.lora.adapter_folder import (PEFT_DEFAULT_ALPHA, PISSA_RANK_KEY, Adapter, raise_tensor_problems,
                                         rank_mismatches, read_adapter_folder, untargeted_modules)
from lorakit.lora.io import base_rewriting_init
from lorakit.safe_io import save_figure, translate_os_errors

DEFAULT_ENERGIES = (0.9, 0.99)
SATURATION = 0.75
FLAT_TAIL = 0.5  # a spectrum whose smallest value is at least half its largest has not decayed within r
PERCENTILE = 0.95
MIN_SUGGESTED_R = 4
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
_CANONICAL_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "c_attn", "c_proj", "c_fc", "query", "key", "value", "dense")


@dataclass
class ModuleRank:
    """The spectrum of one module's update s · B A."""

    name: str
    layer: int | None
    module_type: str
    r: int
    alpha: float
    scale: float
    shape: tuple[int, int]  # (out, in) of the update
    singular_values: list[float]
    energy_ranks: dict[str, int]  # "0.9" -> rank holding 90% of the energy
    stable_rank: float
    frobenius_norm: float

    @property
    def is_zero(self) -> bool:
        return self.frobenius_norm == 0.0

    @property
    def tail_ratio(self) -> float:
        """The smallest singular value over the largest: near 1 for a flat spectrum, small for one
        that decays within the rank (0 for a zero update)."""
        values = self.singular_values
        return values[-1] / values[0] if values and values[0] > 0 else 0.0

    def rank_at(self, energy: float) -> int:
        return self.energy_ranks[_energy_key(energy)]


@dataclass
class Verdict:
    kind: str  # "untrained", "saturated", "oversized" or "fits"
    message: str
    r: int
    energy: float
    percentile_rank: int | None = None  # k95: 95% of modules need at most this many dimensions
    suggested_r: int | None = None
    module_types: list[str] = field(default_factory=list)  # one rank's modules, where an adapter mixes ranks


@dataclass
class AdapterAnalysis:
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    energies: tuple[float, ...]
    modules: list[ModuleRank]
    verdict: Verdict
    warnings: list[str] = field(default_factory=list)
    heatmap: str | None = None
    rank_verdicts: list[Verdict] = field(default_factory=list)  # one per rank, where a rank_pattern mixes them

    def by_type(self) -> list[dict]:
        """Per module type: count, mean and max rank at the first energy, means of the rest."""
        energy = self.energies[0]
        groups: dict[str, list[ModuleRank]] = {}
        for module in self.modules:
            groups.setdefault(module.module_type, []).append(module)
        rows = []
        for module_type in _ordered_types(groups):
            mods = groups[module_type]
            ranks = [m.rank_at(energy) for m in mods]
            rows.append({
                "module_type": module_type, "modules": len(mods), "r": max(m.r for m in mods),
                f"mean_rank@{energy:g}": sum(ranks) / len(ranks), f"max_rank@{energy:g}": max(ranks),
                "mean_stable_rank": sum(m.stable_rank for m in mods) / len(mods),
                "mean_frobenius_norm": sum(m.frobenius_norm for m in mods) / len(mods),
            })
        return rows

    def to_dict(self) -> dict:
        out = asdict(self)
        out["by_type"] = self.by_type()
        return out


# ---- the maths ------------------------------------------------------------------------------

def update_singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of scale * B @ A from the factors (float64), largest first.

    lora_A: (r, in) (conv: (r, in, k, k)); lora_B: (out, r) (conv: (out, r, 1, 1))."""
    r = lora_A.shape[0]
    a = lora_A.reshape(r, -1).double()  # (r, in)
    b = lora_B.reshape(lora_B.shape[0], r).double()  # (out, r)
    _, r_b = torch.linalg.qr(b)  # (min(out, r), r)
    _, r_a = torch.linalg.qr(a.T)  # (min(in, r), r)
    core = r_b @ r_a.T  # (min(out, r), min(in, r))
    return torch.linalg.svdvals(core) * abs(scale)


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold `fraction` of Σσ² (0 for a zero update)."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int((cumulative < fraction - 1e-12).sum().item()) + 1


def stable_rank(singular_values: torch.Tensor) -> float:
    """||ΔW||_F² / ||ΔW||_2²: between 1 (one direction) and the rank (flat spectrum)."""
    top = float(singular_values.max()) if singular_values.numel() else 0.0
    return float((singular_values.double() ** 2).sum() / top**2) if top > 0 else 0.0


def parse_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, the part of the name after it): `model.layers.3.self_attn.q_proj` ->
    (3, 'self_attn.q_proj'); names without a number -> (None, the last component)."""
    match = _LAYER_INDEX.search(name)
    if not match:
        return None, name.rsplit(".", 1)[-1]
    return int(match.group(1)), name[match.end():] or name


def _energy_key(energy: float) -> str:
    return f"{energy:g}"


def _ordered_types(types) -> list[str]:
    def key(t: str):
        last = t.rsplit(".", 1)[-1]
        return (_CANONICAL_ORDER.index(last) if last in _CANONICAL_ORDER else len(_CANONICAL_ORDER), t)

    return sorted(types, key=key)


# ---- the analysis ---------------------------------------------------------------------------

def analyze_adapter(path: str | Path, energies: Sequence[float] = DEFAULT_ENERGIES,
                    allow_pickle: bool = False) -> AdapterAnalysis:
    """Read an adapter folder and compute every module's spectrum and the verdict."""
    energies = check_energies(energies)
    adapter = read_adapter_folder(path, allow_pickle, check_tensors=False)
    raise_tensor_problems(adapter, check_config=False)  # where the config contradicts the tensors: warned about
    modules = [_module_rank(adapter, name, energies) for name in sorted(adapter.pairs)]
    _shorten_types(modules)
    config = adapter.config
    # a rank_pattern may give every module another rank than the config's r: judge by that one
    ranks = {m.r for m in modules}
    r = ranks.pop() if len(ranks) == 1 else int(config.get("r") or max(m.r for m in modules))
    warnings = _config_warnings(adapter)
    pissa = _saved_pissa(adapter)
    half = 2 if pissa else 1  # saved as 2r: the choice the user made was r
    if pissa:
        r //= 2
        warnings.append(f"PiSSA adapter: trained with r={r}, saved as rank {2 * r} against the original base "
                        f"(s·(BA - B0A0), the change training made); the verdict judges it against r={r}")
    by_rank = _by_rank(modules)
    rank_verdicts = [] if len(by_rank) == 1 else [
        make_verdict(group, rank // half, energies[0], capacity=rank, module_types=_types_of(group))
        for rank, group in by_rank.items()]
    verdict = (make_verdict(modules, r, energies[0], capacity=r * half) if not rank_verdicts
               else combined_verdict(rank_verdicts, r, energies[0]))
    return AdapterAnalysis(
        path=str(adapter.folder), r=r, lora_alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_rslora=adapter.uses_rslora(), use_dora=bool(config.get("use_dora")), energies=tuple(energies),
        modules=modules, verdict=verdict, warnings=warnings, rank_verdicts=rank_verdicts,
    )


def _by_rank(modules: list[ModuleRank]) -> dict[int, list[ModuleRank]]:
    groups: dict[int, list[ModuleRank]] = {}
    for module in sorted(modules, key=lambda m: m.r):
        groups.setdefault(module.r, []).append(module)
    return groups


def _types_of(modules: list[ModuleRank]) -> list[str]:
    return _ordered_types({m.module_type for m in modules})


def combined_verdict(rank_verdicts: list[Verdict], r: int, energy: float) -> Verdict:
    """An adapter whose rank_pattern mixes ranks, each rank's modules judged against their own
    rank (one percentile over all of them would judge a rank-16 module by an r of 8): saturated
    where any rank is, oversized where every trained one is."""
    kinds = {v.kind for v in rank_verdicts} - {"untrained"}
    kind = ("untrained" if not kinds else "saturated" if "saturated" in kinds
            else "oversized" if kinds == {"oversized"} else "fits")
    parts = [f"{', '.join(v.module_types)}: {v.message}" for v in rank_verdicts]
    return Verdict(kind, f"modules of {len(rank_verdicts)} ranks, each judged against its own: " + "; ".join(parts),
                   r, energy)


def _saved_pissa(adapter: Adapter) -> bool:
    """A lorakit PiSSA adapter (its metadata says so), whose tensors hold twice the trained rank."""
    return PISSA_RANK_KEY in (adapter.metadata or {}) and all(p.rank % 2 == 0 for p in adapter.pairs.values())


def check_energies(energies: Sequence[float]) -> tuple[float, ...]:
    energies = tuple(float(e) for e in energies)
    if not energies or any(not 0 < e <= 1 for e in energies):
        raise ConfigError(f"energy levels must be fractions in (0, 1], e.g. 0.9,0.99; got {list(energies)}")
    return energies


def _module_rank(adapter: Adapter, name: str, energies) -> ModuleRank:
    pair = adapter.pairs[name]
    scale = adapter.scaling(name)
    sv = update_singular_values(pair.A, pair.B, scale)
    layer, module_type = parse_module_name(name)
    return ModuleRank(
        name=name, layer=layer, module_type=module_type, r=pair.rank, alpha=adapter.rank_and_alpha(name)[1],
        scale=scale, shape=(pair.B.shape[0], pair.A[0].numel()), singular_values=[float(x) for x in sv],
        energy_ranks={_energy_key(e): energy_rank(sv, e) for e in energies},
        stable_rank=stable_rank(sv), frobenius_norm=float(torch.sqrt((sv**2).sum())),
    )


def _shorten_types(modules: list[ModuleRank]) -> None:
    """`self_attn.q_proj` -> `q_proj` when the last components still tell the types apart."""
    types = {m.module_type for m in modules}
    short = {t: t.rsplit(".", 1)[-1] for t in types}
    if len(set(short.values())) == len(types):
        for m in modules:
            m.module_type = short[m.module_type]


def _config_warnings(adapter: Adapter) -> list[str]:
    warnings = []
    if "lora_alpha" not in adapter.config:
        warnings.append(f"adapter_config.json has no lora_alpha; assumed PEFT's default {PEFT_DEFAULT_ALPHA}")
    mismatched = rank_mismatches(adapter)
    if mismatched:
        warnings.append(f"{len(mismatched)} modules have a rank other than the config's r/rank_pattern "
                        f"(e.g. {mismatched[0][0]}); the tensors' rank is used")
    untargeted = untargeted_modules(adapter)
    if untargeted:
        warnings.append(f"{len(untargeted)} modules hold factors that target_modules does not name (e.g. "
                        f"{untargeted[0]}); PEFT would skip them, the analysis includes them")
    if adapter.config.get("use_dora"):
        warnings.append("DoRA adapter: the spectra describe the low-rank direction update s·BA; "
                        "the learned magnitudes rescale rows on top of it")
    init = base_rewriting_init(adapter.config)
    if init is not None:
        warnings.append(f"init_lora_weights {init!r}: PEFT moved part of W into the adapter at init, so s·BA "
                        "is not the change to the base model; lorakit's own PiSSA adapters are saved as plain LoRA")
    return warnings


def _percentile_nearest_rank(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _next_power_of_two(k: int) -> int:
    return 1 << max(0, k - 1).bit_length()


def make_verdict(modules: list[ModuleRank], r: int, energy: float, capacity: int | None = None,
                 module_types: list[str] | None = None) -> Verdict:
    """The rule of the module docstring; `capacity`: the most dimensions the change can span (r;
    2r for a PiSSA adapter's)."""
    capacity = capacity or r
    pct = f"{energy * 100:g}% energy"
    trained = [m for m in modules if not m.is_zero]
    if not trained:
        return Verdict("untrained", f"r={r}, but every lora_B is zero: the adapter holds no update yet "
                                    "(untrained, or saved before the first step)", r, energy,
                       module_types=module_types or [])
    k95 = _percentile_nearest_rank([m.rank_at(energy) for m in trained], PERCENTILE)
    suggested = max(MIN_SUGGESTED_R, _next_power_of_two(k95))
    usage = f"95% of modules use at most {k95} dimension{'s' if k95 != 1 else ''} ({pct})"
    if capacity != r:
        usage += f" of the {capacity} a PiSSA change can span"
    tail = statistics.median(m.tail_ratio for m in trained)
    shape = f"median smallest/largest singular value {tail:.2f}"
    if k95 >= SATURATION * capacity and tail >= FLAT_TAIL:
        suggested = 2 * r
        kind, message = "saturated", (f"r={r}, and {usage}, with a flat spectrum ({shape}): rank is saturated: "
                                      f"consider a larger r (e.g. {suggested}), unless it trained only briefly "
                                      "(an update that is still mostly noise is flat too)")
    elif k95 >= SATURATION * capacity:
        suggested, kind = r, "fits"
        message = f"r={r} fits: {usage}, but the spectrum decays within r ({shape})"
    elif suggested < r:
        kind, message = "oversized", f"r={r}, but {usage}: r={suggested} would likely do"
    else:
        suggested, kind, message = r, "fits", f"r={r} fits: {usage}"
    idle = len(modules) - len(trained)
    if idle:
        message += f"; {idle} module{'s have' if idle != 1 else ' has'} no update (B = 0)"
    return Verdict(kind, message, r, energy, k95, suggested, module_types or [])


# ---- the heatmap ----------------------------------------------------------------------------

HEATMAP_MAKER = "lorakit analyze"  # the PNG's Software field: analyze replaces only its own heatmaps

def plot_effective_rank(analysis: AdapterAnalysis, path: str | Path, energy: float | None = None) -> Path:
    """PNG of the rank at `energy` (default: the first level) by layer (x) and module type (y)."""
    import numpy as np
    from matplotlib.figure import Figure

    energy = analysis.energies[0] if energy is None else energy
    layered = [m for m in analysis.modules if m.layer is not None]
    layers = sorted({m.layer for m in layered})
    types = _ordered_types({m.module_type for m in layered})
    grid = np.full((max(1, len(types)), max(1, len(layers))), np.nan)
    for m in layered:
        grid[types.index(m.module_type), layers.index(m.layer)] = m.rank_at(energy)
    fig = Figure(figsize=(min(max(5.0, 2 + 0.45 * len(layers)), 24), 1.5 + 0.45 * len(types)))
    ax = fig.add_subplot()
    top = max((m.r for m in analysis.modules), default=analysis.r)  # the largest rank a module has
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=top)
    fig.colorbar(image, ax=ax, label=f"rank at {energy * 100:g}% energy")
    if grid.size <= 600:
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                color = "black" if value > 0.6 * analysis.r else "white"  # readable on viridis' yellows
                ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xlabel("layer")
    skipped = len(analysis.modules) - len(layered)
    note = f"; {skipped} modules outside numbered layers not shown" if skipped else ""
    ax.set_title(f"effective rank of {Path(analysis.path).name} (r={analysis.r}){note}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with translate_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, made_by=HEATMAP_MAKER)

