"""vLLM export and the adapter-folder reader: real PEFT adapters on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError, OutputError
from lorakit.export.adapter_files import read_for_export, split_key
from lorakit.export.vllm import export_vllm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )


def make_adapter(tmp_path: Path, name: str = "adapter", **lora_kwargs):
    """A PEFT adapter (random non-zero lora_B) on a tiny Llama whose config.json is local."""
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(base_dir)
    model.config.name_or_path = model.name_or_path = str(base_dir)
    lora = dict(r=8, lora_alpha=16, target_modules=ALL_SEVEN) | lora_kwargs
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name, peft_model


def cli_export(adapter_dir: Path, output: Path, *extra: str) -> int:
    return main(["export", "--adapter", str(adapter_dir), "--format", "vllm", "--output", str(output), *extra])


def test_clean_adapter_exports_and_the_copy_loads_in_peft(tmp_path):
    adapter_dir, peft_model = make_adapter(tmp_path)
    out = tmp_path / "served"
    done = export_vllm(adapter_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert done.tensors == 2 * 7 * 2 and done.check.problems == [] and done.check.warnings == []
    assert all(k.startswith("base_model.model.") for k in load_file(out / "adapter_model.safetensors"))

    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(base, out)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(got, expected)


def test_keys_from_other_tools_are_normalised(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    renamed = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    del config["target_modules"]  # vLLM requires the field: the copy fills it in
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "served"
    done = export_vllm(adapter_dir, out)
    assert set(load_file(out / "adapter_model.safetensors")) == set(tensors)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    assert any("target_modules" in w for w in done.check.warnings)


def test_dora_is_rejected_with_the_reason(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, use_dora=True)
    with pytest.raises(AdapterFileError, match="DoRA"):
        export_vllm(adapter_dir, tmp_path / "out")
    assert cli_export(adapter_dir, tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def test_rank_limits(tmp_path, capsys):
    adapter_dir, _ = make_adapter(tmp_path, r=32, lora_alpha=64)
    with pytest.raises(AdapterFileError, match="rank 32 is above --max-lora-rank 16"):
        export_vllm(adapter_dir, tmp_path / "a", max_lora_rank=16)
    assert cli_export(adapter_dir, tmp_path / "a", "--max-lora-rank", "16") == 2
    with pytest.raises(ConfigError, match="choose one of 1, 8, 16, 32"):
        export_vllm(adapter_dir, tmp_path / "a", max_lora_rank=24)
    # no flag: above vLLM's default of 16 is a warning that says what to pass
    capsys.readouterr()
    assert cli_export(adapter_dir, tmp_path / "b") == 0
    assert "warning: rank 32 is above vLLM's default --max-lora-rank 16" in capsys.readouterr().err
    assert export_vllm(adapter_dir, tmp_path / "c", max_lora_rank=64).check.warnings == []


def test_per_module_scaling_is_exported_with_a_warning_about_older_vllm(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, r=8, lora_alpha=16, rank_pattern={"v_proj": 4},
                                  alpha_pattern={"down_proj": 64})
    warnings = export_vllm(adapter_dir, tmp_path / "out").check.warnings
    assert len(warnings) == 1 and warnings[0].startswith("4 modules (model.layers.0.mlp.down_proj, ...) take their "
                                                         "own scaling from rank_pattern / alpha_pattern")
    plain, _ = make_adapter(tmp_path, name="plain", r=8, lora_alpha=16, rank_pattern={"v_proj": 8})
    assert export_vllm(plain, tmp_path / "plain-out").check.warnings == []  # a pattern that changes nothing


def test_rank_above_vllm_maximum_is_rejected(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, r=4, lora_alpha=8, rank_pattern={"down_proj": 600})
    with pytest.raises(AdapterFileError, match="rank 600 is above vLLM's largest --max-lora-rank"):
        export_vllm(adapter_dir, tmp_path / "out")


def test_embedding_and_lm_head_lora_need_the_flag(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj", "lm_head", "embed_tokens"])
    with pytest.raises(AdapterFileError, match="embed_tokens, lm_head.*--allow-embeddings"):
        export_vllm(adapter_dir, tmp_path / "out")
    assert cli_export(adapter_dir, tmp_path / "out") == 2
    done = export_vllm(adapter_dir, tmp_path / "out", allow_embeddings=True)
    keys = set(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert not any("base_layer" in k for k in keys)  # PEFT's copies of base weights are dropped
    assert done.modules == 2 * 1 + 2


def test_modules_to_save_are_rejected(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for flags in ((), ("--allow-embeddings",)):
        assert cli_export(adapter_dir, tmp_path / "out", *flags) == 2
    with pytest.raises(AdapterFileError, match=r"modules_to_save is \['lm_head'\]"):
        export_vllm(adapter_dir, tmp_path / "out", allow_embeddings=True)


def test_missing_lora_b_is_named(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match=f"model.layers.1.mlp.up_proj: has lora_A but {gone} is missing"):
        export_vllm(adapter_dir, tmp_path / "out")
    assert cli_export(adapter_dir, tmp_path / "out") == 2


def test_shape_and_dtype_problems_are_all_listed(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj", "v_proj"])
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] = torch.zeros(8, 64, dtype=torch.int8)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError) as info:
        export_vllm(adapter_dir, tmp_path / "out")
    message = str(info.value)
    assert "layers.0.self_attn.q_proj: lora_A is (8, 64) and lora_B is (64, 4)" in message
    assert "layers.1.self_attn.v_proj.lora_A.weight has dtype torch.int8" in message


def test_a_rank_0_pair_is_named_not_divided_by(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj", "v_proj"])
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(0, 64)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 0)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match="layers.0.self_attn.q_proj: lora_A and lora_B have rank 0"):
        export_vllm(adapter_dir, tmp_path / "out")  # a ZeroDivisionError in the scaling check before
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_names_the_lost_tensors(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path)
    path = adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(AdapterFileError, match="truncated.*cut off: base_model.model.model.layers.1"):
        read_for_export(adapter_dir)
    assert cli_export(adapter_dir, tmp_path / "out") == 2


def test_pickle_weights_need_allow_pickle(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle.*--allow-pickle"):
        export_vllm(adapter_dir, tmp_path / "out")
    assert cli_export(adapter_dir, tmp_path / "out") == 2
    assert cli_export(adapter_dir, tmp_path / "out", "--allow-pickle") == 0
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(tensors)


def test_gpt2_base_is_rejected_and_unknown_modules_are_named(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    gpt2_dir = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4).save_pretrained(gpt2_dir)
    with pytest.raises(AdapterFileError, match="GPT2LMHeadModel does not implement SupportsLoRA"):
        export_vllm(adapter_dir, tmp_path / "out", base_config_dir=gpt2_dir)
    for flag in ("--model", "--base-config", "--base"):  # one flag, as merge spells it, and its older spellings
        assert cli_export(adapter_dir, tmp_path / "out", flag, str(gpt2_dir)) == 2
        assert not (tmp_path / "out").exists()
    renamed = tmp_path / "gpt2-config.json"  # a config file of another name is read as it is
    renamed.write_bytes((gpt2_dir / "config.json").read_bytes())
    with pytest.raises(AdapterFileError, match="GPT2LMHeadModel does not implement SupportsLoRA"):
        export_vllm(adapter_dir, tmp_path / "out", base_config_dir=renamed)

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k.replace("q_proj", "rotary_proj"): v for k, v in load_file(path).items()}
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match="modules rotary_proj are not linear projections"):
        export_vllm(adapter_dir, tmp_path / "out")


def test_a_base_config_of_unknown_or_malformed_type(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(config | {"model_type": "madeup"}))
    warnings = export_vllm(adapter_dir, tmp_path / "out", base_config_dir=unknown).check.warnings
    assert warnings == ["the base config model type 'madeup' is not in lorakit's table: module names were "
                        "checked against the Llama-family projections"]  # it was given: no advice to give it
    for key, value, named in (("model_type", 5, "model_type is 5, not a name"),
                              ("architectures", "LlamaForCausalLM", "architectures is 'LlamaForCausalLM', not a list")):
        malformed = tmp_path / f"{key}.json"
        malformed.write_text(json.dumps(config | {key: value}))
        with pytest.raises(ConfigError, match=named):
            export_vllm(adapter_dir, tmp_path / f"out-{key}", base_config_dir=malformed)
        assert cli_export(adapter_dir, tmp_path / f"out-{key}", "--base-config", str(malformed)) == 2
        assert not (tmp_path / f"out-{key}").exists()


def test_output_folder_rules(tmp_path):
    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    with pytest.raises(OutputError, match="adapter folder itself"):
        export_vllm(adapter_dir, adapter_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert cli_export(adapter_dir, busy) == 2
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_export(adapter_dir, empty, "--json") == 0
    assert (empty / "adapter_config.json").is_file()
    assert json.loads((empty / "adapter_config.json").read_text())["modules_to_save"] is None
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OutputError, match="is a symbolic link; give the folder's own path"):
        export_vllm(adapter_dir, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "target").iterdir()) == []
    with pytest.raises(OutputError, match="the folder name is too long for the export's temp folder"):
        export_vllm(adapter_dir, tmp_path / ("e" * 240))


def test_a_killed_exports_temp_folder_is_removed_by_the_next_export(tmp_path):
    from lorakit.publish import _host

    adapter_dir, _ = make_adapter(tmp_path, target_modules=["q_proj"])
    never_a_pid = 4194304  # Linux's pids stay below pid_max, which is at most 2**22
    killed = tmp_path / f".tmp-out-{_host()}-{never_a_pid}-0123abcd"
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"cut off")
    export_vllm(adapter_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_split_key_roles():
    assert split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (
        "model.layers.0.self_attn.q_proj", "A", "linear")
    assert split_key("model.embed_tokens.lora_embedding_B.default") == ("model.embed_tokens", "B", "embedding")
    assert split_key("base_model.model.x.q_proj.lora_B.bias") == ("x.q_proj", "bias", "linear")
    assert split_key("base_model.model.x.q_proj.lora_magnitude_vector")[1] == "magnitude"
    assert split_key("base_model.model.lm_head.weight") == ("lm_head.weight", "other", "")
    assert split_key("base_model.model.model.embed_tokens.base_layer.weight")[1] == "base_copy"


def test_a_lora_ga_adapter_exports_with_a_warning_that_its_base_was_rewritten(tmp_path):
    # vLLM accepts it, and applies it to the original weights, as PEFT does: not what was trained
    adapter_dir, _ = make_adapter(tmp_path, r=8, lora_alpha=16)
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "init_lora_weights": "lora_ga"}))
    warnings = export_vllm(adapter_dir, tmp_path / "out").check.warnings
    assert len(warnings) == 1 and "trained on base weights LoRA-GA rewrote" in warnings[0]


@pytest.mark.parametrize("key, value", [("kasa_config", {"kasa": True}), ("trainable_token_indices", [1, 2]),
                                        ("target_parameters", ["mlp.experts.gate_up_proj"])])
def test_peft_variants_vllm_would_read_as_plain_lora_are_refused(tmp_path, key, value):
    adapter_dir, _ = make_adapter(tmp_path, r=8, lora_alpha=16)
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), key: value}))
    with pytest.raises(AdapterFileError, match=f"{key}=.*more than plain LoRA factors"):
        export_vllm(adapter_dir, tmp_path / "out")


def test_the_printed_serve_commands_name_files_that_hold_the_base(tmp_path):
    """For an adapter of the built-in model they named `BASE`, whose alias (smollm2-135m-instruct)
    neither vLLM nor llama.cpp resolves: now its converted folder and its GGUF file."""
    from argparse import Namespace

    from lorakit.cli.export import _served_base
    from lorakit.gguf_convert import converted_gguf_dir
    from lorakit.models import DEFAULT_MODEL, builtin_gguf_path

    for base, folder in ((DEFAULT_MODEL, "builtin"), ("org/base-model", "hub")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    builtin, hub = (Namespace(model=None, adapter=str(tmp_path / f)) for f in ("builtin", "hub"))
    assert _served_base(builtin, gguf=True) == str(builtin_gguf_path())
    assert _served_base(builtin, gguf=False) == str(converted_gguf_dir(builtin_gguf_path()))
    assert (_served_base(hub, gguf=False), _served_base(hub, gguf=True)) == ("org/base-model", "BASE.gguf")
