"""Nothing let in: pickle only on request (and then weights_only), no write outside --output,
adapters for another base refused unless overridden, damaged checkpoints skipped.

Where lorakit writes is decided by the command line alone: --output (or the `output:` key of a
YAML config the user passes, the user's own choice). Nothing read from an adapter config, a
checkpoint's trainer_state.json or manifest is ever used as a path to write to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train import checkpoint as ckpt
from reliability_kit import train_args
from tiny_models import edit_checkpoint_state


def _eval(adapter, tiny, *extra) -> list[str]:
    return ["eval", "--adapter", str(adapter), "--data", str(tiny.data), "--model", str(tiny.model),
            "--seq-len", "64", "--json", *extra]


def _to_pickle(adapter) -> None:
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()


class _Payload:
    """Unpickling this runs os.system: what a hostile .bin file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_adapter_loads_with_the_flag_and_gives_the_same_result(adapter_copy, tiny, capsys):
    assert main(_eval(adapter_copy, tiny)) == 0
    expected = json.loads(capsys.readouterr().out)
    _to_pickle(adapter_copy)
    assert main(_eval(adapter_copy, tiny)) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(_eval(adapter_copy, tiny, "--allow-pickle")) == 0
    assert json.loads(capsys.readouterr().out) == expected


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "analyze", "export"])
def test_hostile_pickle_is_refused_even_with_the_flag(command, adapter_copy, tiny, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (adapter_copy / "adapter_model.safetensors").unlink()
    with open(adapter_copy / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _Payload(marker)}, handle, protocol=2)
    argv = {"eval": _eval(adapter_copy, tiny),
            "generate": ["generate", "--adapter", str(adapter_copy), "--model", str(tiny.model), "--max-new-tokens", "1", "hi"],
            "merge": ["merge", "--adapter", str(adapter_copy), "--model", str(tiny.model), "--output", str(tmp_path / "m")],
            "analyze": ["analyze", str(adapter_copy), "--no-heatmap"],
            "export": ["export", "--adapter", str(adapter_copy), "--format", "vllm", "--output", str(tmp_path / "v")]}[command]
    assert main([*argv, "--allow-pickle"] if command != "generate" else [*argv[:-1], "--allow-pickle", "hi"]) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "m").exists() and not (tmp_path / "v").exists()


def test_pickle_only_model_needs_the_flag(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny.model, model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    argv = train_args(tiny, tmp_path / "out", "--model", str(model), "--dry-run")
    assert main(argv) == 2 and "--allow-pickle" in capsys.readouterr().err
    assert main([*argv, "--allow-pickle"]) == 0


def test_adapter_for_another_base_loads_only_with_the_override(adapter_copy, tiny, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = adapter_copy / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, "lorakit_base_fingerprint": "sha256:other"})
    assert main(_eval(adapter_copy, tiny)) == 2
    assert "trained on a base model of another architecture or shape" in capsys.readouterr().err
    assert main(_eval(adapter_copy, tiny, "--allow-other-base")) == 0


def _command(command: str, adapter, tiny, tmp_path) -> list[str]:
    a, m = str(adapter), str(tiny.model)
    return {"generate": ["generate", "--adapter", a, "--model", m, "--max-new-tokens", "1"],
            "merge": ["merge", "--adapter", a, "--model", m, "--output", str(tmp_path / "merged")],
            "analyze": ["analyze", a, "--no-heatmap"],
            "export-vllm": ["export", "--adapter", a, "--format", "vllm", "--output", str(tmp_path / "vllm")],
            "export-merged": ["export", "--adapter", a, "--format", "merged", "--base", m,
                              "--output", str(tmp_path / "merged")]}[command]


@pytest.mark.parametrize("command", ["generate", "merge", "analyze", "export-vllm", "export-merged"])
def test_allow_pickle_reaches_every_adapter_command(command, adapter_copy, tiny, tmp_path, capsys):
    _to_pickle(adapter_copy)
    argv = _command(command, adapter_copy, tiny, tmp_path)
    tail = ["hi"] if command == "generate" else []
    assert main(argv + tail) == 2 and "--allow-pickle" in capsys.readouterr().err
    assert main(argv + ["--allow-pickle"] + tail) == 0


@pytest.mark.parametrize("command", ["generate", "merge", "export-merged"])
def test_allow_other_base_reaches_every_command_that_loads_onto_a_base(command, adapter_copy, tiny, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = adapter_copy / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, "lorakit_base_fingerprint": "sha256:other"})
    argv = _command(command, adapter_copy, tiny, tmp_path)
    tail = ["hi"] if command == "generate" else []
    assert main(argv + tail) == 2 and "--allow-other-base" in capsys.readouterr().err
    assert main(argv + ["--allow-other-base"] + tail) == 0


