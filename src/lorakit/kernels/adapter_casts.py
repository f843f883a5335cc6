"""The adapters of a fused group cast to the activations' dtype, cached between steps.

Adapters stored in a wider dtype than the activations (fp32 master weights under a bf16 base)
are cast down for the fused GEMMs (kernels/fused_lora). The cast copies (A of the group stacked
into one matrix, each B) are kept on the group's first layer and written again, in one
multi-tensor copy, only when the master weights may have changed (after an optimizer step, a
load, a move): forward, recompute under checkpointing and backward reuse them. On an H200 the
per-GEMM casts and concatenations were about 400 kernel launches of a 1b step, whose CPU time
the GPU waited for.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lorakit.kernels import cuda_graph


def lora_parts(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """(base_layer, lora_A, lora_B) of a LoRA layer whose factors are weight matrices, else None.
    Read from the registered children: the patched forwards ask on every call, and nn.Module's
    attribute lookup of a child or parameter costs about half a microsecond a name."""
    children = module.__dict__.get("_modules", {})
    base, lora_a, lora_b = children.get("base_layer"), children.get("lora_A"), children.get("lora_B")
    if base is None or not hasattr(module, "scaling") or param(lora_a, "weight") is None \
            or param(lora_b, "weight") is None:
        return None
    return base, lora_a, lora_b


def param(module: nn.Module | None, name: str) -> torch.Tensor | None:
    """module's registered parameter `name`, or None (no module, or no such parameter)."""
    return None if module is None else module.__dict__.get("_parameters", {}).get(name)


class CastAdapters:
    """One group's adapters in the activations' dtype: A of every projection stacked into one
    (R, in) matrix and each B (the master itself where the dtypes agree), copied from the masters
    in one multi-tensor copy, with the stamp of the masters they were copied from.

    Two sets of copies take turns: a graph not yet backpropagated may hold the current set (two
    forwards around another model's optimizer step), so a refresh writes the other one. Writing
    into kept buffers rather than making new ones each step: new ones grew the demo's peak RSS
    by 0.15 GiB (the C allocator's fragmentation)."""

    def __init__(self, masters_a: list[torch.Tensor], masters_b: list[torch.Tensor], dtype: torch.dtype,
                 sets: int = 2):
        self.masters, self.stamp = (*masters_a, *masters_b), None
        self.layout = _layout(self.masters, dtype)
        # a first forward under inference_mode must not make inference tensors: training saves these
        with torch.inference_mode(False):
            self._sets = [_copy_buffers(masters_a, masters_b, dtype) for _ in range(sets)]
        self._turn = 0
        self._use(*self._sets[0][:2])

    def refresh(self, stamp: tuple) -> None:
        self._turn = (self._turn + 1) % len(self._sets)
        a_cat, b, targets, sources = self._sets[self._turn]
        with torch.inference_mode(False), torch.no_grad():
            torch._foreach_copy_(targets, sources)  # one launch for the group, casts included
        self._use(a_cat, b)
        self.stamp = stamp

    def _use(self, a_cat: torch.Tensor, b: list[torch.Tensor]) -> None:
        # the transposes as views made once: each forward's update reads B^T of every projection.
        # no_grad: inference_mode(False) turns grad mode on, and a view of an fp32 master made
        # with it would carry a graph (and refuse deepcopy)
        with torch.inference_mode(False), torch.no_grad():
            self.a_cat, self.b, self.b_t = a_cat, b, [matrix.T for matrix in b]


def _copy_buffers(masters_a, masters_b, dtype):
    """(a_cat, [B copies or masters], the copy targets, their sources) for one set of copies."""
    first = masters_a[0]
    a_cat = torch.empty(sum(a.shape[0] for a in masters_a), first.shape[1], dtype=dtype, device=first.device)
    b = [m if m.dtype == dtype else torch.empty_like(m, dtype=dtype) for m in masters_b]
    copied = [(copy, m) for copy, m in zip(b, masters_b) if copy is not m]
    targets = [*a_cat.split([a.shape[0] for a in masters_a]), *(copy for copy, _ in copied)]
    return a_cat, b, targets, [*masters_a, *(m for _, m in copied)]


CAST_ADAPTERS = "_lorakit_cast_adapters"  # on a group's first layer: {group's layer ids: CastAdapters}
# FSDP2 writes each forward's gathered weights into the same storage and may keep their version:
# there the copies are made afresh in every forward (backward still reuses that forward's)
FRESH_CASTS = "_lorakit_fresh_casts"


def cast_afresh_every_forward(model: nn.Module) -> None:
    """No cached adapter copies in `model` (for FSDP-sharded models)."""
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.__dict__[FRESH_CASTS] = True
            module.__dict__.pop(CAST_ADAPTERS, None)


_optimizer_steps = 0  # every torch.optim step anywhere in this process, once counting has started


def _count_optimizer_step(*_):
    global _optimizer_steps
    _optimizer_steps += 1


@functools.cache
def _start_counting_optimizer_steps() -> None:
    # fused AdamW (the trainer's) updates parameters without bumping their version counters, so
    # the versions alone cannot tell that the masters changed
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_count_optimizer_step)


def cast_adapters(layers, dtype: torch.dtype) -> CastAdapters:
    """The group's adapters in `dtype`, copied again only after a torch.optim step, or when a
    master's version or storage moved (load_state_dict and other in-place writes bump the version;
    a move swaps the storage); new buffers when a master's dtype or device, or the activations'
    dtype, changed. Call inside a Function's forward. Unseen: an optimizer outside torch.optim, or
    a write through `.data`: update adapter weights with copy_ under no_grad, as load_state_dict does."""
    _start_counting_optimizer_steps()
    parts = [lora_parts(layer) for layer in layers]
    masters_a = [param(lora_a, "weight") for _, lora_a, _ in parts]
    masters_b = [param(lora_b, "weight") for _, _, lora_b in parts]
    masters = (*masters_a, *masters_b)
    stamp = (_optimizer_steps, *((m._version, m.data_ptr()) for m in masters))
    if layers[0].__dict__.get(FRESH_CASTS):  # used by this forward (and its backward) alone
        casts = CastAdapters(masters_a, masters_b, dtype, sets=1)
        casts.refresh(stamp)
        return casts
    store = layers[0].__dict__.setdefault(CAST_ADAPTERS, {})
    key = tuple(id(layer) for layer in layers)
    casts = store.get(key)
    if casts is None or casts.layout != _layout(masters, dtype) or any(a is not b for a, b in zip(casts.masters, masters)):
        casts = store[key] = CastAdapters(masters_a, masters_b, dtype)
    # a CUDA graph replays what its capture recorded: the copy must be in it, due or not
    if casts.stamp != stamp or cuda_graph.capturing(masters[0]):
        casts.refresh(stamp)
    return casts


def _layout(masters, dtype: torch.dtype) -> tuple:
    """What the copy buffers are made for: the activations' dtype, the masters' dtypes and devices."""
    return dtype, *((m.dtype, m.device) for m in masters)
