"""The trainer's fast-path switches: --fast-paths and --triton-kernels (auto: on a GPU only)."""

import argparse
import json

import pytest
import torch

from lorakit.config import add_flags, lora_config, resolve
from lorakit.kernels import triton_launch, triton_ops
from lorakit.kernels import llama_patch
from lorakit.kernels.llama_patch import fast_paths_enabled, wants_triton
from lorakit.lora import apply_lora
from lorakit.train import run

from tiny_models import tiny_llama


def _config(*argv):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--data", "unused.jsonl", "--r", "4", *argv])
    return resolve(None, dict(vars(args).items()))


def _model(config):
    model = tiny_llama()
    apply_lora(model, lora_config(config))
    return model


CPU = torch.device("cpu")


def enable_fast_paths(model, config, device):
    """The run's fast paths for this config (train/run.py), and their notices."""
    return run.enable_fast_paths_for(model, config.train.triton_kernels, config.data.packing, device)


def test_triton_kernels_auto_leaves_them_off_on_a_cpu():
    config = _config()
    assert config.train.triton_kernels == "auto"
    model = _model(config)
    notices = enable_fast_paths(model, config, CPU)
    assert fast_paths_enabled(model)
    assert not any("Triton" in n for n in notices)


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)])
def test_wants_triton_follows_the_setting_and_the_device(setting, device, expected):
    assert wants_triton(setting, torch.device(device)) is expected


def test_the_run_asks_for_triton_kernels_for_a_gpu_run_and_says_so(monkeypatch):
    asked = []
    monkeypatch.setattr(llama_patch, "enable_fast_paths", lambda model, triton: asked.append(triton) or [])
    monkeypatch.setattr(llama_patch, "triton_kernels_enabled", lambda model: asked[-1])
    said = []
    for flags in ([], ["--no-triton-kernels"], ["--triton-kernels", "on"]):
        config = _config(*flags)
        said.append(enable_fast_paths(_model(config), config, torch.device("cuda")))
    assert asked == [True, False, True]
    assert [any("Triton kernels for RMSNorm" in n for n in notices) for notices in said] == [True, False, True]


