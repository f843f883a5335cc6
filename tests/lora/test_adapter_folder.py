"""The shared adapter-folder reader: files, config, weights, metadata, grouping, and the same
message from every command that reads an adapter (load, analyze, export)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, apply_lora, load_adapter, save_adapter
from lorakit.errors import AdapterFileError, AdapterMismatchError
from lorakit.export.vllm import export_vllm
from lorakit.lora import base_fingerprint, lora_layers
from lorakit.lora.adapter_folder import (
    adapter_from_memory,
    parameter_name,
    read_adapter_config,
    read_adapter_folder,
    split_key,
    tensor_problems,
)
from lorakit.plan.analyze import analyze_adapter

from tiny_models import randomize_lora, tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
PREFIX = "base_model.model."


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def saved(tmp_path):
    """A lorakit adapter (q_proj, v_proj, r=4) with non-zero factors, and the model it came from."""
    model = randomize_lora(apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])))
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a", model


def edit_config(folder, **fields):
    """Rewrite the adapter's adapter_config.json with these fields changed."""
    import json

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def rewrite_weights(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def every_reader_message(folder, tmp_path) -> list[str]:
    """The AdapterFileError each command raises on ``folder``."""
    messages = []
    for read in (lambda: load_adapter(tiny_llama(), folder), lambda: analyze_adapter(folder),
                 lambda: export_vllm(folder, tmp_path / "served")):
        with pytest.raises(AdapterFileError) as info:
            read()
        messages.append(str(info.value))
    return messages


# ---- files and config ------------------------------------------------------------------------------

def test_missing_folder_config_and_weights(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(AdapterFileError, match="no adapter folder at .*pass the folder that holds adapter_config.json"):
        read_adapter_folder(tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="no adapter folder at"):  # eval and generate read the config first:
        read_adapter_config(tmp_path / "nope")  # it said "nope/adapter_config.json is missing"
    (folder / "adapter_model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(AdapterFileError, match=r"has no adapter_model.safetensors; the adapter's weights are missing "
                                               r"\(the folder holds: adapter_config.json\)"):
        read_adapter_folder(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        read_adapter_folder(folder)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"adapter_config.json is not valid JSON \(.*line 1 column 2.*\); restore it from the original"),
    ("[1, 2]", "adapter_config.json must hold a JSON object, not list"),
    ('{"peft_type": "IA3"}', "describes a IA3 adapter; lorakit reads LoRA adapters only"),
    ('{"r": "8"}', "r must be a positive integer, got '8'"),
    ('{"r": 4, "lora_alpha": 0}', "lora_alpha must be a number above 0 that fits in float32 .*, got 0"),
    ('{"r": 4, "lora_alpha": 1e300}', "lora_alpha must be a number above 0 that fits in float32 .*, got 1e\\+300"),
    ('{"r": 4, "alpha_pattern": {"q_proj": 1e300}}', "alpha_pattern must map module patterns to numbers above 0 "
                                                     "that fit in float32"),
    ("[" * 100000 + "]" * 100000, "adapter_config.json is nested too deeply to be an adapter config"),
    ('{"r": 4, "rank_pattern": {"q_proj": 2.5}}', "rank_pattern must map module patterns to positive integers"),
    ('{"r": 4, "alpha_pattern": {"(q_proj": 2}}', "alpha_pattern key '\\(q_proj' is not a valid regular expression"),
])
def test_bad_config_is_named_with_its_fix(saved, text, message):
    folder, _ = saved
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFileError, match=message):
        read_adapter_folder(folder)


def test_pickle_weights_need_allow_pickle_and_then_read_the_same(saved):
    folder, _ = saved
    from_safetensors = read_adapter_folder(folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="is a pickle file.*pass --allow-pickle"):
        read_adapter_folder(folder)
    from_pickle = read_adapter_folder(folder, allow_pickle=True)
    assert from_pickle.weights_file.name == "adapter_model.bin" and from_pickle.metadata == {}
    assert sorted(from_pickle.pairs) == sorted(from_safetensors.pairs)
    for module, pair in from_pickle.pairs.items():
        assert torch.equal(pair.A, from_safetensors.pairs[module].A)
        assert torch.equal(pair.B, from_safetensors.pairs[module].B)


def test_lorakit_metadata_is_read(saved):
    folder, model = saved
    adapter = read_adapter_folder(folder)
    assert adapter.base_fingerprint == base_fingerprint(tiny_llama())
    assert adapter.metadata["lorakit_version"]


# ---- PEFT's files ----------------------------------------------------------------------------------

