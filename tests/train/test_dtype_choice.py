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
