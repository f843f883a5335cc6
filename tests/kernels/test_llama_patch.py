"""Fast paths on a tiny model with LoRA: same loss and adapter gradients as the plain path."""

import copy
import pickle

import pytest
import torch
import torch.utils.checkpoint
from replayed_dropout import recorded_masks, replay_masks
from tiny_models import prefill_then_decode
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from lorakit.kernels import causal_loss, cpu_attention, fused_lora, llama_patch, native_ops
from lorakit.kernels.causal_loss import causal_lm_loss
from lorakit.kernels.llama_patch import disable_fast_paths, enable_fast_paths, fast_paths_enabled
from lorakit.lora import LoraConfig, LoraLinear, apply_lora, merge_lora

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
# Qwen2: biases on q, k, v; Qwen3: RMSNorms on q and k per head; Mistral: a sliding window
pytestmark = pytest.mark.usefixtures("gemm_backend")  # torch's GEMMs and oneDNN's
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def _model(arch="llama", **lora_options):
    torch.manual_seed(0)
    config_cls, model_cls = ARCHS[arch]
    model = model_cls(config_cls(**SIZES))
    apply_lora(model, LoraConfig(r=4, alpha=8, **lora_options))
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.normal_(std=0.05)
    return model


def _batch(vocab=256):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, vocab, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens carry no loss
    labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), _adapter_grads(model)


def _assert_same(got, want, rtol=1e-5):
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    torch.testing.assert_close(loss_got, loss_want, rtol=rtol, atol=0)
    assert grads_got.keys() == grads_want.keys() and len(grads_want) > 0
    for name, g in grads_want.items():
        torch.testing.assert_close(grads_got[name], g, rtol=rtol,
                                   atol=rtol * float(g.abs().max()), msg=name)


def _plain(model, batch):
    return _loss_and_grads(model, lambda: model(**batch).loss)


def _fast(model, batch):
    return _loss_and_grads(model, lambda: causal_lm_loss(model, batch))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fast_paths_match_plain_model_loss_and_grads(arch):
    model, batch = _model(arch), _batch()
    plain = _plain(model, batch)
    assert enable_fast_paths(model) == []
    mlp = model.model.layers[0].mlp
    assert mlp.__dict__["forward"].module is mlp  # bound to its module, not a closure
    _assert_same(_fast(model, batch), plain)


def test_enabling_stacks_the_frozen_gate_up_weights_and_disabling_separates_them():
    model, batch = _model(), _batch()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    plain = _plain(model, batch)

    def storages(module, names):
        return len({getattr(module, n).base_layer.weight.untyped_storage().data_ptr() for n in names})

    enable_fast_paths(model)  # on a CPU each weight keeps its storage (stacked, no faster here)
    assert storages(model.model.layers[0].mlp, ("gate_proj", "up_proj")) == 2
    enable_fast_paths(model, stack=True)  # as on a GPU
    for layer in model.model.layers:
        assert storages(layer.mlp, ("gate_proj", "up_proj")) == 1
        # q, k, v apart: attention saves v, and a view of one q|k|v matrix would keep q and k alive
        assert storages(layer.self_attn, ("q_proj", "k_proj", "v_proj")) == 3
    _assert_same(_fast(model, batch), plain)
    disable_fast_paths(model)
    for layer in model.model.layers:
        assert storages(layer.mlp, ("gate_proj", "up_proj")) == 2
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_stacking_under_inference_mode_leaves_weights_that_train():
    model, batch = _model(), _batch()
    plain = _plain(model, batch)
    with torch.inference_mode():  # e.g. an evaluation that turned the fast paths on
        enable_fast_paths(model, stack=True)
    assert not model.model.layers[0].mlp.gate_proj.base_layer.weight.is_inference()
    _assert_same(_fast(model, batch), plain)
    with torch.inference_mode():
        disable_fast_paths(model)
    assert not model.model.layers[0].mlp.up_proj.base_layer.weight.is_inference()
    _assert_same(_fast(model, batch), plain)


