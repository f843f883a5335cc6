"""`lorakit merge` writes a plain transformers folder that reproduces base + adapter."""

import errno
import json
import os
import warnings

import pytest
import torch

from lorakit import LoraConfig, apply_lora, save_adapter
from lorakit.cli import main

from tiny_models import randomize_lora, save_tiny_chat_model


def _saved_adapter(tmp_path):
    """An untrained LoRA (B = 0) on a tiny base model folder, saved to tmp_path/adapter."""
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    return tmp_path / "adapter"


def test_merge_writes_a_plain_model_that_matches(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_logit_difference"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() <= 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # the output exists now: a second merge refuses without --overwrite
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 2


def test_merge_refuses_nan_adapter_and_writes_nothing(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lora_B.weight.fill_(float("nan"))
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_merge_output_problems_are_one_message_and_leave_nothing(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lorakit import safe_io  # noqa: F401  (the module whose error translation is under test)

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    (tmp_path / "afile").write_text("x")
    merge = ["merge", "--adapter", str(tmp_path / "adapter"), "--output"]
    for output, extra, words in [("afile/sub", [], "which is a file"), ("afile", ["--overwrite"], "is a file")]:
        assert main(merge + [str(tmp_path / output), *extra]) == 2
        assert words in capsys.readouterr().err
    # a disk filling up during the save: safetensors' own error, one message, no temp folder left
    SafetensorError = type("SafetensorError", (Exception,), {})

    def full_disk(self, *args, **kwargs):
        raise SafetensorError("IoError: No space left on device (os error 28)")

    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    assert main(merge + [str(tmp_path / "new" / "merged")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


def test_export_merged_takes_overwrite_as_its_message_says(tmp_path, capsys):
    _saved_adapter(tmp_path)
    (tmp_path / "out").mkdir()
    export = ["export", "--adapter", str(tmp_path / "adapter"), "--format", "merged", "--output", str(tmp_path / "out")]
    assert main(export) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(export + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "vllm", "--output",
                 str(tmp_path / "v"), "--overwrite"]) == 2


def test_a_failed_final_move_keeps_the_checked_merge_and_says_where(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    _saved_adapter(tmp_path)
    real_rename = Path.rename

    def refuse_into_output(self, target):
        if Path(target).name == "merged":
            raise PermissionError(13, "Permission denied")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_into_output)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 2
    assert "the checked merged model is complete in" in capsys.readouterr().err
    kept = list(tmp_path.glob("merged.unplaced-*"))
    assert len(kept) == 1 and (kept[0] / "config.json").exists() and not (tmp_path / "merged").exists()
    monkeypatch.undo()
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert list(tmp_path.glob("merged.unplaced-*")) == kept  # the next merge leaves the kept one alone


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_keeps_the_old_merge_until_the_new_one_is_in_place(tmp_path, capsys, monkeypatch):
    import shutil
    from pathlib import Path

    _saved_adapter(tmp_path)
    merge = ["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]
    assert main(merge) == 0
    (tmp_path / "merged" / "old-marker").write_text("the earlier merge")

    # killed between --overwrite's two renames: the old merge aside, the new one in its temp folder
    from lorakit.publish import _host

    pid, host = _dead_pid(), _host()
    (tmp_path / "merged").rename(tmp_path / f".old-merged-{host}-{pid}-0123abcd")
    shutil.copytree(tmp_path / f".old-merged-{host}-{pid}-0123abcd", tmp_path / f".tmp-merged-{host}-{pid}-4567cdef")
    (tmp_path / f".tmp-merged-otherhost-{pid}-89abcdef").mkdir()  # another host's: its process cannot be seen
    assert main(merge) == 2  # the old merge is back under its name, so it is not replaced without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "merged" / "old-marker").exists()
    assert [p.name for p in tmp_path.glob(".*-merged-*")] == [f".tmp-merged-otherhost-{pid}-89abcdef"]
    (tmp_path / f".tmp-merged-otherhost-{pid}-89abcdef").rmdir()

    real_rename = Path.rename

    def refuse_the_new_one(self, target):
        if self.name.startswith(".tmp-merged-"):
            raise PermissionError(13, "Permission denied")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_the_new_one)
    assert main(merge + ["--overwrite"]) == 2  # the move fails: the old merge goes back
    assert (tmp_path / "merged" / "old-marker").exists()
    monkeypatch.undo()
    shutil.rmtree(next(tmp_path.glob(".tmp-merged-*")))  # kept under its temp name: the rename away failed too
    assert main(merge + ["--overwrite"]) == 0
    assert (tmp_path / "merged" / "config.json").exists() and not (tmp_path / "merged" / "old-marker").exists()
    assert not list(tmp_path.glob(".*-merged-*"))


def test_a_symlinked_or_too_long_output_is_refused_before_the_merge(tmp_path, capsys):
    _saved_adapter(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    merge = ["merge", "--adapter", str(tmp_path / "adapter"), "--overwrite", "--output"]
    for output, words in [("link", "is a symbolic link"), ("dangling", "is a symbolic link"),
                          ("m" * 240, "the folder name is too long for the merge's temp folder")]:
        assert main(merge + [str(tmp_path / output)]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "dangling", "link", "real"]


@pytest.mark.parametrize("fmt, flags, message", [
    ("vllm", ["--outtype", "f16"], "--outtype is for --format gguf, not vllm"),
    ("gguf", ["--max-lora-rank", "64"], "--max-lora-rank is for --format vllm, not gguf"),
    ("merged", ["--allow-embeddings"], "--allow-embeddings is for --format vllm, not merged"),
    ("vllm", ["--overwrite"], "a vllm export never replaces a file"),
])
def test_an_option_the_format_would_ignore_is_refused(tmp_path, capsys, fmt, flags, message):
    assert main(["export", "--adapter", str(tmp_path / "a"), "--format", fmt, "--output", str(tmp_path / "o"),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_base_without_a_chat_template_keeps_the_trained_format_after_merging(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.formats import FALLBACK_CHAT_TEMPLATE

    base_dir = save_tiny_chat_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = None  # training rendered its chats with lorakit's fallback format
    tokenizer.save_pretrained(base_dir)
    (base_dir / "chat_template.jinja").unlink(missing_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    assert AutoTokenizer.from_pretrained(base_dir).chat_template is None
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == FALLBACK_CHAT_TEMPLATE


def test_a_16_bit_merge_outside_its_tolerance_points_to_float32(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lorakit import merge

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    monkeypatch.setattr(merge, "rounded_merge_tolerance", lambda dtype, reference: 0.0)  # bf16 rounding alone exceeds it
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"), "--dtype",
                 "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "nothing was written; merge with --dtype float32" in err and not (tmp_path / "m").exists()


def test_an_output_holding_an_input_or_the_current_folder_is_refused(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", base_model_name=str(base_dir))
    (run / "notes.txt").write_text("mine")
    monkeypatch.chdir(run)
    cases = [(run, "the adapter"), (run / "adapter", "the adapter"), (tmp_path / "base", "the base model"),
             (".", "the adapter")]
    for output, what in cases:
        assert main(["merge", "--adapter", "adapter", "--output", str(output), "--overwrite"]) == 2
        assert f"is or holds {what}" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", "..", "--overwrite"]) == 2
    assert "is or holds the current folder" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and (run / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "base" / "config.json").exists()


def test_the_fp32_check_scales_with_the_logits():
    from lorakit.merge import merge_tolerance

    # fp32 rounding of W + s B A moves large logits more: SmolLM2 with a strong adapter moved its logits
    # (largest 35) by 1.5e-4, as PEFT's own merge did; a fixed 1e-4 refused that correct merge
    assert merge_tolerance(torch.tensor([-35.4, 3.0])) > 1.5e-4
    assert merge_tolerance(torch.tensor([0.5, -0.2])) == 1e-4  # small logits: the floor


def test_a_bf16_base_is_merged_in_fp32_and_written_in_bf16_as_peft_keeps_the_base_dtype(tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_chat_model(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(base_dir).to(torch.bfloat16).save_pretrained(base_dir)  # config: bfloat16
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        exact = model(ids).logits  # the bf16 base's weights, read in fp32, plus the adapter
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["max_abs_logit_difference"] <= result["tolerance"]
    with safe_open(str(next((tmp_path / "m").glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():  # one bf16 rounding of the merged weights, no bf16 arithmetic: within 2%
        assert (merged(ids).logits - exact).abs().max() <= 0.02 * exact.abs().max()
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "f"), "--dtype",
                 "float32", "--json"]) == 0  # asked for: fp32
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32"


def test_an_explicit_16_bit_merge_is_checked_in_fp32(tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 merges in fp32, rounds once and checks the reload in fp32 against the
    exact adapted model (2% of the largest logit): a merge that applied half of each update would
    pass a check done in bf16 arithmetic (10%), and is refused here."""
    from transformers import AutoModelForCausalLM

    import lorakit.lora

    base_dir = save_tiny_chat_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    merge_args = ["merge", "--adapter", str(tmp_path / "adapter"), "--dtype", "bfloat16", "--json"]
    assert main([*merge_args, "--output", str(tmp_path / "good")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["max_abs_logit_difference"] <= result["tolerance"]
    real = lorakit.lora.remove_lora

    def merge_half(model, merge=False):
        with torch.no_grad():
            for _, layer in lorakit.lora.lora_layers(model):
                layer.lora_B.weight.mul_(0.5)
        return real(model, merge=merge)

    monkeypatch.setattr(lorakit.lora, "remove_lora", merge_half)
    assert main([*merge_args, "--output", str(tmp_path / "half")]) == 2
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "half").exists()


def test_a_sequence_classification_adapter_merges_into_a_classifier(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    base_dir = save_tiny_chat_model(tmp_path / "base")  # a causal LM's folder: no num_labels, no score head
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    model.config.pad_token_id = 0
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    ids = torch.randint(1, 300, (1, 10))
    with torch.no_grad():
        model.score.weight.normal_()  # the head trains in full: the adapter carries it
        expected = model.eval()(ids).logits
    save_adapter(model, tmp_path / "adapter", base_model_name=str(base_dir))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() <= 1e-4  # was refused: "lack lm_head.weight"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "q"),
                 "--quantize", "4bit"]) == 2
    assert "this one is for a SEQ_CLS model: merge it without --quantize" in capsys.readouterr().err
    # eval and generate run causal LMs: refused by name, not "the weights lack tensors" after a load report
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "is a SEQ_CLS adapter (a classifier's); eval works with causal LM adapters" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(tmp_path / "adapter"), "hello"]) == 2
    assert "is a SEQ_CLS adapter (a classifier's); generate works" in capsys.readouterr().err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".score." not in k}, weights)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "nohead")]) == 2
    assert "a SEQ_CLS adapter without its task head" in capsys.readouterr().err  # was merged with a random head


@pytest.mark.parametrize("code, said", [(errno.EACCES, False), (errno.EIO, True)])
def test_a_parent_folder_that_cannot_be_flushed_after_the_move(tmp_path, monkeypatch, code, said):
    """The folder is in place once renamed: a parent this user may not open for reading is no
    failure; an I/O error flushing it is a warning (the new name may not survive a power cut), not
    an error that would have the checked work redone."""
    from lorakit import publish

    def cannot_flush(path):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(publish, "fsync_dir", cannot_flush)
    tmp = publish.temp_beside(tmp_path / "out")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        publish.move_into_place(tmp, tmp_path / "out", False, "the checked merged model")
    flush_warnings = [w for w in caught if "may not survive a power cut" in str(w.message)]
    assert len(flush_warnings) == (1 if said else 0)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"x" and not tmp.exists()


@pytest.mark.parametrize("fmt, output", [("vllm", "served"), ("gguf", "a.gguf")])
def test_export_refuses_a_base_of_another_depth_whose_shapes_fit_as_merge_does(tmp_path, capsys, fmt, output):
    """A 3-layer base takes every factor of a 2-layer adapter: only the fingerprint, taken from the
    model --model's config.json describes, tells them apart (export went ahead)."""
    adapter = _saved_adapter(tmp_path)
    deeper = save_tiny_chat_model(tmp_path / "deeper", layers=3)
    export = ["export", "--adapter", str(adapter), "--format", fmt, "--output", str(tmp_path / output)]
    assert main(export + ["--model", str(deeper)]) == 2
    assert "trained on a base model of another architecture or shape" in capsys.readouterr().err
    assert not (tmp_path / output).exists()
    assert main(export + ["--model", str(deeper), "--allow-other-base"]) == 0
    assert main(export[:-1] + [str(tmp_path / ("own-" + output)), "--model", str(tmp_path / "base")]) == 0


def test_a_small_merge_writes_without_transformers_progress_bar(tmp_path, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    from lorakit import terminal

    adapter = _saved_adapter(tmp_path)
    hf_logging.enable_progress_bar()
    capfd.readouterr()  # the tiny base's own writing
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored
    monkeypatch.setattr(terminal, "LOADING_BAR_BYTES", 0)  # as if the weights took a while to write
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "again")]) == 0
    assert "Writing model shards" in capfd.readouterr().err
