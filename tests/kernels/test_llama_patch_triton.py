"""enable_fast_paths(model, triton=True) on tiny models with LoRA, in Triton's interpreter: same
logits and adapter gradients as triton=False and as the unpatched model."""

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_ops builds its kernels

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from tiny_models import prefill_then_decode, randomize_lora, tiny_llama  # noqa: E402
from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from lorakit.kernels import triton_ops  # noqa: E402
from lorakit.kernels.causal_loss import causal_lm_loss  # noqa: E402
from lorakit.kernels.llama_patch import (disable_fast_paths, enable_fast_paths,  # noqa: E402
                                         fast_paths_enabled)
from lorakit.lora import LoraConfig, apply_lora  # noqa: E402

if not triton_ops.triton_available():  # triton_ops was imported earlier without the interpreter
    pytest.skip(f"Triton kernels cannot run: {triton_ops.unavailable_reason()}",
                allow_module_level=True)

# hidden 72 over 4 heads: head dim 18, so RoPE's half (9) and the norms (72) have masked tails
SIZES = dict(hidden_size=72, intermediate_size=120, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)
OTHERS = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
          "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def _model(arch="llama"):
    if arch == "llama":
        model = tiny_llama(**SIZES)
    else:
        config_cls, model_cls = OTHERS[arch]
        torch.manual_seed(0)
        model = model_cls(config_cls(**SIZES)).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    return randomize_lora(model)


def _batch():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0  # right padding
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_same(got, want, atol=1e-5):
    (logits_got, grads_got), (logits_want, grads_want) = got, want
    torch.testing.assert_close(logits_got, logits_want, rtol=1e-5, atol=atol)
    assert grads_got.keys() == grads_want.keys() and len(grads_want) > 0
    for name, g in grads_want.items():
        torch.testing.assert_close(grads_got[name], g, rtol=1e-4,
                                   atol=atol * max(1.0, float(g.abs().max())), msg=name)


def _triton_forwards(model):
    return sum(bool(m.__dict__.get("_lorakit_triton")) for m in model.modules())


def test_triton_kernels_enabled_says_whether_any_module_runs_them():
    from lorakit.kernels.llama_patch import triton_kernels_enabled

    model = _model()
    enable_fast_paths(model)
    assert not triton_kernels_enabled(model)
    enable_fast_paths(model, triton=True)
    assert triton_kernels_enabled(model)


def test_llama_triton_matches_plain_fast_paths_and_unpatched_model():
    model, batch = _model(), _batch()
    unpatched = _logits_and_grads(model, batch)
    assert enable_fast_paths(model) == []
    plain_fast = _logits_and_grads(model, batch)
    assert enable_fast_paths(model, triton=True) == []
    assert _triton_forwards(model) == 2 * 2 + 1 + 2 + 2  # norms, final norm, attentions, MLPs
    triton_fast = _logits_and_grads(model, batch)
    _assert_same(triton_fast, plain_fast)
    _assert_same(triton_fast, unpatched)


def test_a_float16_model_through_the_triton_fast_paths_matches_its_float64_copy():
    """fp16 weights are what --dtype auto trains on a GPU without bf16 (a T4): the fused blocks
    and Triton kernels in fp16, the adapters' fp32 masters, against the model in float64."""
    torch.manual_seed(0)
    model = apply_lora(tiny_llama(**SIZES).to(torch.float16), LoraConfig(r=4, alpha=8))
    model = randomize_lora(model)
    reference = copy.deepcopy(model).double()
    batch = _batch()
    want = _logits_and_grads(reference, batch)
    assert enable_fast_paths(model, triton=True) == [] and _triton_forwards(model) == 9
    logits, grads = _logits_and_grads(model, batch)
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.double(), want[0], rtol=2e-2, atol=2e-2)
    for name, g in want[1].items():
        assert grads[name].dtype == torch.float32  # the masters
        cosine = torch.nn.functional.cosine_similarity(grads[name].double().flatten(), g.flatten(), dim=0)
        assert cosine > 0.999, name


def test_triton_kernels_are_the_ones_running(monkeypatch):
    model, batch = _model(), _batch()
    calls = []
    for name in ("rms_norm", "rope", "silu_mul", "silu_mul_grads"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    enable_fast_paths(model, triton=True)
    causal_lm_loss(model, {**batch, "labels": batch["input_ids"]}).backward()
    # per layer: 2 norms, 1 rope, silu_mul in forward and again in backward; plus the final norm
    assert sorted(calls) == sorted(["rms_norm"] * 5 + ["rope"] * 2 + ["silu_mul"] * 4
                                   + ["silu_mul_grads"] * 2)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_llama_style_models_match(arch):
    model, batch = _model(arch), _batch()
    unpatched = _logits_and_grads(model, batch)
    assert enable_fast_paths(model, triton=True) == []
    _assert_same(_logits_and_grads(model, batch), unpatched)


def test_trainable_norm_weights_get_their_gradient():
    model, batch = _model(), _batch()
    for layer in model.model.layers:
        layer.input_layernorm.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(True)
    unpatched = _logits_and_grads(model, batch)
    enable_fast_paths(model, triton=True)
    got = _logits_and_grads(model, batch)
    assert "model.norm.weight" in got[1]
    _assert_same(got, unpatched)


def test_kv_cache_decoding_matches():
    model, ids = _model(), _batch()["input_ids"]
    want = prefill_then_decode(model, ids, 5)
    enable_fast_paths(model, triton=True)
    torch.testing.assert_close(prefill_then_decode(model, ids, 5), want, rtol=1e-5, atol=1e-5)


def test_switching_and_disabling_restore_everything():
    model, batch = _model(), _batch()
    enable_fast_paths(model, triton=True)
    enable_fast_paths(model)  # back to the plain fast paths: no Triton forward left
    assert fast_paths_enabled(model) and _triton_forwards(model) == 0
    enable_fast_paths(model, triton=True)
    disable_fast_paths(model)
    assert not fast_paths_enabled(model)
    assert not any("forward" in m.__dict__ or "_lorakit_triton" in m.__dict__
                   for m in model.modules())
    model(**batch)


def test_unavailable_triton_gives_one_notice_and_keeps_the_plain_fast_paths(monkeypatch):
    model, batch = _model(), _batch()
    want = _logits_and_grads(model, batch)
    monkeypatch.setattr(triton_ops, "unavailable_reason", lambda: "no CUDA device")
    notices = enable_fast_paths(model, triton=True)
    assert notices == ["Triton kernels not used (no CUDA device); the other fast paths stay"]
    assert fast_paths_enabled(model) and _triton_forwards(model) == 0
    _assert_same(_logits_and_grads(model, batch), want)


def test_the_loss_takes_the_triton_kernel_while_the_model_runs_triton_kernels(monkeypatch):
    model, batch = _model(), _batch()
    calls = []
    monkeypatch.setattr(triton_ops, "cross_entropy_rows_",
                        lambda *a, _real=triton_ops.cross_entropy_rows_, **k: calls.append(1) or _real(*a, **k))
    labelled = {**batch, "labels": batch["input_ids"]}
    for triton, disabled, expected in ((False, False, False), (True, False, True), (True, True, False)):
        enable_fast_paths(model, triton=triton)
        if disabled:
            disable_fast_paths(model)
        calls.clear()
        causal_lm_loss(model, labelled).backward()
        assert bool(calls) == expected, (triton, disabled)