def test_a_deep_copy_of_a_patched_model_computes_with_its_own_weights():
    model, batch = _model(), _batch()
    enable_fast_paths(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_B" in name or "norm" in name:
                param.mul_(0.5)
    fast = causal_lm_loss(twin, batch).item()
    disable_fast_paths(twin)
    assert fast == pytest.approx(causal_lm_loss(twin, batch).item(), rel=1e-5)  # its plain path
    assert fast != pytest.approx(causal_lm_loss(model, batch).item(), rel=1e-3)


def test_a_patched_model_refuses_pickling_with_the_way_out():
    model = _model()
    enable_fast_paths(model)
    with pytest.raises(TypeError, match="disable_fast_paths"):
        pickle.dumps(model)
    disable_fast_paths(model)
    pickle.dumps(model)


def test_a_projection_two_attentions_share_is_patched_once_and_falls_back():
    model, batch = _model(), _batch()
    first, second = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    second.o_proj, second.q_proj = first.o_proj, first.q_proj
    enable_fast_paths(model)
    merge_lora(model)  # the patched forwards now fall back to the modules' own
    loss = causal_lm_loss(model, batch)
    assert torch.isfinite(loss)
    disable_fast_paths(model)
    assert "forward" not in first.o_proj.__dict__ and "forward" not in first.q_proj.__dict__


def _unpadded_batch(vocab=256):
    input_ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(4))
    labels = input_ids.clone()
    labels[:, :5] = -100
    return dict(input_ids=input_ids, labels=labels)


def _count_cpu_attention_calls(monkeypatch):
    calls = []
    real = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cpu_attention_takes_unpadded_rows_and_matches(monkeypatch, arch):
    model, batch = _model(arch), _unpadded_batch()
    plain = _plain(model, batch)
    calls = _count_cpu_attention_calls(monkeypatch)
    enable_fast_paths(model)
    _assert_same(_fast(model, batch), plain)
    copied = llama_patch._rope_swap_blocker(model.model.layers[0].self_attn) is None
    assert len(calls) == (len(model.model.layers) if copied else 0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]])
def test_attention_without_fused_projections_still_takes_the_native_rope_and_attention(monkeypatch, targets):
    """LoRA on q and v only, or on the MLP only: q, k, v cannot fuse, but the copied forward
    calls the projections as they are and keeps the CPU attention and the native RoPE."""
    model, batch = _model(target_modules=targets), _unpadded_batch()
    plain = _plain(model, batch)
    attention_calls = _count_cpu_attention_calls(monkeypatch)
    real_rope, rope_calls = native_ops.rope, []
    monkeypatch.setattr(native_ops, "rope", lambda *a: rope_calls.append(1) or real_rope(*a))
    notices = enable_fast_paths(model)
    assert any("self_attn" in n and "no adapter on this Linear" in n for n in notices)
    _assert_same(_fast(model, batch), plain)
    layers = len(model.model.layers)
    assert len(attention_calls) == layers and len(rope_calls) == layers
    assert fast_paths_enabled(model) == ("gate_proj" in targets)  # RoPE and attention alone do not count


def test_attention_with_accelerate_hooks_keeps_its_own_forward():
    """The copy would call the projections itself and skip the hook's pre/post forward."""
    model = _model(target_modules=["q_proj", "v_proj"])
    attn = model.model.layers[0].self_attn
    attn._hf_hook = object()
    enable_fast_paths(model)
    assert "forward" not in attn.__dict__ and "forward" in model.model.layers[1].self_attn.__dict__


