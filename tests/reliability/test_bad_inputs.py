"""Every bad input a user can give, through the CLI: exit 2, one message, no traceback, no mess.

The inputs live in tests/reliability/corpus/ (config/*.yaml, data/*) where they are files;
damaged models, adapters, checkpoints and output folders are made from the shared tiny model
and trained run (conftest.py) by the `setup` of each case. Each case asserts:

- exit code 2;
- one `error:` message on stderr holding a fragment naming the problem AND one naming the fix;
- no traceback;
- nothing written: the --output folder is exactly as before (absent, or unchanged), no temp
  folders beside it; where a run starts and then fails (disk full), the earlier checkpoints are
  intact and nothing looks finished (no summary.json, no adapter/).

Most cases run `lorakit.cli.main` in-process (fast); `test_real_processes_print_no_traceback`
runs a few as real `python -m lorakit` processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.train import checkpoint as ckpt
from reliability_kit import CORPUS, LORAKIT, child_env
from tiny_models import edit_checkpoint_state, write_define_data


@dataclass
class Ctx:
    tiny: object
    trained: Path
    other_model: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def adapter(self) -> Path:
        return self.tmp / "adapter"

    @property
    def model(self) -> Path:
        return self.tmp / "model"

    def paths(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "out": str(self.out), "adapter": str(self.adapter), "model": str(self.model),
                "tiny_model": str(self.tiny.model), "data": str(self.tiny.data), "other": str(self.other_model)}


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    problem: str  # a fragment of the message that names the problem
    fix: str  # a fragment that names the fix
    setup: Callable[[Ctx], None] | None = None
    writes: bool = False  # the run starts, then fails: check `after` instead of "nothing written"
    after: Callable[[Ctx], None] | None = None


# ---- argv builders ---------------------------------------------------------------------------

def _fill(ctx: Ctx, args) -> list[str]:
    return [str(a).format(**ctx.paths()) for a in args]


def train(*extra, data: str | None = None, config: str | None = None):
    """`lorakit train` on the tiny model; `data` names a corpus file (or a {placeholder} path)."""
    def build(ctx: Ctx) -> list[str]:
        data_path = ctx.tiny.data if data is None else (data if "{" in data else CORPUS / "data" / data)
        argv = ["train", *([str(CORPUS / "config" / config)] if config else []), "--model", str(ctx.tiny.model),
                "--data", str(data_path), "--output", str(ctx.out), "--max-steps", "2", "--batch-size", "4",
                "--seq-len", "64", "--eval-split", "0", "--seed", "3", "--save-every", "1"]
        rank = [] if config else ["--r", "4"]  # a flag would override the config file's value
        return _fill(ctx, argv + rank + list(extra))
    return build


def adapter_cmd(command: str, *extra):
    """An adapter-reading command on the damaged copy of the trained adapter."""
    def build(ctx: Ctx) -> list[str]:
        a, m = str(ctx.adapter), str(ctx.tiny.model)
        argv = {"eval": ["eval", "--adapter", a, "--data", str(ctx.tiny.data), "--model", m, "--seq-len", "64"],
                "generate": ["generate", "--adapter", a, "--model", m, "--max-new-tokens", "2"],
                "merge": ["merge", "--adapter", a, "--model", m, "--output", str(ctx.out)],
                "analyze": ["analyze", a, "--no-heatmap"],
                "export": ["export", "--adapter", a, "--format", "vllm", "--output", str(ctx.out)]}[command]
        return _fill(ctx, argv + list(extra)) + (["hello"] if command == "generate" else [])
    return build


def raw(*args):
    return lambda ctx: _fill(ctx, args)


# ---- damage ----------------------------------------------------------------------------------

def _copy_adapter(ctx: Ctx) -> Path:
    return Path(shutil.copytree(ctx.trained / "adapter", ctx.adapter))


def _weights(ctx: Ctx) -> tuple[dict, dict]:
    path = ctx.adapter / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(path), metadata


def adapter_damage(kind: str):
    def setup(ctx: Ctx) -> None:
        _copy_adapter(ctx)
        weights = ctx.adapter / "adapter_model.safetensors"
        tensors, metadata = _weights(ctx)
        first = sorted(tensors)[0]
        if kind == "missing-tensor":
            del tensors[first]
        elif kind == "nan":
            tensors[first] = torch.full_like(tensors[first], float("nan"))
        elif kind == "other-base":
            metadata["lorakit_base_fingerprint"] = "sha256:" + "0" * 32
        if kind in ("missing-tensor", "nan", "other-base"):
            save_file(tensors, weights, metadata=metadata)
        elif kind == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
        elif kind == "pickle":
            torch.save(tensors, ctx.adapter / "adapter_model.bin")
            weights.unlink()
        elif kind == "no-weights":
            weights.unlink()
        elif kind == "bad-config":
            (ctx.adapter / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
        elif kind == "untargeted":  # PEFT would skip the tensors of every module but q_proj
            config = json.loads((ctx.adapter / "adapter_config.json").read_text())
            (ctx.adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
        elif kind != "none":
            raise ValueError(kind)
    return setup


def model_damage(kind: str):
    def setup(ctx: Ctx) -> None:
        src, dst = ctx.tiny.model, ctx.model
        if kind == "truncated":
            shutil.copytree(src, dst)
            weights = dst / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            return
        if kind in ("bad-config-json", "list-config-json"):
            shutil.copytree(src, dst)
            (dst / "config.json").write_text("{bad" if kind == "bad-config-json" else "[1]")
            return
        if kind == "unknown-dtype":
            shutil.copytree(src, dst)
            config = json.loads((dst / "config.json").read_text())
            (dst / "config.json").write_text(json.dumps({**config, "dtype": "float8", "torch_dtype": "float8"}))
            return
        if kind == "nan-weights":
            shutil.copytree(src, dst)
            tensors = load_file(dst / "model.safetensors")
            for name in tensors:
                if "embed_tokens" in name:
                    tensors[name].fill_(float("nan"))
            save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
            return
        dst.mkdir()
        if kind == "empty":
            return
        for item in src.iterdir():
            if item.suffix != ".safetensors":
                shutil.copy(item, dst / item.name)
        if kind == "pickle-only":
            torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return setup


def write_file(name: str, data: bytes):
    return lambda ctx: (ctx.tmp / name).write_bytes(data)


def copy_run(finished: bool = True):
    def setup(ctx: Ctx) -> None:
        shutil.copytree(ctx.trained, ctx.out)
        if not finished:
            (ctx.out / "summary.json").unlink()
            shutil.rmtree(ctx.out / "adapter")
    return setup


def edit_trainer_state(change: Callable[[dict], object]):
    """A hand-edited (or hostile) trainer_state.json in every checkpoint, manifests made to match;
    `change` edits the dict in place, or returns what replaces it."""
    def setup(ctx: Ctx) -> None:
        copy_run()(ctx)
        for folder in ckpt.list_checkpoints(ctx.out / "checkpoints"):
            edit_checkpoint_state(folder, change)
    return setup


def replace_optimizer_json(text: str):
    """optimizer.json replaced in every checkpoint, manifests made to match (found by a hunt: a KeyError)."""
    def setup(ctx: Ctx) -> None:
        copy_run()(ctx)
        for folder in ckpt.list_checkpoints(ctx.out / "checkpoints"):
            (folder / ckpt.OPTIMIZER_JSON).write_text(text)
            edit_checkpoint_state(folder, lambda state: None)  # re-hashes every file
    return setup


def run_file_as_folder(name: str):
    def setup(ctx: Ctx) -> None:
        copy_run()(ctx)
        (ctx.out / name).unlink(missing_ok=True)
        (ctx.out / name).mkdir()
    return setup


def damage_all_checkpoints(ctx: Ctx) -> None:
    copy_run()(ctx)
    for folder in ckpt.list_checkpoints(ctx.out / "checkpoints"):
        path = folder / ckpt.ADAPTER_FILE
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


def fewer_examples(ctx: Ctx) -> None:
    copy_run()(ctx)
    write_define_data(ctx.tmp / "small.jsonl", count=6)


def read_only_output(ctx: Ctx) -> None:
    """Root ignores chmod, so the file system's answer is simulated where the output is created."""
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == ctx.out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "mkdir", mkdir)


