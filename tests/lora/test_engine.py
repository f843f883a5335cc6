import pytest
import torch

from lorakit import LoraConfig, apply_lora, disable_adapters, lora_report, merge_lora, trainable_parameters, unmerge_lora
from lorakit.errors import ConfigError, MergeError
from lorakit.lora.layer import LoraLinear

from tiny_models import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        LoraConfig(r=0, alpha=-1, dropout=1.5, scaling="big", init="zeros", use_dora="no")
    message = str(err.value)
    for word in ("r must", "alpha must", "dropout must", "scaling must", "init must", "use_dora must be True or False"):
        assert word in message


def test_zero_b_gives_base_output(llama):
    reference = logits(llama)
    apply_lora(llama, LoraConfig(r=4, alpha=8))
    assert torch.equal(logits(llama), reference)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
def test_merge_unmerge_parity(factory):
    model = factory()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    adapted = logits(model)
    merge_lora(model)
    assert torch.allclose(logits(model), adapted, atol=1e-5)
    merge_lora(model)  # twice is a no-op
    assert torch.allclose(logits(model), adapted, atol=1e-5)
    unmerge_lora(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key, value in base.items():
        assert torch.allclose(restored[key], value, atol=1e-6), key


def test_dora_merge_parity(llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8, use_dora=True))
    randomize_lora(llama)
    adapted = logits(llama)
    merge_lora(llama)
    assert torch.allclose(logits(llama), adapted, atol=1e-5)
    unmerge_lora(llama)
    assert torch.allclose(logits(llama), adapted, atol=1e-5)


def test_bf16_merge_within_tolerance():
    model = tiny_llama().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32  # fp32 masters
    adapted = logits(model).float()
    merge_lora(model)
    # merged in fp32 and cast once: differences come from bf16 rounding of W alone
    assert (logits(model).float() - adapted).abs().max() < 0.05


def test_fp16_forward_runs():
    model = tiny_llama().to(torch.float16)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    out = logits(model)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_training_a_merged_model_warns_with_the_fix(llama):
    import warnings

    merge_lora(randomize_lora(apply_lora(llama, LoraConfig(r=4, alpha=8))))
    with torch.no_grad():  # inference on a merged model is what merging is for: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            llama(IDS)
    llama.eval()  # eval mode with gradients on (an attribution, a saliency map): no warning either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama(IDS)
    llama.train()
    with pytest.warns(UserWarning, match=r"merged into the base weights .* call unmerge_lora\(model\) before training"):
        llama(IDS)
    unmerge_lora(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama(IDS, labels=IDS).loss.backward()
    assert llama.model.layers[0].self_attn.q_proj.lora_B.weight.grad is not None


def test_nan_adapter_refuses_to_merge(llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.lora_B.weight[0, 0] = float("nan")
    before = llama.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(MergeError, match="NaN"):
        merge_lora(llama)
    assert torch.equal(llama.model.layers[0].self_attn.q_proj.base_layer.weight, before)  # nothing half merged


def test_only_adapters_change_after_a_step(llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(llama)], lr=1e-2)
    llama.train()
    llama(IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)


def test_trainable_report_and_modules_to_save():
    model = tiny_bert()
    apply_lora(model, LoraConfig(r=4, alpha=8, modules_to_save=["classifier"]))
    names = [n for n, _ in trainable_parameters(model)]
    assert "classifier.weight" in names and all(".lora_" in n or n.startswith("classifier") for n in names)
    report = lora_report(model)
    assert report.adapted_modules == 12
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def test_disable_adapters_gives_base(llama):
    reference = logits(llama)
    apply_lora(llama, LoraConfig(r=4, alpha=8))
    randomize_lora(llama)
    with disable_adapters(llama):
        assert torch.equal(logits(llama), reference)
    assert not torch.allclose(logits(llama), reference)


@pytest.mark.parametrize("factory,dora", [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, False),
                                         (tiny_gpt2, True)])
def test_disable_adapters_gives_base_when_merged(factory, dora):
    # a merged layer used to return the merged (adapted) output when disabled
    model = factory()
    reference = logits(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, use_dora=dora))
    randomize_lora(model)
    adapted = logits(model)
    merge_lora(model)
    with disable_adapters(model):
        assert torch.allclose(logits(model), reference, atol=1e-5)
    assert torch.allclose(logits(model), adapted, atol=1e-5)  # the weights were left as they were


