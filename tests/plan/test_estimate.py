"""lorakit estimate: parameter counts, FLOPs, weight bytes, the saved-activation model against
measurement, the CPU measurement itself, and the CLI."""

import gc
import os
import json

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.plan.estimate import (
    _per_step_saved_bytes,
    NF4_BYTES_PER_PARAM,
    TrainShape,
    backward_workspace_bytes,
    estimate,
    estimate_memory,
    flops_per_token,
    layer_saved_bytes,
    step_time,
    weight_bytes,
)
from lorakit.plan.measure import AllocationTimeline, SavedTensorTracker, measure_step
from lorakit.plan.model_shapes import PRESETS, ModelShape, count_lora_params, model_shape


def tiny_config(**overrides):
    from transformers import LlamaConfig

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    sizes.update(overrides)
    return LlamaConfig(**sizes)


# ---- parameters and FLOPs --------------------------------------------------------------------

@pytest.mark.parametrize("targets,peft_targets", [
    ("all-linear", "all-linear"), ("qv", ["q_proj", "v_proj"]), ("mlp", ["gate_proj", "up_proj", "down_proj"]),
])
def test_lora_param_count_equals_a_real_peft_model(targets, peft_targets):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = tiny_config(head_dim=32)  # head_dim != hidden / heads: q is 128 wide
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=peft_targets))
    real = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count_lora_params(config, 8, targets) == real


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_equals_the_real_model(tied):
    from transformers import LlamaForCausalLM

    config = tiny_config(tie_word_embeddings=tied)
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())  # tied weights counted once
    assert model_shape(config).num_params() == real


def test_a_config_json_without_tie_word_embeddings_takes_its_model_types_default(tmp_path):
    # transformers writes only non-default values: a Gemma config.json often leaves out its tie
    import json

    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256)
    data = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    real = sum(p.numel() for p in GemmaForCausalLM(config).parameters())
    assert model_shape(tmp_path).tie_word_embeddings and model_shape(tmp_path).num_params() == real
    llama = {k: v for k, v in tiny_config().to_dict().items() if k != "tie_word_embeddings"}
    assert not model_shape(llama).tie_word_embeddings


def test_flops_per_token_of_the_1b_shape():
    shape = TrainShape(batch_size=4, seq_len=2048, r=16)
    h, i, kv, vocab, layers = 2048, 8192, 512, 128256, 16
    n_mm = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h  # the tied head still multiplies
    n_lora = layers * 16 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    by_hand = 4 * n_mm + 6 * n_lora + 6 * layers * 2048 * h
    assert flops_per_token("1b", shape) == by_hand
    # PERF.md: ~5.3 GFLOP/token (817 TFLOP/s at 100% MFU is ~153k tokens/s, i.e. 5.34 G)
    assert abs(by_hand / (817e12 / 153e3) - 1) < 0.02
    hardware = flops_per_token("1b", TrainShape(seq_len=2048, grad_checkpointing=True), hardware=True)
    assert hardware == by_hand + 2 * (n_mm - vocab * h) + 2 * n_lora + 2 * layers * 2048 * h


def test_8b_flops_and_step_time():
    shape = TrainShape(batch_size=2, seq_len=2048, r=16)
    per_token = flops_per_token("8b", shape)
    assert abs(per_token / 31.6e9 - 1) < 0.02  # PERF.md: ~31.6 GFLOP/token
    assert step_time("8b", shape, 817) == pytest.approx(per_token * 4096 / 817e12)
    assert step_time("8b", shape, 817, mfu=0.4) == pytest.approx(per_token * 4096 / 817e12 / 0.4)


# ---- weights ---------------------------------------------------------------------------------

def test_weight_bytes_bf16_nf4_int8():
    m = PRESETS["8b"]
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    rest = 2 * 128256 * 4096 + 65 * 4096  # untied embedding + head, norms
    assert m.num_params() == linear + rest == 8_030_261_248  # Llama-3.1-8B
    assert weight_bytes(m, TrainShape(dtype="bf16")) == 2 * (linear + rest)
    assert weight_bytes(m, TrainShape(dtype="fp32")) == 4 * (linear + rest)
    assert NF4_BYTES_PER_PARAM == pytest.approx(0.5 + 0.127 / 8, abs=2e-4)  # 4.127 bits
    assert weight_bytes(m, TrainShape(quantize="4bit")) == int(linear * NF4_BYTES_PER_PARAM + 2 * rest)
    assert weight_bytes(m, TrainShape(quantize="4bit")) / 1e9 == pytest.approx(5.70, abs=0.05)  # research notes
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 * 2 + 4096)
    assert weight_bytes(m, TrainShape(quantize="8bit")) == linear + 4 * rows + 2 * rest


# ---- activations -----------------------------------------------------------------------------

def test_saved_bytes_per_layer_by_hand():
    m = PRESETS["1b"]  # h 2048, q 2048, kv 512, I 8192, 32 heads
    saved = layer_saved_bytes(m, TrainShape(r=16, dtype="bf16"))
    by_hand = (4 * 2048 + 4) * 2 + 2 * (2048 + 2 * 512) + 2 * 2048 + 4 * 32 + 3 * 2 * 8192 \
        + 2 * 2048 + 2 * 2048 + 2 * 8192 + 7 * 16 * 2
    assert sum(saved.values()) == by_hand
    peft = layer_saved_bytes(m, TrainShape(r=16, dtype="bf16", engine="peft"))  # fp32 copy per adapter
    assert sum(peft.values()) - by_hand == (3 * 4 - 2) * 2048 + 4 * 2048 + (2 * 4 - 2) * 2048 + (4 - 2) * 8192 + 7 * 16 * 2


