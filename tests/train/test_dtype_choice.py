"""Which dtype `lorakit train` picks for --dtype auto (the run itself: test_train_cli.py)."""

from pathlib import Path

import pytest

from lorakit import models


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.training_dtype("auto", "cpu") == expected


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(monkeypatch, requested):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.training_dtype(requested, "cpu") == requested


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo here")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    if "avx512_bf16" in flags:
        assert models.cpu_has_native_bf16()
    elif not flags & {"amx_bf16", "amx_tile"}:
        assert not models.cpu_has_native_bf16()
    else:  # AMX listed: usable only where the OS enabled it, which torch checks and cpuinfo does not say
        pytest.skip("AMX without AVX512-BF16: the flags alone do not decide")


# A T4 (compute capability 7.5) answers torch.cuda.is_bf16_supported() with True: torch can emulate
# bf16 there. Only the answer without emulation says whether the GPU multiplies bf16 itself.
GPUS = {"t4": ((7, 5), False), "a100": ((8, 0), True)}


def _pretend_gpu(monkeypatch, gpu: str) -> None:
    import torch

    capability, native = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("lorakit.train.distributed.device_of_rank", lambda: torch.device("cuda", 0))


@pytest.mark.parametrize("gpu, weights, autocast, quantized", [
    ("t4", "float16", "float16", "float16"),  # fp16 is what a T4 multiplies natively; the loss is scaled
    ("a100", "bfloat16", "bfloat16", "bfloat16"),
])
def test_auto_on_a_gpu_follows_native_bf16_not_emulated(monkeypatch, gpu, weights, autocast, quantized):
    import torch

    from lorakit.quantize import compute_dtype
    from lorakit.train.precision import autocast_dtype_for

    _pretend_gpu(monkeypatch, gpu)
    assert models.training_dtype("auto", "cuda") == weights
    # --dtype float32 on a GPU: fp32 weights under the 16-bit autocast the GPU multiplies natively
    assert autocast_dtype_for(torch.nn.Linear(2, 2), torch.device("cuda", 0)) == getattr(torch, autocast)
    assert compute_dtype("cuda:0") == getattr(torch, quantized)
    assert compute_dtype("cuda:0", "float32") == torch.float32  # --dtype is kept with --quantize
    assert models.inference_placement("cuda", "auto") == ("cuda", weights)  # eval and generate: the same


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_a_gpu_without_bf16_says_what_auto_chose_and_what_bf16_costs(monkeypatch, quantize):
    import torch

    from lorakit.train.precision import dtype_notice

    config = _default_config()
    config.model.quantize = quantize
    model = torch.nn.Linear(2, 2)
    _pretend_gpu(monkeypatch, "t4")
    [auto] = dtype_notice(config, model)
    assert "compute capability 7.5" in auto and "float16" in auto and "loss is scaled" in auto
    assert ("the quantised model computes in float16" in auto) == (quantize != "none")
    config.model.dtype = "bfloat16"
    [bf16] = dtype_notice(config, model)
    assert "torch emulates its products" in bf16 and "drop --dtype" in bf16
    config.model.dtype = "float32"
    assert dtype_notice(config, model) == []
    _pretend_gpu(monkeypatch, "a100")
    for dtype in ("auto", "bfloat16"):
        config.model.dtype = dtype
        assert dtype_notice(config, model) == []


def _default_config():
    import argparse

    from lorakit.config import add_flags, resolve

    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve(None, vars(parser.parse_args([])))
