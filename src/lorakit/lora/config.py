"""LoraConfig: the three decisive parameters (r, alpha, target modules) and their options.

Validation runs on construction and reports every problem at once, so a user fixes a config
in one pass instead of one error per run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Union

from lorakit.errors import ConfigError
from lorakit.values import is_number, is_positive_int, is_positive_number

TargetSpec = Union[str, list[str]]

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian", "pissa")


@dataclass
class LoraConfig:
    """What to adapt and how.

    r: rank of the update B @ A. alpha: its numerator; the update is scaled by
    alpha / r ("standard") or alpha / sqrt(r) ("rslora", rank-stabilised).
    target_modules: "all-linear", a preset name of the guide's projections ("attention", "mlp",
    "qv", "all"), a list of names (exact module names or name suffixes), or a regular
    expression string (full match against the module name).
    rank_pattern / alpha_pattern: per-module overrides, keys matched like PEFT's
    (a regular expression matching the end of the module name).
    """

    r: int = 16
    alpha: float = 32
    target_modules: TargetSpec = "all-linear"
    dropout: float = 0.0
    scaling: str = "standard"
    use_dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: TargetSpec | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid LoRA config:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        out: list[str] = []
        if not is_positive_int(self.r):
            out.append(f"r must be a positive integer, got {self.r!r} (the guide: 8, 16 or 64)")
        if not is_positive_number(self.alpha):
            out.append(f"alpha must be a positive number, got {self.alpha!r} (the guide: alpha = 2 * r)")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.scaling not in SCALINGS:
            out.append(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.init not in INITS:
            out.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.use_dora, bool):  # "no" is truthy: it would turn DoRA on
            out.append(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.init == "pissa" and self.use_dora:
            out.append("init='pissa' cannot be combined with use_dora=True; choose one")
        out += _target_problems("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            out += _target_problems("exclude_modules", self.exclude_modules)
        out += _pattern_problems(self.rank_pattern, self.alpha_pattern)
        if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
            out.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        return out

    def scale_for(self, r: int, alpha: float) -> float:
        return lora_scale(r, alpha, self.scaling)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of one module, after rank_pattern / alpha_pattern."""
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.alpha)
        return int(r), float(alpha)

    def to_dict(self) -> dict:
        return asdict(self)


def pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key (a regular expression) that
    matches the end of the module name at a '.' boundary wins."""
    for key, value in (pattern or {}).items():
        if pattern_matches(key, module_name):
            return value
    return default


def pattern_matches(key: str, module_name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _target_problems(field_name: str, spec) -> list[str]:
    if isinstance(spec, str):
        if not spec.strip():
            if field_name == "exclude_modules":
                return [f"{field_name} is empty; leave it out to exclude nothing, or name modules such as ['lm_head']"]
            return [f"{field_name} is empty; use 'all-linear' or a list such as ['q_proj', 'v_proj']"]
        return _regex_problems(field_name, spec)
    if isinstance(spec, list) and spec and all(isinstance(s, str) and s for s in spec):
        return []
    return [f"{field_name} must be 'all-linear', a module name, a list of names or a regex, got {spec!r}"]


def _regex_problems(field_name: str, spec: str) -> list[str]:
    try:
        re.compile(spec)
    except re.error as exc:
        return [f"{field_name} {spec!r} is not a valid regular expression ({exc})"]
    return []


def _pattern_problems(rank_pattern, alpha_pattern) -> list[str]:
    out = []
    if not isinstance(rank_pattern, dict):
        return [f"rank_pattern must be a mapping of module pattern to rank, got {rank_pattern!r}"]
    if not isinstance(alpha_pattern, dict):
        return [f"alpha_pattern must be a mapping of module pattern to alpha, got {alpha_pattern!r}"]
    for key, value in rank_pattern.items():
        if not is_positive_int(value):
            out.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        out += _regex_problems("rank_pattern key", key)
    for key, value in alpha_pattern.items():
        if not is_positive_number(value):
            out.append(f"alpha_pattern[{key!r}] must be a positive number, got {value!r}")
        out += _regex_problems("alpha_pattern key", key)
    return out


def lora_scale(r: int, alpha: float, scaling: str = "standard") -> float:
    """The factor on B(A(x)): alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r