def test_fused_groups_keep_a_dropout_mask_per_adapter_on_the_cpu_and_none_on_cuda():
    m = PRESETS["1b"]

    def saved(device, dropout):
        return layer_saved_bytes(m, TrainShape(r=16, dtype="bf16", device=device, fused_mlp=True, fused_attention=True,
                                               lora_dropout=dropout))

    masks = {key: n for key, n in saved("cpu", 0.1).items() if "mask" in key}
    assert sum(masks.values()) == 3 * 2048 + 2048 + 2 * 2048 + 8192 and len(masks) == 4  # a byte per element
    assert saved("cuda", 0.1) == saved("cuda", 0.0)  # kernels/adapter_dropout draws them again in backward
    workspace = {dropout: backward_workspace_bytes(m, TrainShape(r=16, dtype="bf16", device="cuda", fused_mlp=True,
                                                                 lora_dropout=dropout))
                 for dropout in (0.0, 0.1)}
    tokens = TrainShape().tokens
    assert [a - b for a, b in zip(workspace[0.1], workspace[0.0])] == [0, tokens * 8192, tokens * 8192]  # down's mask
    unfused = layer_saved_bytes(m, TrainShape(r=16, dtype="bf16", device="cuda", lora_dropout=0.1))
    assert sum(unfused.values()) > sum(saved("cuda", 0.0).values())  # a dropped copy and a mask per adapter


def test_layer_zero_saves_less():
    m = PRESETS["smollm2-135m"]
    first = layer_saved_bytes(m, TrainShape(), stream_grad=False)
    other = layer_saved_bytes(m, TrainShape(), stream_grad=True)
    assert sum(other.values()) - sum(first.values()) == 4 * m.hidden_size + 4  # no norm1 save
    only_mlp = layer_saved_bytes(m, TrainShape(targets="mlp"), stream_grad=False)
    assert not any("q, k, v" in key for key in only_mlp)  # nothing upstream needs a grad


def test_checkpointing_fused_loss_and_quantisation_lower_their_terms():
    base = TrainShape(batch_size=4, seq_len=2048)
    plain = estimate_memory("1b", base)
    ckpt = estimate_memory("1b", TrainShape(batch_size=4, seq_len=2048, grad_checkpointing=True))
    fused = estimate_memory("1b", TrainShape(batch_size=4, seq_len=2048, fused_loss=True))
    nf4 = estimate_memory("1b", TrainShape(batch_size=4, seq_len=2048, quantize="4bit"))
    assert ckpt.activations < plain.activations / 5 and ckpt.total < plain.total
    assert plain.activations_without_checkpointing == plain.activations == ckpt.activations_without_checkpointing
    assert ckpt.activations_with_checkpointing == ckpt.activations
    assert plain.logits == 12 * 8192 * 128256 + 8 * 8192  # fp32 lsm output + two fp32 grads, + labels
    assert fused.logits == 8 * 256 * 128256 + 2 * 8192 * 2048 * 2 + 8 * 8192  # one 256-row chunk (128 MiB fp32)
    assert fused.total < plain.total - 8e9
    assert nf4.weights < plain.weights / 2
    assert plain.adapter == 16 * count_lora_params("1b", 16)
    assert plain.total == plain.weights + plain.adapter + plain.activations_resident + plain.logits


def test_perf_anchor_without_checkpointing():
    """PERF.md, 1b 4 x 2048 on an H200: PEFT defaults 33.6 GiB, PEFT with bf16 adapters 26.5 GiB."""
    peft = estimate_memory("1b", TrainShape(batch_size=4, seq_len=2048, engine="peft")).total / 2**30
    lorakit = estimate_memory("1b", TrainShape(batch_size=4, seq_len=2048)).total / 2**30
    assert peft == pytest.approx(33.6, rel=0.05)
    assert lorakit == pytest.approx(26.5, rel=0.05)


# ---- the CPU measurement ---------------------------------------------------------------------

def test_saved_tensor_tracker_counts_storages_once_and_releases_them():
    x = torch.randn(1000, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(1000))
    tracker = SavedTensorTracker({weight.untyped_storage().data_ptr()})
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        y = (x.exp() * x * weight).sum()  # exp saves its result; mul saves x (twice as a view)
        assert tracker.live == 2 * 4000 + 4000  # exp(x), x, x * exp(x); the parameter excluded
        y.backward()
    assert tracker.live == 0 and tracker.peak == 12000


def test_allocation_timeline_levels_and_peaks():
    line = AllocationTimeline([(1, 100), (2, 50), (3, -100), (4, 200), (5, -250)], {"a": 3, "b": 5})
    assert line.level_at(3) == 150
    assert line.peak_between(None, None) == 250
    assert line.peak_between(3, 3) == 150  # the level entering the window counts
    assert line.peak_between(None, 2) == 150


def test_measured_step_agrees_with_the_estimate():
    config = tiny_config()
    for checkpointing in (False, True):
        shape = TrainShape(batch_size=2, seq_len=64, r=8, dtype="fp32", grad_checkpointing=checkpointing, device="cpu")
        measured, predicted = measure_step(config, shape), estimate_memory(config, shape)
        assert measured.weights == pytest.approx(predicted.weights, rel=0.01)
        assert measured.adapter == pytest.approx(predicted.adapter, rel=0.01)
        assert measured.activations == pytest.approx(predicted.allocated_at_head, rel=0.1)
        assert measured.total == pytest.approx(predicted.total, rel=0.1)
        if not checkpointing:  # everything autograd saved, plus log_softmax's output and the labels
            saved = predicted.activations_resident + 4 * shape.tokens * config.vocab_size + 8 * shape.tokens
            assert measured.saved_peak == pytest.approx(saved, rel=0.02)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_a_quantised_step_is_measured_and_agrees_with_the_estimate(quantize):
    pytest.importorskip("bitsandbytes")
    config = tiny_config()
    shape = TrainShape(batch_size=2, seq_len=64, r=8, dtype="bf16", quantize=quantize, device="cpu")
    measured, predicted = measure_step(config, shape), estimate_memory(config, shape)
    assert measured.weights == pytest.approx(predicted.weights, rel=0.15)  # a tiny model's quantisation overhead
    assert measured.total == pytest.approx(predicted.total, rel=0.1)