def test_switching_native_off_unpatches_what_the_norms_do_not_show():
    """Which ops a module took is not read back from the norms: with the norms left alone (here
    hooked), native=False still takes the native RoPE copy and the CPU attention away."""
    model = _model()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module._hf_hook = object()
    enable_fast_paths(model)
    attn = model.model.layers[0].self_attn
    assert cpu_attention.enabled_for(attn)
    enable_fast_paths(model, native=False)
    assert not cpu_attention.enabled_for(attn)
    assert "forward" in attn.__dict__  # q, k, v still fused, RoPE and attention transformers' own


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.usefixtures("mask_keeping")
def test_dropout_adapters_fuse_and_match_the_plain_model_with_their_masks(monkeypatch, arch, stack):
    """Every group fuses with adapter dropout on; replayed into the plain model in training mode,
    the masks it drew give the same loss and gradients (stack: gate and up stacked, with the
    GPU's in-place epilogues)."""
    model, batch = _model(arch, dropout=0.3), _unpadded_batch()
    model.train()
    if stack:
        monkeypatch.setattr(fused_lora, "_cublas_writes_in_place", lambda t: True)
    assert enable_fast_paths(model, stack=stack) == []
    assert "forward" in model.model.layers[0].self_attn.q_proj.__dict__
    with recorded_masks() as masks:
        fast = _fast(model, batch)
    assert len(masks) == 7 * SIZES["num_hidden_layers"]
    disable_fast_paths(model)
    replay_masks(masks, (m for m in model.modules() if isinstance(m, LoraLinear)))
    _assert_same(fast, _plain(model, batch))


def test_unfused_dropout_adapters_draw_the_plain_models_masks_through_the_copied_forward():
    """LoRA on q and v only leaves q, k, v unfused: the copied attention forward calls them in
    transformers' order, so in training mode the same seed gives nn.Dropout's masks, loss and
    gradients."""
    model, batch = _model(target_modules=["q_proj", "v_proj"], dropout=0.3), _unpadded_batch()
    model.train()
    torch.manual_seed(11)
    plain = _plain(model, batch)
    enable_fast_paths(model)
    attn = model.model.layers[0].self_attn
    assert "forward" in attn.__dict__ and "forward" not in attn.q_proj.__dict__  # the copy, around unfused q, v
    torch.manual_seed(11)
    _assert_same(_fast(model, batch), plain)


@pytest.mark.usefixtures("mask_keeping")
def test_dropout_masks_are_drawn_again_alike_in_a_checkpointed_recompute(monkeypatch):
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(dropout=0.2), _batch()
    enable_fast_paths(model)
    model.train()
    torch.manual_seed(5)
    want = _fast(model, batch)
    checkpoint_layers(model)
    skipped = _count_skipped_mlp_outputs(monkeypatch)
    torch.manual_seed(5)
    got = _fast(model, batch)
    assert skipped.count(True) == SIZES["num_hidden_layers"]
    _assert_same(got, want, rtol=1e-6)


