"""Fused LoRA autograd for a Llama-style block: q/k/v, o, and the SwiGLU MLP.

A LoRA projection is y = x W^T + b + s * (x A^T) B^T with W frozen, A (r x in), B (out x r).
Run module by module (the plain path), every projection makes its own adapter temporaries
(B(A x), the scaled copy, the new sum) and the MLP saves silu(e), g and h = silu(e) * g for
backward. Here projections that read the same input are computed together:

    forward                                   backward (dY_i = grad of output i)
    XA  = X @ cat(A_1..A_k)^T     (T, sum r)  dXA_i = s_i * dY_i @ B_i            (T, r_i)
    Y_i = X @ W_i^T + b_i                     dB_i  = s_i * dY_i^T @ XA_i         (out_i, r_i)
    Y_i.addmm_(XA_i, B_i^T, alpha=s_i)        dA    = cat(dXA_i)^T @ X            one GEMM
                                              dX    = sum_i dY_i @ W_i + cat(dXA_i) @ cat(A_i)

so X is saved once for the whole group, one skinny GEMM replaces k adapter-A GEMMs (forward
and backward), the update is added in place with the scale folded into `addmm_`, dX is
accumulated in place, and no product of size in x out is ever formed. The frozen W gets no
gradient. For the MLP, down(silu(e) * g) with e = gate(x), g = up(x), only X, e and g are
saved; h = silu(e) * g is recomputed in backward and

    dg = dh * silu(e),   de = dh * g * sigmoid(e) * (1 + e * (1 - sigmoid(e))).

With triton=True, lora_mlp computes h (forward and recompute) and (de, dg) with the Triton
kernels of triton_ops (one pass each, de written over dh) when the kernels can take x: a CUDA
tensor, or any tensor under TRITON_INTERPRET=1. Otherwise the PyTorch code below runs.

On the CPU the large products (the base weights' forward and input gradient, the adapters' A
and B products and gradients) go through kernels/cpu_gemm, which takes oneDNN where it is
faster than torch's own GEMMs.

Adapters stored in a wider dtype than the activations (fp32 master weights under a bf16 base)
are cast down for the GEMMs through kernels/adapter_casts, which keeps the copies between steps;
their gradients are cast back.

Under activation checkpointing a decoder layer's forward runs twice, the second time (in
backward) only to recompute what backward saves. Where the layer ends in `residual + mlp(x)`
(llama_patch.DECODER_LAYERS), the recompute does not need the MLP's output: within
the recompute context of `recompute_skipping_mlp_output` lora_mlp leaves out the down projection's
base GEMM (its LoRA A product, which backward saves, still runs) and returns an uninitialised
tensor, which only the discarded residual sum reads: about a quarter of a Llama layer's forward
FLOPs, so of the work checkpointing adds.

The fused path covers plain LoRA, with or without adapter dropout (kernels/adapter_dropout):
`fuse_blocker(module)` names why a module cannot use it (DoRA, merged or disabled adapter,
trainable or non-float base weight, a dropout module other than nn.Dropout).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.kernels import adapter_dropout, cpu_gemm, stacking
from lorakit.kernels.adapter_casts import CastAdapters, cast_adapters, lora_parts
from lorakit.kernels.adapter_casts import param as _param

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAMS_PER_PROJECTION = 4  # base weight, base bias (or None), lora_A weight, lora_B weight


def fuse_blocker(module: nn.Module) -> str | None:
    """Why `module` cannot take the fused path, or None when it can."""
    parts = lora_parts(module)
    if parts is None:
        return f"no adapter on this {type(module).__name__}"  # --targets qv: normal, not a fault
    if getattr(module, "merged", False):
        return "the adapter is merged into the base weight"
    if getattr(module, "disabled", False):
        return "the adapter is disabled"
    return _dora_blocker(module) or _dropout_blocker(module) or _base_blocker(*parts)


def _dora_blocker(module: nn.Module) -> str | None:
    if getattr(module, "use_dora", False) is True:  # PEFT keeps a dict per adapter name here: not ours
        return "DoRA adapters are not fused"
    return None


def _dropout_blocker(module: nn.Module) -> str | None:
    dropout = module.__dict__["_modules"].get("lora_dropout")
    if dropout is not None and type(dropout) not in (nn.Identity, nn.Dropout):  # a subclass may drop otherwise
        return f"unknown lora_dropout module {type(dropout).__name__}"
    return None


def _dropout_rate(layer: nn.Module) -> float:
    """The share of the adapter's input its dropout zeroes in this call: 0 in eval mode."""
    dropout = layer.__dict__["_modules"].get("lora_dropout")
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _base_blocker(base: nn.Module, lora_a: nn.Module, lora_b: nn.Module) -> str | None:
    weight, bias = _param(base, "weight"), _param(base, "bias")
    # exact types: a subclass with its own forward (BitNet's, FP8 ones) computes something else
    if type(base) not in (nn.Linear, cpu_gemm.CpuGemmLinear) or weight is None or weight.dtype not in _FUSED_DTYPES:
        return f"base layer {type(base).__name__} is not a plain nn.Linear in fp16, bf16, fp32 or fp64"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the base layer is trainable"
    if _param(lora_a, "bias") is not None or _param(lora_b, "bias") is not None:
        return "adapter matrices with a bias are not fused"
    return None