def test_peft_saved_adapter_groups_per_module(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], use_dora=True,
                             use_rslora=True, rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"])
    peft_model = randomize_lora(peft.get_peft_model(tiny_llama(), config))
    peft_model.save_pretrained(tmp_path / "a")
    adapter = read_adapter_folder(tmp_path / "a")

    peft_layers = {name.removeprefix(PREFIX): m for name, m in peft_model.named_modules() if hasattr(m, "lora_A")
                   and "default" in getattr(m, "lora_A", {})}
    assert sorted(adapter.pairs) == sorted(peft_layers) and len(peft_layers) == 4
    for module, layer in peft_layers.items():
        pair = adapter.pairs[module]
        assert torch.equal(pair.A, layer.lora_A["default"].weight.detach())
        assert torch.equal(pair.B, layer.lora_B["default"].weight.detach())
        assert adapter.scaling(module) == pytest.approx(layer.scaling["default"])
    assert len(adapter.magnitudes) == 4  # DoRA: one magnitude vector per module
    assert any("lm_head" in key for key in adapter.other_keys)
    assert tensor_problems(adapter) == []


def test_adapter_name_infix_keys_load_like_plain_ones(saved, tmp_path):
    folder, model = saved
    expected = logits(model)
    rewrite_weights(folder, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    assert all(".default." in k for k in load_file(folder / "adapter_model.safetensors"))
    assert split_key(f"{PREFIX}m.q_proj.lora_A.default.weight") == ("m.q_proj", "A", "linear")
    assert parameter_name(f"{PREFIX}m.q_proj.lora_A.default.weight") == "m.q_proj.lora_A.weight"
    assert (logits(load_adapter(tiny_llama(), folder)) - expected).abs().max() == 0


# ---- tensor problems -------------------------------------------------------------------------------

def test_every_tensor_problem_is_listed(saved):
    folder, _ = saved
    keys = sorted(load_file(folder / "adapter_model.safetensors"))

    def damage(tensors):
        del tensors[keys[0]]  # layer 0 q_proj lora_A
        tensors[keys[2]] = tensors[keys[2]].to(torch.int32)  # layer 0 v_proj lora_A
        tensors[keys[5]] = torch.full_like(tensors[keys[5]], float("inf"))  # layer 1 q_proj lora_B
        tensors[keys[7]] = tensors[keys[7]][:, :3].contiguous()  # layer 1 v_proj lora_B: rank 3 against A's 4

    rewrite_weights(folder, damage)
    problems = tensor_problems(read_adapter_folder(folder, check_tensors=False))
    assert problems == [
        f"model.layers.0.self_attn.q_proj: has lora_B but {keys[0]} is missing; the adapter is incomplete",
        f"{keys[2]} has dtype torch.int32; LoRA factors must be floating point",
        f"{keys[5]} holds NaN or inf values; the adapter is damaged (a diverged run?): train it again or use an "
        "earlier checkpoint",
        "model.layers.1.self_attn.v_proj: lora_A is (4, 64) and lora_B is (32, 3); they do not multiply "
        "(A is (r, in), B is (out, r))",
    ]
    with pytest.raises(AdapterFileError, match="4 problems with the adapter's tensors:\n  - model.layers.0"):
        read_adapter_folder(folder)


def test_two_tensors_for_one_factor_are_refused(saved):
    folder, _ = saved
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_weights(folder, lambda t: t.update({key.replace(".weight", ".other.weight"): t[key].clone()}))
    with pytest.raises(AdapterFileError, match="two tensors give lora_A of model.layers.0.self_attn.q_proj"):
        read_adapter_folder(folder)


def test_in_memory_adapters_get_the_same_checks(saved):
    folder, _ = saved
    adapter = read_adapter_folder(folder)
    tensors = adapter.parameter_tensors()
    tensors.pop("model.layers.1.self_attn.v_proj.lora_B.weight")
    with pytest.raises(AdapterFileError, match="<memory>: model.layers.1.self_attn.v_proj: has lora_A but "
                                               r"base_model\.model\..*lora_B\.weight is missing"):
        adapter_from_memory(adapter.config, tensors)


def test_embedding_lora_is_refused_before_the_model_changes(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "a")
    model = tiny_llama()
    with pytest.raises(AdapterMismatchError, match=r"adapts embeddings \(model.embed_tokens\).*load this adapter with PEFT"):
        load_adapter(model, tmp_path / "a")
    assert not list(lora_layers(model))
    assert "model.embed_tokens" in read_adapter_folder(tmp_path / "a").pairs  # analyze / export still read it


# ---- one message from every command ----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing-tensor", "nan", "truncated"])
def test_load_analyze_and_export_name_the_same_problem(saved, tmp_path, damage):
    folder, _ = saved
    weights = folder / "adapter_model.safetensors"
    first = sorted(load_file(weights))[0]
    if damage == "missing-tensor":
        rewrite_weights(folder, lambda t: t.pop(first))
        expected = f"has lora_B but {first} is missing; the adapter is incomplete"
    elif damage == "nan":
        rewrite_weights(folder, lambda t: t[first].fill_(float("nan")))
        expected = f"{first} holds NaN or inf values; the adapter is damaged"
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
        expected = ("is truncated (", "), so it is not a valid safetensors file: these tensors are cut off: "
                    f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight; re-copy or re-save the adapter")
    for message in every_reader_message(folder, tmp_path):
        assert all(part in message for part in ((expected,) if isinstance(expected, str) else expected)), message


def test_a_rank_the_config_contradicts_is_refused_on_load_and_warned_by_analyze(saved, tmp_path):
    folder, _ = saved
    edit_config(folder, r=8)  # the tensors have rank 4
    expected = "tensors have rank 4 but adapter_config gives r=8"
    with pytest.raises(AdapterFileError, match=expected):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterFileError, match=expected):
        export_vllm(folder, tmp_path / "served")
    assert any("rank other than the config's r" in w for w in analyze_adapter(folder).warnings)


def test_an_unsupported_option_is_named_before_the_ranks_it_changes(saved):
    from lorakit.adapters import AdapterSet

    folder, _ = saved
    # PEFT's target_parameters saves rank r per expert: the tensors' rank is not the config's r
    edit_config(folder, r=2, target_parameters=["experts.weight"])
    with pytest.raises(AdapterFileError, match="target_parameters=.* is not supported by lorakit"):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterFileError, match="target_parameters=.* is not supported by lorakit"):
        AdapterSet(tiny_llama()).add(folder)