def test_selective_checkpointing_lies_between_and_keeps_both_ends():
    m = PRESETS["1b"]
    shape = dict(batch_size=4, seq_len=2048, fused_loss=True)
    off, on = estimate_memory(m, TrainShape(**shape)), estimate_memory(m, TrainShape(**shape, grad_checkpointing=True))
    assert estimate_memory(m, TrainShape(**shape, grad_checkpointing=True, checkpoint_layers=0)).to_dict() == off.to_dict()
    assert estimate_memory(m, TrainShape(**shape, grad_checkpointing=True, checkpoint_layers=16)).to_dict() == on.to_dict()
    totals = [estimate_memory(m, TrainShape(**shape, grad_checkpointing=True, checkpoint_layers=k)).total for k in range(17)]
    # each checkpointed layer saves memory until the peak moves to one layer's recompute + backward
    # (with 256-row loss chunks that is the last layer's: checkpointing it too saves nothing)
    assert all(a > b for a, b in zip(totals[:15], totals[1:15])) and totals[15] == totals[16]
    half = estimate_memory(m, TrainShape(**shape, grad_checkpointing=True, checkpoint_layers=8))
    per_layer = 8192 * sum(layer_saved_bytes(m, TrainShape(**shape)).values())
    layer_zero = 8192 * sum(layer_saved_bytes(m, TrainShape(**shape), stream_grad=False).values())
    checkpoint = 8192 * 2048 * 2  # a checkpointed layer keeps its bf16 input
    cast_copies = count_lora_params(m, 16) * 2 // 16  # and not its adapters' bf16 weight copies
    freed = layer_zero + 7 * per_layer + 8 * (cast_copies - checkpoint)  # layers 0-7 are checkpointed
    assert off.activations_resident - half.activations_resident == freed
    # the recompute comes after the plain layers are freed: the resident set stays the peak
    assert half.activations == half.activations_resident
    plain_flops = flops_per_token(m, TrainShape(**shape), hardware=True)
    full_flops = flops_per_token(m, TrainShape(**shape, grad_checkpointing=True), hardware=True)
    half_flops = flops_per_token(m, TrainShape(**shape, grad_checkpointing=True, checkpoint_layers=8), hardware=True)
    assert half_flops == pytest.approx((plain_flops + full_flops) / 2)


def test_selective_checkpointing_agrees_with_measurement():
    """The earliest k of 4 layers checkpointed, as lorakit's trainer picks them (measure_step
    checkpoints through the trainer's memory_plan.checkpoint_layers; the model is sized so that
    the layers, not the loss, decide the memory)."""
    config = tiny_config(intermediate_size=172, num_hidden_layers=4, vocab_size=256)
    at_head = []
    for k in (0, 1, 3):
        shape = TrainShape(batch_size=2, seq_len=64, r=8, dtype="fp32", grad_checkpointing=k > 0,
                           checkpoint_layers=k, device="cpu")
        measured, predicted = measure_step(config, shape), estimate_memory(config, shape)
        at_head.append(measured.activations)
        if k == 0:
            continue
        # the saved set at the loss: the plain layers', the checkpoints, log_softmax's output, the labels
        saved = predicted.activations_resident + 4 * shape.tokens * config.vocab_size + 8 * shape.tokens
        assert measured.saved_peak == pytest.approx(saved, abs=16)
        assert measured.activations == pytest.approx(predicted.allocated_at_head, rel=0.05)
        assert measured.backward_peak == pytest.approx(predicted.activations + predicted.workspace, rel=0.1)
        assert measured.total == pytest.approx(predicted.total, rel=0.1)
    assert all(a > b for a, b in zip(at_head, at_head[1:]))


def test_offloaded_checkpoints_keep_two_layer_inputs_on_the_device():
    m = PRESETS["1b"]
    shape = dict(batch_size=4, seq_len=2048, fused_loss=True, grad_checkpointing=True)
    full = estimate_memory(m, TrainShape(**shape))
    offload = estimate_memory(m, TrainShape(**shape, offload_checkpoints=True))
    layer_input = 8192 * 2048 * 2  # bf16 hidden states of 4 x 2048 tokens
    # 16 inputs on the device become 2 in flight; the other 14 wait in host memory
    assert full.activations_resident - offload.activations_resident == 14 * layer_input
    assert full.activations - offload.activations == 14 * layer_input
    assert full.total - offload.total == 14 * layer_input
    assert (offload.offloaded_to_host, full.offloaded_to_host) == (16 * layer_input, 0)
    assert offload.weights == full.weights and offload.logits == full.logits  # only the checkpoints move
    one = estimate_memory(m, TrainShape(**shape, checkpoint_layers=1, offload_checkpoints=True))
    assert one.total == estimate_memory(m, TrainShape(**shape, checkpoint_layers=1)).total  # 1 <= 2 in flight
    assert one.offloaded_to_host == layer_input
    result = estimate(m, TrainShape(**shape, offload_checkpoints=True))  # the other setting: no checkpointing
    assert result.memory_other_checkpointing.to_dict() == estimate_memory(m, TrainShape(batch_size=4, seq_len=2048,
                                                                                        fused_loss=True)).to_dict()
    assert flops_per_token(m, TrainShape(**shape, offload_checkpoints=True), hardware=True) == \
        flops_per_token(m, TrainShape(**shape), hardware=True)  # the same recompute
    with pytest.raises(ConfigError, match="offload_checkpoints=True needs grad_checkpointing"):
        TrainShape(offload_checkpoints=True)
    with pytest.raises(ConfigError, match="offload_checkpoints must be True or False"):
        TrainShape(grad_checkpointing=True, offload_checkpoints="yes")