def read_only_run(ctx: Ctx) -> None:
    """A finished run on a file system that has become read-only (as above, simulated)."""
    copy_run()(ctx)
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent == ctx.out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    ctx.monkeypatch.setattr(Path, "write_text", write_text)


def disk_full_at_second_checkpoint(ctx: Ctx) -> None:
    """ENOSPC on the 4th safetensors write: checkpoint 1 writes three, checkpoint 2's first fails."""
    import lorakit.safe_io as safe_io

    original, calls = safe_io._safetensors_save_file, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    ctx.monkeypatch.setattr(safe_io, "_safetensors_save_file", save)


def disk_full_in_metrics(ctx: Ctx) -> None:
    """metrics.jsonl's lines go to /dev/full, where every write fails with ENOSPC."""
    from lorakit.train.session import Session

    original = Session._open_metrics

    def open_metrics(session):
        original(session)
        session.metrics.close()
        session.metrics = open("/dev/full", "a", encoding="utf-8")

    ctx.monkeypatch.setattr(Session, "_open_metrics", open_metrics)


def datasets_cache_full(ctx: Ctx) -> None:
    """datasets fails to write the Arrow copy of a data file into its cache."""
    import lorakit.data.reading as reading

    def load_file(path, kind, cache_dir, options):
        raise RuntimeError("An error occurred while generating the dataset") from OSError(
            errno.ENOSPC, "No space left on device", "/cache/json/train.arrow")

    ctx.monkeypatch.setattr(reading, "_load_file", load_file)