def can_fuse(module: nn.Module) -> bool:
    """True when `module` is a plain LoRA layer the fused functions can run."""
    return fuse_blocker(module) is None


# checked=True in the functions below: the caller has just seen fuse_blocker pass for every layer
# (llama_patch's forwards do, on every call), so it is not asked again

def lora_linear(x: torch.Tensor, layer: nn.Module, *, checked: bool = False) -> torch.Tensor:
    """layer(x) for one LoRA projection (e.g. o_proj), update added in place."""
    (out,) = _SharedInputLora.apply(x, (layer,), *_scalings_and_params([layer], checked))
    return out


def lora_qkv(x: torch.Tensor, q: nn.Module, k: nn.Module, v: nn.Module, *,
             checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q(x), k(x), v(x)) with x saved once and one merged adapter-A GEMM."""
    return _SharedInputLora.apply(x, (q, k, v), *_scalings_and_params([q, k, v], checked))


def lora_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, *,
             triton: bool = False, checked: bool = False) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) saving only x, gate(x) and up(x) for backward.

    triton=True: the SwiGLU elementwise part runs the Triton kernels where they can take x.
    """
    return _LoraSwiGLU.apply(x, _triton_ops_for(x) if triton else None, (gate, up, down),
                             *_scalings_and_params([gate, up, down], checked))


def _triton_ops_for(x):
    """The triton_ops module when its kernels can take x, else None. Imported on demand: the
    module decides between interpreter and GPU kernels when it is first imported."""
    from lorakit.kernels import triton_ops
    return triton_ops if triton_ops.runs_on(x) else None


def _scalings_and_params(layers, checked: bool = False):
    params = []
    for layer in layers:
        reason = None if checked else fuse_blocker(layer)
        if reason is not None:
            raise ValueError(f"cannot fuse {type(layer).__name__}: {reason}")
        base, lora_a, lora_b = lora_parts(layer)
        params += [_param(base, "weight"), _param(base, "bias"), _param(lora_a, "weight"), _param(lora_b, "weight")]
    return (tuple(float(layer.scaling) for layer in layers), tuple(_dropout_rate(layer) for layer in layers), *params)


def _group(params, scalings):
    """[(W, b, A, B, s), ...] from the flat argument list."""
    n = PARAMS_PER_PROJECTION
    return [(*params[i * n:(i + 1) * n], s) for i, s in enumerate(scalings)]


def _rank_slices(projections):
    slices, start = [], 0
    for _, _, lora_a, _, _ in projections:
        slices.append(slice(start, start + lora_a.shape[0]))
        start += lora_a.shape[0]
    return slices


class _RecomputeState(threading.local):
    # per thread: checkpoint recomputes run in autograd's backward threads
    def __init__(self) -> None:
        self.skips_mlp_output = False
        self.previous: list[bool] = []


_RECOMPUTE = _RecomputeState()


class SkipMlpOutput:
    """The recompute context of one checkpointed layer: while it is entered, lora_mlp leaves its
    output uncomputed if `applies()` (asked at each entry: a hook added since the forward counts).
    Reusable and re-entrant: torch enters a checkpoint's recompute context once per recompute,
    and a graph kept with retain_graph recomputes again."""

    def __init__(self, applies: Callable[[], bool]):
        self.applies = applies

    def __enter__(self) -> None:
        _RECOMPUTE.previous.append(_RECOMPUTE.skips_mlp_output)
        _RECOMPUTE.skips_mlp_output = self.applies()

    def __exit__(self, *exc_info) -> None:
        _RECOMPUTE.skips_mlp_output = _RECOMPUTE.previous.pop()