def test_offloaded_checkpoints_agree_with_measurement(monkeypatch):
    """Offloading on the CPU, measured: the host copies are kept in numpy memory, outside the
    torch allocator the measurement reads, so what remains is what a device would hold."""
    import numpy as np

    from lorakit.train import offload

    class NumpyHost(offload.HostOffload):
        def pack(self, tensor):
            return offload.HostCopy(np.array(tensor.detach().numpy()), tensor.device, False)

        def unpack(self, packed):
            return torch.from_numpy(packed.tensor).clone()  # back through the torch allocator

    # measure.build_model offloads as the trainer does, here into numpy memory
    monkeypatch.setattr(offload, "HostOffload", lambda: NumpyHost(offloadable=lambda t: True))
    config = tiny_config(intermediate_size=172, num_hidden_layers=8, vocab_size=256)
    shape = TrainShape(batch_size=2, seq_len=64, r=8, dtype="fp32", grad_checkpointing=True,
                       offload_checkpoints=True, device="cpu")
    gc.collect()  # earlier tests' garbage freed during a profiled step would read as a negative allocation
    measured, predicted = measure_step(config, shape), estimate_memory(config, shape)
    assert measured.activations == pytest.approx(predicted.allocated_at_head, rel=0.1)
    assert measured.total == pytest.approx(predicted.total, rel=0.05)
    gc.collect()
    full = measure_step(config, TrainShape(**{**shape.__dict__, "offload_checkpoints": False}))
    layer_input = shape.tokens * 64 * 4
    drop = full.activations - measured.activations  # at the head: the checkpoints that left the device
    predicted_drop = 6 * layer_input  # 8 inputs, 2 counted in flight
    assert predicted_drop <= drop <= predicted_drop + 2 * layer_input  # the estimate errs on the safe side


def test_checkpoint_layers_is_checked():
    with pytest.raises(ConfigError, match="needs grad_checkpointing"):
        TrainShape(checkpoint_layers=3)
    with pytest.raises(ConfigError, match="checkpoint_layers must be"):
        TrainShape(grad_checkpointing=True, checkpoint_layers=-1)
    with pytest.raises(ConfigError, match="True or False"):
        TrainShape(grad_checkpointing="off")  # a config's on/off/auto string is not a shape
    with pytest.raises(ConfigError, match="exceeds the model's 16 layers"):
        estimate_memory("1b", TrainShape(grad_checkpointing=True, checkpoint_layers=17))


# ---- model shapes and errors -----------------------------------------------------------------

def test_model_shape_from_a_folder_a_file_a_preset(tmp_path):
    config = tiny_config(num_key_value_heads=1)
    config.save_pretrained(tmp_path)
    from_folder, from_file = model_shape(tmp_path), model_shape(str(tmp_path / "config.json"))
    assert from_folder == from_file
    assert (from_folder.hidden_size, from_folder.num_kv_heads, from_folder.head_dim, from_folder.vocab_size) == (64, 1, 16, 512)
    assert model_shape("SmolLM2-135M").num_params() == pytest.approx(134.5e6, rel=0.01)


def test_bad_models_and_shapes_are_user_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ConfigError, match="Llama-style"):
        model_shape(tmp_path)
    # BERT's config has the decoder's size keys too: it must not get a decoder's figures
    bert = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(bert))
    with pytest.raises(ConfigError, match="is an encoder model"):
        model_shape(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**bert, "model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(ConfigError, match="is an encoder-decoder model"):
        model_shape(tmp_path)
    # Mixtral's config reads as a dense decoder's too: 8x7B counted as 7.2B (it has 46.7B)
    mixtral = {**bert, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    with pytest.raises(ConfigError, match=r"is a mixture-of-experts model \(8 experts per layer"):
        model_shape(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**mixtral, "num_local_experts": 1}))  # one expert: dense
    assert model_shape(tmp_path).num_layers == 2
    doge = {**bert, "model_type": "doge", "is_moe": False, "num_experts": 16384}  # a class default, dense model
    (tmp_path / "config.json").write_text(json.dumps(doge))
    assert model_shape(tmp_path).num_layers == 2
    nemotron_h = {**bert, "model_type": "nemotron_h", "n_routed_experts": 8}
    for blocks, dense in ((["mamba", "attention", "mlp"], True), (["mamba", "moe", "attention"], False)):
        (tmp_path / "config.json").write_text(json.dumps({**nemotron_h, "layers_block_type": blocks}))
        if dense:
            assert model_shape(tmp_path).num_layers == 2
        else:
            with pytest.raises(ConfigError, match="mixture-of-experts"):
                model_shape(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        TrainShape(dtype="int3")
    with pytest.raises(ConfigError, match="unknown target 'qkv'"):
        TrainShape(targets="qkv")
    from lorakit.plan.model_shapes import resolve_targets
    assert resolve_targets("attention,mlp") == resolve_targets("all")  # groups inside a list, as train takes them
    with pytest.raises(ConfigError, match="batch_size"):
        TrainShape(batch_size=0)


def test_estimate_reports_both_checkpointing_settings():
    result = estimate("8b", TrainShape(batch_size=2, seq_len=2048, grad_checkpointing=True, engine="peft"))
    assert result.memory_other_checkpointing.activations > result.memory.activations
    assert result.memory.total / 2**30 == pytest.approx(23.4, rel=0.1)  # PERF.md: PEFT, 8b, 2 x 2048, ckpt
    assert result.step_seconds_at_mfu == pytest.approx(result.step_seconds_at_100 / 0.4)


# ---- CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "0", "nan"])
def test_cli_refuses_a_peak_that_is_not_a_positive_number(capsys, value):
    assert main(["estimate", "--model", "1b", "--device-peak-tflops", value]) == 2
    assert "--device-peak-tflops must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--checkpoint-layers", "5"], "--checkpoint-layers 5 needs --grad-checkpointing on or offload"),
    (["--checkpoint-layers", "0", "--grad-checkpointing", "on"], "must be at least 1, got 0"),
    (["--checkpoint-layers", "-1"], "must be at least 1, got -1"),
])
def test_cli_names_checkpoint_layers_problems_in_flag_words(capsys, flags, words):
    assert main(["estimate", "--model", "1b", *flags]) == 2
    assert words in capsys.readouterr().err
    assert main(["estimate", "--model", "1b", "--checkpoint-layers", "0", "--json"]) == 0  # 0 of 16, off: as asked


