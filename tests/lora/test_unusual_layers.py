"""Layers that look linear and are not, or are linear and are not called: MoE routers (nn.Linear
subclasses returning tuples), gates narrower than the rank, and weights a model reads directly."""

import warnings

import pytest
import torch
import transformers
from torch import nn

from lorakit import LoraConfig, apply_lora
from lorakit.errors import ConfigError, LorakitWarning, TargetMatchError
from lorakit.lora.layer import LoraLinear
from lorakit.lora.model import describe_modules

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256)


def tiny(config_class: str, **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config)


def phimoe():
    return tiny("PhimoeConfig", num_local_experts=4)


def llama4():
    return tiny("Llama4TextConfig", num_local_experts=4, intermediate_size_mlp=128, head_dim=16)


def qwen2_moe():
    return tiny("Qwen2MoeConfig", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64)


def train_step(model) -> None:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("build, router", [(phimoe, "mlp.router"), (llama4, "feed_forward.router")])
def test_routers_that_return_tuples_are_not_adapted_by_all_linear(build, router):
    model = build()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    train_step(model)  # wrapping a router broke the forward: its (scores, experts) tuple cannot take an update
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert not any(name.endswith(router) for name in adapted)
    assert any(name.endswith("self_attn.q_proj") for name in adapted)
    assert all(m.lora_A.weight.grad is not None for m in model.modules() if isinstance(m, LoraLinear))


def test_a_router_named_as_a_target_is_refused_with_its_class():
    with pytest.raises(TargetMatchError, match="PhimoeTopKRouter, not a linear layer"):
        apply_lora(phimoe(), LoraConfig(r=4, alpha=8, target_modules=["router"]))


def test_a_linear_subclass_with_its_own_linear_forward_is_still_adapted():
    falcon = tiny("FalconConfig", num_kv_heads=4, new_decoder_architecture=False)
    kinds = {info.kind for info in describe_modules(falcon) if info.name.endswith(("query_key_value", "dense_h_to_4h"))}
    assert kinds == {"linear"}  # FalconLinear overrides forward, and computes x Wᵀ + b
    apply_lora(falcon, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert sum(isinstance(m, LoraLinear) for m in falcon.modules()) == 8


def test_probing_a_router_leaves_the_random_state_alone():
    model = phimoe()
    model.train()  # PhiMoE's router draws jitter noise in training mode
    before = torch.get_rng_state()
    describe_modules(model)
    assert torch.equal(before, torch.get_rng_state())


def test_all_linear_leaves_out_layers_narrower_than_the_rank_with_a_warning():
    model = qwen2_moe()
    with pytest.warns(LorakitWarning, match=r"all-linear leaves out 2 layers narrower than the rank "
                                             r"\(model.layers.0.mlp.shared_expert_gate, 64 -> 1, and the like\)"):
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert adapted and not any("shared_expert_gate" in name for name in adapted)
    train_step(model)


def test_all_linear_in_a_list_leaves_out_narrow_layers_too():
    with pytest.warns(LorakitWarning, match="all-linear leaves out 2 layers narrower than the rank"):
        apply_lora(qwen2_moe(), LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))


def test_a_narrow_layer_named_on_its_own_is_still_refused():
    with pytest.raises(ConfigError, match=r"shared_expert_gate \(64 -> 1\) cannot take rank 4"):
        apply_lora(qwen2_moe(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "shared_expert_gate"]))


class ReadsItsWeight(nn.Module):
    """Like Jamba's mamba mixer with dt_proj: multiplies by a layer's weight without calling it; and,
    like transformers' Falcon and GPT-Neo paths, reads another layer's dtype before calling it."""

    def __init__(self):
        super().__init__()
        self.read = nn.Linear(8, 8)
        self.called = nn.Linear(8, 8)

    def forward(self, x):
        return self.called(x.to(self.called.weight.dtype)) + x @ self.read.weight.T + self.read.bias


def test_a_weight_read_directly_is_the_base_weight_and_the_trainer_names_the_adapter_left_idle():
    from lorakit.train.loop import _say_which_adapters_got_no_gradient

    torch.manual_seed(0)
    model = ReadsItsWeight()
    x = torch.randn(3, 8)
    expected = model(x)
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["read", "called"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading a weight (a dtype, a product) is no cause for a warning
        torch.testing.assert_close(model(x), expected)  # B starts at zero: the base model's output
        model(x).sum().backward()
    with pytest.warns(LorakitWarning, match=r"1 adapted layer got no gradient in the first step \(read\).*--exclude"):
        _say_which_adapters_got_no_gradient(model)  # "called" got one: it is not named


def test_exclude_leaves_a_layer_out():
    model = ReadsItsWeight()
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules="all-linear", exclude_modules="read"))
    assert isinstance(model.called, LoraLinear) and isinstance(model.read, nn.Linear)


def test_all_linear_with_a_rank_above_every_layer_is_refused():
    from tiny_models import tiny_llama

    with pytest.raises(ConfigError, match="every linear layer of this model is narrower than rank 200; lower r"):
        apply_lora(tiny_llama(), LoraConfig(r=200, alpha=400, target_modules="all-linear"))
