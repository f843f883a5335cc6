"""Causal self-attention for training on the CPU: block-causal GEMMs over grouped query heads.

SDPA on the CPU runs torch's flash-attention kernels, whose backward is slow at training
lengths: 13.4-13.7 ms forward + backward per layer at SmolLM2's shape (4 x 256 tokens, 9 query
and 3 key/value heads of 64, fp32 or bf16) against this module's 8.7-9.7 ms (docs/performance.md).

Layout. The G = Hq / Hkv query heads that share a key/value head are stacked into one matrix,
rows ordered (position, head): q (B, Hq, T, D) -> (B Hkv, T G, D). Each (batch, key/value head)
is then one GEMM of T G rows against T keys: no repeated k and v, and GEMMs G times taller.
Queries go in blocks of BLOCK positions (BLOCK G rows); block i attends to keys [0, e_i), its own
end, so the causal triangle above the block diagonal is never computed (about half the work
when T >> BLOCK) and only the diagonal block is masked. Per block, with Q pre-scaled:

    forward   S = Q_i K_{:e}^T     P = softmax(S)      O_i = P V_{:e}
    backward  dV_{:e} += P^T dO_i   dS = P * (dO_i V_{:e}^T - delta_i)   (delta = rowsum(dO * O))
              dQ_i = scale dS K_{:e}    dK_{:e} += dS^T Q_i

Backward needs P. Up to KEEP_PROBS_MAX_LEN positions it is kept from the forward (fp32: about
2 Hq (T + BLOCK) bytes per token and layer, 5.8 kB at SmolLM2's 256, a fifth more than the rest
of the layer saves); longer rows keep only the row log-sum-exp and recompute P = exp(S - lse)
block by block, one more GEMM per block, so memory stays linear in T.

Computes in fp32 (float64 stays float64). 16-bit inputs are upcast: P and every sum stay fp32,
only the output is rounded to 16 bits (and read back as such for delta, as SDPA does).
`attention_blocker` names why a call must stay with SDPA instead: a mask,
queries shorter than keys (decoding from a cache), dropout, a sliding window shorter than the
row, autocast, a GPU.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 64  # query positions per block: 64 G-row GEMMs, and the skipped triangle's granularity
KEEP_PROBS_MAX_LEN = 256  # longer rows recompute P in backward instead of keeping it


# set on an attention module by enable_fast_paths (with the native ops): its causal attention may
# take this kernel, in the copied attention forward and in the varlen path
_ENABLED = "_lorakit_cpu_attention"


def set_enabled(module, on: bool) -> None:
    """Let `module`'s causal attention take causal_attention where it applies (or not)."""
    if on:
        module.__dict__[_ENABLED] = True
    else:
        module.__dict__.pop(_ENABLED, None)


def enabled_for(module) -> bool:
    return bool(getattr(module, "__dict__", {}).get(_ENABLED, False))


