import pytest

from lorakit.errors import TargetMatchError
from lorakit.lora.model import describe_modules, output_head_name
from lorakit.lora.targets import ModuleInfo, select_targets

from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

LLAMA = [ModuleInfo(f"model.layers.{i}.{p}", "linear", 8, 8) for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + [
    ModuleInfo("model.embed_tokens", "Embedding"), ModuleInfo("lm_head", "linear", 8, 100)]


def test_suffix_matches_every_layer():
    assert select_targets(LLAMA, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_exact_name_and_regex():
    assert select_targets(LLAMA, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert select_targets(LLAMA, r".*\.1\.self_attn\.[qv]_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_excludes_head():
    names = select_targets(LLAMA, "all-linear", output_head="lm_head")
    assert len(names) == 14 and "lm_head" not in names


def test_presets_per_architecture():
    assert len(select_targets(LLAMA, "all", model_type="llama")) == 14
    assert {n.rsplit(".", 1)[1] for n in select_targets(LLAMA, "qv", model_type="llama")} == {"q_proj", "v_proj"}
    assert len(select_targets(LLAMA, "mlp", model_type="mistral")) == 6


def test_comma_list_and_exclude():
    names = select_targets(LLAMA, "q_proj,v_proj", exclude=["model.layers.0.self_attn.q_proj"])
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_groups_inside_a_list_are_groups():
    assert select_targets(LLAMA, "attention,mlp", model_type="llama") == select_targets(LLAMA, "all", model_type="llama")
    assert select_targets(LLAMA, ["qv", "down_proj"], model_type="llama") == [
        n for n in select_targets(LLAMA, "all", model_type="llama") if n.endswith(("q_proj", "v_proj", "down_proj"))]


def test_a_model_without_linear_layers_is_named_as_such():
    with pytest.raises(TargetMatchError, match="this model has no linear layer to adapt"):
        select_targets([ModuleInfo("lm_head", "linear", 8, 100)], "all", model_type="llama", output_head="lm_head")


def test_the_output_head_is_named_as_such():
    with pytest.raises(TargetMatchError, match="is the output head"):
        select_targets(LLAMA, "lm_head", output_head="lm_head")


def test_a_regex_that_also_matches_the_output_head_says_it_is_left_out():
    with pytest.warns(UserWarning, match=r"also matches the output head \(lm_head\), which lorakit leaves out"):
        names = select_targets(LLAMA, r".*(q_proj|lm_head)", output_head="lm_head")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_regex_with_a_comma_is_not_split_into_names():
    assert select_targets(LLAMA, r"model\.layers\.\d{1,2}\.self_attn\.q_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select_targets(LLAMA, "q_proj, ") == select_targets(LLAMA, ["q_proj"])


def test_exclude_takes_the_architecture_presets_too():
    names = select_targets(LLAMA, "all-linear", exclude="mlp", model_type="llama", output_head="lm_head")
    assert names == select_targets(LLAMA, "attention", model_type="llama")


def test_partial_typo_is_an_error_with_suggestion():
    with pytest.raises(TargetMatchError) as err:
        select_targets(LLAMA, ["q_proj", "v_porj"])
    message = str(err.value)
    assert "v_porj" in message and "did you mean 'v_proj'" in message.lower() and "gate_proj" in message


def test_non_linear_target_is_named():
    with pytest.raises(TargetMatchError, match="Embedding"):
        select_targets(LLAMA, ["embed_tokens"])


def test_unknown_arch_preset():
    with pytest.raises(TargetMatchError, match="not in the table"):
        select_targets(LLAMA, "attention", model_type="mystery")


@pytest.mark.parametrize("factory,arch_count", [(tiny_llama, 14), (tiny_gpt2, 8), (tiny_bert, 12)])
def test_real_models_all_linear_and_all_preset(factory, arch_count):
    model = factory()
    infos = describe_modules(model)
    head = output_head_name(model)
    all_linear = select_targets(infos, "all-linear", output_head=head)
    assert len(all_linear) == arch_count
    assert all(".pooler." not in n and "classifier" not in n for n in all_linear)
    preset = select_targets(infos, "all", model_type=model.config.model_type, output_head=head)
    assert preset == all_linear  # the guide's seven projections are every block linear here


def test_bert_output_dense_is_not_confused():
    names = select_targets(describe_modules(tiny_bert()), "mlp", model_type="bert")
    assert not any("attention" in n for n in names) and len(names) == 4
