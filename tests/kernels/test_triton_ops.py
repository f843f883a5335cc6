"""Triton RMSNorm, SwiGLU and RoPE (forward and every gradient) against plain PyTorch, run on
CPU through Triton's interpreter. Sizes are odd on purpose (hidden 72, 5 rows, half head dim
36) so the masked tails are exercised; tensors stay tiny because the interpreter is slow."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_ops builds its kernels

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from transformers.models.llama.modeling_llama import (LlamaRMSNorm,  # noqa: E402
                                                      apply_rotary_pos_emb)

from lorakit.kernels import triton_ops as ops  # noqa: E402

if not ops.triton_available():  # triton_ops was imported earlier without the interpreter
    pytest.skip(f"Triton kernels cannot run: {ops.unavailable_reason()}", allow_module_level=True)

HIDDEN = 72
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _outputs_and_grads(fn, inputs, seed=7):
    """fn(*inputs) and the grads of a fixed random projection of its outputs w.r.t. every
    input that requires grad."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    wrt = [t for t in inputs if t.requires_grad]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, wrt))


def _assert_close(got, want, dtype):
    for g, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        # scale atol to the tensor's size: a dW summed over rows is larger than one element
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(g.float(), w.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, float(w.abs().max())))


def test_available_under_the_interpreter():
    assert ops.triton_available() and ops.unavailable_reason() is None
    assert ops.runs_on(torch.zeros(1))


# ---- RMSNorm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, HIDDEN), (2, 7, HIDDEN)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_matches_reference(dtype, shape, weight_grad):
    x = _randn(*shape, dtype=dtype).requires_grad_()
    weight = (1 + _randn(HIDDEN, seed=1, scale=0.1)).to(dtype).requires_grad_(weight_grad)
    got = _outputs_and_grads(lambda a, w: ops.rms_norm(a, w, 1e-6), [x, weight])
    want = _outputs_and_grads(lambda a, w: ops.rms_norm_reference(a, w, 1e-6), [x, weight])
    assert len(got[1]) == (2 if weight_grad else 1)
    _assert_close(got, want, dtype)


def test_rms_norm_reference_is_llama_rms_norm():
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + _randn(HIDDEN, seed=1, scale=0.1))
    x = _randn(5, HIDDEN, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.rms_norm_reference(x, norm.weight.bfloat16(), 1e-5),
                               norm.bfloat16()(x), rtol=0, atol=0)


def test_rms_norm_matches_llama_module_and_its_grads():
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + _randn(HIDDEN, seed=1, scale=0.1))
    x = _randn(13, HIDDEN, scale=3.0).requires_grad_()  # 13 rows: uneven rows per program
    got = _outputs_and_grads(lambda a, w: ops.rms_norm(a, w, 1e-5), [x, norm.weight])
    want = _outputs_and_grads(lambda a, w: torch.func.functional_call(norm, {"weight": w}, (a,)),
                              [x, norm.weight])
    _assert_close(got, want, torch.float32)


def test_rms_norm_bf16_input_fp32_weight_promotes_like_llama():
    x = _randn(5, HIDDEN, dtype=torch.bfloat16).requires_grad_()
    weight = (1 + _randn(HIDDEN, seed=1, scale=0.1)).requires_grad_()
    got = _outputs_and_grads(lambda a, w: ops.rms_norm(a, w, 1e-6), [x, weight])
    want = _outputs_and_grads(lambda a, w: ops.rms_norm_reference(a, w, 1e-6), [x, weight])
    assert got[0][0].dtype == torch.float32
    _assert_close(got, want, torch.bfloat16)


def test_rms_norm_strided_input_and_no_rows():
    x = _randn(HIDDEN, 5).T.requires_grad_()  # column stride != 1: copied to rows
    weight = 1 + _randn(HIDDEN, seed=1, scale=0.1)
    _assert_close(_outputs_and_grads(lambda a: ops.rms_norm(a, weight, 1e-6), [x]),
                  _outputs_and_grads(lambda a: ops.rms_norm_reference(a, weight, 1e-6), [x]),
                  torch.float32)
    empty = torch.zeros(0, HIDDEN, requires_grad=True)
    out = ops.rms_norm(empty, weight.requires_grad_(), 1e-6)
    dx, dw = torch.autograd.grad(out.sum(), [empty, weight])
    assert out.shape == (0, HIDDEN) and dx.shape == (0, HIDDEN) and not dw.any()