def earlier_checkpoint_intact(ctx: Ctx) -> None:
    root = ctx.out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000001"]
    assert ckpt.verify_checkpoint(root / "step-000001") is None
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert not (ctx.out / "summary.json").exists() and not (ctx.out / "adapter").exists()


def nothing_finished(ctx: Ctx) -> None:
    assert not (ctx.out / "summary.json").exists() and not (ctx.out / "adapter").exists()


def both(*setups):
    def setup(ctx: Ctx) -> None:
        for step in setups:
            step(ctx)
    return setup


# ---- the table -------------------------------------------------------------------------------

CONFIG_CASES = [
    Case("yaml-malformed", train(config="malformed.yaml"), "malformed.yaml is not valid YAML", "fix the syntax"),
    Case("yaml-nested-too-deep", train(config="nested_too_deep.yaml"), "nests too deeply", "sections of plain options"),
    Case("yaml-unknown-key", train(config="unknown_key.yaml"), "unknown key(s)", "lorakit train --help"),
    Case("yaml-unknown-top-key", train(config="unknown_top_key.yaml"), "learning_rate", "lorakit train --help"),
    Case("yaml-wrong-type-int", train(config="wrong_type_int.yaml"), "lora.r (config file)", "must be an integer"),
    Case("yaml-wrong-type-bool", train(config="wrong_type_bool.yaml"), "data.packing (config file)", "must be true or false"),
    Case("yaml-float-steps", train(config="wrong_type_float_steps.yaml"), "train.max_steps", "must be an integer"),
    Case("yaml-top-level-list", train(config="top_level_list.yaml"), "not list", "must hold a mapping of options"),
    Case("yaml-section-not-mapping", train(config="section_not_mapping.yaml"), "lora in", "must be a mapping of options"),
    Case("yaml-python-object", train(config="python_object.yaml"), "python/object/apply", "remove the tag"),
    Case("yaml-python-object-nested", train(config="python_object_nested.yaml"), "python/object/apply", "remove the tag"),
    Case("yaml-latin1", train(config="latin1.yaml"), "is not UTF-8 text", "save it as UTF-8"),
    Case("yaml-null-value", train(config="null_value.yaml"), "train.lr (config file) is empty", "leave the key out"),
    Case("yaml-list-key", train(config="list_key.yaml"), "a key is a list", "use a plain option name"),
    Case("yaml-duplicate-key", train(config="duplicate_key.yaml"), "key 'r' is given twice", "keep one of them"),
    Case("yaml-r-zero", train(config="r_zero.yaml"), "r must be a positive integer, got 0", "8, 16 or 64"),
    Case("yaml-alpha-negative", train(config="alpha_negative.yaml"), "got -16", "alpha must be a positive number"),
    Case("yaml-dropout-range", train(config="dropout_out_of_range.yaml"), "got 1.5", "dropout must be in [0, 1)"),
    Case("yaml-lr-nan", train(config="lr_nan.yaml"), "got nan", "--lr must be positive"),
    Case("yaml-output-not-string", train(config="output_not_string.yaml"), "output.output (config file)", "must be a string"),
    Case("yaml-missing-file", train("{tmp}/nope.yaml"), "nope.yaml does not exist", "pass a YAML file"),
]

