"""Activation checkpointing chosen from the memory estimate: the choice against budgets, the
budget itself, selective and offloaded checkpointing against a plain run, and the wiring into
`lorakit train`."""

import argparse
import json

import pytest
import torch

from lorakit import host
from lorakit.config import add_flags, lora_config, resolve
from lorakit.lora import apply_lora
from lorakit.plan.measure import SavedTensorTracker
from lorakit.train import memory_plan
from lorakit.train.memory_plan import (
    Budget,
    CheckpointPlan,
    apply_checkpointing,
    checkpointing_needs,
    choose_checkpointing,
    checkpointable_layers,
    memory_budget,
    offload_needs,
)
from lorakit.train.offload import HostOffload

from tiny_models import randomize_lora, tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only planned for: the budget is monkeypatched, nothing runs there


def run_config(*argv):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    base = ([] if "--data" in argv else ["--data", "unused.jsonl"]) + ["--batch-size", "2", "--seq-len", "64", "--r", "4"]
    return resolve(None, {k: v for k, v in vars(parser.parse_args(base + list(argv))).items()})


def lora_model(layers=4, model=None):
    model = model if model is not None else tiny_llama(layers=layers)
    apply_lora(model, lora_config(run_config()))
    randomize_lora(model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model.train()


def with_budget(monkeypatch, nbytes):
    monkeypatch.setattr(memory_plan, "memory_budget", lambda model, device: Budget(nbytes, "test budget"))


# ---- the choice --------------------------------------------------------------------------------

def test_auto_takes_the_least_checkpointing_that_fits(monkeypatch):
    model, config = lora_model(), run_config()
    needs = checkpointing_needs(model, config, CPU)
    assert len(needs) == 5 and all(a > b for a, b in zip(needs, needs[1:]))  # more layers, less memory
    with_budget(monkeypatch, needs[0])
    assert choose_checkpointing(model, config, CPU).mode == "off"
    with_budget(monkeypatch, needs[2] + 1)  # between 2 and 1 checkpointed layers
    plan = choose_checkpointing(model, config, CPU)
    assert (plan.mode, plan.layers, plan.estimate_bytes) == ("selective", (0, 1), needs[2])
    assert plan.notice.startswith("activation checkpointing: selective, 2 of 4 layers (estimated peak")
    with_budget(monkeypatch, needs[4])
    assert choose_checkpointing(model, config, CPU).layers == (0, 1, 2, 3)
    with_budget(monkeypatch, needs[4] - 1)  # even every layer does not fit: full, and say so
    plan = choose_checkpointing(model, config, CPU)
    assert plan.mode == "full" and "exceeds" in plan.notice and "--batch-size" in plan.notice
    assert "--quantize" not in plan.notice  # bitsandbytes needs a GPU


def test_explicit_on_and_off_win_over_the_budget(monkeypatch):
    model = lora_model()
    with_budget(monkeypatch, 1)
    off = choose_checkpointing(model, run_config("--no-grad-checkpointing"), CPU)
    assert off.mode == "off" and "exceeds" in off.notice and "--grad-checkpointing auto" in off.notice
    with_budget(monkeypatch, 2**40)
    on = choose_checkpointing(model, run_config("--grad-checkpointing"), CPU)
    assert on.mode == "full" and "--grad-checkpointing on from flag" in on.notice


def test_models_the_estimator_cannot_describe_train_without_checkpointing(monkeypatch):
    with_budget(monkeypatch, 1)
    plan = choose_checkpointing(lora_model(model=tiny_gpt2()), run_config(), CPU)
    assert plan.mode == "off" and plan.estimate_bytes is None and "does not model" in plan.notice


def test_unknown_budget_assumes_it_fits(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "MEMINFO", str(tmp_path / "missing"))
    plan = choose_checkpointing(lora_model(), run_config(), CPU)
    assert plan.mode == "off" and plan.budget.bytes is None and "assumed to fit" in plan.notice


def roomy_host(monkeypatch, tmp_path, kib=10**8):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable:  {kib} kB\n")
    monkeypatch.setattr(host, "MEMINFO", str(meminfo))


def test_auto_offloads_on_cuda_when_only_offload_fits(monkeypatch, tmp_path):
    model, config = lora_model(), run_config()
    roomy_host(monkeypatch, tmp_path)
    full = checkpointing_needs(model, config, CUDA)[-1]
    device_need, host_bytes = offload_needs(model, config, CUDA)
    assert device_need < full and host_bytes == 4 * 2 * 64 * 64 * 4  # every layer's fp32 input
    assert full - device_need == 2 * 2 * 64 * 64 * 4  # 4 inputs on the device become 2 in flight
    with_budget(monkeypatch, full)  # full checkpointing fits: no offloading
    assert choose_checkpointing(model, config, CUDA).mode == "full"
    with_budget(monkeypatch, device_need)
    plan = choose_checkpointing(model, config, CUDA)
    assert (plan.mode, plan.layers, plan.estimate_bytes) == ("offload", (0, 1, 2, 3), device_need)
    assert plan.notice.startswith("activation checkpointing: every layer, inputs offloaded to host memory (estimated")
    assert "in host memory" in plan.notice.split("available:")[1]
    assert choose_checkpointing(model, config, CPU).mode == "full"  # never on a CPU
    with_budget(monkeypatch, device_need - 1)  # not even offloading fits: full, and say so
    plan = choose_checkpointing(model, config, CUDA)
    assert plan.mode == "full" and "exceeds" in plan.notice and "--quantize 4bit" in plan.notice
    with_budget(monkeypatch, device_need)
    roomy_host(monkeypatch, tmp_path, kib=host_bytes // 1024 - 1)  # the host cannot take the inputs
    assert choose_checkpointing(model, config, CUDA).mode == "full"


def test_explicit_offload(monkeypatch):
    model = lora_model()
    with_budget(monkeypatch, 2**40)
    plan = choose_checkpointing(model, run_config("--grad-checkpointing", "offload"), CUDA)
    assert plan.mode == "offload" and plan.layers == (0, 1, 2, 3)
    assert "--grad-checkpointing offload from flag" in plan.notice and "in host memory" in plan.notice
    plan = choose_checkpointing(model, run_config("--grad-checkpointing", "offload"), CPU)
    assert (plan.mode, plan.layers) == ("full", (0, 1, 2, 3))
    assert plan.notice.startswith("activation checkpointing: every layer (") and "nothing is offloaded" in plan.notice
    with_budget(monkeypatch, 1)  # on CUDA, explicit on that does not fit points at offload
    on = choose_checkpointing(model, run_config("--grad-checkpointing"), CUDA)
    assert "--grad-checkpointing offload" in on.notice


# ---- the budget --------------------------------------------------------------------------------

def test_cpu_budget_is_memavailable_times_margin_plus_the_model(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000000 kB\nMemFree:  300000 kB\nMemAvailable:  500000 kB\n")
    monkeypatch.setattr(host, "MEMINFO", str(meminfo))
    model = lora_model()
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    budget = memory_budget(model, CPU)
    assert budget.bytes == int(500000 * 1024 * 0.9) + held and "MemAvailable" in budget.source
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share this node's memory
    assert memory_budget(model, CPU).bytes == int(250000 * 1024 * 0.9) + held


def test_cuda_budget_reads_the_free_memory_of_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    budget = memory_budget(lora_model(), torch.device("cuda", 0))  # the model is on the CPU: holds 0 there
    assert budget.bytes == int(9 * 2**30) and "cuda:0" in budget.source


# ---- selective checkpointing against a plain run -------------------------------------------------

def step(model, batch):
    """Loss, the adapters' grads, the bytes saved for backward at the loss and those each decoder
    layer saved (a checkpointed layer: its input, kept by the checkpoint; its recompute's saves
    go through the checkpoint's own hooks)."""
    tracker = SavedTensorTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    per_layer, forward_pass = [], [True]
    for layer in checkpointable_layers(model):
        _measure_calls(layer, tracker, per_layer, forward_pass)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = model(input_ids=batch, labels=batch).loss
        saved = tracker.live
        forward_pass[0] = False
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved, per_layer


def _measure_calls(layer, tracker, per_layer, forward_pass):
    """Records what each forward call of `layer` leaves saved, measured around the whole call:
    transformers 5.17 runs a layer's module hooks inside its checkpoint (and again in the
    recompute), 5.24 outside, so hooks cannot measure it the same way on both."""
    def measured_call(self, *args, **kwargs):
        before = tracker.live
        out = super(measured, self).__call__(*args, **kwargs)
        if forward_pass[0]:
            per_layer.append(tracker.live - before)
        return out

    measured = type(type(layer).__name__, (type(layer),), {"__call__": measured_call})
    layer.__class__ = measured


def plan_of(mode, layers, num_layers=4):
    return CheckpointPlan(mode, tuple(layers), num_layers, None, Budget(None, "test"), "")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_selective_checkpointing_equals_the_plain_step_and_saves_in_between():
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode, layers in (("off", ()), ("selective", (0, 1)), ("full", range(4))):
        model = lora_model()  # same seeds: the same weights and adapters each time
        apply_checkpointing(model, plan_of(mode, layers))
        runs[mode] = step(model, batch)
    loss, grads, saved, per_layer = runs["off"]
    assert len(grads) == 4 * 7 * 2  # every adapter's A and B got a gradient
    for mode in ("selective", "full"):
        other_loss, other_grads, _, _ = runs[mode]
        assert torch.allclose(other_loss, loss, atol=1e-6)
        assert all(torch.allclose(other_grads[n], g, atol=1e-6, rtol=1e-5) for n, g in grads.items())
    assert runs["full"][2] < runs["selective"][2] < saved
    layer_input = batch.numel() * 64 * 4  # fp32 hidden states
    assert runs["full"][3] == [layer_input] * 4  # a checkpointed layer keeps its input only
    assert runs["selective"][3][:2] == [layer_input] * 2
    assert runs["selective"][3][3] == per_layer[3] > 10 * layer_input  # a plain layer: its whole saved set


class TracedHost(HostOffload):
    """Offloads every tensor (the CPU stands in for a device) and records what it packs."""

    packed: list = []
    unpacked: list = []

    def __init__(self):
        super().__init__(offloadable=lambda tensor: True)

    def pack(self, tensor):
        TracedHost.packed.append(tuple(tensor.shape))
        return super().pack(tensor)

    def unpack(self, packed):
        TracedHost.unpacked.append(tuple(packed.tensor.shape))
        return super().unpack(packed)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_offload_equals_the_plain_step_and_packs_only_the_layer_inputs(monkeypatch):
    from lorakit.train import offload

    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loss, grads, _, _ = step(lora_model(), batch)
    model = lora_model()
    monkeypatch.setattr(offload, "HostOffload", TracedHost)
    TracedHost.packed, TracedHost.unpacked = [], []
    apply_checkpointing(model, plan_of("offload", range(4)))
    offloaded_loss, offloaded_grads, saved, per_layer = step(model, batch)
    assert torch.allclose(offloaded_loss, loss, atol=1e-6)
    assert offloaded_grads.keys() == grads.keys()
    assert all(torch.allclose(offloaded_grads[n], g, atol=1e-6, rtol=1e-5) for n, g in grads.items())
    # exactly each layer's input (torch < 2.5 also saves an empty placeholder per checkpoint), once out
    # and once back: the layers' inner ops stay with the checkpoint's own hooks
    assert [s for s in TracedHost.packed if 0 not in s] == [(2, 32, 64)] * 4
    assert [s for s in TracedHost.unpacked if 0 not in s] == [(2, 32, 64)] * 4
    assert per_layer == [0] * 4  # the outer tracker sees nothing saved inside a layer: the copies hold them


def test_cpu_tensors_are_not_copied_by_default():
    tensor = torch.randn(3, 4)
    assert HostOffload().pack(tensor) is tensor and HostOffload().unpack(tensor) is tensor


# ---- the wiring into `lorakit train` -------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_train_picks_selective_checkpointing_and_keeps_the_result(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from lorakit.cli import main
    from tiny_models import save_tiny_chat_model, write_define_data

    model, data = save_tiny_chat_model(tmp_path / "model", layers=4), write_define_data(tmp_path / "d.jsonl", 32)
    args = ["train", "--model", str(model), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "64", "--r", "4", "--eval-split", "0", "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert "activation checkpointing: off" in capsys.readouterr().out

    def tight(model, device):  # room for the step with 3 of the 4 layers checkpointed
        from lorakit.config import RunConfig

        config = RunConfig()
        config.train.batch_size, config.data.seq_len, config.lora.r = 2, 64, 4
        return Budget(checkpointing_needs(model, config, device)[3], "test budget")

    monkeypatch.setattr(memory_plan, "memory_budget", tight)
    assert main([*args, "--output", str(tmp_path / "tight")]) == 0
    assert "activation checkpointing: selective, 3 of 4 layers" in capsys.readouterr().out
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "tight" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert json.loads((tmp_path / "tight" / "summary.json").read_text())["steps"] == 2


# ---- FSDP: the plan counts one rank's share ------------------------------------------------------

def two_processes(monkeypatch):
    from lorakit.train import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)


def test_a_sharded_run_plans_with_one_ranks_share(monkeypatch):
    from lorakit.plan.estimate import TrainShape, estimate_memory

    model = lora_model()
    two_processes(monkeypatch)
    sharded, replicated = run_config("--fsdp", "on"), run_config("--fsdp", "off")
    fsdp_needs, ddp_needs = checkpointing_needs(model, sharded, CPU), checkpointing_needs(model, replicated, CPU)
    assert checkpointing_needs(model, replicated, CPU, fsdp=True) == fsdp_needs  # the decision, passed or derived
    sizes = dict(batch_size=2, seq_len=64, r=4, dtype="fp32", world_size=2, fused_loss=True, device="cpu")
    assert fsdp_needs[0] == estimate_memory(model.config, TrainShape(**sizes, fsdp=True)).total
    assert ddp_needs[0] == estimate_memory(model.config, TrainShape(**sizes)).total
    assert all(f < d for f, d in zip(fsdp_needs, ddp_needs))
    with_budget(monkeypatch, fsdp_needs[0])  # fits sharded, not replicated
    assert choose_checkpointing(model, sharded, CPU).mode == "off"
    plan = choose_checkpointing(model, sharded, CPU, fsdp=False)
    assert plan.mode != "off" and plan.estimate_bytes in ddp_needs
    plan = choose_checkpointing(model, run_config(), CPU)  # --fsdp auto on a CPU: replicated
    assert plan.mode != "off" and plan.estimate_bytes in ddp_needs


def test_a_single_process_never_plans_sharded(monkeypatch):
    model = lora_model()
    assert memory_plan.sharded_run(run_config("--fsdp", "on"), CPU) is False
    assert checkpointing_needs(model, run_config("--fsdp", "on"), CPU) == checkpointing_needs(model, run_config(), CPU)


def test_estimated_step_bytes_stays_replicated_unless_asked(monkeypatch):
    from lorakit.plan.estimate import TrainShape, estimate_memory
    from lorakit.train import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    config = run_config("--model", "8b", "--grad-checkpointing", "on")
    config.train.fast_paths = True
    sizes = dict(batch_size=2, seq_len=64, r=4, grad_checkpointing=True, fused_loss=True, world_size=8)
    assert distributed.estimated_step_bytes(config) == estimate_memory("8b", TrainShape(**sizes)).total
    sharded = estimate_memory("8b", TrainShape(**sizes, fsdp=True)).total
    assert distributed.estimated_step_bytes(config, fsdp=True) == sharded
    monkeypatch.setattr("lorakit.models.training_dtype", lambda requested, device: "float16")  # a T4's auto
    assert distributed.estimated_step_bytes(config) == estimate_memory("8b", TrainShape(**sizes, dtype="fp16")).total
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    assert distributed.estimated_step_bytes(config, fsdp=True) is None  # nothing to shard


def test_offload_warns_once_when_the_layer_input_comes_by_keyword():
    from lorakit.train import offload

    offload._warn_keyword_inputs.cache_clear()
    run = offload.offloaded_checkpoint()
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="by keyword"):
        run(lambda hidden: hidden * 2, hidden=x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_memory_budget_flag_lowers_the_budget_auto_plans_for(monkeypatch):
    model, gib = lora_model(), memory_plan.GIB
    needs = checkpointing_needs(model, run_config(), CPU)
    with_budget(monkeypatch, needs[0] * 10)  # the device has room for the plain step
    assert choose_checkpointing(model, run_config(), CPU).mode == "off"
    cap = (needs[2] + needs[3]) / 2 / gib / memory_plan.SAFETY_MARGIN  # 90% of it: between 2 and 3 layers
    plan = choose_checkpointing(model, run_config("--memory-budget", repr(cap)), CPU)
    assert (plan.mode, plan.layers) == ("selective", (0, 1, 2))
    assert plan.budget.bytes == int(cap * gib * memory_plan.SAFETY_MARGIN)
    assert "90% of --memory-budget" in plan.notice and "from flag" in plan.notice
    roomy = choose_checkpointing(model, run_config("--memory-budget", "1000"), CPU)  # above the device's: no effect
    assert roomy.mode == "off" and roomy.budget.source == "test budget"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_memory_budget_exits_2_with_one_message(capsys, tmp_path, value):
    from lorakit.cli import main

    assert main(["train", "--memory-budget", value, "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--memory-budget must be a positive number of GiB up to 1,048,576, got {float(value)}" in err
    assert "Traceback" not in err


def test_the_plan_counts_the_cpu_attention_probabilities_where_the_fast_paths_keep_them():
    from lorakit.kernels import llama_patch
    from lorakit.kernels.llama_patch import disable_fast_paths, enable_fast_paths

    model, config = lora_model(), run_config()

    def planned():
        _, sizes = memory_plan._estimator_step(model, config, CPU, fsdp=False)
        return sizes["cpu_attention"]

    assert not planned()  # SDPA: only its logsumexp
    assert not memory_plan._estimator_step(model, config, CPU, fsdp=False)[1]["fused_mlp"]
    enable_fast_paths(model)
    assert planned() and memory_plan._estimator_step(model, config, CPU, fsdp=False)[1]["fused_mlp"]
    assert not memory_plan._estimator_step(model, config, CUDA, fsdp=False)[1]["cpu_attention"]
    llama_patch._restore_forward(model.model.layers[0].mlp)  # one MLP unfused: the estimate keeps its tensors
    assert not memory_plan._estimator_step(model, config, CPU, fsdp=False)[1]["fused_mlp"]
    enable_fast_paths(model, native=False)  # transformers' own ops: SDPA again
    assert not planned()
    disable_fast_paths(model)
    assert not planned()


def test_the_plan_knows_which_blocks_run_fused():
    """With dropout the fused groups keep no dropped copies (on the CPU bool masks): the plan asks the
    patched model which groups fused (a mix answers False, the larger estimate)."""
    from lorakit.kernels import llama_patch
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.lora import LoraConfig

    def fused(model):
        sizes = memory_plan._estimator_step(model, run_config(), CPU, fsdp=False)[1]
        return sizes["fused_attention"], sizes["fused_mlp"]

    everything, attention_only = lora_model(), tiny_llama(layers=2)
    apply_lora(attention_only, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert fused(everything) == (False, False)
    enable_fast_paths(everything)
    enable_fast_paths(attention_only)
    assert fused(everything) == (True, True) and fused(attention_only) == (True, False)
    llama_patch._restore_forward(attention_only.model.layers[0].self_attn.q_proj)  # one attention unfused
    assert fused(attention_only) == (False, False)


def test_the_trainer_plans_after_enabling_the_fast_paths(monkeypatch, tmp_path):
    """prepare() enables the fast paths before it plans checkpointing, so the plan counts what
    they keep (on a CPU the attention probabilities) and what they do not (the fused MLP's
    silu(gate) and SwiGLU product)."""
    from tiny_models import save_tiny_chat_model, write_define_data

    from lorakit.train.run import prepare

    model = save_tiny_chat_model(tmp_path / "model")
    data = write_define_data(tmp_path / "d.jsonl", 16)
    planned, real = [], memory_plan._estimator_step

    def recording(*args, **kwargs):
        step = real(*args, **kwargs)
        planned.append(step[1]["cpu_attention"] and step[1]["fused_mlp"])
        return step

    monkeypatch.setattr(memory_plan, "_estimator_step", recording)
    prepare(run_config("--model", str(model), "--data", str(data), "--eval-split", "0"))
    assert planned and all(planned)