def test_enabling_twice_patches_each_module_once():
    model = _model(target_modules=["q_proj", "v_proj", "o_proj"])
    for native in (True, True, False, False):
        enable_fast_paths(model, native=native)
    disable_fast_paths(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_native_false_and_disable_keep_sdpa(monkeypatch):
    calls = _count_cpu_attention_calls(monkeypatch)
    model, batch = _model(), _unpadded_batch()
    enable_fast_paths(model, native=False)
    causal_lm_loss(model, batch)
    enable_fast_paths(model)
    disable_fast_paths(model)
    model(**batch)
    assert calls == []
    enable_fast_paths(model)
    causal_lm_loss(model, batch)
    assert len(calls) == len(model.model.layers)


def test_padded_rows_and_sliding_windows_keep_sdpa(monkeypatch):
    calls = _count_cpu_attention_calls(monkeypatch)
    model = _model()
    enable_fast_paths(model)
    causal_lm_loss(model, _batch())  # an attention mask
    model = _model("mistral")
    # shorter than the 20 tokens: transformers then passes a window mask, which routes the call
    # (attention_blocker's own window check is unit-tested in test_cpu_attention.py)
    model.config.sliding_window = 8
    enable_fast_paths(model)
    causal_lm_loss(model, _unpadded_batch())
    assert calls == []


def test_fused_blocks_are_the_ones_running(monkeypatch):
    model, batch = _model(), _batch()
    calls = []
    for name in ("lora_mlp", "lora_qkv", "lora_linear"):
        real = getattr(llama_patch, name)
        monkeypatch.setattr(llama_patch, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    enable_fast_paths(model)
    causal_lm_loss(model, batch)
    assert sorted(calls) == sorted(["lora_mlp", "lora_qkv", "lora_linear"] * 2)


def test_native_norm_and_rope_are_the_ones_running_on_cpu(monkeypatch):
    model, batch = _model(), _batch()
    calls = []
    for name in ("rms_norm", "rope"):
        real = getattr(native_ops, name)
        monkeypatch.setattr(native_ops, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    enable_fast_paths(model)
    causal_lm_loss(model, batch)
    layers = len(model.model.layers)
    ropes = layers if llama_patch._rope_swap_blocker(model.model.layers[0].self_attn) is None else 0
    assert sorted(calls) == sorted(["rms_norm"] * (2 * layers + 1) + ["rope"] * ropes)


@pytest.mark.parametrize("version, copied", [("5.17.0", True), ("5.25.0", True),
                                             ("5.16.2", False), ("5.26.0.dev0", False)])
def test_rope_swap_only_in_the_copied_transformers_range(monkeypatch, version, copied):
    import transformers

    model, batch = _model(), _batch()
    plain = _plain(model, batch)
    monkeypatch.setattr(transformers, "__version__", version)
    notices = enable_fast_paths(model)
    if copied:
        assert notices == []
    else:
        assert len(notices) == 1 and f"transformers {version[:6]}" in notices[0]
        assert "fused RoPE not used" in notices[0]
    _assert_same(_fast(model, batch), plain)


def test_the_test_install_keeps_transformers_in_the_copied_range():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text()
    (low_major, low_minor), (high_major, high_minor) = llama_patch.COPIED_ATTENTION_RANGE
    assert f'"transformers>={low_major}.{low_minor},<{high_major}.{high_minor + 1}"' in setup


def test_patched_norms_alone_do_not_count_as_fast_paths():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SIZES))  # no adapters: no block can fuse
    notices = enable_fast_paths(llama)
    assert len(notices) == 2 and all("no adapter on this Linear" in n for n in notices)
    assert not fast_paths_enabled(llama) and "forward" in llama.model.norm.__dict__
    norms_only = nn.Sequential(nn.Linear(8, 8), LlamaRMSNorm(8))
    assert enable_fast_paths(norms_only) == ["no Llama-style attention or SwiGLU MLP with LoRA was found"]


def test_trainable_norm_weights_get_their_gradient():
    model, batch = _model(), _batch()
    norms = [model.model.norm] + [layer.post_attention_layernorm for layer in model.model.layers]
    for norm in norms:
        norm.weight.requires_grad_(True)
    plain = _plain(model, batch)
    enable_fast_paths(model)
    fast = _fast(model, batch)
    assert "model.norm.weight" in fast[1]
    _assert_same(fast, plain)


def test_kv_cache_decoding_matches():
    model, ids = _model().eval(), _batch()["input_ids"]
    want = prefill_then_decode(model, ids, 7)
    enable_fast_paths(model)
    torch.testing.assert_close(prefill_then_decode(model, ids, 7), want, rtol=1e-5, atol=1e-5)


def test_native_false_leaves_norms_and_rope_to_transformers_and_switches_back():
    model, batch = _model(), _batch()
    plain = _plain(model, batch)
    enable_fast_paths(model)
    assert enable_fast_paths(model, native=False) == []  # re-patched without the native ops
    assert fast_paths_enabled(model) and "forward" not in model.model.norm.__dict__
    _assert_same(_fast(model, batch), plain)
    enable_fast_paths(model)
    assert "forward" in model.model.norm.__dict__


def test_with_gradient_checkpointing():
    model, batch = _model(), _batch()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    plain = _plain(model, batch)
    enable_fast_paths(model)
    _assert_same(_fast(model, batch), plain)


def _count_skipped_mlp_outputs(monkeypatch):
    skipped = []
    original = fused_lora._shared_forward

    def spy(x2, projections, casts, rates, outputs=True):
        skipped.append(not outputs)
        return original(x2, projections, casts, rates, outputs)

    monkeypatch.setattr(fused_lora, "_shared_forward", spy)
    return skipped


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("offload, stack", [(False, False), (True, False), (False, True)])
def test_trainer_checkpointing_recomputes_without_the_mlp_output_and_matches(monkeypatch, arch, offload, stack):
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(arch), _batch()
    if stack:  # stacked gate and up with the GPU's epilogues: d gate and d up side by side
        monkeypatch.setattr(fused_lora, "_cublas_writes_in_place", lambda t: True)
    enable_fast_paths(model, stack=stack)
    model.train()
    want = _fast(model, batch)
    checkpoint_layers(model, offload=offload)  # on a CPU offload keeps tensors where they are
    skipped = _count_skipped_mlp_outputs(monkeypatch)
    got = _fast(model, batch)
    # each layer's forward computes the MLP's output, each recompute leaves it out
    assert skipped.count(True) == SIZES["num_hidden_layers"] and skipped.count(False) > 0
    _assert_same(got, want, rtol=1e-6)


GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up and down each run _shared_forward once per forward


def test_recompute_skip_only_for_layers_that_only_add_the_mlp_output(monkeypatch):
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(), _batch()
    enable_fast_paths(model)
    monkeypatch.setattr(llama_patch, "DECODER_LAYERS", set())  # a layer the fast path does not know
    checkpoint_layers(model.train())
    plain = _plain(model, batch)
    skipped = _count_skipped_mlp_outputs(monkeypatch)
    got = _fast(model, batch)
    # every layer ran twice (forward and recompute) and computed its MLP's output both times
    assert len(skipped) == 2 * GROUPS_PER_LAYER * SIZES["num_hidden_layers"] and not any(skipped)
    _assert_same(got, plain)


def test_a_hook_reading_the_mlp_output_keeps_it_in_the_recompute(monkeypatch):
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(), _batch()
    enable_fast_paths(model)
    gain = nn.Parameter(torch.tensor(1.5))  # the hook's product saves the MLP output for backward
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: out * gain)
    want = _fast(model, batch)
    want_gain = gain.grad.clone()
    gain.grad = None
    checkpoint_layers(model.train())
    skipped = _count_skipped_mlp_outputs(monkeypatch)
    got = _fast(model, batch)
    assert len(skipped) == 2 * GROUPS_PER_LAYER * SIZES["num_hidden_layers"] and not any(skipped)
    _assert_same(got, want, rtol=1e-6)
    torch.testing.assert_close(gain.grad, want_gain, rtol=1e-6, atol=0)


