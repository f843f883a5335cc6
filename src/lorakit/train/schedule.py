"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay.

A pure function of the step, so the schedule's whole state is the step number: a resumed run
gets the same learning rate at every step by construction.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based). Warm-up step k
    trains at (k+1)/warmup of the peak, so the first step already learns (transformers' schedules
    give step 0 a zero lr, a step spent for nothing) and the last warm-up step reaches the peak."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return int(math.ceil(total_steps * ratio)) if ratio > 0 else 0
