"""Fused Triton kernels for RMSNorm, SwiGLU and RoPE, forward and backward, with autograd wrappers,
and the cross-entropy of a chunk of logits with its gradient, in place.

Each autograd op has a plain PyTorch reference (`*_reference`, from native_ops): the tests
compare against it, and the wrappers fall back to it for inputs the kernels do not cover (see
each docstring).

    rms_norm(x, w, eps)    y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)    LlamaRMSNorm
                           saves x and one fp32 rstd per row; backward (n = x32 * rstd)
                           dn = (dy * w).to(x.dtype), dx = rstd * (dn - n * mean(dn * n))
                           dw = sum over rows of dy * n.to(x.dtype), only when w needs it
                           (per-program fp32 partial sums, then one torch sum)
    swiglu(gate, up)       silu(gate) * up; saves gate and up only, backward recomputes
                           sig = sigmoid(gate): d_up = dy * gate * sig,
                           d_gate = dy * up * sig * (1 + gate * (1 - sig))
    rope(q, k, cos, sin)   transformers' apply_rotary_pos_emb (rotate_half halves):
                           out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (c/s halves 1, 2 of cos, sin)
                           backward is its transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1,
                           i.e. the rotation by -sin when the halves repeat (they do in Llama)
    cross_entropy_rows_(   per row of logits (c, V) with its label y: loss = lse - logit[y] with
      logits, labels,      lse = max + log(sum(exp(logit - max))), i.e. F.cross_entropy(logits
      grad)                .float(), y, reduction="none"); grad=True then overwrites the logits
                           with its gradient softmax - onehot(y) = exp(logit - lse) - (j == y),
                           rounded once to their dtype. No autograd and no fallback: chunked_ce
                           calls it for a frozen head, its PyTorch ops otherwise

All arithmetic is fp32 in registers; inputs and outputs stay in their own dtype (fp32, bf16,
fp16). Hidden sizes need not be powers of two: the tail of every block is masked. The kernels
read every input element before writing the matching output element, so an output may alias
its input (the MLP backward writes d_gate over the incoming gradient this way); the autograd
wrappers themselves never write to their inputs.

Kernels are built when this module is imported: under TRITON_INTERPRET=1 they run on CPU
tensors through Triton's interpreter (slow, for tests), otherwise they need CUDA tensors.
`runs_on(t)` says whether the kernels can take tensor t.
"""

from __future__ import annotations

import functools

import torch

# the plain PyTorch references: the wrappers fall back to them
from lorakit.kernels.native_ops import (rms_norm_reference, rope_blocker, rope_reference,
                                        swiglu_reference)

from lorakit.kernels import triton_launch
from lorakit.kernels.triton_launch import tl, triton
MAX_NORM_WIDTH = 32768  # one row lives in one block (registers); wider rows take the reference
_ELEMENTWISE_BLOCK = 1024
# logits per step of the cross-entropy's loop over a row: 16 KiB of bf16 per load, 16 steps over
# a 128k vocabulary (smaller vocabularies get one block of their own size)
CROSS_ENTROPY_BLOCK = 8192


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def triton_available() -> bool:
    """Triton is importable and the kernels can run here (a CUDA device, or the interpreter)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run in this process, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if triton_launch.INTERPRETED or torch.cuda.is_available():
        return None
    return "no CUDA device (and TRITON_INTERPRET=1 was not set when the kernels were built)"


def runs_on(t: torch.Tensor) -> bool:
    """The kernels can take tensor t: a CUDA tensor, or any tensor under the interpreter."""
    return triton is not None and (triton_launch.INTERPRETED or t.is_cuda)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@functools.lru_cache(maxsize=None)
def _programs_for_reduction(device: torch.device) -> int:
    """How many programs share the rows of a dW reduction (a few per SM)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, each looping over many rows


# ---- helpers ----------------------------------------------------------------------------------
# tl.sum, tl.sigmoid and tl.zeros are jit functions that Triton builds when it is first
# imported; if that was before TRITON_INTERPRET=1 was set (transformers imports triton), the
# interpreter cannot call them. These are built with the kernels, so any import order works.

