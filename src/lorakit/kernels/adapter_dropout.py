"""Adapter dropout inside the fused LoRA blocks (kernels/fused_lora):

    y_i = x W_i^T + s_i * (drop_i(x) A_i^T) B_i^T

Each projection of a group draws its own mask, in the projections' order, from torch's default
generator, so a seed, a resume and a checkpointed recompute give the same masks. On a GPU
torch's fused dropout kernel draws them, as nn.Dropout does; on a CPU `cpu_mask` does, 3.6-3.8x
faster than nn.Dropout's bernoulli_, which there cost about a quarter of a SmolLM2 step.

What backward keeps to apply a mask again (`dropped` returns it; `masks_for` gives the masks):
- on a CPU the bool mask itself (1 byte an element: drawing it twice would cost a step another
  6%, while the masks are 0.14 GiB of its 2.5);
- on CUDA the generator's state before the draw, from which backward draws the same mask again,
  as torch's checkpointing recomputes dropout: the same kernel on the same state, shape, strides
  and alignment (its vector width follows them; backward's input is forward's saved tensor, or
  the MLP's product recomputed alike). The kept masks of a Llama-3.2-1B step (4 x 2048 tokens,
  all seven projections) were about 2.7 GB; drawing them again reads each input once more and
  writes a copy and the mask: about 13 GB of memory traffic a step, 3-4 ms on an H200 (an
  estimate, not yet measured on one).

A mask multiplies as bytes: torch multiplies by a bool tensor 6-35x slower on a CPU (a
conversion per element), which made the first version of this path slower than the plain one.
A byte mask still makes transient converted copies on a CPU (freed at once; the step's peak RSS
grew by the masks alone); masked_fill_, which makes none, ran 5x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDRAWN_ON = frozenset({"cuda"})  # device types whose masks backward draws again rather than keeps
_KEEP_LEVELS = 1 << 16  # a CPU mask compares 16 random bits per element


@dataclass(frozen=True, eq=False)
class Redraw:
    """A mask not kept: the state of the default generator just before it was drawn."""
    state: torch.Tensor


def dropped(x: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor | Redraw]:
    """(x with dropout at `rate`, what backward keeps for its mask: the bool mask or a Redraw)."""
    state = _generator(x.device).get_state() if x.device.type in REDRAWN_ON else None
    copy, mask = draw(x, rate)
    return copy, (mask if state is None else Redraw(state))


def draw(x: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with dropout at `rate`, its bool mask): a forward's draw, mask and copy in one pass on a
    device torch drops on."""
    if x.device.type != "cpu":
        return torch.ops.aten.native_dropout(x, rate, True)
    mask = cpu_mask(x, rate)
    return masked(x, mask, rate), mask


def masks_for(x: torch.Tensor, dropouts) -> list[tuple[torch.Tensor | None, float]]:
    """[(bool mask or None, rate)] from [(what `dropped` kept or None, rate)] of the projections
    reading x: a Redraw draws its mask again, leaving the generator as it was."""
    return [(_drawn_again(x, kept, rate) if isinstance(kept, Redraw) else kept, rate) for kept, rate in dropouts]


def _drawn_again(x: torch.Tensor, redraw: Redraw, rate: float) -> torch.Tensor:
    generator = _generator(x.device)
    now = generator.get_state()
    generator.set_state(redraw.state)
    try:  # draw's random numbers, without its copy on a CPU (and unseen by tests that record `draw`)
        return cpu_mask(x, rate) if x.device.type == "cpu" else torch.ops.aten.native_dropout(x, rate, True)[1]
    finally:
        generator.set_state(now)


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    return torch.cuda.default_generators[device.index]  # a tensor's device always has its index


def cpu_mask(x: torch.Tensor, rate: float) -> torch.Tensor:
    """A bool mask shaped like x that keeps each element with probability 1 - rate, rounded to a
    multiple of 1/65536: four elements from each 64-bit random number of torch's generator
    (bernoulli_ draws a number per element: 4.5 against 1.2 ms for 1024 x 576 on 2 cores)."""
    threshold = round((1.0 - rate) * _KEEP_LEVELS) - _KEEP_LEVELS // 2  # int16 values below it keep
    if threshold >= _KEEP_LEVELS // 2 or threshold <= -_KEEP_LEVELS // 2:  # all kept, or none
        return torch.full_like(x, threshold > 0, dtype=torch.bool)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    return (words.view(torch.int16)[:x.numel()] < threshold).view(x.shape)


def masked(x: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """x * mask / (1 - rate), a new tensor: on a CPU the dropped copy `draw` made, again; on a
    GPU within an ulp of it (its kernel scales by 1 / (1 - rate) computed in fp32, this in fp64).
    The bool mask is read as bytes (above)."""
    return x.mul(mask.view(torch.uint8)).mul_(1.0 / (1.0 - rate))
