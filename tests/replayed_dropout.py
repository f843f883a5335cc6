"""The adapter-dropout masks lorakit's fused blocks draw, recorded and replayed into the plain
LoRA layers: the oracle for the fused dropout, whose CPU masks come from another random stream
than nn.Dropout's (kernels/adapter_dropout.cpu_mask). Also used by scripts/gpu_kernels.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lorakit.kernels import adapter_dropout


@contextlib.contextmanager
def recorded_masks() -> Iterator[list[torch.Tensor]]:
    """A list that receives every mask the fused blocks' forwards draw inside the block, in the
    order drawn (backward's draws again are not recorded)."""
    masks: list[torch.Tensor] = []
    drawn = adapter_dropout.draw

    def recording(x, rate):
        dropped, mask = drawn(x, rate)
        masks.append(mask)
        return dropped, mask

    adapter_dropout.draw = recording
    try:
        yield masks
    finally:
        adapter_dropout.draw = drawn


def replay_masks(masks: list[torch.Tensor], layers: Iterable[nn.Module]) -> None:
    """Make each LoRA layer's dropout apply these masks, taken in call order (the plain path
    calls the projections in the order the fused path drew for them)."""
    queue = iter(list(masks))
    for layer in layers:
        if isinstance(layer.lora_dropout, nn.Dropout):
            layer.lora_dropout = ReplayedDropout(layer.lora_dropout.p, queue)


class ReplayedDropout(nn.Module):
    """Dropout in plain PyTorch with given masks: x * mask / (1 - p)."""

    def __init__(self, p: float, masks: Iterator[torch.Tensor]):
        super().__init__()
        self.p, self.masks = p, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = next(self.masks)  # drawn over the (tokens, features) view of the input
        assert mask.numel() == x.numel(), "the masks replay in another order than they were drawn"
        return x * mask.view(x.shape).to(x.device) / (1 - self.p)