FLAG_CASES = [
    Case("flag-columns-not-a-pair", train("--columns", "instruction"), "got 'instruction'",
         "takes FIELD=COLUMN pairs (e.g. instruction=question output=answer)"),
    Case("flag-columns-unknown-field", train("--columns", "prompt_text=question"), "'prompt_text' is not a field",
         "map to one of text, messages"),
    Case("flag-columns-missing-column", train("--columns", "output=answr"), "no data file has a column 'answr'",
         "the files' columns:"),
    Case("flag-r-zero", train("--r", "0"), "got 0", "r must be a positive integer"),
    Case("flag-alpha-negative", train("--alpha", "-8"), "got -8", "alpha must be a positive number"),
    Case("flag-dropout-range", train("--dropout", "1.5"), "got 1.5", "dropout must be in [0, 1)"),
    Case("flag-dropout-negative", train("--dropout", "-0.1"), "got -0.1", "dropout must be in [0, 1)"),
    Case("flag-lr-negative", train("--lr=-1e-3"), "got -0.001", "--lr must be positive"),
    Case("flag-batch-size-zero", train("--batch-size", "0"), "got 0", "--batch-size must be at least 1"),
    Case("flag-max-steps-zero", train("--max-steps", "0"), "got 0", "--max-steps must be positive"),
    Case("flag-warmup-ratio", train("--warmup-ratio", "1.5"), "got 1.5", "--warmup-ratio must be in [0, 1)"),
    Case("flag-seq-len-tiny", train("--seq-len", "4"), "got 4", "--seq-len must be at least 8"),
    Case("flag-keep-zero", train("--keep-checkpoints", "0"), "got 0", "--keep-checkpoints must be at least 1"),
    Case("flag-resume-and-overwrite", train("--resume", "--overwrite"), "contradict each other", "choose one"),
    # the run folder it would replace stays as it was (the value used to crash after --overwrite had cleared it)
    Case("flag-bad-weight-decay-over-a-run", train("--overwrite", "--weight-decay", "-1"), "--weight-decay",
         "must be >= 0", setup=copy_run()),
    Case("flag-unknown", train("--rank", "8"), "unrecognized arguments: --rank", "usage:"),
    Case("flag-bad-format-choice", train("--format", "xml"), "invalid choice: 'xml'", "choose from"),
    Case("flag-r-not-int", train("--r", "abc"), "invalid int value: 'abc'", "usage:"),
    Case("flag-targets-typo", train("--targets", "q_projj"), "'q_projj' matches no linear layer", "Did you mean 'q_proj'"),
    Case("flag-targets-partly-typo", train("--targets", "q_proj,v_projj"), "'v_projj' matches no linear layer", "Did you mean 'v_proj'"),
    Case("flag-targets-empty", train("--targets", ""), "--targets is empty", "all-linear"),
    # the engine's field names the flag; excluding "all-linear" (the advice for --targets) would leave nothing
    Case("flag-exclude-empty", train("--exclude", ""), "--exclude is empty", "leave it out to exclude nothing"),
    Case("flag-rank-above-layer", train("--r", "100"), "cannot take rank 100 (at most 32)", "lower r or exclude them"),
    Case("flag-eval-split-all", train("--eval-split", "100"), "leaves none of the 48 for training", "smaller eval split"),
    Case("export-bad-format", raw("export", "--adapter", "{tmp}", "--format", "onnx", "--output", "{out}"),
         "invalid choice: 'onnx'", "choose from"),
    Case("config-is-a-folder", raw("train", "{tmp}"), "is a folder", "pass a YAML file"),
    Case("estimate-zero-layers", raw("estimate", "--model", "{tmp}/config.json"), "num_hidden_layers is 0",
         "pass the model's own config.json", setup=write_file("config.json", json.dumps(
             {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 0,
              "num_attention_heads": 4, "vocab_size": 100}).encode())),
    Case("estimate-head-dim-a-string", raw("estimate", "--model", "{tmp}/config.json"), "head_dim is '16'",
         "not a positive integer", setup=write_file("config.json", json.dumps(
             {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "head_dim": "16", "vocab_size": 100}).encode())),
    Case("estimate-config-a-list", raw("estimate", "--model", "{tmp}/config.json"), "holds a JSON list",
         "pass the model's own config.json", setup=write_file("config.json", b"[1]")),
    Case("estimate-config-number-too-long", raw("estimate", "--model", "{tmp}/config.json"), "cannot read model config",
         "restore the model's own config.json", setup=write_file("config.json", b'{"hidden_size": ' + b"9" * 5000 + b"}")),
    Case("estimate-text-config-a-string", raw("estimate", "--model", "{tmp}/config.json"), "text_config is a str",
         "pass the model's own config.json", setup=write_file("config.json", b'{"model_type": "llava", "text_config": "x"}')),
    Case("estimate-model-type-a-list", raw("estimate", "--model", "{tmp}/config.json"), "model_type is ['bert']",
         "pass the model's own config.json", setup=write_file("config.json", b'{"model_type": ["bert"], "hidden_size": 64}')),
    Case("bench-variants-empty-entry", raw("bench", "--variants", "lorakit,,peft"), "'lorakit,,peft' has an empty entry",
         "write names like lorakit,peft"),
    Case("bench-two-orders", raw("bench", "--sequential", "--interleave"), "--interleave: not allowed with", "--sequential"),
]