def attention_blocker(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask=None, dropout: float = 0.0,
                      sliding_window: int | None = None) -> str | None:
    """Why causal_attention cannot replace SDPA's causal attention for these tensors, or None.
    query (B, Hq, T, D), key and value (B, Hkv, S, D)."""
    if query.device.type != "cpu":
        return "not a CPU tensor"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on (SDPA follows its dtype rules)"
    if not query.dtype.is_floating_point or query.dtype != key.dtype or key.dtype != value.dtype:
        return "query, key and value must share one floating-point dtype"
    if attention_mask is not None:
        return "an attention mask is given"
    if dropout:
        return "attention dropout"
    if query.dim() != 4 or key.shape != value.shape or query.shape[0] != key.shape[0]:
        return "shapes are not (B, H, T, D)"
    if query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return "queries and keys differ in length (a cache), or a single query"
    if query.shape[1] % key.shape[1] or query.shape[3] != key.shape[3]:
        return "query heads are not a multiple of key/value heads of the same size"
    if sliding_window is not None and sliding_window < query.shape[2]:
        return "a sliding window shorter than the sequence"
    return None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T scale, causal) v with grouped-query heads, as (B, T, Hq, D) contiguous.

    query (B, Hq, T, D), key and value (B, Hkv, T, D), Hq a multiple of Hkv: what
    `scaled_dot_product_attention(..., is_causal=True, enable_gqa=True).transpose(1, 2)` gives.
    """
    reason = attention_blocker(query, key, value)
    if reason is not None:
        raise ValueError(f"causal_attention cannot take these tensors: {reason}")
    return _CausalGroupedAttention.apply(query, key, value, float(scale))


def kept_probability_bytes(length: int, heads: int) -> float:
    """Bytes per token that the forward keeps for backward beyond SDPA's tensors: the fp32
    probabilities of `heads` query heads over rows of `length` (0 past KEEP_PROBS_MAX_LEN)."""
    if length > KEEP_PROBS_MAX_LEN:
        return 0.0
    keys_per_row = sum((end - start) * end for start, end in _blocks(length)) / length
    return 4.0 * heads * keys_per_row


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(length: int):
    return [(start, min(start + BLOCK, length)) for start in range(0, length, BLOCK)]


def _diagonal_mask(positions: int, group: int) -> torch.Tensor:
    """(positions G, positions) True where row (t, g) must not see key j: j > t. Cached, except
    under torch.compile, which traces through a cache (and warns that it does)."""
    if torch.compiler.is_compiling():
        return _block_mask(positions, group)
    return _cached_block_mask(positions, group)


def _block_mask(positions: int, group: int) -> torch.Tensor:
    keys = torch.arange(positions, device="cpu")  # explicit: a default-device context may differ
    return keys[None, :] > keys.repeat_interleave(group)[:, None]


_cached_block_mask = functools.cache(_block_mask)


def _grouped(x: torch.Tensor, kv_heads: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """(B, Hq, T, D) -> (B Hkv, T G, D) in `dtype`, rows ordered (position, head), times scale."""
    b, heads, length, dim = x.shape
    group = heads // kv_heads
    out = torch.empty(b, kv_heads, length, group, dim, dtype=dtype, device=x.device)
    out.copy_(x.view(b, kv_heads, group, length, dim).transpose(2, 3))
    if scale != 1.0:  # not mul(out=): torch.compile cannot trace a view of an out= result
        out.mul_(scale)
    return out.view(b * kv_heads, length * group, dim)


def _scores(q_rows, keys, start, end, group):
    """S for one query block, the diagonal block masked."""
    scores = torch.bmm(q_rows, keys[:, :end].transpose(1, 2))
    scores[:, :, start:].masked_fill_(_diagonal_mask(end - start, group), float("-inf"))
    return scores


def _operands(query, key, value, scale):
    """(scale Q grouped (B Hkv, T G, D), K and V as (B Hkv, T, D)), in the compute dtype."""
    b, _, length, dim = key.shape
    dtype = _compute_dtype(query.dtype)
    return (_grouped(query, key.shape[1], dtype, scale),
            *(t.to(dtype).reshape(b * key.shape[1], length, dim) for t in (key, value)))


class _CausalGroupedAttention(torch.autograd.Function):
    """Saves its inputs and output as they are (what SDPA keeps too) plus P or the row lse; the
    grouped fp32 operands are rebuilt in backward, one cheap copy each."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        b, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q, k, v = _operands(query, key, value, scale)
        out = torch.empty_like(q)
        keep = length <= KEEP_PROBS_MAX_LEN
        probs, lse = [], None if keep else q.new_empty(q.shape[:2])
        for start, end in _blocks(length):
            rows = slice(start * group, end * group)
            scores = _scores(q[:, rows], k, start, end, group)
            if keep:
                p = torch.softmax(scores, -1)
                probs.append(p)
            else:
                row_lse = torch.logsumexp(scores, -1, keepdim=True)
                lse[:, rows] = row_lse.squeeze(-1)
                p = scores.sub_(row_lse).exp_()
            out[:, rows] = torch.bmm(p, v[:, :end])
        result = query.new_empty(b, length, heads, dim)
        result.view(b, length, kv_heads, group, dim).copy_(
            out.view(b, kv_heads, length, group, dim).transpose(1, 2))
        # the result itself is saved (no copy): modifying it in place later is an autograd error
        ctx.save_for_backward(query, key, value, result, *(probs if keep else [lse]))
        ctx.scale, ctx.keep = scale, keep
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, result, *kept = ctx.saved_tensors
        b, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q, k, v = _operands(query, key, value, ctx.scale)
        grad_o = _grouped(grad_out.transpose(1, 2), kv_heads, q.dtype)
        delta = torch.linalg.vecdot(grad_out.to(q.dtype), result.to(q.dtype))  # (B, T, Hq)
        delta = delta.view(b, length, kv_heads, group).transpose(1, 2).reshape(-1, length * group, 1)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for index, (start, end) in enumerate(_blocks(length)):
            rows = slice(start * group, end * group)
            if ctx.keep:
                p = kept[index]
            else:
                p = _scores(q[:, rows], k, start, end, group).sub_(kept[0][:, rows, None]).exp_()
            grad_o_rows = grad_o[:, rows]
            grad_v[:, :end] += torch.bmm(p.transpose(1, 2), grad_o_rows)
            grad_s = torch.bmm(grad_o_rows, v[:, :end].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            grad_q[:, rows] = torch.bmm(grad_s, k[:, :end])
            grad_k[:, :end] += torch.bmm(grad_s.transpose(1, 2), q[:, rows])
        return (_ungrouped(grad_q, query.shape, kv_heads, ctx.scale, query.dtype),
                grad_k.view(key.shape).to(key.dtype), grad_v.view(key.shape).to(key.dtype), None)


def _ungrouped(grad_q, shape, kv_heads, scale, dtype):
    """dQ (B Hkv, T G, D), unscaled -> (B, Hq, T, D) in `dtype`, times scale (Q was scaled in
    forward)."""
    b, heads, length, dim = shape
    group = heads // kv_heads
    out = torch.empty(b, heads, length, dim, dtype=dtype, device=grad_q.device)
    out.view(b, kv_heads, group, length, dim).copy_(
        grad_q.view(b, kv_heads, length, group, dim).transpose(2, 3))
    return out.mul_(scale)