def test_a_hostile_checkpoint_cannot_redirect_writes(run_copy, tiny, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    def redirect(state: dict) -> None:
        state["config"]["output"]["output"] = str(elsewhere)
        state["config"]["model"]["name"] = str(elsewhere / "model")
        state.update(output=str(elsewhere), adapter=str(elsewhere / "adapter"), path="../../elsewhere")

    for folder in ckpt.list_checkpoints(run_copy / "checkpoints"):
        edit_checkpoint_state(folder, redirect)
    assert main(train_args(tiny, run_copy, "--resume", "--max-steps", "4")) == 0
    assert not elsewhere.exists()
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 4
    assert ckpt.find_latest_valid(run_copy / "checkpoints").name == ckpt.step_dir_name(4)


def test_a_manifest_naming_files_outside_is_a_damaged_checkpoint(run_copy, tiny, tmp_path, caplog, capsys):
    newest = ckpt.list_checkpoints(run_copy / "checkpoints")[0]
    (tmp_path / "secret").write_text("x")
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    manifest["files"]["../../secret"] = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert main(train_args(tiny, run_copy, "--resume")) == 0
    assert "points outside" in caplog.text
    assert "resumed from step-000002" in capsys.readouterr().out
    assert (tmp_path / "secret").read_text() == "x"


def test_symlinks_in_checkpoints_never_lead_to_deleting_outside(run_copy, tiny, tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_text("precious")
    root = run_copy / "checkpoints"
    os.symlink(outside / "keep", root / "step-000000")  # looks like the oldest checkpoint
    os.symlink(outside / "keep", root / ".tmp-step-000009-1")  # looks like a leftover temp folder
    assert main(train_args(tiny, run_copy, "--resume", "--max-steps", "5", "--keep-checkpoints", "1")) == 0
    assert (outside / "keep" / "file").read_text() == "precious"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000005"]


def test_adapter_config_cannot_choose_where_analyze_writes(adapter_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config.update(output_dir=str(elsewhere), heatmap=str(elsewhere / "x.png"), base_model_name_or_path="../../x")
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    assert main(["analyze", str(adapter_copy)]) == 0
    assert (adapter_copy / "effective_rank.png").exists() and not elsewhere.exists()


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_ends_identical(run_copy, trained, tiny, caplog, capsys):
    newest = ckpt.list_checkpoints(run_copy / "checkpoints")[0]
    assert newest.name == "step-000003"
    data = bytearray((newest / ckpt.ADAPTER_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (newest / ckpt.ADAPTER_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert main(train_args(tiny, run_copy, "--resume")) == 0
    assert "skipping damaged checkpoint" in caplog.text and "step-000003" in caplog.text
    assert "resumed from step-000002" in capsys.readouterr().out
    assert (run_copy / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (trained / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("damage", [
    lambda m: m.update(format_version=None), lambda m: m.update(format_version="2"),
    lambda m: m.update(files=list(m["files"])), lambda m: m["files"].update({next(iter(m["files"])): 5}),
    "nested"])
def test_a_garbled_manifest_is_a_damaged_checkpoint_the_resume_steps_past(run_copy, tiny, caplog, capsys, damage):
    # each was a traceback (a comparison with None, .items() of a list, a RecursionError), exit 1
    newest = ckpt.list_checkpoints(run_copy / "checkpoints")[0]
    if damage == "nested":
        (newest / ckpt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    else:
        manifest = json.loads((newest / ckpt.MANIFEST).read_text())
        damage(manifest)
        (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert main(train_args(tiny, run_copy, "--resume")) == 0
    assert "skipping damaged checkpoint" in caplog.text
    assert "resumed from step-000002" in capsys.readouterr().out


@pytest.mark.parametrize("edit, said", [
    (lambda state: state["rng"].update(python=[1, 2]), "cannot be restored"),
    (lambda state: state.update(base_eval={}), "invalid value(s) for base_eval"),
    (lambda state: state.update(base_eval={"__tensor__": "x"}), "holds what a save does not write")])
def test_a_hand_edited_checkpoint_that_passes_its_checksums_is_refused_in_one_line(run_copy, tiny, capsys, edit, said):
    # each failed part way through the resume with a traceback
    for folder in ckpt.list_checkpoints(run_copy / "checkpoints"):
        edit_checkpoint_state(folder, edit)
    assert main(train_args(tiny, run_copy, "--resume", "--max-steps", "4")) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_an_optimizer_group_without_its_parameters_is_refused_in_one_line(run_copy, tiny, capsys):
    for folder in ckpt.list_checkpoints(run_copy / "checkpoints"):
        saved = json.loads((folder / ckpt.OPTIMIZER_JSON).read_text())
        for group in saved["param_groups"]:
            del group["params"]
        (folder / ckpt.OPTIMIZER_JSON).write_text(json.dumps(saved))
        edit_checkpoint_state(folder, lambda state: None)  # the manifest made to match
    assert main(train_args(tiny, run_copy, "--resume", "--max-steps", "4")) == 2
    err = capsys.readouterr().err
    assert "does not describe an optimizer state" in err and "Traceback" not in err


def test_a_metrics_line_edited_out_of_shape_is_left_out_and_the_run_finishes(run_copy, tiny, capsys):
    # a line without "kind" (one flipped bit) made every later resume end in a KeyError at the summary
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"kind"', '"kimd"', 1)
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(train_args(tiny, run_copy, "--resume", "--max-steps", "4")) == 0
    assert "the file was removed or damaged" in " ".join(capsys.readouterr().out.split())
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 4