DATA_CASES = [
    Case("data-missing", train(data="{tmp}/nope.jsonl"), "nope.jsonl does not exist", "check the path"),
    Case("data-empty", train(data="empty.jsonl"), "empty.jsonl is empty", "at least one record"),
    Case("data-blank-lines", train(data="blank_lines.jsonl"), "only blank lines", "at least one JSON record"),
    Case("data-binary", train(data="binary.jsonl"), "looks binary (it contains NUL bytes)", "not a .jsonl text file"),
    Case("data-utf16", train(data="utf16.jsonl"), "is UTF-16 encoded", "convert it to UTF-8"),
    Case("data-latin1-jsonl", train(data="latin1.jsonl"), "line 1 is not valid UTF-8", "re-save the file as UTF-8"),
    Case("data-latin1-txt", train(data="latin1.txt"), "line 1 is not valid UTF-8", "re-save the file as UTF-8"),
    Case("data-bad-json-line", train(data="bad_json_line.jsonl"), "line 3 is not valid JSON", "must be one JSON object"),
    Case("data-array-line", train(data="array_line.jsonl"), "line 2 is a JSON list, not an object", 'must look like {"text": "..."}'),
    Case("data-no-known-fields", train(data="no_known_fields.jsonl"), "cannot tell the data format", "expected 'messages'"),
    Case("data-missing-field", train(data="missing_field.jsonl"), "line 2): field 'output' is missing", "expects the fields instruction, output"),
    Case("data-wrong-field-type", train(data="wrong_field_type.jsonl"), "field 'instruction' is an int", "expects the fields"),
    Case("data-unknown-role", train(data="unknown_role.jsonl"), "unknown role 'wizard'", "expected one of system, user"),
    Case("data-empty-messages", train(data="empty_messages.jsonl"), "'messages' must be a non-empty list", "list of turns"),
    Case("data-all-too-long", train(data="too_long.jsonl"), "all 3 examples are longer than --seq-len 64", "raise --seq-len"),
    Case("data-no-trained-tokens", train(data="no_trained_tokens.jsonl"), "none of the 2 examples has a trained token", "check the text"),
    Case("data-header-only-csv", train(data="header_only.csv"), "holds no records", "only a header"),
    Case("data-assistant-first", train(data="assistant_first.jsonl"), "starts with the assistant's turn",
         "start it with a system or user turn"),
    Case("data-role-list", train(data="role_list.jsonl"), "unknown role ['user']", "expected one of system, user"),
    Case("data-deep-nesting", train(data="{tmp}/deep.jsonl"), "line 2 nests its values too deeply",
         "a record holds text fields",
         setup=write_file("deep.jsonl", b'{"text": "fine"}\n{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}\n")),
    Case("data-ragged-csv", train(data="ragged.csv"), "could not read", "Expected 2 fields in line 3, saw 4"),
    Case("data-not-parquet", train(data="not_parquet.parquet"), "is not a Parquet file", "check the file or its extension"),
    Case("data-unsupported-extension", train(data="data.xml"), "unsupported extension '.xml'", "use .jsonl"),
    Case("data-wrong-format-flag", train("--format", "instruction", data="chat_as_instruction.jsonl"),
         "format instruction needs the column(s)", "but the data has ['messages']"),
    Case("data-folder-not-dataset", train(data="{tmp}"), "holds no data files (.csv, .json, .jsonl, .parquet, .txt) "
         "and is not a dataset saved", "pass the data files, or the folder save_to_disk wrote"),
    Case("data-eval-file-missing", train("--eval-data", "{tmp}/nope-eval.jsonl"), "nope-eval.jsonl does not exist", "check the path"),
]

MODEL_CASES = [
    Case("model-missing", train("--model", "{tmp}/no-such-model"), "no such model folder or file", "pass a local folder with config.json"),
    Case("model-empty-folder", train("--model", "{model}"), "has no config.json", "pass a local folder with config.json",
         setup=model_damage("empty")),
    Case("model-no-weights", train("--model", "{model}"), "has config.json but no weights", "copy the weight files",
         setup=model_damage("no-weights")),
    Case("model-pickle-only", train("--model", "{model}"), "holds only pickle weights", "pass --allow-pickle",
         setup=model_damage("pickle-only")),
    Case("model-truncated-weights", train("--model", "{model}"), "could not load the model", "re-save the model",
         setup=model_damage("truncated")),
    Case("model-config-json-malformed", train("--model", "{model}"), "config.json is not valid JSON",
         "restore it from the original model", setup=model_damage("bad-config-json")),
    Case("model-config-json-a-list", train("--model", "{model}"), "config.json holds a JSON list",
         "restore it from the original model", setup=model_damage("list-config-json")),
    Case("model-config-json-unknown-dtype", train("--model", "{model}"), "torch_dtype 'float8' is not a torch dtype",
         "set it to bfloat16, float16 or float32", setup=model_damage("unknown-dtype")),
    Case("model-nan-weights", train("--model", "{model}"), "all 2 steps had a non-finite loss",
         "check the model and the data", setup=model_damage("nan-weights"), writes=True, after=nothing_finished),
    Case("model-nan-weights-eval", train("--model", "{model}", "--eval-split", "8"),
         "the base model's eval loss is nan before any training", "check the model",
         setup=model_damage("nan-weights"), writes=True, after=nothing_finished),
    Case("model-fake-gguf", train("--model", "{tmp}/model.gguf"), "is not a GGUF file", "re-download or re-export it",
         setup=write_file("model.gguf", b"not a gguf at all")),
    Case("model-weights-file", train("--model", "{tmp}/pytorch_model.bin"), "is a file but not a .gguf file",
         "a transformers model is a folder", setup=write_file("pytorch_model.bin", b"x")),
    Case("model-is-an-adapter", train("--model", "{adapter}"), "it holds a LoRA adapter", "pass its base model as the model",
         setup=adapter_damage("none")),
]

OUTPUT_CASES = [
    Case("output-is-a-file", train(), "is a file", "choose a folder path", setup=write_file("out", b"not a folder")),
    Case("overwrite-read-only-run", train("--overwrite"), "Read-only file system", "choose a writable folder",
         setup=read_only_run),
    Case("output-symlink-loop", train("--output", "{tmp}/loopA/x"), "loopA", "fix the symbolic-link loop",
         setup=lambda ctx: ((ctx.tmp / "loopA").symlink_to(ctx.tmp / "loopB"),
                            (ctx.tmp / "loopB").symlink_to(ctx.tmp / "loopA"))),
    Case("output-name-too-long", train("--output", "{tmp}/" + "x" * 300), "File name too long", "choose a shorter path"),
    Case("merge-output-holds-the-adapter", adapter_cmd("merge", "--output", "{tmp}", "--overwrite"),
         "is or holds the adapter", "choose a new folder elsewhere", setup=lambda ctx: _copy_adapter(ctx)),
    Case("output-holds-finished-run", train(), "already holds a finished run", "pass --resume with a larger --max-steps",
         setup=copy_run(finished=True)),
    Case("output-holds-unfinished-run", train(), "already holds an unfinished run", "--overwrite to replace it",
         setup=copy_run(finished=False)),
    Case("output-read-only", train(), "Read-only file system", "choose a writable folder", setup=read_only_output),
    Case("output-disk-full-during-checkpoint", train(), "disk full while writing", "free space or choose another --output",
         setup=disk_full_at_second_checkpoint, writes=True, after=earlier_checkpoint_intact),
    Case("output-disk-full-in-metrics", train(), "disk full while writing", "metrics.jsonl",
         setup=disk_full_in_metrics, writes=True, after=nothing_finished),
    Case("datasets-cache-full", train(), "disk full while writing datasets' cache (", "): set "
         "HF_DATASETS_CACHE (or HF_HOME) to a writable folder", setup=datasets_cache_full),
    Case("resume-other-rank", train("--resume", "--r", "8"), "does not fit this run's LoRA layers",
         "resume with the LoRA settings of that run", setup=copy_run()),
    Case("resume-other-targets", train("--resume", "--targets", "qv"), "tensor(s) this run does not train",
         "resume with the LoRA settings of that run", setup=copy_run()),
    Case("resume-other-base-model", train("--resume", "--model", "{other}"), "was made for another base model",
         "resume with the same --model", setup=copy_run()),
    Case("resume-every-checkpoint-damaged", train("--resume"), "every checkpoint in", "pass --overwrite instead of --resume",
         setup=damage_all_checkpoints),
    *[Case(f"resume-trainer-state-{name}", train("--resume"), problem, "delete this",
           setup=edit_trainer_state(change)) for name, change, problem in [
        ("a-list", lambda s: [1], "lacks the step or the random state"),
        ("config-a-string", lambda s: s.update(config="oops"), "invalid value(s) for config"),
        ("history-len-a-string", lambda s: s.update(history_len="x"), "invalid value(s) for history_len"),
        ("step-not-the-folders", lambda s: s["state"].update(step=s["state"]["step"] + 2), "is not the step its folder"),
        ("rng-without-python", lambda s: s["rng"].pop("python") and None, "its random state (rng.safetensors"),
    ]],
    *[Case(f"resume-{name}-a-folder", train("--resume"), f"{name} is not a file, where the run keeps its",
           "move it out of the run folder", setup=run_file_as_folder(name)) for name in ("metrics.jsonl", "summary.json")],
    Case("resume-optimizer-json-empty", train("--resume"), "optimizer.json does not describe an optimizer state",
         "delete this", setup=replace_optimizer_json("{}")),
    Case("resume-hostile-trainer-state", train("--resume"), "is not a valid lorakit training state",
         "delete this checkpoint folder", setup=edit_trainer_state(lambda s: s["state"].update(step=-3, evil="x"))),
    Case("resume-other-data", train("--resume", data="{tmp}/small.jsonl"), "the data now makes",
         "resume with the same data", setup=fewer_examples),
]

ADAPTER_CASES = [
    Case("eval-adapter-missing-tensor", adapter_cmd("eval"), "is missing", "the adapter is incomplete",
         setup=adapter_damage("missing-tensor")),
    Case("generate-adapter-missing-tensor", adapter_cmd("generate"), "is missing", "the adapter is incomplete",
         setup=adapter_damage("missing-tensor")),
    Case("merge-adapter-missing-tensor", adapter_cmd("merge"), "is missing", "the adapter is incomplete",
         setup=adapter_damage("missing-tensor")),
    Case("analyze-adapter-missing-tensor", adapter_cmd("analyze"), "is missing", "the adapter is incomplete",
         setup=adapter_damage("missing-tensor")),
    Case("export-adapter-missing-tensor", adapter_cmd("export"), "is missing", "re-save the adapter",
         setup=adapter_damage("missing-tensor")),
    Case("eval-adapter-truncated", adapter_cmd("eval"), "not a valid safetensors file", "re-copy or re-save the adapter",
         setup=adapter_damage("truncated")),
    Case("generate-adapter-truncated", adapter_cmd("generate"), "not a valid safetensors file", "re-copy or re-save the adapter",
         setup=adapter_damage("truncated")),
    Case("merge-adapter-truncated", adapter_cmd("merge"), "not a valid safetensors file", "re-copy or re-save the adapter",
         setup=adapter_damage("truncated")),
    Case("analyze-adapter-truncated", adapter_cmd("analyze"), "not a valid safetensors file", "re-copy or re-save the adapter",
         setup=adapter_damage("truncated")),
    Case("export-adapter-truncated", adapter_cmd("export"), "is truncated", "re-copy or re-save the adapter",
         setup=adapter_damage("truncated")),
    Case("eval-adapter-other-base", adapter_cmd("eval"), "was trained on a base model of another architecture or shape", "pass --allow-other-base",
         setup=adapter_damage("other-base")),
    Case("generate-adapter-other-base", adapter_cmd("generate"), "was trained on a base model of another architecture or shape", "pass --allow-other-base",
         setup=adapter_damage("other-base")),
    Case("merge-output-under-a-file", adapter_cmd("merge", "--output", "{tmp}/afile/merged"), "which is a file",
         "choose a folder path", setup=write_file("afile", b"mine")),
    Case("merge-output-is-a-file", adapter_cmd("merge", "--output", "{tmp}/afile", "--overwrite"), "is a file",
         "choose a folder path", setup=write_file("afile", b"mine")),
    Case("merge-adapter-other-base", adapter_cmd("merge"), "was trained on a base model of another architecture or shape", "pass --allow-other-base",
         setup=adapter_damage("other-base")),
    # export reads the base's config.json only: the fingerprint is taken from the model it describes
    Case("export-adapter-other-base", adapter_cmd("export"), "was trained on a base model of another architecture or shape",
         "pass --allow-other-base", setup=adapter_damage("other-base")),
    Case("eval-adapter-on-smaller-model", adapter_cmd("eval", "--model", "{other}", "--allow-other-base"),
         "targets modules this model does not have", "load it onto the base model it was trained for",
         setup=adapter_damage("none")),
    Case("eval-adapter-pickle", adapter_cmd("eval"), "is a pickle file", "pass --allow-pickle", setup=adapter_damage("pickle")),
    Case("generate-adapter-pickle", adapter_cmd("generate"), "is a pickle file", "pass --allow-pickle",
         setup=adapter_damage("pickle")),
    Case("merge-adapter-pickle", adapter_cmd("merge"), "is a pickle file", "pass --allow-pickle", setup=adapter_damage("pickle")),
    Case("analyze-adapter-pickle", adapter_cmd("analyze"), "is a pickle file", "pass --allow-pickle",
         setup=adapter_damage("pickle")),
    Case("export-adapter-pickle", adapter_cmd("export"), "is a pickle file", "pass --allow-pickle", setup=adapter_damage("pickle")),
    Case("eval-adapter-nan", adapter_cmd("eval"), "holds NaN or inf values", "train it again or use an earlier checkpoint",
         setup=adapter_damage("nan")),
    Case("analyze-adapter-nan", adapter_cmd("analyze"), "holds NaN or inf values", "train it again or use an earlier checkpoint",
         setup=adapter_damage("nan")),
    Case("merge-adapter-nan", adapter_cmd("merge"), "NaN or inf", "train it again", setup=adapter_damage("nan")),
    Case("eval-adapter-config-not-json", adapter_cmd("eval"), "adapter_config.json is not valid JSON",
         "restore it from the original adapter", setup=adapter_damage("bad-config")),
    Case("generate-adapter-no-weights", adapter_cmd("generate"), "has no adapter_model.safetensors",
         "the adapter's weights are missing", setup=adapter_damage("no-weights")),
    Case("eval-adapter-folder-missing", adapter_cmd("eval"), "no adapter folder at", "pass the folder that holds"),
    Case("eval-adapter-untargeted-modules", adapter_cmd("eval"), "does not cover", "list them in target_modules",
         setup=adapter_damage("untargeted")),
    Case("export-adapter-untargeted-modules", adapter_cmd("export"), "does not cover", "list them in target_modules",
         setup=adapter_damage("untargeted")),
    Case("merge-output-exists", adapter_cmd("merge"), "is a file", "choose a folder path",
         setup=both(adapter_damage("none"), write_file("out", b"keep me"))),
]

CASES = CONFIG_CASES + FLAG_CASES + DATA_CASES + MODEL_CASES + OUTPUT_CASES + ADAPTER_CASES


def test_the_corpus_is_large_and_every_file_is_used():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    files = {p.name for p in (CORPUS / "config").iterdir()} | {p.name for p in (CORPUS / "data").iterdir()}
    text = Path(__file__).read_text()
    assert files and all(f'"{name}"' in text for name in files), sorted(n for n in files if f'"{n}"' not in text)


# ---- running a case --------------------------------------------------------------------------

def snapshot(path: Path) -> dict | None:
    """Every file under `path` with its bytes' hash (None: the path does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_clear_message(case: Case, rc: int, out: str, err: str) -> None:
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    start = err.index("usage:") if ": error: " in errors[0] and "usage:" in err else err.index(errors[0])
    message = err[start:]  # argparse: usage line + error; lorakit: the message and its continuation lines
    assert case.problem in message, message
    assert case.fix in message, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_through_the_cli(case, tiny, trained, other_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a YAML payload that ran would leave LORAKIT_PWNED here
    ctx = Ctx(tiny, trained, other_model, tmp_path, monkeypatch)
    if case.setup:
        case.setup(ctx)
    before = snapshot(ctx.out)
    rc, out, err = run_cli(case.argv(ctx), capsys)
    assert_one_clear_message(case, rc, out, err)
    if case.writes:
        case.after(ctx)
    else:
        assert snapshot(ctx.out) == before, "the failed command changed its output"
    assert not list(tmp_path.glob(".tmp-*")), "a temp folder was left beside the output"
    assert not (tmp_path / "LORAKIT_PWNED").exists()


# ---- a few as real processes: what a user sees on a terminal ---------------------------------

REAL_PROCESS_CASES = ["yaml-malformed", "flag-unknown", "eval-adapter-truncated"]


def test_real_processes_print_no_traceback(tiny, trained, other_model, tmp_path, monkeypatch):
    children = []
    for case in [c for c in CASES if c.id in REAL_PROCESS_CASES]:
        ctx = Ctx(tiny, trained, other_model, tmp_path / case.id, monkeypatch)
        ctx.tmp.mkdir()
        if case.setup:
            case.setup(ctx)
        child = subprocess.Popen([*LORAKIT, *case.argv(ctx)], env=child_env(), cwd=ctx.tmp, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        children.append((case, ctx, child))
    for case, ctx, child in children:
        out, err = child.communicate(timeout=240)
        assert_one_clear_message(case, child.returncode, out, err)
        assert not ctx.out.exists()


@pytest.mark.parametrize("argv, said", [
    (["recommend", "--gpu-memory", ""], "--gpu-memory is empty; give it a value, or leave the flag out"),
    (["eval", "--adapter", "a", "--data", ""], "--data is empty; give it a value\n"),  # required: no leaving it out
    (["merge", "--adapter", "", "--output", "m"], "--adapter is empty; give it a value\n"),
    (["generate", "--adapter", "a", "--use", "", "hi"], "--use is empty; give it a value, or leave the flag out"),
    (["sweep", "c.yaml", "--output", ""], "--output is empty; give it a value, or leave the flag out")])
def test_an_empty_flag_value_is_refused_not_taken_for_not_given(argv, said, capsys):
    # recommend planned for this machine's memory, sweep wrote into runs/, eval read "." as data
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"error: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--data", "bad\udcff.jsonl", "--output", "runs/x"],
                                  ["merge", "--adapter", "a", "--output", "m\udcff"], ["sweep", "sw\udcff.yaml"]])
def test_a_path_that_is_not_utf8_is_refused_before_anything_runs(argv, tmp_path, capsys, monkeypatch):
    # a finished training run lost its checkpoint and adapter to such a path (JSON cannot hold it)
    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "holds bytes that are not UTF-8" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
