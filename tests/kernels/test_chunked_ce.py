"""chunked_lm_head_loss against the plain full-logits cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels.chunked_ce import chunked_lm_head_loss

N, H, V = 37, 16, 50  # 37 tokens: chunks of 8 leave a ragged last chunk
pytestmark = pytest.mark.usefixtures("gemm_backend")  # torch's GEMMs and oneDNN's


def _inputs(dtype=torch.float32, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels, normalizer, bias=None):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / normalizer


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 8, 4096])
def test_fp32_loss_and_hidden_grad_match_reference(chunk_size):
    hidden, weight, labels = _inputs()
    normalizer = 123.0
    ref = _reference(hidden, weight, labels, normalizer)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=normalizer,
                               chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (g_ref,), (g_out,) = _grads(ref, [hidden]), _grads(out, [hidden])
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_default_normalizer_is_mean_over_kept_labels():
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100)
    out = chunked_lm_head_loss(hidden, weight, labels, chunk_size=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(out, [hidden])[0], _grads(ref, [hidden])[0],
                               rtol=1e-5, atol=1e-6)


def test_chunk_with_all_labels_ignored():
    hidden, weight, labels = _inputs()
    labels[8:24] = -100  # chunks 1 and 2 (of size 8) carry no loss at all
    ref = _reference(hidden, weight, labels, 10.0)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=10.0, chunk_size=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g_out = _grads(out, [hidden])[0]
    torch.testing.assert_close(g_out, _grads(ref, [hidden])[0], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(g_out[8:24]) == 0


def test_all_labels_ignored_gives_zero_not_nan():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    out = chunked_lm_head_loss(hidden, weight, labels, chunk_size=8)
    assert out.item() == 0.0
    assert torch.count_nonzero(_grads(out, [hidden])[0]) == 0


def test_trainable_weight_and_bias_get_gradients():
    hidden, weight, labels = _inputs()
    weight.requires_grad_()
    bias = (torch.randn(V) * 0.1).requires_grad_()
    ref = _reference(hidden, weight, labels, 7.0, bias)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=7.0, chunk_size=8, bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g_out, g_ref in zip(_grads(out, [hidden, weight, bias]), _grads(ref, [hidden, weight, bias])):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_grad_output_scales():
    hidden, weight, labels = _inputs()
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=5.0, chunk_size=8)
    (2.5 * out).backward()
    assert weight.grad is None
    hidden_ref = hidden.detach().clone().requires_grad_()
    (2.5 * _reference(hidden_ref, weight, labels, 5.0)).backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, rtol=1e-5, atol=1e-6)


def test_micro_batches_with_shared_normalizer_equal_one_big_batch():
    hidden, weight, labels = _inputs()
    total = int((labels != -100).sum())
    halves = [slice(0, 20), slice(20, N)]
    summed = sum(chunked_lm_head_loss(hidden[s], weight, labels[s], normalizer=total,
                                      chunk_size=8) for s in halves)
    big = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100)
    torch.testing.assert_close(summed, big, rtol=1e-5, atol=1e-6)


def test_bf16_within_tolerance_of_fp32_reference():
    hidden, weight, labels = _inputs(torch.bfloat16)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=20.0, chunk_size=8)
    hidden32 = hidden.detach().float().requires_grad_()
    ref = _reference(hidden32, weight.float(), labels, 20.0)
    # bf16 logits carry ~3 significant digits: loss within 1e-2 relative, grads within 2e-2
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    g_out = _grads(out, [hidden])[0]
    assert g_out.dtype == torch.bfloat16
    torch.testing.assert_close(g_out.float(), _grads(ref, [hidden32])[0], rtol=2e-2, atol=2e-3)


def test_leading_dims_are_flattened():
    hidden, weight, labels = _inputs()
    hidden3 = hidden[:36].reshape(4, 9, H)
    out = chunked_lm_head_loss(hidden3, weight, labels[:36].reshape(4, 9), normalizer=3.0,
                               chunk_size=8)
    ref = _reference(hidden[:36], weight, labels[:36], 3.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mismatched_label_count_is_rejected():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="labels hold"):
        chunked_lm_head_loss(hidden, weight, labels[:-1])


def test_only_the_labelled_rows_hidden_gradient_is_kept_for_backward():
    hidden, weight, labels = _inputs()
    kept = int((labels != -100).sum())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_lm_head_loss(hidden, weight, labels, chunk_size=8)
    # the labelled rows' indices and their hidden gradient; nothing N x V
    assert sorted(tuple(t.shape) for t in saved if t.numel() > 1) == [(kept,), (kept, H)]


def test_ignored_rows_never_reach_the_head(monkeypatch):
    from lorakit.kernels import chunked_ce

    rows_seen = []
    plain_head = chunked_ce._head_logits
    monkeypatch.setattr(chunked_ce, "_head_logits", lambda x, *args, **kw: rows_seen.append(len(x)) or plain_head(x, *args, **kw))
    hidden, weight, labels = _inputs(ignore_every=2)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=5.0, chunk_size=8)
    assert sum(rows_seen) == int((labels != -100).sum()) < N
    ref = _reference(hidden, weight, labels, 5.0)
    (g_out,), (g_ref,) = _grads(out, [hidden]), _grads(ref, [hidden])
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(g_out[labels == -100]) == 0


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = _inputs()
    out = chunked_lm_head_loss(hidden, weight, torch.full_like(labels, -100), chunk_size=8)
    assert out.item() == 0.0
    assert torch.count_nonzero(_grads(out, [hidden])[0]) == 0


def test_default_chunk_rows_follow_the_byte_budget():
    from lorakit.kernels.chunked_ce import default_chunk_rows

    assert default_chunk_rows(49152) == 640  # 128 MiB of fp32 logits, a multiple of 64 rows
    assert default_chunk_rows(128256) == 256  # the floor: smaller GEMMs would waste the GPU
    assert default_chunk_rows(256) == 4096  # the ceiling
    assert default_chunk_rows(49152, budget_bytes=2**30) == 4096


def test_an_fp32_head_on_the_cpu_gets_the_larger_budget(monkeypatch):
    from lorakit.kernels import chunked_ce

    assert chunked_ce.chunk_budget_bytes("cpu", fp32_head=True) == 256 * 2**20
    assert chunked_ce.chunk_budget_bytes("cpu", fp32_head=False) == 128 * 2**20
    assert chunked_ce.chunk_budget_bytes("cuda", fp32_head=True) == 128 * 2**20
    seen = []
    real = chunked_ce.default_chunk_rows
    monkeypatch.setattr(chunked_ce, "default_chunk_rows",
                        lambda vocab, budget, bytes_per_logit=4: seen.append(budget) or real(vocab, budget))
    hidden, weight, labels = _inputs()
    for head in (weight, weight.bfloat16()):
        chunked_lm_head_loss(hidden.to(head.dtype), head, labels)
    assert seen == [256 * 2**20, 128 * 2**20]


def test_default_chunking_equals_the_reference_over_several_chunks(monkeypatch):
    from lorakit.kernels import chunked_ce

    monkeypatch.setattr(chunked_ce, "default_chunk_rows", lambda vocab, budget, bytes_per_logit=4: 8)  # 37 rows: 5 chunks
    hidden, weight, labels = _inputs()
    ref = _reference(hidden, weight, labels, 10.0)
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=10.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(out, [hidden])[0], _grads(ref, [hidden])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_workspace_path_equals_the_allocating_path_exactly(monkeypatch, dtype, with_bias):
    from lorakit.kernels import chunked_ce

    hidden, weight, labels = _inputs(dtype)
    weight.requires_grad_()  # the head's own gradient path reads the workspace too
    bias = (torch.randn(V) * 0.1).to(dtype).requires_grad_() if with_bias else None
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    def loss_and_grads():
        out = chunked_lm_head_loss(hidden, weight, labels, normalizer=9.0, chunk_size=8, bias=bias)
        return [out, *_grads(out, inputs)]

    reused = loss_and_grads()
    monkeypatch.setattr(chunked_ce, "_workspace_for", lambda device: None)
    allocated = loss_and_grads()
    for got, want in zip(reused, allocated, strict=True):
        assert torch.equal(got, want)


def test_cpu_workspace_first_used_under_inference_mode_still_serves_training():
    from lorakit.kernels.chunked_ce import release_workspace

    release_workspace()
    hidden, weight, labels = _inputs()
    with torch.inference_mode():
        chunked_lm_head_loss(hidden.detach(), weight, labels, normalizer=4.0, chunk_size=8)  # an eval first
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=4.0, chunk_size=8)
    ref = _reference(hidden, weight, labels, 4.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(out, [hidden])[0], _grads(ref, [hidden])[0], rtol=1e-5, atol=1e-6)


def test_cpu_workspace_is_per_thread():
    from concurrent.futures import ThreadPoolExecutor

    cases = [_inputs(seed=seed) for seed in range(4)]
    expected = [_reference(h, w, y, 3.0).item() for h, w, y in cases]

    def loss_many_times(case):
        h, w, y = case
        return [chunked_lm_head_loss(h.detach(), w, y, normalizer=3.0, chunk_size=8).item() for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(loss_many_times, cases))
    for got, want in zip(results, expected):
        assert got == pytest.approx([want] * 20, rel=1e-5)


def test_cpu_workspace_is_reused_across_calls_and_grows_for_bigger_chunks(gemm_backend):
    from lorakit.kernels.chunked_ce import _WORKSPACE, release_workspace

    release_workspace()
    hidden, weight, labels = _inputs()
    chunked_lm_head_loss(hidden, weight, labels, chunk_size=8)
    if gemm_backend == "onednn":  # oneDNN returns the logits in a buffer of its own
        assert _WORKSPACE.nbytes == 0
        return
    first = _WORKSPACE.get("logits", 8, V, torch.float32).data_ptr()
    assert _WORKSPACE.nbytes == 8 * V * 4  # one fp32 buffer: log_softmax runs in place
    chunked_lm_head_loss(hidden, weight, labels, chunk_size=8)
    assert _WORKSPACE.get("logits", 8, V, torch.float32).data_ptr() == first
    out = chunked_lm_head_loss(hidden, weight, labels, normalizer=4.0, chunk_size=16)  # grows
    assert _WORKSPACE.nbytes == 16 * V * 4
    torch.testing.assert_close(out, _reference(hidden, weight, labels, 4.0), rtol=1e-5, atol=1e-6)
    release_workspace()
    assert _WORKSPACE.nbytes == 0