def test_pissa_disabled_and_removed_give_the_original_model(llama):
    # PiSSA moves W's principal part into the adapter: the base layer alone is a residual
    from lorakit import remove_lora

    reference, weight = logits(llama), llama.model.layers[0].mlp.up_proj.weight.clone()
    apply_lora(llama, LoraConfig(r=4, alpha=8, init="pissa"))
    randomize_lora(llama)
    with disable_adapters(llama):
        assert torch.allclose(logits(llama), reference, atol=1e-5)
    merge_lora(llama)
    with disable_adapters(llama):
        assert torch.allclose(logits(llama), reference, atol=1e-5)
    remove_lora(llama, merge=False)
    assert torch.allclose(llama.model.layers[0].mlp.up_proj.weight, weight, atol=1e-5)
    assert torch.allclose(logits(llama), reference, atol=1e-5)


def test_scaling_standard_and_rslora(llama):
    apply_lora(llama, LoraConfig(r=16, alpha=32, scaling="rslora", rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 8}))
    layer = llama.model.layers[0].self_attn
    assert layer.k_proj.scaling == pytest.approx(32 / 4)
    assert layer.q_proj.r == 4 and layer.q_proj.scaling == pytest.approx(32 / 2)
    assert layer.v_proj.scaling == pytest.approx(8 / 4)


def test_rank_above_layer_size_names_the_layer():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"k_proj \(64 -> 32\) cannot take rank 48"):
        apply_lora(model, LoraConfig(r=48, alpha=96, target_modules="all"))  # all-linear would leave k, v out


def test_pissa_starts_at_base_output(llama):
    reference = logits(llama)
    apply_lora(llama, LoraConfig(r=4, alpha=8, init="pissa"))
    assert torch.allclose(logits(llama), reference, atol=1e-4)
    layer: LoraLinear = llama.model.layers[0].mlp.up_proj
    assert layer.lora_B.weight.abs().sum() > 0  # principal directions, not zeros


def test_gaussian_init_and_dropout(llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8, init="gaussian", dropout=0.1))
    layer = llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout, torch.nn.Dropout)
    assert layer.lora_A.weight.std().item() == pytest.approx(0.25, rel=0.2)


def test_a_compiled_model_is_adapted_saved_and_loaded_as_its_module(tmp_path):
    from safetensors.torch import load_file

    from lorakit import load_adapter, save_adapter
    from lorakit.lora import base_fingerprint

    model = tiny_llama()
    compiled = torch.compile(model)  # lazy: nothing compiles until a forward
    assert base_fingerprint(compiled) == base_fingerprint(model)
    assert apply_lora(compiled, LoraConfig(r=4)) is compiled
    save_adapter(compiled, tmp_path / "a")
    assert not any("_orig_mod" in key for key in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    load_adapter(tiny_llama(), tmp_path / "a")  # the plain base takes it: same names, same fingerprint
    assert any(isinstance(m, LoraLinear) for m in load_adapter(torch.compile(tiny_llama()), tmp_path / "a").modules())


def test_loading_onto_a_model_with_adapters_is_refused_before_it_changes(tmp_path):
    from lorakit import load_adapter, save_adapter

    model = apply_lora(tiny_llama(), LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        load_adapter(model, tmp_path / "a")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_a_model_on_the_meta_device_cannot_be_saved_or_merged(tmp_path):
    from lorakit import save_adapter

    with torch.device("meta"):
        model = tiny_llama()
    apply_lora(model, LoraConfig(r=4))
    for act in (lambda: save_adapter(model, tmp_path / "a"), lambda: merge_lora(model)):
        with pytest.raises(ConfigError, match="on the meta device"):
            act()
    assert not (tmp_path / "a").exists()


def test_a_pattern_or_exclusion_that_matches_nothing_is_refused():
    from lorakit.errors import TargetMatchError

    with pytest.raises(ConfigError, match=r"rank_pattern\['nomatch_proj'\] matches none of the"):
        apply_lora(tiny_llama(), LoraConfig(r=4, rank_pattern={"nomatch_proj": 2}))
    with pytest.raises(ConfigError, match=r"alpha_pattern\['up_proj'\] matches none"):
        apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], alpha_pattern={"up_proj": 2}))
    with pytest.raises(TargetMatchError, match="exclude_modules: target 'zzz' matches no linear layer"):
        apply_lora(tiny_llama(), LoraConfig(r=4, exclude_modules=["zzz"]))
    model = apply_lora(tiny_llama(), LoraConfig(r=4, rank_pattern={"q_proj": 2}, exclude_modules=["v_proj"]))
    assert model.model.layers[0].self_attn.q_proj.r == 2 and not isinstance(model.model.layers[0].self_attn.v_proj,
                                                                            LoraLinear)
