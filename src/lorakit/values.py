"""Type checks for values read from YAML, JSON and Python callers, where True is an int and NaN a float."""

from __future__ import annotations

import math
import re
from pathlib import Path

MIN_MEMORY = 256 * 2**20  # a memory size below this is refused as a typo (a unit left out)
MAX_MEMORY = 2**50  # 1 PiB: above it, a typo (config.MAX_MEMORY_BUDGET_GIB, the budget it becomes, is the same)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
    return is_int(value) and value > 0


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_number(value) -> bool:
    return is_number(value) and value > 0


def parse_size(text: str, flag: str = "--gpu-memory", minimum: int = MIN_MEMORY) -> int:
    """'24GiB', '24GB', '24G' or '24' (GiB) -> bytes. Units are read as binary (GB = GiB):
    GPU vendors quote binary sizes ('24 GB' cards hold 24 GiB). Below `minimum`: refused as a typo."""
    from lorakit.errors import ConfigError

    match = _SIZE.match(str(text))
    if match and match.group(3) and not match.group(2) and float(match.group(1)) > 0:  # "16B": bytes, never meant
        raise ConfigError(f"{flag} {text!r} reads as bytes; write the unit: e.g. {match.group(1)}GiB")
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a memory size; write e.g. 24GiB, 80GB or 16")
    unit = match.group(2).lower() or "g"
    size = int(float(match.group(1)) * 1024 ** "kmgt".index(unit) * 1024)
    if size < minimum:
        raise ConfigError(f"{flag} {text!r} is below {minimum // 2**20} MiB, too little to train any model; "
                          "write the size with its unit, e.g. 24GiB")
    if size > MAX_MEMORY:
        raise ConfigError(f"{flag} {text!r} is more than 1 PiB (a typo?); write the size with its unit, e.g. 24GiB")
    return size


def parse_gib(text: str, flag: str) -> float:
    """A size in GiB: a plain number (0.003, 1e2) as it always was, or one with its unit (8GiB, 512MiB)."""
    try:
        return float(text)
    except ValueError:
        return parse_size(text, flag, minimum=1) / 2**30


def first_repeated_path(paths: list) -> str | None:
    """The first path named again (as itself, or by another path to the same file)."""
    seen = set()
    for path in paths:
        if not str(path).strip():  # named as empty by its own check
            continue
        try:
            resolved = Path(str(path)).expanduser().resolve()
        except (OSError, ValueError):  # a NUL byte: the file's own check names it
            resolved = str(path)
        if resolved in seen:
            return str(path)
        seen.add(resolved)
    return None