@pytest.mark.parametrize("capability, auto", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_triton_kernels_auto_skips_a_gpu_older_than_triton_supports_and_says_so(monkeypatch, capability, auto):
    """Triton supports NVIDIA GPUs of compute capability 8.0 on (since 3.3): a T4 (7.5) runs the
    plain fast paths unless --triton-kernels on asks for the kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert wants_triton("auto", gpu) is auto and wants_triton("on", gpu) is True
    asked = []
    monkeypatch.setattr(llama_patch, "enable_fast_paths", lambda model, triton: asked.append(triton) or [])
    config = _config()
    notices = enable_fast_paths(_model(config), config, gpu)
    assert asked == [auto]
    older = [n for n in notices if "no Triton kernels" in n]
    assert older == ([] if auto else ["fast paths: no Triton kernels: Triton supports GPUs of compute capability "
                                      "8.0 on, and this one's is 7.5 (--triton-kernels on to try them)"])


def test_triton_kernels_without_a_gpu_fall_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(triton_launch, "INTERPRETED", False)  # as on a plain CPU run
    monkeypatch.setattr(triton_ops.torch.cuda, "is_available", lambda: False)
    config = _config("--triton-kernels")
    model = _model(config)
    notices = [n for n in enable_fast_paths(model, config, CPU) if "Triton" in n]
    assert len(notices) == 1 and "not used" in notices[0], notices
    assert fast_paths_enabled(model)  # the other fast paths stay


def test_packed_runs_switch_to_varlen_attention_and_unpacked_runs_do_not():
    packed = _config()  # packing is the default
    model = _model(packed)
    enable_fast_paths(model, packed, CPU)
    assert run.packed_attention_for(model, packing=True) == "varlen"
    unpacked = _config("--no-packing")
    model = _model(unpacked)
    enable_fast_paths(model, unpacked, CPU)
    assert run.packed_attention_for(model, packing=False) == "4d"
    assert model.config._attn_implementation != "lorakit_varlen"


def test_the_run_says_when_its_gemms_take_onednn():
    from lorakit.kernels import cpu_gemm

    config = _config()
    with cpu_gemm.use_backend(cpu_gemm.ONEDNN):
        said = enable_fast_paths(_model(config), config, CPU)
    with cpu_gemm.use_backend(cpu_gemm.ATEN):
        silent = enable_fast_paths(_model(config), config, CPU)
    assert [n for n in said if "oneDNN" in n] == [
        "fast paths: float32 GEMMs through oneDNN, faster than torch's own on this CPU (LORAKIT_CPU_GEMM=aten for torch's)"]
    assert not any("oneDNN" in n for n in silent)


def _tiny(config_class: str, **options):
    import transformers

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    if config_class == "BloomConfig":
        small = dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    if config_class == "MptConfig":
        small = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=128)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**small, **options))


def test_packing_turns_off_where_a_packed_row_cannot_carry_the_models_attention_rule():
    cases = [  # (model, longest example, packing kept)
        (_tiny("MistralConfig", sliding_window=8), 9, False),  # lorakit_varlen cannot cut a document at a window
        (_tiny("MistralConfig", sliding_window=8), 8, True),  # no document is longer: the window never binds
        (_tiny("Gemma2Config", sliding_window=8, head_dim=16), 20, False),  # a 4D mask would drop the window
        (_tiny("Qwen2Config", sliding_window=8), 20, True),  # Qwen2's window is off unless use_sliding_window
        (_tiny("BloomConfig"), 5, False),  # ALiBi: transformers builds its biases from a 2D mask
        (_tiny("MptConfig", max_seq_len=256), 64, False),  # its ALiBi table spans a row of --seq-len 512
        (_tiny("MptConfig", max_seq_len=512), 64, True),
        (tiny_llama(), 64, True),
    ]
    for model, longest, kept in cases:
        config = _config()
        assert config.data.packing
        notices = run.packing_notice(config, model, longest)
        assert config.data.packing is kept, (type(model).__name__, notices)
        assert (notices == []) is kept
        if not kept:
            assert notices[0].startswith("packing: off, ") and "each row holds one example (padded)" in notices[0]
    config = _config("--no-packing")
    assert run.packing_notice(config, _tiny("BloomConfig"), 5) == [] and not config.data.packing


@pytest.mark.parametrize("arch, notice", [
    ("MistralConfig", "packing: off, the model's sliding window (8 tokens)"),  # lorakit_varlen raised mid-run
    ("BloomConfig", "packing: off, bloom positions tokens with ALiBi"),  # the 4D mask crashed ALiBi
    ("MptConfig", "packing: off, a packed row of up to 64 tokens (--seq-len) is longer than the 48 positions of "
                  "MPT's ALiBi table"),  # a traceback mid-run
])
def test_models_packing_cannot_serve_train_and_evaluate_through_the_cli(tmp_path, capsys, arch, notice):
    import transformers

    from lorakit.cli import main

    from tiny_models import tiny_tokenizer, write_define_data

    tokenizer = tiny_tokenizer()
    sizes = {"BloomConfig": dict(hidden_size=64, n_layer=2, n_head=4),
             "MptConfig": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=48)}.get(arch) or \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             sliding_window=8)
    config = getattr(transformers, arch)(**sizes, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_define_data(tmp_path / "data.jsonl", count=16)
    args = ["train", "--model", str(tmp_path / "model"), "--data", str(data), "--seq-len", "64", "--max-steps", "1",
            "--r", "4", "--dtype", "float32", "--eval-split", "4", "--output", str(tmp_path / "run")]
    assert main(args) == 0
    assert notice in " ".join(capsys.readouterr().out.split())
    # lorakit eval decides as train does (it packed whatever the model), and says so
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--model", str(tmp_path / "model"),
                 "--data", str(data), "--seq-len", "64", "--dtype", "float32", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and notes[0].startswith("rows unpacked: ") and notice.split("off, ")[1] in notes[0]


def test_an_architecture_without_a_projection_table_takes_all_linear_and_the_table_says_why():
    config = _config()
    notices = run.resolve_targets(config, _tiny("GPTNeoXConfig"))
    assert config.lora.targets == "all-linear" and notices == [
        "model type 'gpt_neox' is not in the projection table: using all-linear targets"]
    assert config.sources["lora.targets"] == "default: all-linear ('gpt_neox' has no projection table)"  # was: seven


def test_experts_fused_into_3d_parameters_stay_frozen_and_the_default_targets_take_what_is_linear():
    from lorakit.errors import ConfigError

    mixtral = dict(num_local_experts=4, num_experts_per_tok=2)
    config = _config()  # the default: all seven projections
    notices = run.resolve_targets(config, _tiny("MixtralConfig", **mixtral))
    assert config.lora.targets == "k_proj,o_proj,q_proj,v_proj"
    assert config.sources["lora.targets"].startswith("default: the seven projections that are linear")
    assert len(notices) == 1 and "fused 3D parameters (model.layers.0.mlp.experts.gate_up_proj and the like, in 2 " \
        "layers)" in notices[0] and notices[0].endswith("targets: k_proj, o_proj, q_proj, v_proj")
    with pytest.raises(ConfigError, match="--targets mlp: gate_proj, up_proj, down_proj are fused expert parameters.*"
                                          "use --targets attention"):
        run.resolve_targets(_config("--targets", "mlp"), _tiny("MixtralConfig", **mixtral))
    config = _config("--targets", "attention")
    assert "stay frozen" in run.resolve_targets(config, _tiny("MixtralConfig", **mixtral))[0]
    assert config.lora.targets == "attention"
    qwen2_moe = _tiny("Qwen2MoeConfig", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    config = _config()  # the shared expert's projections are linear: the default keeps "all"
    assert "stay frozen" in run.resolve_targets(config, qwen2_moe)[0] and config.lora.targets == "all"
    assert run.resolve_targets(_config(), tiny_llama()) == []


def test_resuming_a_checkpoint_from_before_auto_compares_what_the_setting_does(monkeypatch):
    from lorakit.train import saved_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    saved = {"train": {"triton_kernels": False, "lr": 1e-4}}
    assert saved_run.config_changes(saved, {"train": {"triton_kernels": "auto", "lr": 1e-4}}) == []
    assert saved_run.config_changes(saved, {"train": {"triton_kernels": "on", "lr": 1e-4}}) == [
        "train.triton_kernels False -> 'on'"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto is on on a GPU: a change from false
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert saved_run.config_changes(saved, {"train": {"triton_kernels": "auto", "lr": 1e-4}}) != []


def test_a_cpu_runs_fast_paths_keep_freed_memory_as_the_benchs_lorakit_variants_do(monkeypatch):
    """The heap setting (host.keep_freed_memory) is part of a CPU run's fast paths, and the bench
    gives it to exactly the variants that stand for them, so that it measures what train runs."""
    from lorakit import bench, bench_variants, host

    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append("train") or True)
    monkeypatch.setattr(bench_variants, "keep_freed_memory", lambda: calls.append("bench") or True)
    config = _config()
    enable_fast_paths(_model(config), config, CPU)
    assert calls == ["train"]
    plan = bench.resolve(bench.BenchSettings(preset="tiny", steps=1, warmup=0, variants=["lorakit", "peft"],
                                             peak_tflops=1.0, isolate=False, threads=1))
    for name, keeps in (("peft", False), ("lorakit-plain", False), ("lorakit", True)):  # plain: --no-fast-paths
        calls.clear()
        bench_variants.prepare_variant(name, plan)
        assert calls == (["bench"] if keeps else []), name