@_jit
def _add(a, b):
    return a + b


@_jit
def _row_sum(x):
    return tl.reduce(x, 0, _add)


@_jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@_jit
def _maximum(a, b):
    return tl.maximum(a, b)


@_jit
def _row_max(x):
    return tl.reduce(x, 0, _maximum)


# ---- RMSNorm ----------------------------------------------------------------------------------

@_jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, n_cols,
                             eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(_row_sum(x32 * x32) / n_cols + eps)
    # LlamaRMSNorm casts the normalised row back to x's dtype before the weight multiply
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@_jit
def _rms_norm_backward_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_partial_ptr,
                              x_row_stride, dy_row_stride, dx_row_stride, n_rows, n_cols,
                              rows_per_program, BLOCK: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full((BLOCK,), 0.0, tl.float32)
    first = program.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = x.to(tl.float32) * rstd
        # the reference rounds dy * w to x's dtype on its way back through the cast
        dnormed = (dy * w).to(x.dtype).to(tl.float32)
        dx = rstd * (dnormed - normed * (_row_sum(dnormed * normed) / n_cols))
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * normed.to(x.dtype).to(tl.float32)
    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + program * BLOCK + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with unit column stride, copying only when a view cannot do it."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype),
                        device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows:
            triton_launch.launch(_rms_norm_forward_kernel, (n_rows,), x2, x2, weight.contiguous(), y, rstd,
                    x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, rstd = ctx.saved_tensors
        dy = _rows(grad_y)
        n_rows, n_cols = x2.shape
        weight_grad = ctx.needs_input_grad[1]
        programs, rows_each = _split_rows(n_rows, x2.device, weight_grad)
        block = triton.next_power_of_2(n_cols)
        dx = torch.empty_like(x2)
        # one fp32 row of partial dW sums per program (rstd stands in, unused, without dW)
        partial = (torch.empty((programs, block), dtype=torch.float32, device=x2.device)
                   if weight_grad else rstd)
        if programs:
            triton_launch.launch(
                _rms_norm_backward_kernel, (programs,), x2,
                x2, weight.contiguous(), rstd, dy, dx, partial, x2.stride(0), dy.stride(0),
                dx.stride(0), n_rows, n_cols, rows_each,
                BLOCK=block, WEIGHT_GRAD=weight_grad, num_warps=_warps(block))
        dw = partial[:, :n_cols].sum(0).to(weight.dtype) if weight_grad else None
        return dx.view(ctx.x_shape), dw, None


def _split_rows(n_rows, device, weight_grad):
    """(programs, rows per program): one row each, unless a dW reduction wants few programs."""
    if not weight_grad or n_rows == 0:
        return n_rows, 1
    rows_each = triton.cdiv(n_rows, min(n_rows, _programs_for_reduction(device)))
    return triton.cdiv(n_rows, rows_each), rows_each


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm(x) with the given weight and eps, through the kernels when they cover it.

    Output dtype follows LlamaRMSNorm (x's dtype promoted with the weight's). Grads: dx, and
    dweight when weight.requires_grad. Rows wider than MAX_NORM_WIDTH, a weight of another
    shape or device, or a tensor the kernels cannot take run the reference.
    """
    usable = (runs_on(x) and weight.device == x.device and weight.dim() == 1
              and weight.shape[0] == x.shape[-1] and 0 < x.shape[-1] <= MAX_NORM_WIDTH)
    if not usable:
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))


# ---- SwiGLU -----------------------------------------------------------------------------------

@_jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_stride, up_stride, out_stride,
                           BLOCK: tl.constexpr):
    # one block of one row per program: rows may sit side by side in a wider matrix (row strides)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * _sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _swiglu_backward_kernel(gate_ptr, up_ptr, grad_ptr, dgate_ptr, dup_ptr, n_cols, gate_stride, up_stride,
                            grad_stride, dgate_stride, dup_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row * grad_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(gate)
    dup = grad * gate * sig
    dgate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + row * dgate_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * dup_stride + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _row_grid(rows: torch.Tensor):
    return rows.shape[0], triton.cdiv(rows.shape[1], _ELEMENTWISE_BLOCK)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up without autograd, as a new contiguous matrix; gate, up (rows, cols) of one
    dtype with unit column stride (column blocks of a wider matrix will do)."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel():
        triton_launch.launch(_swiglu_forward_kernel, _row_grid(gate), gate, gate, up, out, gate.shape[1],
                gate.stride(0), up.stride(0), out.stride(0), BLOCK=_ELEMENTWISE_BLOCK)
    return out


def silu_mul_grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, *, into_grad: bool = False,
                   d_up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of silu(gate) * up for upstream grad, without autograd.

    All (rows, cols) with unit column stride, same shape; into_grad=True writes d gate over
    `grad` (saves a buffer when the caller owns grad); d_up, when given, is where d up goes (the
    fused MLP puts both side by side, so that one GEMM takes them). Both take grad's dtype.
    """
    dgate = grad if into_grad else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    dup = d_up if d_up is not None else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if gate.numel():
        triton_launch.launch(_swiglu_backward_kernel, _row_grid(gate), gate, gate, up, grad, dgate, dup, gate.shape[1],
                gate.stride(0), up.stride(0), grad.stride(0), dgate.stride(0), dup.stride(0),
                BLOCK=_ELEMENTWISE_BLOCK)
    return dgate, dup


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.shape = gate.shape
        gate, up = _rows(gate), _rows(up)
        ctx.save_for_backward(gate, up)
        return silu_mul(gate, up).view(ctx.shape)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate, d_up = silu_mul_grads(gate, up, _rows(grad))
        return d_gate.view(ctx.shape), d_up.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up saving only gate and up. Tensors of different shapes, dtypes or devices,
    or ones the kernels cannot take, run the reference."""
    if not (runs_on(gate) and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.device == up.device and gate.dtype.is_floating_point):
        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate, up)


# ---- RoPE -------------------------------------------------------------------------------------

@_jit
def _rope_heads(x_ptr, out_ptr, sx_b, sx_h, sx_t, so_b, so_h, so_t, b, t, n_heads,
                c1, c2, s1, s2, half, dims, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate every head of one (batch, position) row of x into out."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < n_heads) & (dims[None, :] < half)
        x_row = x_ptr + b * sx_b + t * sx_t + heads[:, None] * sx_h + dims[None, :]
        o_row = out_ptr + b * so_b + t * so_t + heads[:, None] * so_h + dims[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map
            out1 = x1 * c1 + x2 * s2
            out2 = x2 * c2 - x1 * s1
        else:
            out1 = x1 * c1 - x2 * s1
            out2 = x2 * c2 + x1 * s2
        tl.store(o_row, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + half, out2.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _rope_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr,
                 sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t,
                 sc_b, sc_t, ss_b, ss_t, seq_len, q_heads, k_heads, half,
                 BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // seq_len, row % seq_len
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < half
    c_row, s_row = cos_ptr + b * sc_b + t * sc_t, sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(c_row + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + half + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + half + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rope_heads(q_ptr, qo_ptr, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, b, t, q_heads,
                c1, c2, s1, s2, half, dims, BLOCK_H, BACKWARD)
    _rope_heads(k_ptr, ko_ptr, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, b, t, k_heads,
                c1, c2, s1, s2, half, dims, BLOCK_H, BACKWARD)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bht_strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _rope_launch(q, k, cos, sin, backward):
    """(q', k') rotated (or, backward, transposed-rotated), in new tensors shaped like q, k."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    batch, q_heads, seq_len, dim = q.shape
    half = dim // 2
    # a batch-1 cos/sin (position ids shared by the batch) is read with batch stride 0
    cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    sin_b = 0 if sin.shape[0] == 1 else sin.stride(0)
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(q_heads, k.shape[1])), max(1, 4096 // block_d))
    if batch * seq_len:
        triton_launch.launch(
            _rope_kernel, (batch * seq_len,), q,
            q, q_out, k, k_out, cos, sin, *_bht_strides(q), *_bht_strides(q_out),
            *_bht_strides(k), *_bht_strides(k_out), cos_b, cos.stride(1), sin_b, sin.stride(1),
            seq_len, q_heads, k.shape[1], half, BLOCK_D=block_d, BLOCK_H=block_h,
            BACKWARD=backward, num_warps=_warps(block_h * block_d))
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(grad_q, grad_k, cos, sin, backward=True)
        return dq, dk, None, None


def _rope_blocker(q, k, cos, sin) -> str | None:
    if not runs_on(q):
        return "the kernels cannot take these tensors"
    reason = rope_blocker(q, k, cos, sin)  # shapes, head dims, one dtype, constant cos/sin
    if reason is not None:
        return reason
    batch, _, seq_len, _ = q.shape
    if (k.shape[0], k.shape[2]) != (batch, seq_len):
        return "k does not match q"
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        return "cos/sin do not match q"
    if not q.dtype.is_floating_point:
        return "not a floating-point dtype"
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return "tensors on different devices"
    return None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb(q, k, cos, sin) for q (B, H, T, D), k (B, Hkv, T, D), cos and sin
    (B or 1, T, D). Returns new tensors laid out like q and k (the inputs are not modified).
    Anything else (other layouts, mixed dtypes, cos/sin needing a gradient) runs the reference."""
    if _rope_blocker(q, k, cos, sin) is not None:
        return rope_reference(q, k, cos, sin)
    return _Rope.apply(q, k, cos, sin)


# ---- cross-entropy over rows of logits ----------------------------------------------------------

@_jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, loss_ptr, row_stride, n_cols,
                               BLOCK: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    # pass 1: running max and sum of exp(logit - max), rescaled whenever the max grows. While
    # every logit so far is -inf (masked tails, or -inf logits) the max is -inf: the shift and
    # the rescale then avoid -inf - -inf, whose NaN would spread to the whole row
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        offsets = start + cols
        x = tl.load(row_ptr + offsets, mask=offsets < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, _row_max(x))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.where(running_max == new_max, 1.0, tl.exp(running_max - shift))
        running_sum = running_sum * rescale + _row_sum(tl.exp(x - shift))
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    label = tl.load(labels_ptr + row)
    # an ignored row (label -100) has no loss and a zero gradient; any other label outside the
    # row would read another row's memory: it gives a NaN loss instead
    ignored = label == -100  # chunked_ce.IGNORE_INDEX (a global would need tl.constexpr)
    valid = (label >= 0) & (label < n_cols)
    label_logit = tl.load(row_ptr + label, mask=valid, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - label_logit))
    if GRAD:  # pass 2: softmax - onehot over the logits, in their own dtype
        keep = tl.where(ignored, 0.0, 1.0)
        for start in range(0, n_cols, BLOCK):
            offsets = start + cols
            mask = offsets < n_cols
            x = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(offsets == label, 1.0, 0.0)) * keep
            tl.store(row_ptr + offsets, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, grad: bool, *,
                        block: int = CROSS_ENTROPY_BLOCK) -> torch.Tensor:
    """Per-row cross-entropy of logits (c, V) against labels (c,), a (c,) fp32 tensor.

    grad=True overwrites logits with the gradient of the loss sum, softmax - onehot(labels),
    computed in fp32 and rounded once to the logits' dtype; grad=False leaves them as they are.
    One kernel reads the logits twice and writes them once (the loss alone: reads them once).
    logits need unit column stride; labels lie in [0, V), or are -100 for a row without loss
    (loss 0, gradient 0: chunked_ce drops such rows before, except while a CUDA graph is
    captured); any other label gives a NaN loss. `block` is the logits per step of the loop over a row.
    """
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be (rows, V) with unit column stride, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    n_rows, n_cols = logits.shape
    labels = labels.contiguous()
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(block, triton.next_power_of_2(n_cols))
    if n_rows:
        triton_launch.launch(_cross_entropy_rows_kernel, (n_rows,), logits, logits, labels, loss,
                logits.stride(0), n_cols, BLOCK=block, GRAD=grad, num_warps=_warps(block))
    return loss