# ---- SwiGLU -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, HIDDEN), (3, 1030)])  # 3090 elements: 4 blocks, a tail
def test_swiglu_matches_reference(dtype, shape):
    gate = _randn(*shape, dtype=dtype, scale=3.0).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=1).requires_grad_()
    _assert_close(_outputs_and_grads(ops.swiglu, [gate, up]),
                  _outputs_and_grads(ops.swiglu_reference, [gate, up]), dtype)


def test_swiglu_saves_only_gate_and_up():
    gate, up = _randn(5, HIDDEN).requires_grad_(), _randn(5, HIDDEN, seed=1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu(gate, up)
    assert sorted(t.data_ptr() for t in saved) == sorted([gate.data_ptr(), up.data_ptr()])


def test_swiglu_grads_can_overwrite_the_incoming_gradient():
    gate, up, grad = (_randn(5, HIDDEN, seed=s) for s in range(3))
    want = ops.silu_mul_grads(gate, up, grad)
    got = ops.silu_mul_grads(gate, up, grad.clone(), into_grad=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_swiglu_kernels_read_and_write_column_blocks_of_wider_matrices():
    # the fused MLP's gate and up outputs sit side by side in one (rows, 2 * cols) matrix, and
    # its d gate and d up are written side by side into another: row strides, not contiguity
    both, grads = _randn(5, 2 * HIDDEN, scale=3.0), _randn(5, 2 * HIDDEN, seed=1)
    gate, up = both[:, :HIDDEN], both[:, HIDDEN:]
    torch.testing.assert_close(ops.silu_mul(gate, up), ops.silu_mul(gate.contiguous(), up.contiguous()),
                               rtol=0, atol=0)
    want = ops.silu_mul_grads(gate.contiguous(), up.contiguous(), grads[:, :HIDDEN].contiguous())
    d_gate, d_up = ops.silu_mul_grads(gate, up, grads[:, :HIDDEN], into_grad=True, d_up=grads[:, HIDDEN:])
    assert d_gate.data_ptr() == grads.data_ptr() and d_up.data_ptr() == grads[:, HIDDEN:].data_ptr()
    for got, expected in zip((grads[:, :HIDDEN], grads[:, HIDDEN:]), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- RoPE -------------------------------------------------------------------------------------

def _rotary(batch, seq_len, dim, dtype, seed=None):
    """Llama's cos/sin (halves repeat), or random ones with distinct halves when seed is set."""
    if seed is not None:
        return _randn(batch, seq_len, dim, seed=seed, dtype=dtype), \
            _randn(batch, seq_len, dim, seed=seed + 1, dtype=dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(seq_len).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).expand(batch, seq_len, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(batch, seq_len, dim, dtype):
    # q as the attention sees it: a (B, T, H, D) projection output viewed as (B, H, T, D)
    q = _randn(batch, seq_len, 4, dim, dtype=dtype).transpose(1, 2).requires_grad_()
    k = _randn(batch, 2, seq_len, dim, dtype=dtype, seed=1).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cos_batch, seed", [(1, None), (2, None), (2, 5)])
def test_rope_matches_transformers(dtype, cos_batch, seed):
    q, k = _qk(2, 5, HIDDEN, dtype)
    cos, sin = _rotary(cos_batch, 5, HIDDEN, dtype, seed)
    q_before, k_before = q.detach().clone(), k.detach().clone()
    got = _outputs_and_grads(lambda a, b: ops.rope(a, b, cos, sin), [q, k])
    want = _outputs_and_grads(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), [q, k])
    _assert_close(got, want, dtype)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # inputs untouched
    assert got[0][0].stride() == q.stride()  # laid out like q


def test_rope_backward_is_rotation_by_minus_sin():
    q, k = _qk(1, 5, HIDDEN, torch.float32)
    cos, sin = _rotary(1, 5, HIDDEN, torch.float32)
    gq, gk = _randn(*q.shape, seed=3), _randn(*k.shape, seed=4)
    dq, dk = torch.autograd.grad(ops.rope(q, k, cos, sin), [q, k], [gq, gk])
    want_q, want_k = apply_rotary_pos_emb(gq, gk, cos, -sin)
    torch.testing.assert_close(dq, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, want_k, rtol=1e-5, atol=1e-5)


def test_rope_with_trainable_cos_takes_the_reference():
    q, k = _qk(1, 5, HIDDEN, torch.float32)
    cos, sin = (t.requires_grad_() for t in _rotary(1, 5, HIDDEN, torch.float32))
    got = _outputs_and_grads(ops.rope, [q, k, cos, sin])
    want = _outputs_and_grads(apply_rotary_pos_emb, [q, k, cos, sin])
    assert len(got[1]) == 4
    _assert_close(got, want, torch.float32)


# ---- lora_mlp's SwiGLU part -------------------------------------------------------------------

def _lora_mlp_layers(dtype, dropout=0.0):
    from lorakit.lora.layer import LoraLinear

    torch.manual_seed(0)
    layers = []
    for in_f, out_f in ((HIDDEN, 40), (HIDDEN, 40), (40, HIDDEN)):
        base = torch.nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
        layer = LoraLinear(base, 4, 8, 2.0, dropout=dropout)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.5)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stacked, dropout", [(False, 0.0), (True, 0.0), (False, 0.2)])
def test_lora_mlp_with_triton_swiglu_matches_torch_swiglu(dtype, stacked, dropout, monkeypatch):
    from lorakit.kernels import fused_lora
    from lorakit.kernels.fused_lora import lora_mlp

    layers = _lora_mlp_layers(dtype, dropout)  # dropout: the same seed, the same masks in both runs
    if stacked:  # gate and up as one matrix, d gate and d up written side by side (as on a GPU)
        assert fused_lora.stack_frozen_weights(layers[:2])
        monkeypatch.setattr(fused_lora, "_cublas_writes_in_place", lambda t: True)
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def run(triton):
        x = _randn(5, HIDDEN, dtype=dtype).requires_grad_()
        torch.manual_seed(3)
        out = lora_mlp(x, *layers, triton=triton)
        weights = _randn(*out.shape, seed=9)
        return [out.detach()], list(torch.autograd.grad((out.float() * weights).sum(),
                                                        [x, *params]))

    _assert_close(run(True), run(False), dtype)


# ---- cross-entropy rows -----------------------------------------------------------------------

VOCAB = 300  # blocks of 128: two full ones and a masked tail of 44


def _softmax_minus_onehot(logits, labels):
    probs = torch.softmax(logits.double(), -1)
    probs[torch.arange(len(labels)), labels] -= 1.0
    return probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_match_float64(dtype):
    logits = _randn(5, VOCAB, dtype=dtype, scale=4.0)
    labels = torch.tensor([0, 299, 7, 128, 255])  # first, last, and around block edges
    want_loss = -torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    want_grad = _softmax_minus_onehot(logits, labels)
    grad = logits.clone()
    loss = ops.cross_entropy_rows_(grad, labels, grad=True, block=128)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    else:  # fp32 arithmetic rounded once: within one bf16 step of the exact value (the
        # interpreter truncates where the GPU rounds to nearest)
        torch.testing.assert_close(grad.double(), want_grad, rtol=2**-7, atol=1e-30)


def test_cross_entropy_rows_without_grad_leave_the_logits_alone():
    logits = _randn(5, VOCAB, dtype=torch.bfloat16, scale=4.0)
    labels = torch.tensor([3, 1, 4, 1, 5])
    before = logits.clone()
    loss = ops.cross_entropy_rows_(logits, labels, grad=False, block=128)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(
        logits.float(), labels, reduction="none"), rtol=1e-6, atol=1e-6)


def test_cross_entropy_rows_out_of_range_label_gives_nan_not_a_stray_read():
    loss = ops.cross_entropy_rows_(_randn(3, VOCAB), torch.tensor([VOCAB, -1, 2]), grad=False)
    assert loss[:2].isnan().all() and loss[2].isfinite()


def test_cross_entropy_rows_give_an_ignored_row_no_loss_and_no_gradient():
    logits = _randn(3, VOCAB, dtype=torch.bfloat16, scale=4.0)
    labels = torch.tensor([5, -100, 299])
    grad = logits.clone()
    loss = ops.cross_entropy_rows_(grad, labels, grad=True, block=128)
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    kept = torch.tensor([0, 2])
    want = ops.cross_entropy_rows_(logits[kept].clone(), labels[kept], grad=False, block=128)
    torch.testing.assert_close(loss[kept], want, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_while_a_cuda_graph_is_captured_keeps_every_row_to_the_same_result(monkeypatch, with_bias):
    # capture forbids the host read that selects the labelled rows: all 13 rows go through the
    # kernel, the 4 ignored ones with no loss and no gradient
    from lorakit.kernels import chunked_ce, cuda_graph

    hidden, weight, bias, labels = _head_inputs(torch.float32, with_bias)
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)  # the GPU's path
    selected_loss, (selected_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, True, bias)
    rows_seen = []
    monkeypatch.setattr(ops, "cross_entropy_rows_", lambda logits, *a, _real=ops.cross_entropy_rows_, **k:
                        rows_seen.append(logits.shape[0]) or _real(logits, *a, **k))
    monkeypatch.setattr(cuda_graph, "capturing", lambda tensor: True)
    kept_loss, (kept_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, True, bias)
    assert sum(rows_seen) == 13
    torch.testing.assert_close(kept_loss, selected_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(kept_grad, selected_grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(kept_grad[labels == -100], torch.zeros_like(kept_grad[labels == -100]))


def test_chunked_loss_refuses_its_torch_path_inside_a_cuda_graph_capture(monkeypatch):
    from lorakit.kernels import cuda_graph

    hidden, weight, _, labels = _head_inputs(torch.float32)
    monkeypatch.setattr(cuda_graph, "capturing", lambda tensor: True)
    with pytest.raises(ValueError, match="inside a CUDA graph only through its Triton kernel"):
        _chunked_loss_and_hidden_grad(hidden, weight, labels, False)


def _chunked_loss_and_hidden_grad(hidden, weight, labels, triton, bias=None):
    from lorakit.kernels.chunked_ce import chunked_lm_head_loss

    hidden = hidden.detach().clone().requires_grad_()
    loss = chunked_lm_head_loss(hidden, weight, labels, normalizer=11.0, chunk_size=4, bias=bias,
                                triton=triton)
    params = [hidden] + [p for p in (weight, bias) if p is not None and p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def _head_inputs(dtype, with_bias=False):
    hidden = _randn(13, HIDDEN, dtype=dtype)
    weight = _randn(VOCAB, HIDDEN, dtype=dtype, seed=1, scale=0.2)
    bias = _randn(VOCAB, dtype=dtype, seed=2, scale=0.1) if with_bias else None
    labels = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(3))
    labels[::4] = -100  # 9 labelled rows: chunks of 4, 4 and 1
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_with_the_fused_kernel_matches_the_torch_path(monkeypatch, dtype, with_bias):
    from lorakit.kernels import chunked_ce

    hidden, weight, bias, labels = _head_inputs(dtype, with_bias)
    calls = []
    monkeypatch.setattr(ops, "cross_entropy_rows_", lambda *a, _real=ops.cross_entropy_rows_, **k:
                        calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)  # the GPU's path
    fused_loss, (fused_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, True, bias)
    assert len(calls) == 3
    torch_loss, (torch_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, False, bias)
    assert len(calls) == 3
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-6, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-6, atol=1e-8)
    else:  # softmax - onehot may differ by one bf16 step (see above) before the GEMM
        torch.testing.assert_close(fused_grad.float(), torch_grad.float(), rtol=2**-7,
                                   atol=2**-7 * float(torch_grad.abs().max()))


def test_chunked_loss_without_hidden_grad_skips_the_gradient_pass(monkeypatch):
    from lorakit.kernels.chunked_ce import chunked_lm_head_loss

    hidden, weight, _, labels = _head_inputs(torch.bfloat16)
    grad_flags = []
    monkeypatch.setattr(ops, "cross_entropy_rows_", lambda *a, _real=ops.cross_entropy_rows_, **k:
                        grad_flags.append(k["grad"]) or _real(*a, **k))
    got = chunked_lm_head_loss(hidden, weight, labels, chunk_size=4, triton=True)
    assert grad_flags == [False] * 3
    want = chunked_lm_head_loss(hidden, weight, labels, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_chunked_loss_with_a_trained_head_keeps_the_torch_path(monkeypatch):
    hidden, weight, bias, labels = _head_inputs(torch.float32, with_bias=True)
    weight.requires_grad_()
    monkeypatch.setattr(ops, "cross_entropy_rows_", None)  # would fail if called
    got = _chunked_loss_and_hidden_grad(hidden, weight, labels, True, bias)
    want = _chunked_loss_and_hidden_grad(hidden, weight, labels, False, bias)
    assert len(got[1]) == 2  # hidden and weight
    for g, w in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert torch.equal(g, w)


def test_chunked_loss_with_hidden_wider_than_the_head_matches_the_torch_path(monkeypatch):
    # fp32 hidden states into a bf16 head: the GEMM's rows cannot land in the gradient in place
    from lorakit.kernels import chunked_ce

    hidden, weight, _, labels = _head_inputs(torch.bfloat16)
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)  # the GPU's path
    fused_loss, (fused_grad,) = _chunked_loss_and_hidden_grad(hidden.float(), weight, labels, True)
    torch_loss, (torch_grad,) = _chunked_loss_and_hidden_grad(hidden.float(), weight, labels, False)
    assert fused_grad.dtype == torch.float32
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_grad, torch_grad, rtol=2**-7, atol=2**-7 * float(torch_grad.abs().max()))


@pytest.mark.parametrize("triton, rows", [(False, 256), (True, 512)])
def test_the_fused_kernel_s_default_chunk_counts_only_head_dtype_logits(monkeypatch, triton, rows):
    # a bf16 head: 128 MiB hold 256 rows of fp32 logits (the torch path's), 512 of bf16 ones
    from lorakit.kernels import chunked_ce

    sizes = []
    for path in ("_chunk_loss_and_grads", "_fused_chunk_loss_and_grads"):
        monkeypatch.setattr(chunked_ce, path, lambda *args: sizes.append(args[-1].stop - args[-1].start)
                            or torch.zeros(()))
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)  # the GPU's path
    vocab = 2**20 // 8
    hidden = torch.zeros(600, 8, dtype=torch.bfloat16)
    chunked_ce.chunked_lm_head_loss(hidden, torch.zeros(vocab, 8, dtype=torch.bfloat16),
                                    torch.zeros(600, dtype=torch.long), triton=triton)
    assert sizes[0] == rows


