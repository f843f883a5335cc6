"""native_ops' RMSNorm and RoPE against transformers' modules and functions: gradcheck in float64,
the same values and gradients in fp32, in bf16 no further from a float64 answer than transformers,
and the reference for what the hand-written backwards do not cover."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorakit.kernels import native_ops

HIDDEN, HEAD_DIM = 72, 18


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _values_and_grads(fn, inputs, seed=7):
    """fn(*inputs) and the grads of a fixed random projection of its outputs w.r.t. every input
    that requires grad (inputs are cloned: the caller's tensors are never touched)."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
    return [t.detach() for t in (*outs, *grads)]


def _max_error(got, exact):
    return max(float((g.double() - e).abs().max()) for g, e in zip(got, exact, strict=True))


# ---- RMSNorm ------------------------------------------------------------------------------------

def _norm(dtype=torch.float32, trainable=False):
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * _randn(HIDDEN, seed=2))
    return norm.requires_grad_(trainable)


def test_rms_norm_passes_gradcheck_with_a_trainable_weight():
    x = _randn(3, 5, HIDDEN, dtype=torch.float64).requires_grad_()
    weight = (1 + 0.5 * _randn(HIDDEN, seed=2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: native_ops.rms_norm(a, w, 1e-5), (x, weight))


@pytest.mark.parametrize("trainable", [False, True])
def test_rms_norm_matches_llama_rms_norm_in_fp32(trainable):
    norm, x = _norm(trainable=trainable), _randn(2, 7, HIDDEN, seed=1).requires_grad_()
    inputs = [x, norm.weight]
    assert type(native_ops.rms_norm(x, norm.weight, 1e-5).grad_fn).__name__ == "_RMSNormBackward"
    got = _values_and_grads(lambda a, w: native_ops.rms_norm(a, w, norm.variance_epsilon), inputs)
    want = _values_and_grads(lambda a, w: native_ops.rms_norm_reference(a, w, 1e-5), inputs)
    with torch.no_grad():
        torch.testing.assert_close(got[0], norm(x), rtol=1e-6, atol=1e-6)
    assert len(got) == len(want) == (3 if trainable else 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_rms_norm_16_bit_rounds_like_llama_and_is_no_less_exact(x_dtype, w_dtype):
    x = (3 * _randn(4, 9, HIDDEN, seed=1)).to(x_dtype).requires_grad_()
    weight = (1 + 0.5 * _randn(HIDDEN, seed=2)).to(w_dtype).requires_grad_()
    got = _values_and_grads(lambda a, w: native_ops.rms_norm(a, w, 1e-5), [x, weight])
    want = _values_and_grads(lambda a, w: native_ops.rms_norm_reference(a, w, 1e-5), [x, weight])
    exact = _values_and_grads(lambda a, w: native_ops.rms_norm(a, w, 1e-5),  # float64 inside
                              [x.double(), weight.double()])
    assert [t.dtype for t in got] == [t.dtype for t in want]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # same roundings forward
    assert _max_error(got, exact) <= 1.05 * _max_error(want, exact)


def test_rms_norm_takes_strided_inputs_and_empty_batches():
    norm = _norm()
    x = _randn(5, HIDDEN, 3, seed=1).transpose(1, 2)  # last dim not contiguous
    with torch.no_grad():
        torch.testing.assert_close(native_ops.rms_norm(x, norm.weight, 1e-5), norm(x))
    assert native_ops.rms_norm(torch.empty(0, HIDDEN), norm.weight, 1e-5).shape == (0, HIDDEN)


def test_rms_norm_with_an_unusual_weight_takes_the_reference(monkeypatch):
    monkeypatch.setattr(native_ops._RMSNorm, "apply", None)  # would fail if called
    x, weight = _randn(2, 3, HIDDEN), _randn(1, HIDDEN, seed=3)
    torch.testing.assert_close(native_ops.rms_norm(x, weight, 1e-5),
                               native_ops.rms_norm_reference(x, weight, 1e-5))


# ---- RoPE ---------------------------------------------------------------------------------------

def _rotary(batch, seq_len, dtype=torch.float32, seed=None):
    """Llama's cos/sin (halves repeat), or random ones with distinct halves when seed is set."""
    if seed is not None:
        return (_randn(batch, seq_len, HEAD_DIM, seed=seed, dtype=dtype),
                _randn(batch, seq_len, HEAD_DIM, seed=seed + 1, dtype=dtype))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    freqs = torch.arange(seq_len).double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).expand(batch, seq_len, HEAD_DIM)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(seq_len, dtype=torch.float32):
    # q as the attention sees it: a (B, T, H, D) projection output viewed as (B, H, T, D)
    q = (2 * _randn(2, seq_len, 3, HEAD_DIM)).to(dtype).transpose(1, 2).requires_grad_()
    k = (2 * _randn(2, 1, seq_len, HEAD_DIM, seed=1)).to(dtype).requires_grad_()
    return q, k


@pytest.mark.parametrize("cos_batch, seed", [(1, None), (2, 5)])
def test_rope_passes_gradcheck(cos_batch, seed):
    q, k = (t.detach().double().requires_grad_() for t in _qk(4))
    cos, sin = _rotary(cos_batch, 4, torch.float64, seed)
    assert torch.autograd.gradcheck(lambda a, b: native_ops.rope(a, b, cos, sin), (q, k))


@pytest.mark.parametrize("cos_batch, seed", [(1, None), (2, None), (2, 5)])
def test_rope_matches_transformers_in_fp32_and_leaves_its_inputs(cos_batch, seed):
    q, k = _qk(5)
    cos, sin = _rotary(cos_batch, 5, seed=seed)
    before = q.detach().clone(), k.detach().clone()
    assert type(native_ops.rope(q, k, cos, sin)[0].grad_fn).__name__ == "_RopeBackward"
    got = _values_and_grads(lambda a, b: native_ops.rope(a, b, cos, sin), [q, k])
    want = _values_and_grads(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), [q, k])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_in_16_bit_is_no_less_exact_than_transformers(dtype):
    q, k = _qk(16, dtype)
    cos, sin = _rotary(2, 16, dtype)
    got = _values_and_grads(lambda a, b: native_ops.rope(a, b, cos, sin), [q, k])
    want = _values_and_grads(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), [q, k])
    exact = _values_and_grads(lambda a, b: apply_rotary_pos_emb(a, b, cos.double(), sin.double()),
                              [q.double(), k.double()])
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert _max_error(got, exact) <= _max_error(want, exact)


def test_rope_with_trainable_cos_takes_the_reference():
    q, k = _qk(5)
    cos, sin = (t.requires_grad_() for t in _rotary(1, 5))
    got = _values_and_grads(native_ops.rope, [q, k, cos, sin])
    want = _values_and_grads(apply_rotary_pos_emb, [q, k, cos, sin])
    assert len(got) == 6  # q', k' and four gradients, cos and sin included
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_runs_on_cpu_tensors_only():
    assert native_ops.runs_on(torch.zeros(1))
    assert not native_ops.runs_on(torch.zeros(1, device="meta"))
