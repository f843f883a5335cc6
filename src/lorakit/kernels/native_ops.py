"""RMSNorm and RoPE in plain PyTorch with hand-written backwards, and their references.

transformers' eager RMSNorm and apply_rotary_pos_emb are chains of small ops: every op allocates
its output and autograd keeps what each one needs, so a norm makes about a dozen passes over
its input (forward and backward) and RoPE builds rotate_half with a slice, a negation and a cat.
On a CPU those passes, not the arithmetic, are the cost. The autograd functions here compute
the same functions with the fewest passes PyTorch ops allow:

    rms_norm(x, w, eps)   forward: one dot product per row for mean(x^2), x * rstd, times w
                          (LlamaRMSNorm's roundings: fp32 inside, normed cast to x's dtype
                          before the weight). Saves x and the fp32 rstd per row.
                          (float64 stays float64 inside, where LlamaRMSNorm rounds to fp32.)
                          backward (n = x32 * rstd, dn = (dy * w) in fp32):
                          dx = rstd dn - x32 rstd^3 mean(dn x32)    (a dot product and an addcmul)
                          dw = sum over rows of dy * n.to(x.dtype), only when w needs it
    rope(q, k, cos, sin)  out = x cos, then each half gets its rotate_half term by addcmul_;
                          backward is the transposed rotation, the same three ops.
                          In 16-bit this rounds twice where transformers rounds three times.

`runs_on(t)` says where the trainer uses them by default: CPU tensors. On a GPU the Triton
kernels of triton_ops (the default there, `--triton-kernels auto`) fuse each op into one kernel
instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def runs_on(t: torch.Tensor) -> bool:
    """The trainer's default: CPU tensors (measured there; on a GPU see triton_ops)."""
    return t.device.type == "cpu"


# ---- references --------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, written out."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1: q, k (B, H, T, D), cos (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ---- RMSNorm ------------------------------------------------------------------------------------

def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of a * b, kept as a trailing dim of 1, without the product tensor."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 (x itself when it is fp32), or float64 as it is (LlamaRMSNorm would round it
    to fp32; keeping it lets gradcheck check these backwards)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = _at_least_fp32(x)
        rstd = _row_dot(x32, x32).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = (x32 * rstd).to(x.dtype)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = normed.mul_(weight) if out_dtype == normed.dtype else weight * normed
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable  # in-place backward; nothing in lorakit takes second derivatives
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        x32 = _at_least_fp32(x)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            grad_normed = _at_least_fp32((grad_y * weight).to(x.dtype))  # LlamaRMSNorm's casts
            coefficient = _row_dot(grad_normed, x32).mul_(rstd.pow(3)).div_(x.shape[-1])
            dx = grad_normed.mul_(rstd).addcmul_(x32, coefficient, value=-1).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            dw = (grad_y * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm(x) with the given weight and eps (output dtype: x's promoted with the
    weight's). A weight that is not one value per feature runs the reference."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or x.shape[-1] == 0:
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))


# ---- RoPE ---------------------------------------------------------------------------------------

def _rotate(x, cos, sin, transposed: bool):
    """x cos + rotate_half(x) sin, or (transposed) its adjoint x cos + rotate_half^T(x sin)."""
    half = x.shape[-1] // 2
    out = x * cos
    first, second = out[..., :half], out[..., half:]
    if transposed:  # rotate_half^T(y) = (y2, -y1)
        first.addcmul_(x[..., half:], sin[..., half:])
        second.addcmul_(x[..., :half], sin[..., :half], value=-1)
    else:  # rotate_half(x) = (-x2, x1)
        first.addcmul_(x[..., half:], sin[..., :half], value=-1)
        second.addcmul_(x[..., :half], sin[..., half:])
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): one row for every head
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_q, cos, sin, True), _rotate(grad_k, cos, sin, True), None, None


def rope_blocker(q, k, cos, sin) -> str | None:
    """Why these tensors are not q, k (B, H, T, D) and cos, sin (B, T, D) of one dtype, with an
    even head dim and constant cos/sin, or None. The Triton kernels need this and more."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return "shapes are not q, k (B, H, T, D) and cos, sin (B, T, D)"
    if q.shape[-1] % 2 or k.shape[-1] != q.shape[-1] or cos.shape[-1] != q.shape[-1]:
        return "the head dims differ or are odd"
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return "mixed dtypes (the reference promotes them)"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin need a gradient"
    return None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb(q, k, cos, sin) for q (B, H, T, D), k (B, Hkv, T, D), cos and sin
    (B or 1, T, D); new tensors, the inputs are not modified. Anything else (mixed dtypes,
    cos/sin needing a gradient) runs the reference."""
    if rope_blocker(q, k, cos, sin) is not None:
        return rope_reference(q, k, cos, sin)
    return _Rope.apply(q, k, cos, sin)
