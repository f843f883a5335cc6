"""Which dtype `lorakit train` picks for --dtype auto, and that the run says so."""

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit import models

from tiny_models import save_tiny_chat_model, write_define_data

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_chat_model(root / "model"), write_define_data(root / "train.jsonl", count=32)


def _train(tiny, out, *extra):
    model, data = tiny
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--seq-len", "64", "--r", "4", "--eval-split", "8", *extra])


@pytest.mark.parametrize("native", [True, False])
def test_the_run_trains_in_the_chosen_dtype_and_says_so(tiny, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert _train(tiny, tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == ("bfloat16" if native else "float32") and summary["device"] == "cpu"
    assert summary["final_eval_loss"] == summary["final_eval_loss"]  # not NaN
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("dtype: bfloat16 (auto" in printed) == native


def test_float32_flag_overrides_auto(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert _train(tiny, tmp_path / "run", "--dtype", "float32") == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dtype"] == "float32"
    assert "dtype: bfloat16" not in " ".join(capsys.readouterr().out.split())
