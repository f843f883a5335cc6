"""cpu_attention against torch's SDPA (the plain reference) and float64."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import cpu_attention
from lorakit.kernels.cpu_attention import attention_blocker, causal_attention


def _qkv(batch=2, heads=6, kv_heads=2, length=40, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q and k as the models hand them over: (B, H, T, D) views of (B, T, H, D) projections
    q, k, v = (torch.randn(batch, length, h, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, length, heads, dim, generator=g).to(dtype)
    return q, k, v, grad


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def _run(fn, q, k, v, grad, scale):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, scale)
    out.backward(grad)
    return [out.detach(), *(t.grad.clone() for t in (q, k, v))]


@pytest.fixture(params=["kept", "recomputed"])
def probs_mode(request, monkeypatch):
    """Both backward modes: P kept from the forward, or recomputed from the log-sum-exp."""
    monkeypatch.setattr(cpu_attention, "KEEP_PROBS_MAX_LEN", 10**6 if request.param == "kept" else 0)
    return request.param


@pytest.mark.parametrize("heads, kv_heads, length", [(6, 2, 40), (4, 4, 33), (3, 1, 7)])
def test_matches_sdpa_forward_and_backward_in_fp32(monkeypatch, probs_mode, heads, kv_heads, length):
    monkeypatch.setattr(cpu_attention, "BLOCK", 16)  # several blocks, a ragged last one
    q, k, v, grad = _qkv(heads=heads, kv_heads=kv_heads, length=length)
    got = _run(causal_attention, q, k, v, grad, 0.3)
    want = _run(_sdpa, q, k, v, grad, 0.3)
    assert got[0].shape == (2, length, heads, 8) and got[0].is_contiguous()
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_in_float64(monkeypatch, probs_mode):
    monkeypatch.setattr(cpu_attention, "BLOCK", 2)
    q, k, v, _ = _qkv(batch=1, heads=4, kv_heads=2, length=5, dim=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: causal_attention(*t, 0.7), (q, k, v))


def test_16_bit_inputs_are_no_less_exact_than_sdpa():
    q, k, v, grad = _qkv(length=96, dim=16, dtype=torch.bfloat16)
    exact = _run(_sdpa, *(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double(), 0.25)
    ours, theirs = _run(causal_attention, q, k, v, grad, 0.25), _run(_sdpa, q, k, v, grad, 0.25)
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact, strict=True):
        assert o.dtype == torch.bfloat16
        assert (o.double() - e).abs().max() <= 1.05 * (t.double() - e).abs().max(), name


def test_recomputing_keeps_memory_linear_in_the_length(monkeypatch):
    def saved_bytes(keep_len):
        monkeypatch.setattr(cpu_attention, "KEEP_PROBS_MAX_LEN", keep_len)
        q, k, v, _ = _qkv(length=128)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
            causal_attention(q, k, v, 0.3)
        return sum(total)

    kept, recomputed = saved_bytes(128), saved_bytes(127)
    activations = 4 * 2 * 128 * 8 * (6 + 2 + 2 + 6)  # fp32 q, k, v and the output
    assert recomputed <= activations + 4 * 2 * 128 * 6  # plus the fp32 log-sum-exp
    assert kept > activations + 2 * 6 * 128 * 128  # the causal probabilities, about half of T x T


@pytest.mark.parametrize("change, reason", [
    (dict(attention_mask=torch.ones(1)), "an attention mask is given"),
    (dict(dropout=0.1), "attention dropout"),
    (dict(sliding_window=8), "a sliding window shorter than the sequence"),
])
def test_blocker_names_what_sdpa_must_handle(change, reason):
    q, k, v, _ = _qkv(length=12)
    assert attention_blocker(q, k, v) is None
    assert attention_blocker(q, k, v, sliding_window=12) is None
    assert attention_blocker(q, k, v, **change) == reason


def test_blocker_leaves_autocast_to_sdpa():
    q, k, v, _ = _qkv(length=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_blocker(q, k, v) == "autocast is on (SDPA follows its dtype rules)"


def test_traces_under_torch_compile():
    q, k, v, grad = _qkv(length=20, dim=16)
    want = _run(causal_attention, q, k, v, grad, 0.25)
    compiled = torch.compile(causal_attention, backend="aot_eager", fullgraph=False)
    for got, w in zip(_run(compiled, q, k, v, grad, 0.25), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)


def test_blocker_refuses_a_cache_odd_heads_mixed_dtypes_and_other_devices():
    q, k, v, _ = _qkv(heads=6, kv_heads=2, length=12)
    assert "differ in length" in attention_blocker(q[:, :, -1:], k, v)
    assert "multiple" in attention_blocker(q[:, :5], k, v)
    assert "dtype" in attention_blocker(q, k.double(), v)
    meta = [t.detach().to("meta") for t in (q, k, v)]
    assert attention_blocker(*meta) == "not a CPU tensor"
    with pytest.raises(ValueError, match="cannot take these tensors: queries and keys differ"):
        causal_attention(q[:, :, -1:], k, v, 0.3)