def recompute_skipping_mlp_output(applies: Callable[[], bool]) -> Callable[[], tuple]:
    """A `context_fn` for torch.utils.checkpoint around a layer whose MLP output is only added to
    the residual: the original forward runs as usual, the recompute without the down
    projection's base GEMM while `applies()`. Only for layers where nothing saved for backward
    reads that output (llama_patch.recompute_context_fn decides)."""
    return lambda: (contextlib.nullcontext(), SkipMlpOutput(applies))


# ---- frozen weights stacked: one GEMM for projections that read the same input -----------------
# Only for gate and up (llama_patch): stacked q, k and v would come out as column blocks of one
# matrix, and attention, which saves v, would keep q's and k's columns alive until backward too.

def stack_frozen_weights(layers) -> bool:
    """Put the frozen base weights of LoRA projections that read the same input (gate, up) into
    one buffer, each weight a block of its rows (stacking.stack_rows), so that their forward is
    one GEMM (and, where the gradients lie side by side, their input gradient too). Nothing is
    copied for good, and unstack_frozen_weights undoes it. True when the weights are stacked
    now; layers with base biases, or weights stack_rows leaves alone, are not stacked."""
    parts = [lora_parts(layer) for layer in layers]
    if any(part is None or _param(part[0], "bias") is not None for part in parts):
        return False
    return stacking.stack_rows([_param(base, "weight") for base, _, _ in parts])


def unstack_frozen_weights(layers) -> None:
    """Each stacked base weight of these layers in its own storage again."""
    parts = [lora_parts(layer) for layer in layers]
    if all(part is not None for part in parts):
        stacking.unstack_rows([_param(base, "weight") for base, _, _ in parts])


def _stacked_base(projections) -> torch.Tensor | None:
    """The group's frozen weights stacked (no biases), or None: one GEMM each."""
    if any(bias is not None for _, bias, *_ in projections):
        return None
    return stacking.row_blocks([weight for weight, *_ in projections])


def _shared_forward(x2, projections, casts: CastAdapters, rates, outputs: bool = True):
    """(outputs, XA, A_cat, what backward keeps for the dropout masks) of projections sharing
    input x2 (T, in); with outputs=False the outputs are left uncomputed (uninitialised), what
    backward needs is not."""
    a_cat = casts.a_cat  # (R, in), R = sum of ranks
    xa, kept = _times_a(x2, a_cat, projections, rates)  # (T, R)
    if not outputs:
        return [x2.new_empty(x2.shape[0], weight.shape[0]) for weight, *_ in projections], xa, a_cat, kept
    stacked = _stacked_base(projections)
    if stacked is None:
        outs = [cpu_gemm.linear(x2, weight, bias) for weight, bias, *_ in projections]  # (T, out_i) each
    else:  # one GEMM; the outputs are its column blocks
        outs = cpu_gemm.linear(x2, stacked).split([weight.shape[0] for weight, *_ in projections], dim=1)
    for out, (*_, s), lora_b_t, cols in zip(outs, projections, casts.b_t, _rank_slices(projections)):
        cpu_gemm.addmm_(out, xa[:, cols], lora_b_t, alpha=s)
    return list(outs), xa, a_cat, kept


def _times_a(x2, a_cat, projections, rates):
    """(XA (T, R), [what backward keeps for mask_i, or None]): without dropout one GEMM for the
    group; with it (kernels/adapter_dropout), each projection's A times its own dropped copy of
    x2, made and freed one at a time."""
    if not any(rates):
        return cpu_gemm.linear(x2, a_cat), [None] * len(rates)
    products, kept = [], []
    for cols, rate in zip(_rank_slices(projections), rates):
        copy, for_mask = adapter_dropout.dropped(x2, rate) if rate else (x2, None)
        products.append(cpu_gemm.linear(copy, a_cat[cols]))
        kept.append(for_mask)
    return torch.cat(products, dim=1), kept


def _shared_backward(x2, xa, a_cat, cast_b, projections, grad_outs, need_input_grad, dropouts):
    """(dX or None, [dA_i], [dB_i]) for projections sharing input x2; cast_b: each B as the
    forward took it; dropouts: each projection's (what forward kept for its mask or None, rate)."""
    dropouts = adapter_dropout.masks_for(x2, dropouts)
    dxa, grads_a, grads_b = _adapter_grads(x2, xa, cast_b, projections, grad_outs, dropouts)
    dx = _input_grad_with_adapters(projections, grad_outs, dxa, a_cat, dropouts) if need_input_grad else None
    return dx, grads_a, grads_b