@pytest.mark.parametrize("fields, covered", [
    ({"target_modules": ["q_proj", "v_proj"]}, True),
    ({"target_modules": r".*\.(q|v)_proj"}, True),
    ({"target_modules": None}, True),
    ({"target_modules": "all-linear"}, True),
    ({"target_modules": ["zzz"]}, False),
    ({"target_modules": ["q_proj"]}, False),  # PEFT loads this adapter without v_proj, and says nothing
    ({"target_modules": "q_proj|v_proj"}, False),  # a string is a full-match regex in PEFT: no module is named that
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]}, False),
])
def test_tensors_of_modules_the_config_does_not_target_are_refused_as_peft_would_skip_them(saved, tmp_path, fields,
                                                                                           covered):
    folder, _ = saved
    edit_config(folder, **fields)
    if covered:
        load_adapter(tiny_llama(), folder)
        assert not any("target_modules does not name" in w for w in analyze_adapter(folder).warnings)
        return
    expected = "does not cover .* modules the tensors adapt .*so PEFT would ignore their tensors"
    with pytest.raises(AdapterFileError, match=expected):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(AdapterFileError, match=expected):
        export_vllm(folder, tmp_path / "served")
    assert any("target_modules does not name" in w for w in analyze_adapter(folder).warnings)


def test_all_linear_in_a_config_leaves_the_output_layer_out_as_peft_does(tmp_path):
    """PEFT's "all-linear" targets every linear layer but the output layer: lm_head factors under it
    would be skipped (merge gave other logits than PEFT)."""
    model = randomize_lora(apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    save_file({**load_file(weights), "base_model.model.lm_head.lora_A.weight": torch.randn(4, hidden),
               "base_model.model.lm_head.lora_B.weight": torch.randn(vocab, 4)}, weights)  # as PEFT saves it
    edit_config(tmp_path / "a", target_modules="all-linear")
    with pytest.raises(AdapterFileError, match=r"does not cover 1 modules the tensors adapt \(e.g. lm_head\)"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_an_invalid_target_regex_is_named(saved):
    folder, _ = saved
    edit_config(folder, target_modules="(q_proj")
    with pytest.raises(AdapterFileError, match=r"target_modules '\(q_proj' is not a valid regular expression"):
        read_adapter_folder(folder)


def test_rank_0_tensors_are_named_as_damage(saved):
    folder, _ = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in tensors:
        tensors[key] = tensors[key][:0] if "lora_A" in key else tensors[key][:, :0]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="have rank 0; the adapter is damaged"):
        read_adapter_folder(folder)