def test_a_retained_graph_recomputes_again():
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(), _batch()
    enable_fast_paths(model)
    loss, want = _fast(model, batch)
    checkpoint_layers(model.train())
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward(retain_graph=True)  # each recompute enters the layer's recompute context again
    loss.backward()
    for name, grad in _adapter_grads(model).items():
        torch.testing.assert_close(grad, 2 * want[name], rtol=1e-6, atol=1e-9, msg=name)


def test_no_recompute_context_where_torch_takes_only_its_own(monkeypatch):
    from lorakit.kernels import cpu_gemm
    from lorakit.train.memory_plan import checkpoint_layers

    model, batch = _model(), _batch()
    layer = model.model.layers[0]
    assert llama_patch.recompute_context_fn(layer) is None  # the MLP is not fused yet
    enable_fast_paths(model)
    assert llama_patch.recompute_context_fn(layer) is not None
    monkeypatch.setattr(cpu_gemm, "traced", lambda: True)  # torch.compile tracing the layer
    assert llama_patch.recompute_context_fn(layer) is None
    monkeypatch.undo()
    checkpoint_layers(model.train())
    with torch.utils.checkpoint.set_checkpoint_debug_enabled(True):  # refuses any other context_fn
        assert llama_patch.recompute_context_fn(layer) is None
        got = _fast(model, batch)
    _assert_same(got, _fast(model, batch), rtol=1e-6)