def test_cross_entropy_rows_with_a_first_block_of_minus_inf_logits():
    # the running max is -inf through the first block: no -inf - -inf may reach the sum
    logits = _randn(2, VOCAB, scale=4.0)
    logits[:, :128] = float("-inf")  # the whole first block of 128
    labels = torch.tensor([200, 131])
    want_loss = -torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    grad = logits.clone()
    loss = ops.cross_entropy_rows_(grad, labels, grad=True, block=128)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), _softmax_minus_onehot(logits, labels), rtol=1e-5, atol=1e-7)


def test_chunked_loss_with_a_16_bit_hidden_and_an_fp32_head_rounds_once(monkeypatch):
    # the fp32 head's hidden gradient is scaled in fp32 and rounded to bf16 once, as the torch
    # path does: no further from float64 than that path
    from lorakit.kernels import chunked_ce

    hidden, weight, _, labels = _head_inputs(torch.float32)
    hidden = hidden.bfloat16()
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)  # the GPU's path
    _, (fused_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, True)
    _, (torch_grad,) = _chunked_loss_and_hidden_grad(hidden, weight, labels, False)
    _, (exact,) = _chunked_loss_and_hidden_grad(hidden.double(), weight.double(), labels, False)
    assert fused_grad.dtype == torch.bfloat16

    def error(grad):
        return float((grad.double() - exact).norm() / exact.norm())

    assert error(fused_grad) <= 1.05 * error(torch_grad) + 1e-9
