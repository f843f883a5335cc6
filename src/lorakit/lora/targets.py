"""Which layers get an adapter: one pure function over the model's module names.

    select_targets(modules, spec, exclude=..., model_type=..., output_head=...) -> [names]

`spec` may be:
  - "all-linear": every linear layer inside the transformer blocks (modules under a numbered
    block such as `layers.3` or `h.3`), never the output head;
  - a preset group of the guide's seven projections: "all" (q, k, v, o, gate, up, down),
    "attention" (q, k, v, o), "mlp" (gate, up, down), "qv" (q, v), mapped to each
    architecture's own names by ARCH_PROJECTIONS;
  - a list of names: exact module names or name suffixes (`q_proj` matches
    `model.layers.3.self_attn.q_proj`), regular expressions (full match), or the groups above
    ("attention,mlp" is "all");
  - a single string: a name, a comma-separated list, or a regular expression (full match).

Every requested entry must match at least one linear layer; otherwise TargetMatchError lists
the model's linear layer names with near-miss suggestions. Silently adapting only some of the
requested names is how peers train the wrong thing for hours.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

from lorakit.errors import LorakitWarning, TargetMatchError

GROUPS = {
    "all": ("q", "k", "v", "o", "gate", "up", "down"),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "qv": ("q", "v"),
}

_LLAMA_STYLE = {
    "q": r".*\.q_proj", "k": r".*\.k_proj", "v": r".*\.v_proj", "o": r".*\.o_proj",
    "gate": r".*\.gate_proj", "up": r".*\.up_proj", "down": r".*\.down_proj",
}

# The guide's seven projections in each architecture's names (regular expressions, full match).
# Fused layers (phi3's qkv_proj, GPT-2's c_attn) serve several projections at once.
ARCH_PROJECTIONS: dict[str, dict[str, str]] = {
    **{arch: _LLAMA_STYLE for arch in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere")},
    "phi3": {
        "q": r".*\.qkv_proj", "k": r".*\.qkv_proj", "v": r".*\.qkv_proj", "o": r".*\.o_proj",
        "gate": r".*\.gate_up_proj", "up": r".*\.gate_up_proj", "down": r".*\.down_proj",
    },
    "gpt2": {
        "q": r".*\.attn\.c_attn", "k": r".*\.attn\.c_attn", "v": r".*\.attn\.c_attn",
        "o": r".*\.attn\.c_proj", "up": r".*\.mlp\.c_fc", "down": r".*\.mlp\.c_proj",
    },
    "bert": {
        "q": r".*\.attention\.self\.query", "k": r".*\.attention\.self\.key",
        "v": r".*\.attention\.self\.value", "o": r".*\.attention\.output\.dense",
        "up": r".*\.intermediate\.dense", "down": r".*\.layer\.\d+\.output\.dense",
    },
}
for _alias in ("roberta", "xlm-roberta", "electra"):
    ARCH_PROJECTIONS.setdefault(_alias, ARCH_PROJECTIONS["bert"])

LINEAR_KINDS = ("linear", "conv1d")
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class ModuleInfo:
    """What target selection needs to know about one module."""

    name: str
    kind: str  # "linear", "conv1d", or the class name of anything else
    in_features: int = 0
    out_features: int = 0


def select_targets(
    modules: Sequence[ModuleInfo],
    spec,
    *,
    exclude=None,
    model_type: str | None = None,
    output_head: str | None = None,
) -> list[str]:
    """Names of the modules to adapt, in model order. Raises TargetMatchError on any miss."""
    linear = [m for m in modules if m.kind in LINEAR_KINDS and m.name != output_head]
    patterns = _patterns_for(spec, model_type, linear)
    chosen: set[str] = set()
    for label, pattern in patterns:
        hits = [m.name for m in linear if _matches(pattern, m.name)]
        if not hits:
            raise TargetMatchError(_miss_message(label, modules, linear, pattern, output_head))
        if output_head is not None and _matches(pattern, output_head):  # PEFT would adapt the head too
            warnings.warn(f"target {label!r} also matches the output head ({output_head}), which lorakit leaves "
                          "out: it trains LoRA on the other linear layers only", LorakitWarning, stacklevel=3)
        chosen.update(hits)
    chosen -= set(_excluded(exclude, model_type, linear))
    if not chosen:
        raise TargetMatchError(f"exclude_modules {exclude!r} removed every target; nothing is left to adapt")
    return [m.name for m in linear if m.name in chosen]


def _patterns_for(spec, model_type, linear) -> list[tuple[str, str]]:
    """(label shown in errors, full-match regex) per requested entry."""
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all-linear":
            return [("all-linear", _all_linear_regex(linear))]
        if spec in GROUPS:
            return _group_patterns(spec, model_type)
        pieces = [s.strip() for s in spec.split(",") if s.strip()]
        if "," in spec and pieces and all(_PLAIN_NAME.match(piece) for piece in pieces):  # a regex may hold {1,2}
            spec = pieces
        elif _PLAIN_NAME.match(spec):
            spec = [spec]
        else:
            return [(spec, spec)]
    patterns = []
    for entry in spec:
        if entry == "all-linear" or entry in GROUPS:
            patterns += _patterns_for(entry, model_type, linear)
        else:
            patterns.append((entry, _entry_regex(entry)))
    return patterns


def _entry_regex(entry: str) -> str:
    if _PLAIN_NAME.match(entry):  # exact name or dotted suffix
        return rf"(.*\.)?{re.escape(entry)}"
    return entry


def _all_linear_regex(linear: Sequence[ModuleInfo]) -> str:
    in_blocks = [m.name for m in linear if _BLOCK_INDEX.search(m.name)]
    names = in_blocks or [m.name for m in linear]
    return "|".join(re.escape(n) for n in names) if names else r"(?!)"


def _group_patterns(group: str, model_type: str | None) -> list[tuple[str, str]]:
    table = ARCH_PROJECTIONS.get(model_type or "")
    if table is None:
        known = ", ".join(sorted(ARCH_PROJECTIONS))
        raise TargetMatchError(
            f"target preset {group!r} needs the architecture's projection names, and model type "
            f"{model_type!r} is not in the table ({known}); pass explicit module names or 'all-linear'"
        )
    projections = [p for p in GROUPS[group] if p in table]
    unique = dict.fromkeys(table[p] for p in projections)  # fused layers appear once
    return [(f"{group}:{pattern}", pattern) for pattern in unique]


def group_layer_names(modules: Sequence[ModuleInfo], group: str, model_type: str | None) -> tuple[list[str], list[str]]:
    """(the last dotted names of the linear layers the group's projections match, the projections
    that match none) for a group preset; a mixture of experts whose experts are fused 3D parameters
    (transformers 5's Mixtral, Qwen3-MoE) has no gate, up or down linear layer."""
    linear = [m.name for m in modules if m.kind in LINEAR_KINDS]
    names, missing = set(), []
    for label, pattern in _group_patterns(group, model_type):
        hits = [name.rsplit(".", 1)[-1] for name in linear if _matches(pattern, name)]
        names.update(hits)
        missing += [] if hits else [label.split(":", 1)[1].removeprefix(r".*\.")]
    return sorted(names), missing


def narrow_layers_left_out(spec, modules: Sequence[ModuleInfo], names: Sequence[str], rank_of) -> list[str]:
    """The chosen layers that "all-linear" leaves out: those narrower than their rank
    (`rank_of(name)`), such as a mixture of experts' 64 -> 1 shared-expert gate at r=16. A layer
    named on its own is refused instead (lora/model.py's rank check): asking for it by name and
    not getting it would be the silent partial match this module exists to prevent."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if [str(entry).strip() for entry in entries] != ["all-linear"]:
        return []
    narrowest_side = {m.name: min(m.in_features, m.out_features) for m in modules}
    return [name for name in names if rank_of(name) > narrowest_side[name]]


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


def _excluded(exclude, model_type: str | None, linear: Sequence[ModuleInfo]) -> list[str]:
    if exclude is None:
        return []
    patterns = _patterns_for(exclude, model_type, linear)
    for label, pattern in patterns:  # a typo here would quietly adapt what was meant to be left out
        if not any(_matches(pattern, m.name) for m in linear):
            raise TargetMatchError("exclude_modules: " + _miss_message(label, [], linear, pattern, None))
    return [m.name for m in linear if any(_matches(p, m.name) for _, p in patterns)]


def _miss_message(label: str, modules, linear, pattern: str, output_head: str | None) -> str:
    if output_head is not None and _matches(pattern, output_head):
        return (f"target {label!r} is the output head ({output_head}); lorakit trains LoRA on the other linear "
                "layers only: choose among them, e.g. all")
    if not linear:
        return (f"target {label!r} matches nothing: this model has no linear layer to adapt (besides its output "
                "head); check that the model folder holds the model you meant (its config.json's layer count)")
    non_linear = [m for m in modules if _matches(pattern, m.name) and m.kind not in LINEAR_KINDS]
    if non_linear:
        m = non_linear[0]
        return (
            f"target {label!r} matches {m.name!r}, which is a {m.kind}, not a linear layer; "
            "lorakit adapts linear layers only: choose among the model's linear layers"
        )
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in linear})
    near = difflib.get_close_matches(label.rsplit(".", 1)[-1].split(":")[-1], leaves, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return (
        f"target {label!r} matches no linear layer of this model.{hint} "
        f"The model's linear layers are named: {', '.join(leaves)}."
    )