def test_cli_refuses_a_rank_above_a_layers_smaller_side(capsys):
    assert main(["estimate", "--model", "smollm2-135m", "--r", "1000"]) == 2
    assert "r=1000 is above k_proj's smaller side (192)" in capsys.readouterr().err  # the tightest bound
    assert main(["estimate", "--model", "smollm2-135m", "--r", "1000", "--targets", "mlp"]) == 2  # MLP sides: 576


def test_an_unknown_model_name_fails_at_once_offline(capsys, monkeypatch):
    import time

    from lorakit import models

    monkeypatch.setattr(models, "hub_reachable", lambda: False)  # as on these machines
    start = time.perf_counter()
    assert main(["estimate", "--model", "no-such-model-anywhere"]) == 2
    assert time.perf_counter() - start < 10 and "cannot find a model config" in capsys.readouterr().err


def test_cli_json(capsys):
    assert main(["estimate", "--model", "1b", "--batch-size", "4", "--seq-len", "2048", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["num_params"] == 1_235_814_400
    assert report["memory"]["total"] > report["memory_other_checkpointing"]["total"]
    assert report["flops_per_token"] == pytest.approx(5.413e9, rel=1e-3)
    assert report["tokens_per_step"] == 8192


def test_cli_takes_trains_spellings_of_dtype_and_dropout(capsys):
    totals = []
    for flags in (["--dtype", "fp32", "--lora-dropout", "0.1"], ["--dtype", "float32", "--dropout", "0.1"]):
        assert main(["estimate", "--model", "1b", "--json", *flags]) == 0
        totals.append(json.loads(capsys.readouterr().out)["memory"]["total"])
    assert main(["estimate", "--model", "1b", "--json"]) == 0  # bf16, no dropout: another step
    assert totals[0] == totals[1] != json.loads(capsys.readouterr().out)["memory"]["total"]


def test_a_seq_len_beyond_the_models_context_is_noted(tmp_path, capsys):
    tiny_config(max_position_embeddings=512).save_pretrained(tmp_path)
    assert model_shape(tmp_path).context == 512 and model_shape("smollm2-135m").context == 8192
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "513", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [
        "--seq-len 513 is beyond the model's context (512): lorakit train names examples longer than that, and "
        "refuses them where positions are a fixed table"]
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "513"]) == 0
    assert "note: --seq-len 513 is beyond the model's context (512)" in " ".join(capsys.readouterr().out.split())


