"""The trainer's fast-path switches: --fast-paths and the opt-in --triton-kernels."""

import argparse

from lorakit.config import add_flags, lora_config, resolve
from lorakit.kernels import triton_ops
from lorakit.kernels.llama_patch import fast_paths_enabled
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


def test_triton_kernels_are_opt_in():
    config = _config()
    assert config.train.triton_kernels is False
    model = _model(config)
    notices = run._enable_fast_paths(model, config)
    assert fast_paths_enabled(model)
    assert not any("Triton" in n for n in notices)


def test_triton_kernels_without_a_gpu_fall_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)  # as on a plain CPU run
    monkeypatch.setattr(triton_ops.torch.cuda, "is_available", lambda: False)
    config = _config("--triton-kernels")
    model = _model(config)
    notices = [n for n in run._enable_fast_paths(model, config) if "Triton" in n]
    assert len(notices) == 1 and "not used" in notices[0], notices
    assert fast_paths_enabled(model)  # the other fast paths stay


def test_packed_runs_switch_to_varlen_attention_and_unpacked_runs_do_not():
    packed = _config()  # packing is the default
    model = _model(packed)
    run._enable_fast_paths(model, packed)
    assert run.packed_attention_for(model, packing=True) == "varlen"
    unpacked = _config("--no-packing")
    model = _model(unpacked)
    run._enable_fast_paths(model, unpacked)
    assert run.packed_attention_for(model, packing=False) == "4d"
    assert model.config._attn_implementation != "lorakit_varlen"


def test_the_run_says_when_its_gemms_take_onednn():
    from lorakit.kernels import cpu_gemm

    config = _config()
    with cpu_gemm.use_backend(cpu_gemm.ONEDNN):
        said = run._enable_fast_paths(_model(config), config)
    with cpu_gemm.use_backend(cpu_gemm.ATEN):
        silent = run._enable_fast_paths(_model(config), config)
    assert [n for n in said if "oneDNN" in n] == [
        "fast paths: float32 GEMMs through oneDNN, faster than torch's own on this CPU (LORAKIT_CPU_GEMM=aten for torch's)"]
    assert not any("oneDNN" in n for n in silent)