def _adapter_grads(x2, xa, cast_b, projections, grad_outs, dropouts):
    """(dXA (T, R), [dA_i], [dB_i]): the last use of x2."""
    dxa = torch.empty_like(xa)  # (T, R)
    grads_b = []
    for (_, _, _, lora_b, s), b, cols, dy in zip(projections, cast_b, _rank_slices(projections), grad_outs):
        _scaled_matmul(dy, b, s, out=dxa[:, cols])  # (T, r_i)
        grad_b = _scaled_grad_weight(dy, xa[:, cols], s, lora_b.dtype)  # (out_i, r_i)
        grads_b.append(grad_b.contiguous())  # oneDNN's is a transposed view
    master_dtypes = [lora_a.dtype for _, _, lora_a, _, _ in projections]
    if _dropped_any(dropouts):  # dA_i = dXA_i^T @ drop_i(X), one dropped copy at a time
        grads_a = []
        for cols, (mask, rate), dtype in zip(_rank_slices(projections), dropouts, master_dtypes):
            dropped = x2 if mask is None else adapter_dropout.masked(x2, mask, rate)
            grads_a.append(_scaled_grad_weight(dxa[:, cols], dropped, 1.0, dtype))
        return dxa, grads_a, grads_b
    # as apply_lora makes them, the group's masters share a dtype: one GEMM gives every dA in it
    common = master_dtypes[0] if len(set(master_dtypes)) == 1 else dxa.dtype
    grad_a_cat = _scaled_grad_weight(dxa, x2, 1.0, common)  # (R, in)
    grads_a = [grad_a_cat[cols].to(dtype) for cols, dtype in zip(_rank_slices(projections), master_dtypes)]
    return dxa, grads_a, grads_b


def _dropped_any(dropouts) -> bool:
    return any(mask is not None for mask, _ in dropouts)


def _input_grad_with_adapters(projections, grad_outs, dxa, a_cat, dropouts, out=None) -> torch.Tensor:
    """dX = sum_i dY_i @ W_i + sum_i drop_i'(dXA_i @ A_i) (T, in), into `out` (a column block)
    when given; without dropout the adapters' part is one GEMM, dXA @ A_cat."""
    dx = _input_grad([weight for weight, *_ in projections], grad_outs, out)
    if not _dropped_any(dropouts):
        return cpu_gemm.addmm_(dx, dxa, a_cat)
    for cols, (mask, rate) in zip(_rank_slices(projections), dropouts):
        through_a = cpu_gemm.matmul(dxa[:, cols], a_cat[cols])  # (T, in)
        if mask is not None:
            through_a.mul_(mask.view(torch.uint8))
        dx.add_(through_a, alpha=1.0 / (1.0 - rate))
    return dx


def _input_grad(weights, grad_outs, out=None) -> torch.Tensor:
    """sum_i dY_i @ W_i: one GEMM where the weights are stacked and the gradients lie side by
    side (the fused MLP writes d gate and d up so), else one per projection, accumulated."""
    stacked = stacking.row_blocks(weights)
    side_by_side = stacking.column_blocks(grad_outs) if stacked is not None else None
    if side_by_side is not None:
        return _matmul_into(side_by_side, stacked, out)
    dx = _matmul_into(grad_outs[0], weights[0], out)
    for weight, dy in zip(weights[1:], grad_outs[1:]):
        dx = cpu_gemm.matmul_add(dy, weight, dx)
    if out is not None and dx is not out:  # oneDNN's sum is a new tensor
        dx = out.copy_(dx)
    return dx


