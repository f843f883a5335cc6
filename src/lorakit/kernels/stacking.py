"""Tensors that tile one matrix in one storage, and putting frozen weights so.

The fused blocks run one GEMM for projections whose frozen weights are row blocks of one matrix
(`stack_rows` makes each weight a view of a shared buffer; `row_blocks` finds that matrix again
on every call, since a weight may have been moved or replaced since), and one input-gradient
GEMM where their output gradients are column blocks of one matrix (`column_blocks`).
"""

from __future__ import annotations

import contextlib

import torch


def stack_rows(tensors) -> bool:
    """Give these frozen 2-D tensors (weights, or anything `.data` can be set on) one buffer,
    each a block of its rows: each becomes a view of it. True when they are stacked now; tensors
    of different widths, dtypes or devices, meta, trainable or sharded ones (their .data is not
    a plain tensor) are left alone."""
    if len(tensors) < 2:
        return False
    if row_blocks(tensors) is not None:
        return True
    first = tensors[0]
    if not all(type(t.data) is torch.Tensor and not t.is_meta and not t.requires_grad and t.dtype == first.dtype
               and t.device == first.device and t.shape[1:] == first.shape[1:] for t in tensors):
        return False
    with _outside_inference_mode():
        buffer = torch.cat([t.detach() for t in tensors])  # one group at a time: a transient copy
        for tensor, block in zip(tensors, buffer.split([t.shape[0] for t in tensors])):
            tensor.data = block
    return True


def unstack_rows(tensors) -> None:
    """Each of these tensors in its own storage again, if they are stacked."""
    if row_blocks(tensors) is not None:
        with _outside_inference_mode():
            for tensor in tensors:
                tensor.data = tensor.data.clone()


@contextlib.contextmanager
def _outside_inference_mode():
    """Without gradients, and outside inference mode even when called in it: an inference tensor
    as a weight's storage could not be saved for backward in a later training step."""
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) turns grad mode on
        yield


def row_blocks(tensors) -> torch.Tensor | None:
    """The matrix whose consecutive blocks of rows are `tensors`, when they lie so in one
    storage, else None (also for fewer than two, or a None among them)."""
    first = tensors[0]
    if len(tensors) < 2 or first is None:
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t is None or t.storage_offset() != offset or t.untyped_storage().data_ptr() != storage
                or not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def column_blocks(blocks) -> torch.Tensor | None:
    """The (rows, sum of widths) matrix whose consecutive column blocks are `blocks`, when they
    fill its rows in one storage, else None."""
    first = blocks[0]
    if len(blocks) < 2 or first.dim() != 2:
        return None
    rows, row_stride = first.shape[0], first.stride(0)
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for block in blocks:
        if (block.dim() != 2 or block.shape[0] != rows or block.stride() != (row_stride, 1)
                or block.storage_offset() != offset or block.untyped_storage().data_ptr() != storage
                or block.dtype != first.dtype or block.device != first.device):
            return None
        offset += block.shape[1]
    if offset - first.storage_offset() != row_stride:
        return None
    return first.as_strided((rows, row_stride), (row_stride, 1))
