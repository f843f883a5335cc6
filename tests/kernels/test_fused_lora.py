"""Fused LoRA autograd functions against the plain LoraLinear module forward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from replayed_dropout import recorded_masks, replay_masks
from torch import nn

from lorakit.kernels import adapter_casts, adapter_dropout, fused_lora, stacking
from lorakit.kernels.fused_lora import can_fuse, fuse_blocker, lora_linear, lora_mlp, lora_qkv
from lorakit.lora.layer import LoraLinear

HIDDEN, INTER = 24, 40
pytestmark = pytest.mark.usefixtures("gemm_backend")  # torch's GEMMs and oneDNN's


@pytest.fixture(autouse=True)
def seeded():
    """The layers draw their base weights from torch's global generator: fixed draws, so that a
    tolerance holds for the weights it was checked on (unseeded, about one run in twenty drew
    fp32 MLP weights whose summation-order difference passed 1e-5)."""
    torch.manual_seed(0)


@pytest.fixture(params=["cpu-products", "epilogue", "widening"])
def scaling_path(request, monkeypatch):
    """The adapters' scaled products as the CPU runs them (cpu_gemm, then a scaling) and as a GPU
    does (the scale in addmm's alpha, written into a column block of dXA in place), there with
    the gradients of fp32 masters written in fp32 by the GEMM (torch's out_dtype, CUDA only: here
    its stand-in, which gives the fp32 product)."""
    widened = []  # the dtypes the widening GEMMs wrote
    if request.param != "cpu-products":
        monkeypatch.setattr(fused_lora, "_cublas_writes_in_place", lambda t: True)
    if request.param == "widening":
        monkeypatch.setattr(fused_lora, "_gemm_widens", lambda device, operand, output: output == torch.float32)
        monkeypatch.setattr(fused_lora, "_widening_addmm", lambda a, b, scale, dtype: widened.append(dtype) or
                            (scale * (a.double() @ b.double())).to(dtype))
    yield request.param, widened
    assert set(widened) <= {torch.float32}


def _lora(in_f, out_f, r, alpha=None, bias=False, dtype=torch.float32, dropout=0.0, dora=False):
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype).requires_grad_(False)
    alpha = 2 * r if alpha is None else alpha
    layer = LoraLinear(base, r, alpha, alpha / r, dropout=dropout, use_dora=dora)
    with torch.no_grad():  # B starts at zero: give it values so its path is tested
        layer.lora_B.weight.normal_(std=0.5)
    return layer


def _qkv(bias=False, dtype=torch.float32):
    # different ranks and widths (GQA: k, v narrower than q) catch slicing mistakes
    return (_lora(HIDDEN, HIDDEN, 4, bias=bias, dtype=dtype),
            _lora(HIDDEN, 12, 2, alpha=5, bias=bias, dtype=dtype),
            _lora(HIDDEN, 12, 3, bias=bias, dtype=dtype))


def _mlp(dtype=torch.float32):
    return (_lora(HIDDEN, INTER, 4, dtype=dtype), _lora(HIDDEN, INTER, 2, alpha=3, dtype=dtype),
            _lora(INTER, HIDDEN, 4, dtype=dtype))


def _input(dtype=torch.float32, shape=(3, 5)):
    return torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)


def _adapter_params(layers):
    return [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]


def _outputs_and_grads(fn, x, layers, seed=2):
    """Run fn(x) (a tensor or tuple), backprop a fixed random projection of every output."""
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    params = _adapter_params(layers)
    grads = torch.autograd.grad(loss, [x, *params])
    return [o.detach() for o in outs], list(grads)


def _assert_match(fused, plain, rtol, atol):
    for got, want in zip(fused[0] + fused[1], plain[0] + plain[1]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def _plain_mlp(gate, up, down):
    return lambda x: down(F.silu(gate(x)) * up(x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.usefixtures("scaling_path")
def test_qkv_fp32_matches_plain_modules(bias):
    layers = _qkv(bias=bias)
    fused = _outputs_and_grads(lambda x: lora_qkv(x, *layers), _input(), layers)
    plain = _outputs_and_grads(lambda x: tuple(layer(x) for layer in layers), _input(), layers)
    _assert_match(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("scaling_path")
def test_single_projection_fp32_matches_plain_module():
    layer = _lora(HIDDEN, 16, 4, bias=True)
    fused = _outputs_and_grads(lambda x: lora_linear(x, layer), _input(), [layer])
    plain = _outputs_and_grads(layer, _input(), [layer])
    _assert_match(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("scaling_path")
def test_mlp_fp32_matches_plain_modules():
    layers = _mlp()
    fused = _outputs_and_grads(lambda x: lora_mlp(x, *layers), _input(), layers)
    plain = _outputs_and_grads(_plain_mlp(*layers), _input(), layers)
    _assert_match(fused, plain, rtol=1e-5, atol=1e-5)


def _fp32_copy(layers):
    return [copy.deepcopy(layer).float() for layer in layers]


def _relative_errors(got, oracle):
    return [float((g.float() - o).norm() / o.norm()) for g, o in zip(got[0] + got[1],
                                                                    oracle[0] + oracle[1])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # fp16: auto's on a GPU without bf16
@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_16_bit_base_with_fp32_adapters_as_accurate_as_plain_path(block, dtype, scaling_path):
    # LoraLinear keeps fp32 masters under a bf16 or fp16 base; both paths run the GEMMs in it.
    # Oracle: the plain path on an fp32 copy. Stated tolerance: every output and gradient
    # within 1.5e-2 of it in norm (bf16 has 8 mantissa bits, eps 7.8e-3; fp16 10), and no worse
    # than twice the plain 16-bit path's own error.
    layers = _qkv(dtype=dtype) if block == "qkv" else _mlp(dtype=dtype)
    assert layers[0].lora_A.weight.dtype == torch.float32
    fused_fn = (lambda t, ls: lora_qkv(t, *ls)) if block == "qkv" else (lambda t, ls: lora_mlp(t, *ls))
    plain_fn = ((lambda t, ls: tuple(m(t) for m in ls)) if block == "qkv"
                else (lambda t, ls: _plain_mlp(*ls)(t)))
    x, layers32 = _input(dtype), _fp32_copy(layers)
    oracle = _outputs_and_grads(lambda t: plain_fn(t, layers32), x.float(), layers32)
    fused = _outputs_and_grads(lambda t: fused_fn(t, layers), x, layers)
    plain = _outputs_and_grads(lambda t: plain_fn(t, layers), x, layers)
    assert [t.dtype for t in fused[0] + fused[1]] == [t.dtype for t in plain[0] + plain[1]]
    for fused_err, plain_err in zip(_relative_errors(fused, oracle), _relative_errors(plain, oracle)):
        assert fused_err < 1.5e-2 and fused_err <= 2 * plain_err + 1e-3
    path, widened = scaling_path
    # every adapter gradient of the group (one dA GEMM per group, one dB per projection) written wide
    assert len(widened) == (0 if path != "widening" else 4 if block == "qkv" else 5)


def test_frozen_base_gets_no_gradient_and_adapters_accumulate():
    layers = _mlp()
    x = _input().requires_grad_()
    lora_mlp(x, *layers).sum().backward()
    first = [p.grad.clone() for p in _adapter_params(layers)]
    lora_mlp(x, *layers).sum().backward()  # .grad accumulates like any autograd path
    for p, g in zip(_adapter_params(layers), first):
        torch.testing.assert_close(p.grad, 2 * g)
    assert all(layer.base_layer.weight.grad is None for layer in layers)


def test_input_without_grad_still_trains_adapters():
    layers = _qkv()
    x = _input()  # e.g. the embedding output of a frozen model
    sum(o.sum() for o in lora_qkv(x, *layers)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _adapter_params(layers))


def test_save_only_block_input_for_qkv():
    layers = _qkv()
    x = _input().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_qkv(x, *layers)
    params = [p for layer in layers for p in layer.parameters()]
    big = [t for t in saved if t.numel() >= x.numel() and not any(t is p for p in params)]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, once, no copy


def test_mlp_saves_no_silu_product():
    layers = _mlp()
    x = _input().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_mlp(x, *layers)
    tokens = x.numel() // HIDDEN
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == tokens
                   and t.shape[1] == INTER]
    assert len(activations) == 2  # gate and up outputs; silu(e) and h are recomputed


@pytest.mark.parametrize("change, reason", [
    (lambda m: setattr(m, "lora_dropout", nn.AlphaDropout(0.1)), "unknown lora_dropout module AlphaDropout"),
    (lambda m: setattr(m, "merged", True), "merged"),
    (lambda m: setattr(m, "disabled", True), "disabled"),
    (lambda m: m.base_layer.weight.requires_grad_(True), "trainable"),
])
def test_fuse_blocker_names_the_reason(change, reason):
    layer = _lora(HIDDEN, 8, 2)
    assert can_fuse(layer) and fuse_blocker(layer) is None
    change(layer)
    assert not can_fuse(layer) and reason in fuse_blocker(layer)
    with pytest.raises(ValueError, match=reason):
        lora_linear(_input(), layer)


def test_dora_and_plain_linear_are_not_fusable():
    assert "DoRA" in fuse_blocker(_lora(HIDDEN, 8, 2, dora=True))
    assert fuse_blocker(_lora(HIDDEN, 8, 2, dora=True, dropout=0.1)) == "DoRA adapters are not fused"
    assert "no adapter on this Linear" in fuse_blocker(nn.Linear(4, 4))


# ---- adapter dropout: a mask per projection, the plain path's --------------------------------------

def _dropout_block(block, dtype=torch.float32):
    """Layers in training mode with mixed dropout rates (one without: no mask) and their fused
    and plain calls."""
    def lora(in_f, out_f, r, rate, alpha=None):
        return _lora(in_f, out_f, r, alpha=alpha, dtype=dtype, dropout=rate).train()

    if block == "qkv":
        layers = (lora(HIDDEN, HIDDEN, 4, 0.3), lora(HIDDEN, 12, 2, 0.0, alpha=5), lora(HIDDEN, 12, 3, 0.5))
        return layers, lambda x: lora_qkv(x, *layers), lambda x: tuple(layer(x) for layer in layers)
    if block == "mlp":
        layers = (lora(HIDDEN, INTER, 4, 0.1), lora(HIDDEN, INTER, 2, 0.4, alpha=3), lora(INTER, HIDDEN, 4, 0.25))
        return layers, lambda x: lora_mlp(x, *layers), _plain_mlp(*layers)
    layers = (lora(HIDDEN, 16, 4, 0.2),)
    return layers, lambda x: lora_linear(x, layers[0]), layers[0]


def _fused_then_replayed(block, dtype=torch.float32):
    """(fused, plain) outputs and gradients: the fused block in training mode, then the plain
    modules with the masks it drew."""
    layers, fused_fn, plain_fn = _dropout_block(block, dtype)
    with recorded_masks() as masks:
        fused = _outputs_and_grads(fused_fn, _input(dtype), layers)
    assert len(masks) == sum(isinstance(layer.lora_dropout, nn.Dropout) for layer in layers)
    replay_masks(masks, layers)
    return fused, _outputs_and_grads(plain_fn, _input(dtype), layers)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("block", ["qkv", "mlp", "linear"])
@pytest.mark.usefixtures("scaling_path", "mask_keeping")
def test_dropout_blocks_match_the_plain_modules_with_the_same_masks(block, dtype, tolerance):
    fused, plain = _fused_then_replayed(block, dtype)
    # fp32: relative to each tensor's largest entry (the GEMMs sum in another order than autograd's)
    for got, want in zip(fused[0] + fused[1], plain[0] + plain[1]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max()))


def test_dropout_masks_matter():
    layers, fused_fn, _ = _dropout_block("qkv")
    dropped = _outputs_and_grads(fused_fn, _input(), layers)
    for layer in layers:
        layer.lora_dropout.eval()
    undropped = _outputs_and_grads(fused_fn, _input(), layers)
    assert not torch.allclose(undropped[1][0], dropped[1][0], rtol=1e-3)  # dX


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_dropout_blocks_in_16_bits_agree_with_the_plain_path(block, dtype):
    fused, plain = _fused_then_replayed(block, dtype)  # the paths round differently
    errors = _relative_errors(fused, [[t.float() for t in part] for part in plain])
    assert max(errors) < 2e-2, errors


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5, 0.9])
def test_cpu_masks_keep_each_element_independently_with_probability_one_minus_rate(rate):
    torch.manual_seed(3)
    mask = adapter_dropout.cpu_mask(torch.empty(1000, 1003), rate)  # a numel that is no multiple of 4
    keep, n = 1 - rate, mask.numel()
    sigma = (keep * rate / n) ** 0.5
    assert mask.dtype == torch.bool and mask.shape == (1000, 1003)
    assert abs(mask.float().mean().item() - keep) < 5 * sigma
    flat = mask.flatten()
    for lag in (1, 2, 3, 4, 1003):  # neighbours within one 64-bit draw, across draws, across rows
        both = (flat[:-lag] & flat[lag:]).float().mean().item()
        assert abs(both - keep * keep) < 5 * (keep * keep * (1 - keep * keep) / n) ** 0.5, lag
    torch.manual_seed(3)
    assert torch.equal(adapter_dropout.cpu_mask(torch.empty(1000, 1003), rate), mask)  # the generator's draws
    assert adapter_dropout.cpu_mask(torch.empty(5), 1e-9).all() and not adapter_dropout.cpu_mask(torch.empty(5), 1 - 1e-9).any()


@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_dropout_in_eval_mode_is_the_plain_block_and_saves_no_mask(block):
    layers, fused_fn, _ = _dropout_block(block)
    x = _input().requires_grad_()
    for layer in layers:
        layer.eval()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = fused_fn(x)
    assert not any(t.dtype == torch.bool for t in saved)
    for layer in layers:
        layer.lora_dropout = nn.Identity()
    want = fused_fn(x)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)


def test_dropout_qkv_saves_the_input_once_and_a_bool_mask_per_dropping_projection():
    layers, fused_fn, _ = _dropout_block("qkv")
    x = _input().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_fn(x)
    params = [p for layer in layers for p in layer.parameters()]
    big = [t for t in saved if t.numel() >= x.numel() and not any(t is p for p in params)]
    masks = [t for t in big if t.dtype == torch.bool]
    assert len(masks) == 2 and all(m.shape == (x.numel() // HIDDEN, HIDDEN) for m in masks)  # q and v drop, k not
    assert [t.data_ptr() for t in big if t.dtype != torch.bool] == [x.data_ptr()]  # no dropped copy


@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_redrawn_masks_are_not_saved_give_the_kept_masks_gradients_and_leave_the_generator_alone(block, monkeypatch):
    """CUDA's way, run on the CPU's generator: backward draws each mask again from the state
    saved before it, and puts the generator back where forward left it."""
    def step():
        torch.manual_seed(9)
        layers, fused_fn, _ = _dropout_block(block)
        x = _input().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            outs = fused_fn(x)
        after_forward = torch.get_rng_state()
        sum(out.square().sum() for out in (outs if isinstance(outs, tuple) else (outs,))).backward()
        assert torch.equal(torch.get_rng_state(), after_forward)
        grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]
        return grads, [t for t in saved if t.dtype == torch.bool], after_forward

    kept_grads, kept_masks, kept_state = step()
    monkeypatch.setattr(adapter_dropout, "REDRAWN_ON", adapter_dropout.REDRAWN_ON | {"cpu"})
    redrawn_grads, redrawn_masks, redrawn_state = step()
    assert len(kept_masks) == 2 + (block == "mlp") and redrawn_masks == []
    assert torch.equal(redrawn_state, kept_state)  # forward draws alike: a run and its resume take the same masks
    for got, want in zip(redrawn_grads, kept_grads, strict=True):
        assert torch.equal(got, want)


# ---- the cast adapter copies: made once per change of the master weights --------------------------

def _count_refreshes(monkeypatch):
    """A list that grows by one whenever a group's cast copies are written."""

    calls = []
    real = adapter_casts.CastAdapters.refresh
    monkeypatch.setattr(adapter_casts.CastAdapters, "refresh", lambda self, stamp: calls.append(1) or real(self, stamp))
    return calls


def _without_cached_casts(layers):

    fresh = copy.deepcopy(layers)
    for layer in fresh:
        layer.__dict__.pop(adapter_casts.CAST_ADAPTERS, None)
    return fresh


@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_bf16_casts_follow_every_optimizer_step_and_load(block, monkeypatch):
    # fp32 masters under a bf16 base: after each change of the masters the fused block must give
    # exactly what it gives on fresh copies of the layers (nothing cached), and between changes it
    # must not copy again
    refreshes = _count_refreshes(monkeypatch)
    layers = _qkv(dtype=torch.bfloat16) if block == "qkv" else _mlp(dtype=torch.bfloat16)
    fused_fn = (lambda ls: lambda t: lora_qkv(t, *ls)) if block == "qkv" else (lambda ls: lambda t: lora_mlp(t, *ls))
    optimizer = torch.optim.AdamW(_adapter_params(layers), lr=0.05, fused=True)  # the trainer's: bumps no version
    groups = 1 if block == "qkv" else 2
    for step in range(3):
        before = len(refreshes)
        fused = _outputs_and_grads(fused_fn(layers), _input(torch.bfloat16), layers, seed=step)
        again = _outputs_and_grads(fused_fn(layers), _input(torch.bfloat16), layers, seed=step)
        assert len(refreshes) - before == groups  # one copy per group and step, none for the second call
        fresh = _without_cached_casts(layers)
        _assert_match(fused, _outputs_and_grads(fused_fn(fresh), _input(torch.bfloat16), fresh, seed=step), 0, 0)
        _assert_match(again, fused, 0, 0)
        for param, grad in zip(_adapter_params(layers), fused[1][1:]):
            param.grad = grad
        optimizer.step()
    state = {k: torch.randn_like(v) for k, v in layers[0].state_dict().items() if "lora_" in k}
    layers[0].load_state_dict(state, strict=False)
    fused = _outputs_and_grads(fused_fn(layers), _input(torch.bfloat16), layers)
    fresh = _without_cached_casts(layers)
    _assert_match(fused, _outputs_and_grads(fused_fn(fresh), _input(torch.bfloat16), fresh), 0, 0)


def test_fp32_adapters_are_not_copied_and_a_moved_layer_gets_new_copies(monkeypatch):

    layers = _qkv()
    with torch.no_grad():
        casts = adapter_casts.cast_adapters(layers, torch.float32)
        assert all(b is layer.lora_B.weight for b, layer in zip(casts.b, layers))  # same dtype: the master
        assert adapter_casts.cast_adapters(layers, torch.float32) is casts
        assert adapter_casts.cast_adapters(layers, torch.bfloat16) is not casts  # another dtype, other copies
        layers[1].to(torch.float64)  # the masters' storage and dtype move: copies of the new values
        moved = adapter_casts.cast_adapters(layers, torch.float32)
        torch.testing.assert_close(moved.a_cat, torch.cat([layer.lora_A.weight.float() for layer in layers]))
        assert [b.dtype for b in moved.b] == [torch.float32] * 3 and moved.b[1] is not layers[1].lora_B.weight
    layers = _qkv()
    lora_qkv(_input(), *layers)  # fp32 factors: the masters themselves are the copies
    for layer in layers:  # only the adapters upcast (as diffusers' cast_training_params does)
        layer.lora_A.to(torch.float64), layer.lora_B.to(torch.float64)
    fused = _outputs_and_grads(lambda t: lora_qkv(t, *layers), _input(), layers)
    fresh = _without_cached_casts(layers)
    _assert_match(fused, _outputs_and_grads(lambda t: lora_qkv(t, *fresh), _input(), fresh), 0, 0)


def test_a_first_forward_in_inference_mode_leaves_training_possible():
    layers = _qkv(dtype=torch.bfloat16)
    with torch.inference_mode():
        lora_qkv(_input(torch.bfloat16), *layers)
    fused = _outputs_and_grads(lambda t: lora_qkv(t, *layers), _input(torch.bfloat16), layers)
    fresh = _without_cached_casts(layers)
    _assert_match(fused, _outputs_and_grads(lambda t: lora_qkv(t, *fresh), _input(torch.bfloat16), fresh), 0, 0)


def test_two_forwards_around_another_optimizers_step_backpropagate_together():
    # one graph holding this group's copies, then any torch.optim step (another model's): the next
    # forward makes new copies rather than writing over the ones the graph saved
    layers = _qkv(dtype=torch.bfloat16)
    other = nn.Linear(2, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    x = _input(torch.bfloat16)
    first = sum(o.float().sum() for o in lora_qkv(x, *layers))
    other(torch.ones(2)).sum().backward()
    other_optimizer.step()
    second = sum(o.float().sum() for o in lora_qkv(x, *layers))
    (first + second).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _adapter_params(layers))
    # a graph spanning two such steps would find its copies written over: an error, never a wrong gradient
    x = _input(torch.bfloat16)
    losses = []
    for _ in range(3):
        losses.append(sum(o.float().sum() for o in lora_qkv(x, *layers)))
        other_optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(losses).backward()


def test_sharded_models_cast_afresh_in_every_forward(monkeypatch):

    refreshes = _count_refreshes(monkeypatch)
    layers = _qkv(dtype=torch.bfloat16)
    container = nn.ModuleList(layers)
    adapter_casts.cast_afresh_every_forward(container)
    for _ in range(2):
        with torch.no_grad():
            lora_qkv(_input(torch.bfloat16), *layers)
    assert len(refreshes) == 2 and adapter_casts.CAST_ADAPTERS not in layers[0].__dict__


def test_gradients_are_written_wide_only_where_the_gemm_can():
    # torch's out_dtype GEMMs run on CUDA only; elsewhere the gradients are cast as before
    assert not fused_lora._gemm_widens(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert not fused_lora._gemm_widens(torch.device("cuda", 0), torch.float32, torch.float32)
    assert not fused_lora._gemm_widens(torch.device("cuda", 0), torch.bfloat16, torch.float16)


# ---- frozen weights stacked: one GEMM over the group ---------------------------------------------

def _base_weights(layers):
    return [layer.base_layer.weight for layer in layers]


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("block", ["qkv", "mlp"])  # llama_patch stacks gate and up; any group can be
def test_stacked_weights_give_the_same_outputs_and_gradients_with_one_gemm(block, scaling_path, monkeypatch):
    layers = _mlp() if block == "mlp" else _qkv()
    group = layers[:2] if block == "mlp" else layers
    fused_fn = (lambda t: lora_mlp(t, *layers)) if block == "mlp" else (lambda t: lora_qkv(t, *layers))
    plain_fn = _plain_mlp(*layers) if block == "mlp" else (lambda t: tuple(m(t) for m in layers))
    values = [w.clone() for w in _base_weights(group)]
    assert fused_lora.stack_frozen_weights(group)
    assert len(_storages(_base_weights(group))) == 1 and all(  # views of one buffer, the same values
        torch.equal(w, v) for w, v in zip(_base_weights(group), values))
    products = []
    real_linear = fused_lora.cpu_gemm.linear
    monkeypatch.setattr(fused_lora.cpu_gemm, "linear", lambda x, w, b=None: products.append(w.shape) or real_linear(x, w, b))
    input_grads = []
    real_matmul = fused_lora._matmul_into
    monkeypatch.setattr(fused_lora, "_matmul_into", lambda a, w, out: input_grads.append(w.shape) or real_matmul(a, w, out))
    fused = _outputs_and_grads(fused_fn, _input(), layers)
    rows = sum(w.shape[0] for w in _base_weights(group))
    assert (rows, HIDDEN) in products and not any(s in products for s in (w.shape for w in _base_weights(group)))
    # backward: on a GPU (cuBLAS writes column blocks) d gate and d up lie side by side, one GEMM
    # takes them; q, k, v's gradients come apart (one GEMM each, as on the CPU)
    assert ((rows, HIDDEN) in input_grads) == (block == "mlp" and scaling_path[0] != "cpu-products")
    _assert_match(fused, _outputs_and_grads(plain_fn, _input(), layers), rtol=1e-5, atol=1e-5)
    fused_lora.unstack_frozen_weights(group)
    assert len(_storages(_base_weights(group))) == len(group)
    assert all(torch.equal(w, v) for w, v in zip(_base_weights(group), values))


def test_a_stacked_weight_moved_or_replaced_takes_one_gemm_per_projection_again():
    layers = _qkv()
    assert fused_lora.stack_frozen_weights(layers)
    with torch.no_grad():
        layers[1].base_layer.weight.data = layers[1].base_layer.weight.data.clone() * 2  # out of the buffer
    assert stacking.row_blocks(_base_weights(layers)) is None
    fused = _outputs_and_grads(lambda t: lora_qkv(t, *layers), _input(), layers)
    _assert_match(fused, _outputs_and_grads(lambda t: tuple(m(t) for m in layers), _input(), layers), 1e-5, 1e-5)


def test_weights_of_different_dtypes_or_widths_or_with_biases_are_not_stacked():
    mixed = (_lora(HIDDEN, 8, 2), _lora(HIDDEN, 8, 2, dtype=torch.float64))
    assert not fused_lora.stack_frozen_weights(mixed)
    assert not fused_lora.stack_frozen_weights(_qkv(bias=True))
    assert not fused_lora.stack_frozen_weights((_lora(HIDDEN, 8, 2), _lora(HIDDEN + 1, 8, 2)))
    assert not fused_lora.stack_frozen_weights((_lora(HIDDEN, 8, 2),))  # nothing to stack with
    assert len(_storages(_base_weights(mixed))) == 2


def test_side_by_side_finds_column_blocks_that_fill_their_rows():
    matrix = torch.randn(4, 10)
    left, right = matrix[:, :6], matrix[:, 6:]
    assert stacking.column_blocks([left, right]).data_ptr() == matrix.data_ptr()
    assert stacking.column_blocks([right, left]) is None  # out of order
    assert stacking.column_blocks([left, matrix[:, 6:9]]) is None  # a column left out
    assert stacking.column_blocks([torch.randn(4, 6), torch.randn(4, 4)]) is None  # two storages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_deep_copy_after_a_fused_step_and_the_copy_computes_the_same(dtype):
    # the cached casts (B itself for fp32 masters, and its transpose) must carry no autograd graph
    layers = _qkv(dtype=dtype)
    fused = _outputs_and_grads(lambda t: lora_qkv(t, *layers), _input(dtype), layers)
    twins = copy.deepcopy(layers)
    for casts in twins[0].__dict__[adapter_casts.CAST_ADAPTERS].values():
        assert all(t.grad_fn is None for t in (casts.a_cat, *casts.b, *casts.b_t))
    _assert_match(_outputs_and_grads(lambda t: lora_qkv(t, *twins), _input(dtype), twins), fused, 0, 0)