def test_disable_restores_the_original_forwards():
    model, batch = _model(), _batch()
    enable_fast_paths(model)
    enable_fast_paths(model)  # idempotent
    assert fast_paths_enabled(model)
    disable_fast_paths(model)
    assert not fast_paths_enabled(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    model(**batch)


def test_unfusable_adapters_fall_back_with_a_notice():
    options, reason = dict(use_dora=True), "DoRA"
    model, batch = _model(**options), _batch()
    notices = enable_fast_paths(model)
    assert notices and all(reason in n for n in notices)
    assert not fast_paths_enabled(model)  # the norms alone take the native op
    _assert_same(_fast(model, batch), _plain(model, batch))


def test_merged_after_enabling_runs_the_plain_forward():
    model, batch = _model(), _batch()
    with torch.no_grad():
        want = model(**batch).logits
    enable_fast_paths(model)
    merge_lora(model)  # the fused path would add the update twice
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shared_normalizer_makes_micro_batches_add_up():
    model, batch = _model(), _batch()
    enable_fast_paths(model)
    total = int((batch["labels"][:, 1:] != -100).sum())
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    summed = _loss_and_grads(model, lambda: sum(causal_lm_loss(model, h, total) for h in halves))
    _assert_same(summed, _fast(model, batch))


def test_other_architectures_get_a_notice_and_the_chunked_loss_still_works():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256,
                                       n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    apply_lora(model, LoraConfig(r=4, alpha=8))
    notices = enable_fast_paths(model)
    assert notices == ["no Llama-style attention or SwiGLU MLP with LoRA was found"]
    batch = _batch()
    _assert_same(_fast(model, batch), _plain(model, batch))


def test_rescaled_logits_use_the_full_logits_loss(monkeypatch):
    model, batch = _model(), _batch()
    plain = _plain(model, batch)
    model.config.logit_scale = 0.5  # ignored by Llama itself, but marks a head we must not chunk

    def refuse(*args, **kwargs):
        raise AssertionError("chunked loss used on a rescaled head")

    monkeypatch.setattr(causal_loss, "chunked_lm_head_loss", refuse)
    _assert_same(_fast(model, batch), plain)


def test_trainable_head_gets_its_gradient():
    model, batch = _model(), _batch()
    model.lm_head.weight.requires_grad_(True)  # tied to the input embedding here
    plain = _plain(model, batch)
    _assert_same(_fast(model, batch), plain)
    assert isinstance(model.lm_head, nn.Linear)


# ---- where a fast path would compute something else: it must step aside ------------------------

def test_a_head_that_is_more_than_a_projection_keeps_its_own_logits():
    """RoBERTa's causal LM head is dense + GELU + LayerNorm + the projection that
    get_output_embeddings returns: the chunked loss (projection of the last hidden state) would
    be another function. The one-time check finds it; the loss is the model's own."""
    from transformers import RobertaConfig, RobertaForCausalLM

    torch.manual_seed(0)
    model = RobertaForCausalLM(RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=256, is_decoder=True)).eval()
    batch = _batch()  # eval: RoBERTa's dropout would draw other masks in the two losses
    notices = enable_fast_paths(model)
    assert any("the loss computes full logits: its logits are not the output head" in n for n in notices)
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss)


def test_a_config_multiplier_on_the_logits_keeps_them():
    model = _model()
    model.config.lm_head_multiplier = 0.5  # FalconH1's field
    assert "lm_head_multiplier" in causal_loss.chunked_loss_blocker(model)