def test_cli_fast_paths_model_the_trainers_step(capsys):
    """--fast-paths: the chunked loss and the fused MLP, as `lorakit train` plans its step."""
    args = ["estimate", "--model", "1b", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--fast-paths"]) == 0
    fast = json.loads(capsys.readouterr().out)
    want = estimate_memory("1b", TrainShape(fused_loss=True, fused_mlp=True))
    assert fast["memory"]["total"] == want.total < plain["memory"]["total"]
    assert fast["shape"]["fused_loss"] and fast["shape"]["fused_mlp"] and not plain["shape"]["fused_mlp"]
    assert main([*args, "--fast-paths", "--engine", "peft"]) == 2  # PEFT's step has neither
    assert main(["estimate", "--model", "1b", "--fast-paths", "--targets", "attention"]) == 0
    assert "the MLP unfused" in " ".join(capsys.readouterr().out.split())


def test_a_quantised_base_is_modelled_in_the_dtype_it_computes_in(capsys):
    # fp16 is what lorakit train's QLoRA computes in on a GPU without bf16 (a T4), and any --dtype is taken with it
    for dtype, words in (("fp16", "fp16"), ("fp32", "fp32"), ("bfloat16", "bf16")):
        assert main(["estimate", "--model", "smollm2-135m", "--quantize", "4bit", "--dtype", dtype, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["shape"]["dtype"] == words


def test_cli_table(capsys):
    assert main(["estimate", "--model", "smollm2-135m", "--grad-checkpointing", "on", "--quantize", "4bit"]) == 0
    out = capsys.readouterr().out
    assert "checkpointing on (chosen)" in out and "step time at 40% MFU" in out


def test_cli_selective_column(capsys):
    assert main(["estimate", "--model", "1b", "--grad-checkpointing", "on", "--checkpoint-layers", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    selective = estimate_memory("1b", TrainShape(grad_checkpointing=True, checkpoint_layers=6)).total
    assert report["memory"]["total"] == selective and report["shape"]["checkpoint_layers"] == 6
    assert main(["estimate", "--model", "1b", "--grad-checkpointing", "on", "--checkpoint-layers", "6"]) == 0
    assert "checkpointing 6 of 16" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
    assert main(["estimate", "--model", "1b", "--checkpoint-layers", "6"]) == 2  # selective needs it on


def test_cli_offload(capsys):
    assert main(["estimate", "--model", "8b", "--batch-size", "1", "--seq-len", "32768", "--grad-checkpointing",
                 "offload", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"]["offload_checkpoints"] and report["shape"]["grad_checkpointing"]
    assert report["memory"]["offloaded_to_host"] == 32 * 32768 * 4096 * 2  # every layer's bf16 input: 8 GiB
    assert report["memory_other_checkpointing"]["offloaded_to_host"] == 0
    on = estimate_memory("8b", TrainShape(batch_size=1, seq_len=32768, grad_checkpointing=True)).total
    assert on - report["memory"]["total"] == 30 * 32768 * 4096 * 2
    assert main(["estimate", "--model", "8b", "--batch-size", "1", "--seq-len", "32768", "--grad-checkpointing",
                 "offload"]) == 0
    out = capsys.readouterr().out  # rich wraps the long header over two lines
    assert "offloaded (chosen)" in out and "in host memory" in out and "8.00" in out


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert main(["estimate", "--model", "1b", "--r", "0"]) == 2
    assert main(["estimate", "--model", "1b", "--targets", "attn_everything"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_int8_inputs_survive_checkpointing():
    m = PRESETS["smollm2-135m"]
    nf4 = estimate_memory(m, TrainShape(grad_checkpointing=True, quantize="4bit"))
    int8 = estimate_memory(m, TrainShape(grad_checkpointing=True, quantize="8bit"))
    per_layer = 2 * (2 * m.hidden_size + m.q_dim + m.intermediate_size)  # bf16 inputs of the 4 linear groups
    assert int8.activations_resident - nf4.activations_resident == m.num_layers * 4 * 2048 * per_layer
    plain = estimate_memory(m, TrainShape(quantize="8bit"))  # the same tensors are saved anyway
    assert plain.activations == estimate_memory(m, TrainShape(quantize="4bit")).activations


# ---- FSDP: one rank's share -------------------------------------------------------------------

SMALL = ModelShape("small", hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=16, vocab_size=512)


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_weights_by_hand(tied):
    from dataclasses import replace

    m = replace(SMALL, tie_word_embeddings=tied)
    shape = TrainShape(batch_size=1, seq_len=16, r=4, world_size=2, fsdp=True)
    # a layer: q 64x64, k and v 64x32, o 64x64, gate/up 64x128, down 128x64 = 36864, + 2 norms of 64
    layer_base = (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64) * 2  # bf16
    layer_lora = 4 * (128 + 96 + 96 + 128 + 3 * 192)  # r * (in + out) per projection = 4096 params
    embed = 512 * 64
    all_params = embed * (1 if tied else 2) + 9 * 64 + 4 * 36864
    sharded = (all_params - embed) * 2  # every base parameter but the head (tied: the embedding is the head)
    root = (64 + (0 if tied else embed)) * 2  # final norm (+ the untied embedding): whole for the step
    expected = sharded // 2 + 2 * (layer_base + 4 * layer_lora) + root + embed * 2
    fsdp = estimate_memory(m, shape)
    assert fsdp.weights == expected
    assert fsdp.adapter == 4 * layer_lora * 16 // 2  # fp32 weight, grad, m, v: sharded, no all-reduce copy
    ddp = estimate_memory(m, TrainShape(batch_size=1, seq_len=16, r=4, world_size=2))
    assert ddp.weights == all_params * 2 and ddp.adapter == 4 * layer_lora * 20
    # per micro-batch, as replicated: only the parameters' share changes
    assert (fsdp.activations, fsdp.logits, fsdp.workspace) == (ddp.activations, ddp.logits, ddp.workspace)
    assert ddp.total - fsdp.total == (ddp.weights + ddp.adapter) - (fsdp.weights + fsdp.adapter)
    parts = fsdp.fsdp_weights
    assert (parts.base_shard, parts.root_whole, parts.head) == (sharded // 2, root, embed * 2)
    assert ddp.fsdp_weights is None


def test_fsdp_needs_several_devices_and_an_unquantised_base(capsys):
    with pytest.raises(ConfigError, match="world_size is 1"):
        TrainShape(fsdp=True)
    with pytest.raises(ConfigError, match="cannot shard a 4bit base"):
        TrainShape(fsdp=True, world_size=2, quantize="4bit")
    with pytest.raises(ConfigError, match="True or False"):
        TrainShape(fsdp="on", world_size=2)
    assert main(["estimate", "--model", "1b", "--fsdp"]) == 2
    assert "--world-size" in capsys.readouterr().err


def test_fsdp_over_8_ranks_saves_most_of_the_8b_decoder():
    m = PRESETS["8b"]
    sizes = dict(batch_size=1, seq_len=2048, grad_checkpointing=True, fused_loss=True, world_size=8)
    ddp, fsdp = estimate_memory(m, TrainShape(**sizes)), estimate_memory(m, TrainShape(**sizes, fsdp=True))
    layer = m.layer_linear_params() + 2 * m.hidden_size
    decoder = m.num_layers * layer * 2  # bf16, 14.0 GiB
    saved = ddp.weights - fsdp.weights
    # 7/8 of the decoder and of the embedding and norm go, but two layers and the root come back whole
    embed, norm = m.vocab_size * m.hidden_size * 2, m.hidden_size * 2
    gathered = 2 * (layer * 2 + 4 * count_lora_params(m, 16) // m.num_layers)  # bf16 base + fp32 adapters
    assert saved == pytest.approx(7 / 8 * (decoder + embed + norm) - gathered - (embed + norm), abs=8)
    assert saved > 7 / 8 * decoder - 2 * layer * 2 - embed - 16 * 2**20  # the 16 MiB: adapter copies in the layers
    assert saved / 2**30 == pytest.approx(10.4, abs=0.1)
    assert ddp.adapter - fsdp.adapter == count_lora_params(m, 16) * (20 - 2)
    assert fsdp.total < ddp.total / 2


def test_cli_fsdp_reports_one_rank(capsys):
    args = ["estimate", "--model", "8b", "--batch-size", "1", "--world-size", "8", "--fsdp"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    shape = TrainShape(batch_size=1, world_size=8, fsdp=True)
    assert report["shape"]["fsdp"] is True and report["memory"]["total"] == estimate_memory("8b", shape).total
    assert report["memory"]["fsdp_weights"]["head"] == 128256 * 4096 * 2
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "FSDP over 8" in out and "per rank of 8, FSDP" in out and "layers gathered" in out
    assert main(["estimate", "--model", "8b", "--world-size", "8"]) == 0
    assert "DDP (replicated)" in " ".join(capsys.readouterr().out.split())


def _fsdp_rank(rank: int, store_path: str, results) -> None:
    """One of 2 gloo ranks: lorakit's FSDP2 wrap of a tiny untied Llama with LoRA, one step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lorakit import LoraConfig, apply_lora
    from lorakit.train import distributed
    from tiny_models import tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)  # no port to race for
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    distributed.init_from_env()  # the group exists: it only records the world
    model = tiny_llama(layers=4, tie_word_embeddings=False).train()
    apply_lora(model, LoraConfig(r=4))
    distributed.wrap_model(model, True, torch.device("cpu"))
    whole = lambda: sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor))  # noqa: E731
    seen = {"after wrap": whole()}

    def at_head(module, args) -> None:  # a pre-hook's return value would replace the head's input
        seen.setdefault("at the head", whole())

    model.lm_head.register_forward_pre_hook(at_head)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    seen["base shard bytes"] = sum(p.to_local().numel() * p.element_size() for n, p in model.named_parameters()
                                   if isinstance(p, DTensor) and "lora_" not in n)
    seen["adapter shard params"] = sum(p.to_local().numel() for n, p in model.named_parameters()
                                       if isinstance(p, DTensor) and "lora_" in n)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    seen["adapter grads sharded"] = all(isinstance(p.grad, DTensor) for p in adapters)
    results.put((rank, seen))
    distributed.shutdown()
    del model, adapters, whole
    gc.collect()  # DTensors left to the interpreter's exit can abort it (see distributed.shutdown)
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fsdp_accounting_matches_lorakits_sharding_on_two_gloo_ranks(tmp_path):
    """What the estimate assumes of train/distributed.py's FSDP2 layout, checked on the real wrap:
    only the head is whole after wrapping; at the head the root's own parameters (final norm,
    untied embedding) are whole too; the base and the adapters are split in halves."""
    import torch.multiprocessing as mp

    from lorakit.plan.estimate import fsdp_weights
    from tiny_models import tiny_llama

    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_fsdp_rank, args=(str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    seen = dict(results.get(timeout=60) for _ in range(2))[0]
    m = model_shape(tiny_llama(layers=4, tie_word_embeddings=False).config)
    parts = fsdp_weights(m, TrainShape(r=4, dtype="fp32", world_size=2, fsdp=True), count_lora_params(m, 4))
    assert seen["after wrap"] == ["lm_head.weight"]
    assert seen["at the head"] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert seen["base shard bytes"] == parts.base_shard
    assert seen["adapter shard params"] * 16 == parts.adapter_shard and seen["adapter grads sharded"]


def test_fused_loss_flops_count_the_head_for_labelled_tokens_only():
    m = model_shape("1b")
    head = m.vocab_size * m.hidden_size
    full = flops_per_token(m, TrainShape(fused_loss=True))
    assert full - flops_per_token(m, TrainShape(fused_loss=True, labelled_fraction=0.25)) == 4 * 0.75 * head
    # the plain loss computes every logit whatever the labels
    assert flops_per_token(m, TrainShape(labelled_fraction=0.25)) == flops_per_token(m, TrainShape())
    for bad in (0.0, 1.5, "half"):
        with pytest.raises(ConfigError, match="labelled_fraction must be in"):
            TrainShape(labelled_fraction=bad)


def test_cli_labelled_fraction_lowers_the_flops_and_refuses_zero(capsys):
    assert main(["estimate", "--model", "1b", "--fused-loss", "--labelled-fraction", "0.5", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)["flops_per_token"]
    assert main(["estimate", "--model", "1b", "--fused-loss", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops_per_token"] - half == 2 * 128256 * 2048
    assert main(["estimate", "--model", "1b", "--labelled-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert "labelled_fraction must be in (0, 1], got 0.0" in err and "Traceback" not in err


@pytest.mark.parametrize("targets, dropout", [("all-linear", 0.0), ("attention", 0.0), ("mlp", 0.0), ("qv", 0.0),
                                              ("all-linear", 0.1), ("attention", 0.1), ("qv", 0.1)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_fast_paths_save_no_more_than_the_estimate(monkeypatch, dtype, targets, dropout):
    """What the trainer's memory plan estimates on a CPU with the fast paths: the attention
    probabilities the CPU attention keeps (`cpu_attention`), no silu(gate) or SwiGLU product
    where the MLP is fused (`fused_mlp`). A plan made from it must hold whatever the targets
    (before the estimate counted the probabilities, LoRA on the attention alone saved 119% of
    it); in 16 bits the native norm keeps its input as it is, 2h less than the estimate's fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.bench import SavedForBackward
    from lorakit.kernels import cpu_attention
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.lora import LoraConfig, apply_lora

    # SmolLM2-135M's proportions (576 wide, 9 / 3 heads of 64, MLP 1536) in 2 layers
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=targets, dropout=dropout))
    enable_fast_paths(model)
    model.train()  # dropout draws its masks
    ids = torch.randint(0, 256, (2, 256))

    def saved_bytes(keep_probs_up_to):
        monkeypatch.setattr(cpu_attention, "KEEP_PROBS_MAX_LEN", keep_probs_up_to)
        saved = SavedForBackward(model)
        with saved.hooks():
            model.model(input_ids=ids).last_hidden_state
        return saved.nbytes

    m = model_shape(config)

    def estimated_saved(**options):
        shape = TrainShape(batch_size=2, seq_len=256, r=16, targets=targets, dtype=dtype, device="cpu",
                           fused_mlp=True, fused_attention=True, lora_dropout=dropout, **options)
        layers = sum(layer_saved_bytes(m, shape, stream_grad=False).values()) + sum(layer_saved_bytes(m, shape).values())
        return shape.tokens * layers + _per_step_saved_bytes(m, shape)

    with_probs, without = estimated_saved(cpu_attention=True), estimated_saved()
    # longer rows count as 256-position ones: packed documents of up to 256 tokens keep theirs
    long_rows = TrainShape(seq_len=1024, targets=targets, dtype=dtype, device="cpu", cpu_attention=True)
    probs = cpu_attention.kept_probability_bytes(256, 9)
    assert layer_saved_bytes(m, long_rows)["attention probabilities (fp32, CPU attention)"] == probs
    kept, recomputed = saved_bytes(256), saved_bytes(255)
    # what keeping the probabilities adds (recomputing keeps the fp32 lse): as many layers as the
    # estimate says save their attention (with LoRA on the MLP only, layer 0 saves none)
    assert kept - recomputed == with_probs - without > 0
    # the fused blocks also save concatenated copies of the A matrices, per layer and not per token
    # (up to 2% of this test's 2 x 256 tokens, about 1% of SmolLM2's step of 4 x 256 in 30 layers)
    a_copies = sum(p.numel() * 4 for name, p in model.named_parameters() if "lora_A" in name)
    # a tight bound: 100-102% of the estimate in fp32, 90-91% in bf16, whatever the targets
    assert 0.85 * with_probs <= kept <= with_probs + a_copies


def test_a_training_config_gives_the_shape_and_flags_given_beside_it_replace_its_values(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora: {task: style, targets: qv, dropout: 0.1}\ntrain: {batch_size: 2}\n"
                      "data: {seq_len: 64}\nmodel: {dtype: float32}\n")

    def shape(*args) -> dict:
        capsys.readouterr()
        assert main(["estimate", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["shape"]

    taken = shape(str(config))  # the style preset's r, the built-in model's preset shape, train's fast paths
    assert {k: taken[k] for k in ("r", "targets", "batch_size", "seq_len", "dtype", "lora_dropout", "fused_mlp")} == \
        {"r": 8, "targets": "qv", "batch_size": 2, "seq_len": 64, "dtype": "fp32", "lora_dropout": 0.1,
         "fused_mlp": True}
    replaced = shape(str(config), "--r", "32", "--seq-len", "128", "--engine", "peft")
    assert (replaced["r"], replaced["seq_len"], replaced["batch_size"], replaced["fused_mlp"]) == (32, 128, 2, False)
    assert shape()["r"] == 16 and shape()["seq_len"] == 2048  # no config: the defaults, as before
    assert main(["estimate", "--model", str(config)]) == 2
    assert f"--model {config} is a training config, not a model" in capsys.readouterr().err


def test_a_training_configs_settings_the_estimate_leaves_out_are_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora: {exclude: 'down_proj,lm_head', dora: true}\ntrain: {memory_budget: 4}\n")
    assert main(["estimate", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shape"]["targets"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"  # down_proj left out
    assert (result["shape"]["fused_loss"], result["shape"]["fused_mlp"]) == (True, False)  # DoRA: unfused
    assert [note.split(":")[0] for note in result["notes"]] == ["lora.exclude lm_head", "lora.dora",
                                                                "train.memory_budget 4 GiB"]
    assert main(["estimate", str(config), "--no-fused-loss", "--json"]) == 0  # DoRA: no fast paths to keep it
    assert json.loads(capsys.readouterr().out)["shape"]["fused_loss"] is False
    config.write_text("train: {batch_size: 2}\n")  # train's fast paths: the chunked loss and the fused MLP
    assert main(["estimate", str(config), "--no-fast-paths", "--json"]) == 0
    shape = json.loads(capsys.readouterr().out)["shape"]
    assert (shape["fused_loss"], shape["fused_mlp"]) == (False, False)  # train without them has neither
    for flags in (["--no-fused-loss"], ["--engine", "peft", "--fused-loss"]):  # steps no training runs
        assert main(["estimate", str(config), *flags]) == 2 and "Traceback" not in capsys.readouterr().err
    config.write_text("lora: {targets: '.*(q|v)_proj'}\n")
    assert main(["estimate", str(config)]) == 2
    assert "lora.targets '.*(q|v)_proj' is not one the estimator reads; pass --targets" in capsys.readouterr().err
    config.write_text("lora: {exclude: mlp}\n")  # a group, as train reads it
    assert main(["estimate", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["targets"] == "q_proj,k_proj,v_proj,o_proj"
    for model in ("8b", "model.gguf", "meta-llama/Llama-3.1-8B"):
        assert main(["estimate", model]) == 2
        assert f"{model} is not a training config (a .yaml file); to estimate a model, pass it as --model" in \
            capsys.readouterr().err


def test_a_model_path_that_does_not_exist_is_named_as_missing_with_the_folder_it_is_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty holds no config.json"):
        model_shape("./empty")
    with pytest.raises(ModelLoadError, match=f"model ../tiny does not exist .relative paths are read from the current "
                                             f"folder, {tmp_path}"):
        model_shape("../tiny")
