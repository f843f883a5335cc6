"""Products with frozen weights on the CPU, through oneDNN where it beats torch's BLAS.

torch's fp32 `mm` on the CPU calls MKL. MKL picks its kernels by CPU vendor as well as by
instruction set, and on this project's machines (AMD EPYC, Zen 5) its fp32 GEMMs run at about
half of what the AVX-512 units do: 215-222 GFLOP/s on 2 threads against oneDNN's 464-493 for the
same products (2048^3 and the shapes of a SmolLM2 block; docs/performance.md). oneDNN, which
torch also ships, chooses by instruction set. Its results are fp32 products like MKL's
(summation order aside: no reduced-precision arithmetic), so the fused LoRA blocks and the
chunked loss route their large GEMMs through here:

    linear(x, w, b)        x @ w.T + b     forward of a projection (w: out x in)
    matmul(x, w)           x @ w           its input gradient; w.T is read in place, not copied
    matmul_add(x, w, acc)  acc + x @ w     the same, summed over the projections sharing x
    grad_weight(dy, x)     dy.T @ x        an adapter matrix's gradient

`backend_for(t)` decides per dtype, the first time it is asked, by timing one GEMM both ways:
oneDNN when it is clearly faster (Zen 4/5), torch's own `mm` otherwise (Intel CPUs, where MKL
already runs AVX-512, and any GPU tensor). LORAKIT_CPU_GEMM=onednn or =aten fixes the choice.
oneDNN's op has no autograd formula: these functions are for autograd Functions' forward and
backward, where no graph is recorded; a call that would record one takes torch's path.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

ONEDNN, ATEN = "onednn", "aten"
ENV_VAR = "LORAKIT_CPU_GEMM"
# oneDNN is chosen when its best time is below this share of torch's: on Zen 5 it measured
# 0.45-0.5, on CPUs where both run the same instruction set the two are within a few percent
WIN_RATIO = 0.85
_TIMED_SHAPE = (512, 576, 1536)  # (rows, in, out): one of the MLP's GEMMs at a small batch
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

_chosen: dict[torch.dtype, str] = {}
_forced: str | None = None


def backend_for(t: torch.Tensor) -> str:
    """The backend the products with `t`'s device and dtype take here."""
    if t.device.type != "cpu" or t.dtype not in _ONEDNN_DTYPES or not _onednn_available():
        return ATEN
    choice = _forced or _from_environment()
    if choice is not None:
        return choice
    if t.dtype not in _chosen:
        _chosen[t.dtype] = _faster_backend(t.dtype)
    return _chosen[t.dtype]


@contextlib.contextmanager
def use_backend(name: str | None):
    """Fix the backend inside the block (None: decide as usual); for tests and measurements."""
    global _forced
    if name not in (ONEDNN, ATEN, None):
        raise ValueError(f"unknown backend {name!r}; use {ONEDNN!r} or {ATEN!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x (..., in) and weight (out, in)."""
    if _takes_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight for x (T, out) and weight (out, in): a projection's input gradient."""
    if _takes_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), None, "none", [], "")
    return x @ weight


def matmul_add(x: torch.Tensor, weight: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + x @ weight; torch's path adds into acc in place, oneDNN's in its output's epilogue."""
    if _takes_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise.binary(x, acc, weight.t(), None, "add")
    return acc.addmm_(x, weight)


def grad_weight(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy.T @ x for dy (T, a) and x (T, b): the gradient of a weight that read x and got dy
    (an adapter's A or B). oneDNN takes the narrower of the two as its input and the wider as
    its weight, read in place: 1.4-3x torch's time the other way round, on this machine."""
    if not _takes_onednn(x, dy):
        return dy.T @ x
    if dy.shape[1] <= x.shape[1]:
        return torch.ops.mkldnn._linear_pointwise(dy.t(), x.t(), None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.t(), dy.t(), None, "none", [], "").t()


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a weight and bias that get no gradient (a frozen projection
    outside the fused blocks), with both products through `linear` and `matmul`."""
    return _FrozenLinear.apply(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        grad_in = matmul(grad_out.reshape(-1, grad_out.shape[-1]), weight)
        return grad_in.view(*grad_out.shape[:-1], weight.shape[1]), None, None


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the op has no derivative
    return x.dtype == weight.dtype and x.dim() >= 2 and backend_for(x) == ONEDNN


def _from_environment() -> str | None:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    return value if value in (ONEDNN, ATEN) else None


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _faster_backend(dtype: torch.dtype) -> str:
    """Time one GEMM both ways (best of 5 after a warm-up: about 30 ms in all)."""
    rows, inner, out = _TIMED_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    weight = torch.randn(out, inner, generator=generator).to(dtype)
    with torch.no_grad():
        try:
            onednn = _best_time(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""))
        except RuntimeError:  # a build whose oneDNN cannot take this dtype
            return ATEN
        aten = _best_time(lambda: torch.nn.functional.linear(x, weight))
    return ONEDNN if onednn < WIN_RATIO * aten else ATEN


def _best_time(product, repeats: int = 5) -> float:
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best