def test_a_base_layer_subclass_with_its_own_forward_is_not_fused():
    class HalvingLinear(nn.Linear):  # as BitNet's or an FP8 linear: the weight alone is not the function
        def forward(self, x):
            return super().forward(x) / 2

    model, batch = _model(), _batch()
    model.model.layers[0].self_attn.o_proj.base_layer.__class__ = HalvingLinear
    plain = _plain(model, batch)
    notices = enable_fast_paths(model)
    assert any("HalvingLinear is not a plain nn.Linear" in n for n in notices)
    _assert_same(_fast(model, batch), plain)


@pytest.mark.parametrize("where", ["mlp.down_proj", "mlp.gate_proj.base_layer", "self_attn.q_proj.base_layer"])
def test_a_hook_on_a_projection_is_honoured(where):
    model, batch = _model(), _batch()
    model.model.layers[1].get_submodule(where).register_forward_hook(lambda module, args, out: out / 2)
    plain = _plain(model, batch)
    enable_fast_paths(model)
    _assert_same(_fast(model, batch), plain)


def test_a_global_module_hook_is_honoured_and_said_once():
    model, batch = _model(), _batch()
    down_proj = model.model.layers[1].mlp.down_proj
    halve = nn.modules.module.register_module_forward_hook(  # as a profiler or FLOP counter would
        lambda module, args, out: out / 2 if module is down_proj else out)
    try:
        plain = _plain(model, batch)
        enable_fast_paths(model)
        llama_patch._say_once_global_hooks.cache_clear()
        with pytest.warns(UserWarning, match="global module hook") as said:
            hooked = _fast(model, batch)
            _fast(model, batch)
    finally:
        halve.remove()
    _assert_same(hooked, plain)
    assert len([w for w in said if "global module hook" in str(w.message)]) == 1
    assert not torch.allclose(_fast(model, batch)[0], plain[0])  # without it the fused path runs again


def test_torch_func_transforms_take_the_plain_path():
    from torch.func import functional_call, grad

    model, batch = _model(), _batch()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(p):
        return functional_call(model, p, args=(), kwargs=dict(batch, use_cache=False)).loss

    want = grad(loss_of)(params)
    enable_fast_paths(model)
    got = grad(loss_of)(params)  # the fused autograd functions have no setup_context: they step aside
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=name)


def test_the_loss_of_a_peft_model_is_its_base_models_chunked(monkeypatch):
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**SIZES)), peft.LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch()
    notices = enable_fast_paths(model)
    assert not any("DoRA" in n or "full logits" in n for n in notices)  # PEFT's use_dora is a dict per adapter
    chunked = []
    real = causal_loss.chunked_lm_head_loss
    monkeypatch.setattr(causal_loss, "chunked_lm_head_loss", lambda *a, **k: chunked.append(1) or real(*a, **k))
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss)
    assert chunked == [1]


class _RenamedLlama(LlamaForCausalLM):
    """A causal LM the head check has not seen: it runs the check."""


def test_the_head_check_runs_once_per_model_and_keeps_each_modules_mode():
    torch.manual_seed(0)
    model = _RenamedLlama(LlamaConfig(**SIZES))
    model.model.layers[0].eval()  # a mixed state that a user set
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    assert causal_loss.chunked_loss_blocker(model) is None
    assert causal_loss.chunked_loss_blocker(model) is None  # once per model
    assert calls == [1, 1]  # the model's forward, then the backbone alone, as the chunked loss calls it
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_a_model_whose_forward_skips_its_backbone_module_is_checked_through_the_backbone(monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)  # OPT's forward calls model.decoder, never model.model: a hook on the backbone saw nothing
    model = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                     dropout=0.0, attention_dropout=0.0))
    assert causal_loss.chunked_loss_blocker(model) is None
    chunked = []
    real = causal_loss.chunked_lm_head_loss
    monkeypatch.setattr(causal_loss, "chunked_lm_head_loss", lambda *a, **k: chunked.append(1) or real(*a, **k))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(causal_lm_loss(model, {"input_ids": ids, "labels": ids}),
                               model(input_ids=ids, labels=ids).loss)
    assert chunked == [1]