def _matmul_into(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ weight, into `out` when given (cuBLAS writes a column block in place; the CPU copies)."""
    if out is None:
        return cpu_gemm.matmul(a, weight)
    if _cublas_writes_in_place(a):
        return torch.mm(a, weight, out=out)
    return out.copy_(cpu_gemm.matmul(a, weight))


def _cublas_writes_in_place(t: torch.Tensor) -> bool:
    """cuBLAS applies a GEMM's alpha and writes a column block of a wider matrix in place: on a
    GPU the adapters' scaled products take one launch each instead of a product, a scaling and
    a copy (a 1b step launched about 220 of those; its CPU, not its GPU, set the pace). The CPU
    keeps cpu_gemm's products, which choose oneDNN."""
    return t.is_cuda


def _scaled_matmul(a, b, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = scale * (a @ b)."""
    if _cublas_writes_in_place(a):
        return torch.addmm(_unread_input(a), a, b, beta=0, alpha=scale, out=out)
    return out.copy_(cpu_gemm.matmul(a, b).mul_(scale))


def _scaled_grad_weight(dy, x, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * dy^T @ x in `dtype` (its master's): the gradient of a weight whose layer took x
    and returned dy's output. On a GPU whose GEMMs write fp32 from 16-bit operands, written in
    the master's fp32 directly: no rounding to 16 bits, and no cast (11 launches per Llama layer)."""
    if _cublas_writes_in_place(dy):
        if dtype != dy.dtype and _gemm_widens(dy.device, dy.dtype, dtype):
            return _widening_addmm(dy.T, x, scale, dtype)
        grad = torch.addmm(_unread_input(dy), dy.T, x, beta=0, alpha=scale)
    else:
        grad = cpu_gemm.grad_weight(dy, x)
        if scale != 1.0:
            grad.mul_(scale)
    return grad.to(dtype)


def _unread_input(like: torch.Tensor) -> torch.Tensor:
    """The input of an addmm with beta=0, which reads it only for its shape: one scalar per dtype
    and device, made once (an allocation per product cost about 7 us of CPU on the H200's host)."""
    return _scalar(like.dtype, like.device)


@functools.cache
def _scalar(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.zeros((), dtype=dtype, device=device)


def _widening_addmm(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * a @ b written in `dtype` by the GEMM (torch's `out_dtype`: CUDA only). beta=0:
    the input is not read; its shape is the output's, so nothing is resized."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, out_dtype=dtype, beta=0, alpha=scale)


@functools.cache
def _gemm_widens(device: torch.device, operand: torch.dtype, output: torch.dtype) -> bool:
    """`_widening_addmm` runs on this device for these dtypes and gives the fp32 product: asked
    once per device (torch added `out_dtype` in 2.8, for CUDA's fp16 and bf16), on operands laid
    out as the gradients' are: a transposed column block of a wider matrix times a column block.
    Judged by the result alone (no warning filters: this runs in autograd's threads)."""
    if device.type != "cuda" or output != torch.float32 or operand not in (torch.float16, torch.bfloat16):
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(64, 80, device=device, generator=generator).to(operand)[:, 8:56]  # (T, out) of (T, wider)
    xa = torch.randn(64, 40, device=device, generator=generator).to(operand)[:, 8:24]  # (T, r) of (T, R)
    try:
        got = _widening_addmm(dy.T, xa, 0.5, output)
    except Exception:  # noqa: BLE001 - an older torch, another backend: the cast path then
        return False
    want = 0.5 * (dy.double().T @ xa.double())
    return got.dtype == output and got.shape == want.shape and bool(torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5))


def _masks_to_save(ctx, kept) -> list:
    """The kept dropout masks (or None) for save_for_backward; a Redraw (no activation) stays on ctx."""
    ctx.redraws = [k if isinstance(k, adapter_dropout.Redraw) else None for k in kept]
    return [k if isinstance(k, torch.Tensor) else None for k in kept]


def _kept_for_masks(ctx, saved_masks) -> list:
    """What forward kept for each projection's mask, as `_masks_to_save` split it."""
    return [redraw if redraw is not None else mask for mask, redraw in zip(saved_masks, ctx.redraws)]


def _param_grads(grads_a, grads_b):
    """Gradient list in argument order: None for the frozen W and b."""
    out = []
    for grad_a, grad_b in zip(grads_a, grads_b):
        out += [None, None, grad_a, grad_b]
    return out


def _flat(t):
    return t.reshape(-1, t.shape[-1])


class _SharedInputLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers, scalings, rates, *params):
        projections = _group(params, scalings)
        casts = cast_adapters(layers, x.dtype)
        outs, xa, a_cat, kept = _shared_forward(_flat(x), projections, casts, rates)
        ctx.scalings, ctx.rates, ctx.ranks = scalings, rates, len(casts.b)
        ctx.save_for_backward(x, xa, a_cat, *casts.b, *_masks_to_save(ctx, kept), *params)
        lead = x.shape[:-1]
        return tuple(out.view(*lead, out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, xa, a_cat, *rest = ctx.saved_tensors
        n = ctx.ranks
        cast_b, masks, params = rest[:n], _kept_for_masks(ctx, rest[n:2 * n]), rest[2 * n:]
        projections = _group(params, ctx.scalings)
        dx, grads_a, grads_b = _shared_backward(_flat(x), xa, a_cat, cast_b, projections,
                                                [_flat(g) for g in grad_outs],
                                                ctx.needs_input_grad[0], list(zip(masks, ctx.rates)))
        dx = None if dx is None else dx.view(x.shape)
        return dx, None, None, None, *_param_grads(grads_a, grads_b)


def _silu_mul_grads(e, g, dh, silu=None, dg_out=None):
    """(de, dg) for h = silu(e) * g: dg in silu's buffer (given), or silu(e) computed into dg_out;
    de in dh's, by torch's fused silu backward (dh g sigmoid(e) (1 + e (1 - sigmoid(e))) in one
    pass, in fp32 inside for 16-bit inputs). Two passes fewer than spelling the derivative out."""
    dg = (silu if silu is not None else torch.ops.aten.silu.out(e, out=dg_out)).mul_(dh)
    dh_g = dh.mul_(g)
    return torch.ops.aten.silu_backward.grad_input(dh_g, e, grad_input=dh_g), dg


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, triton_ops, layers, scalings, rates, *params):
        gate, up, down = _group(params, scalings)
        gate_up_casts, down_casts = cast_adapters(layers[:2], x.dtype), cast_adapters(layers[2:], x.dtype)
        (e, g), xa, a_cat, kept = _shared_forward(_flat(x), [gate, up], gate_up_casts, rates[:2])  # (T, I) each
        h = triton_ops.silu_mul(e, g) if triton_ops else F.silu(e).mul_(g)  # not saved
        (out,), ha, a_down, kept_down = _shared_forward(h, [down], down_casts, rates[2:],
                                                        outputs=not _RECOMPUTE.skips_mlp_output)
        ctx.scalings, ctx.rates, ctx.triton_ops = scalings, rates, triton_ops
        ctx.save_for_backward(x, e, g, xa, a_cat, ha, a_down, *gate_up_casts.b, *down_casts.b,
                              *_masks_to_save(ctx, kept + kept_down), *params)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, e, g, xa, a_cat, ha, a_down, b_gate, b_up, b_down, *rest = ctx.saved_tensors
        dropouts, params = list(zip(_kept_for_masks(ctx, rest[:3]), ctx.rates)), rest[3:]
        gate, up, down = _group(params, ctx.scalings)
        ops = ctx.triton_ops
        # with gate and up stacked, dh (then d gate over it) and d up go side by side into one
        # matrix, so that dX is one GEMM: on a GPU, where cuBLAS writes column blocks in place
        side_by_side = _cublas_writes_in_place(e) and stacking.row_blocks([gate[0], up[0]]) is not None
        silu = F.silu(e) if ops is None and not side_by_side else None  # kept: d up goes into it
        if ops is not None:
            h = ops.silu_mul(e, g)
        else:  # the same kernels as forward: h is recomputed exactly
            h = silu * g if silu is not None else F.silu(e).mul_(g)
        grad = _flat(grad_out)
        down_dropout = adapter_dropout.masks_for(h, dropouts[2:])
        dxa_down, grads_a_down, grads_b_down = _adapter_grads(h, ha, [b_down], [down], [grad], down_dropout)
        # before the buffers below: the MLP's backward peak stays at two (T, I) matrices (with dropout
        # the down adapter's dropped copy of h was a third, for its dA alone)
        del h
        d_gate_up = torch.empty(e.shape[0], 2 * e.shape[1], dtype=e.dtype, device=e.device) if side_by_side else None
        dh_out, dg_out = (None, None) if d_gate_up is None else d_gate_up.split(e.shape[1], dim=1)
        dh = _input_grad_with_adapters([down], [grad], dxa_down, a_down, down_dropout, out=dh_out)
        del down_dropout  # a mask drawn again (CUDA) would live through the gate and up backward
        if ops is None:
            de, dg = _silu_mul_grads(e, g, dh, silu=silu, dg_out=dg_out)
        else:  # one pass, de written over dh
            de, dg = ops.silu_mul_grads(e, g, dh, into_grad=True, d_up=dg_out)
        dx, grads_a, grads_b = _shared_backward(_flat(x), xa, a_cat, [b_gate, b_up], [gate, up], [de, dg],
                                                ctx.needs_input_grad[0], dropouts[:2])
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, None,
                *_param_grads(grads_a + grads_a_down, grads_b + grads_b_down))
