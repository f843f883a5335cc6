"""Offloaded activation checkpointing: each checkpointed layer's input waits in host memory.

A checkpointed decoder layer keeps only its input for backward (the hidden states, batch x seq
x hidden), and recomputes the rest. With every layer checkpointed those inputs, one per layer,
are what is left on the device; offloading moves them to host memory too:

    forward, layer i                          backward, layer i
    ┌─ offloading hooks (outer) ───────────┐   input  host ─► device   (unpack: when the
    │ checkpoint saves x_i ─► pack: x_i    │                           recompute needs it)
    │        copied to host                │   recompute layer i under the checkpoint's hooks,
    │ ┌─ checkpoint's hooks (inner) ─────┐ │   then its backward
    │ │ layer i's ops: saved tensors are │ │
    │ │ dropped, recomputed in backward  │ │
    │ └──────────────────────────────────┘ │
    └──────────────────────────────────────┘

Why this packs exactly the inputs: torch's non-reentrant checkpoint saves the function's
tensor arguments as saved tensors (`_CheckpointFrame.save_inputs`; older torch releases use a
no-op autograd Function's save_for_backward, with an empty placeholder tensor) BEFORE it pushes
its own saved-tensor hooks for the function's ops. Saved-tensor hooks stack and only the
innermost pair applies, so hooks entered around the checkpoint call see the inputs, and the
layer's own ops go through the checkpoint's hooks, which keep nothing.

transformers' `GradientCheckpointingLayer` runs a checkpointed layer as
`self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)` (transformers 5;
the 4.x releases that have this class call it from `__call__` the same way): the keyword arguments (the attention mask, RoPE's
cos and sin) ride in the partial and are not saved, the positional ones (the hidden states) are.
Setting that attribute on a layer to `offloaded_checkpoint(...)` is the whole change.

Copies of CUDA tensors are pinned, so the copy back can be asynchronous (the caching host
allocator keeps a pinned block until the copies queued from it are done). Tensors already in
host memory are kept as they are: offloading them to the same memory would only cost
a copy (lorakit never offloads on a CPU run; tests pass their own `offloadable`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from lorakit.errors import LorakitWarning


def on_accelerator(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives outside host memory (the tensors worth offloading)."""
    return tensor.device.type not in ("cpu", "meta")


@dataclass(frozen=True)
class HostCopy:
    """A saved tensor held in host memory, and the device it returns to."""

    tensor: torch.Tensor
    device: torch.device
    pinned: bool


@dataclass
class HostOffload:
    """Saved-tensor hooks that hold `offloadable` tensors in host memory until backward."""

    offloadable: Callable[[torch.Tensor], bool] = on_accelerator

    def pack(self, tensor: torch.Tensor) -> Any:
        if not self.offloadable(tensor):
            return tensor
        pinned = tensor.device.type == "cuda"  # page-locked: the copy back can run asynchronously
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        # blocking: the host copy is complete before the device memory can be reused elsewhere
        host.copy_(tensor)
        return HostCopy(host, tensor.device, pinned)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, HostCopy):
            return packed
        # from pinned memory the copy is queued on the current stream, ahead of the recompute
        return packed.tensor.to(packed.device, non_blocking=packed.pinned)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offloaded_checkpoint(offload: HostOffload | None = None,
                         checkpoint: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A `_gradient_checkpointing_func` for transformers' layers: `checkpoint` (torch's
    non-reentrant one by default; the trainer passes memory_plan.layer_checkpoint's) whose saved
    inputs go through `offload` (the hooks wrap the checkpoint call, nothing else)."""
    if offload is None:
        offload = HostOffload()
    if checkpoint is None:
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, torch.Tensor) for a in args):
            _warn_keyword_inputs()
        with offload.hooks():
            return checkpoint(function, *args, **kwargs)

    return run


@functools.cache
def _warn_keyword_inputs() -> None:
    # torch's checkpoint keeps keyword arguments in a closure, out of the saved-tensor hooks' reach
    warnings.warn("offloaded checkpointing: this transformers version passes the layer's hidden states "
                  "by keyword, so they stay on the device; use --grad-checkpointing on", LorakitWarning, stacklevel=3)


def offload_layers(layers: list[nn.Module], offload: HostOffload | None = None) -> None:
    """Checkpoint each of `layers` (transformers' `GradientCheckpointingLayer`s) with its input
    held in host memory. Call after the model-wide checkpointing enable, which sets the
    attribute this replaces."""
    from lorakit.train.memory_plan import layer_checkpoint

    offload = offload or HostOffload()
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = offloaded_checkpoint(offload, layer_checkpoint(layer))
