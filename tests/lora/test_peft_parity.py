"""lorakit adapters load in PEFT, and PEFT adapters load in lorakit, with the same logits."""

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from lorakit import LoraConfig, apply_lora, load_adapter, save_adapter
from lorakit.errors import AdapterFileError, AdapterMismatchError, ConfigError

from tiny_models import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
VARIANTS = {
    "plain": dict(),
    "rslora": dict(scaling="rslora"),
    "dora": dict(use_dora=True),
}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", FACTORIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lorakit_adapter_loads_in_peft(tmp_path, arch, variant):
    model = FACTORIES[arch]()
    apply_lora(model, LoraConfig(r=4, alpha=12, **VARIANTS[variant]))
    randomize_lora(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "adapter").eval()
    assert (logits(peft_model) - expected).abs().max() <= 1e-5
    assert (logits(FACTORIES[arch]()) - expected).abs().max() > 1e-4  # the adapter matters: the check can fail


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_bf16_model_answers_with_a_lorakit_adapter_as_with_peft_bit_for_bit(tmp_path, arch):
    """Inference adds the update as PEFT does (fp32 masters, fp32 sum, one rounding): the same
    logits to the bit, where the training forward's bf16 update differs in the last bits."""
    model = FACTORIES[arch]().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, alpha=12))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(FACTORIES[arch]().to(torch.bfloat16), tmp_path / "adapter").eval()
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    expected = logits(peft_model)
    assert torch.equal(logits(model.eval()), expected)
    with torch.enable_grad():  # the training forward: bf16 products
        assert not torch.equal(model(IDS).logits.detach(), expected)


def peft_config(variant: str, **extra):
    options = VARIANTS[variant]
    return peft.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", init_lora_weights=True,
                           use_rslora=options.get("scaling") == "rslora", use_dora=options.get("use_dora", False), **extra)


@pytest.mark.parametrize("arch", FACTORIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_lorakit(tmp_path, arch, variant):
    peft_model = peft.get_peft_model(FACTORIES[arch](), peft_config(variant))
    randomize_lora(peft_model)
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_adapter(FACTORIES[arch](), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5


def test_peft_rank_pattern_adapter(tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})
    peft_model = randomize_lora(peft.get_peft_model(tiny_llama(), config)).eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert model.model.layers[0].self_attn.v_proj.r == 2
    assert (logits(model) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("r,scaling", [(4, "standard"), (4, "rslora"), (1, "rslora")])  # r=1: alpha/sqrt(r) == alpha/r
def test_pissa_adapter_is_portable(tmp_path, r, scaling):
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=r, alpha=8, init="pissa", scaling=scaling))
    randomize_lora(model, std=0.01)
    with torch.no_grad():  # PiSSA's factors start large; nudge them rather than replace
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert (logits(peft_model) - expected).abs().max() <= 1e-4
    assert (logits(load_adapter(tiny_llama(), tmp_path / "adapter")) - expected).abs().max() <= 1e-4


def test_peft_pissa_adapter_loads_on_the_residual_base_it_needs(tmp_path):
    # PEFT rebuilds W - s B0 A0 when it loads an adapter saved with init_lora_weights="pissa";
    # lorakit added the factors to the original W (off by more than the adapter's whole effect)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights="pissa")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    expected = logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(tiny_llama(), tmp_path / "peft")
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert (logits(tiny_llama()) - expected).abs().max() > 1e-3
    save_adapter(model, tmp_path / "again")  # lorakit saves it as a plain rank-2r LoRA against W
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] is True
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    assert (logits(again) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("init", ["olora", "pissa_niter_4", "loftq", "corda"])
def test_peft_inits_that_rewrite_the_base_differently_are_refused(tmp_path, llama, init):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(AdapterFileError, match=f"init_lora_weights='{init}' rewrites the base weights"):
        load_adapter(llama, tmp_path)


def _saved_peft_adapter(base, config, folder, shift: float) -> torch.Tensor:
    """A PEFT adapter with random LoRA factors and its fully trained copies moved by `shift`, saved
    to `folder`; the logits PEFT computes with it."""
    peft_model = randomize_lora(peft.get_peft_model(base, config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(shift)
    peft_model.save_pretrained(folder)
    return logits(peft_model.eval())


def test_peft_seq_cls_adapter_loads_though_it_names_a_head_the_model_lacks(tmp_path):
    # PEFT's SEQ_CLS adapters list modules_to_save ["classifier", "score"]; BERT has no "score"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    expected = _saved_peft_adapter(tiny_bert(), config, tmp_path / "adapter", shift=0.05)
    model = load_adapter(tiny_bert(), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5


def test_a_tied_lm_head_is_never_trained_in_place_and_its_lora_merges_untied(tmp_path):
    from transformers import LlamaForCausalLM

    from lorakit import remove_lora
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="tied to model.embed_tokens.weight"):
        apply_lora(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    peft_model = randomize_lora(peft.get_peft_model(tiny_llama(tie_word_embeddings=True), config)).eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")  # with lm_head.base_layer.weight, the tied embedding
    model = load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5
    remove_lora(model)  # merging into the shared weight changed the input embedding too
    assert (logits(model) - expected).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded) - expected).abs().max() <= 1e-5


def test_a_peft_adapter_that_saved_a_tied_lm_head_in_full_loads_as_peft_runs_it(tmp_path):
    """PEFT trains a copy of a modules_to_save module; on a tied base that copy is the head alone.
    Loading it must give the head its own weight, not refuse (as training it in place is refused)."""
    from lorakit import disable_adapters
    from lorakit.adapters import AdapterSet

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = peft.get_peft_model(tiny_llama(tie_word_embeddings=True), config)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft_model = randomize_lora(peft_model).eval()
    expected, base = logits(peft_model), logits(tiny_llama(tie_word_embeddings=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama(tie_word_embeddings=True).model.embed_tokens.weight)
    with disable_adapters(model):
        assert (logits(model) - base).abs().max() <= 1e-6
    # the untied head is still the same base: re-saving and switching keep matching it
    save_adapter(model, tmp_path / "again")
    assert (logits(load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "again")) - expected).abs().max() <= 1e-5
    plain = randomize_lora(apply_lora(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, alpha=8)))
    save_adapter(plain, tmp_path / "plain")
    adapters = AdapterSet(tiny_llama(tie_word_embeddings=True))
    adapters.add(tmp_path / "adapter", "head")
    adapters.add(tmp_path / "plain", "plain")
    adapters.activate("head")
    assert (logits(adapters.activate("plain")) - logits(plain)).abs().max() <= 1e-6
    # merged, it is a new base (its head untied): its fingerprint is the one it has when saved and reloaded
    from transformers import LlamaForCausalLM

    from lorakit import remove_lora
    from lorakit.lora import base_fingerprint

    merged = remove_lora(load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "adapter"))
    merged.save_pretrained(tmp_path / "merged")
    assert base_fingerprint(merged) == base_fingerprint(LlamaForCausalLM.from_pretrained(tmp_path / "merged"))


def test_tensors_an_adapter_overwrites_in_full_come_back_when_it_is_disabled_or_removed(tmp_path):
    # PEFT's bias="all" trains every bias; lorakit loads them into the base model's own biases,
    # and disabling, switching or removing the adapter used to keep them (re-saving dropped them)
    from lorakit import disable_adapters, remove_lora
    from lorakit.adapters import AdapterSet

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    peft_model = peft.get_peft_model(tiny_gpt2(), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    expected, base = logits(peft_model.eval()), logits(tiny_gpt2())
    peft_model.save_pretrained(tmp_path / "biased")
    plain = randomize_lora(apply_lora(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])))
    plain_logits = logits(plain)
    save_adapter(plain, tmp_path / "plain")

    model = load_adapter(tiny_gpt2(), tmp_path / "biased")
    assert (logits(model) - expected).abs().max() <= 1e-5
    with disable_adapters(model):
        assert torch.equal(logits(model), base)
    assert (logits(model) - expected).abs().max() <= 1e-5
    save_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == "all"
    again = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "again").eval()
    assert (logits(again) - expected).abs().max() <= 1e-5
    assert torch.equal(logits(remove_lora(model, merge=False)), base)

    adapters = AdapterSet(tiny_gpt2())
    adapters.add(tmp_path / "biased", "biased")
    adapters.add(tmp_path / "plain", "plain")
    adapters.activate("biased")
    assert (logits(adapters.activate("plain")) - plain_logits).abs().max() <= 1e-6
    assert torch.equal(logits(adapters.deactivate()), base)


def test_an_adapter_holding_a_tied_tensor_under_both_names_comes_off_cleanly(tmp_path):
    # PEFT's save_embedding_layers writes the tied embedding as embed_tokens and lm_head: the
    # original must be kept before either name is loaded, and swapped back under both names
    from safetensors.torch import save_file

    from lorakit import disable_adapters, remove_lora

    model = tiny_llama(tie_word_embeddings=True)
    original = model.model.embed_tokens.weight.detach().clone()
    trained = torch.randn_like(original)
    tensors = {"base_model.model.model.embed_tokens.weight": trained, "base_model.model.lm_head.weight": trained.clone()}
    for i in range(2):
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 64)
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj"]}))
    load_adapter(model, tmp_path)
    embedding = model.model.embed_tokens.weight
    with disable_adapters(model):
        assert torch.equal(embedding, original)
    assert torch.equal(embedding, trained)
    remove_lora(model, merge=False)
    assert torch.equal(model.model.embed_tokens.weight, original)


def test_a_pissa_adapter_is_refused_among_several_in_an_adapter_set(tmp_path):
    # attaching it rewrites the base weights; switching would round them a little each time
    from lorakit.adapters import AdapterSet
    from lorakit.errors import ConfigError

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "pissa")
    save_adapter(apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"])), tmp_path / "plain")
    alone = AdapterSet(tiny_llama())
    alone.add(tmp_path / "pissa")
    alone.activate("pissa")
    several = AdapterSet(tiny_llama())
    several.add(tmp_path / "plain")
    with pytest.raises(ConfigError, match="PiSSA adapter, which rewrites the base weights"):
        several.add(tmp_path / "pissa")


def test_a_peft_pissa_adapter_with_dora_is_refused(tmp_path, llama):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa", "use_dora": True}))
    with pytest.raises(AdapterFileError, match="PiSSA adapter with DoRA is not supported by lorakit"):
        load_adapter(llama, tmp_path)


def test_round_trip_and_trainable_flag(tmp_path, llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(llama)
    expected = logits(llama)
    save_adapter(llama, tmp_path / "a")
    frozen = load_adapter(tiny_llama(), tmp_path / "a")
    assert (logits(frozen) - expected).abs().max() == 0
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(tiny_llama(), tmp_path / "a", trainable=True)
    assert {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_other_base_is_refused_with_override(tmp_path, llama):
    apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(llama, tmp_path / "a")
    other = tiny_llama(layers=3)
    with pytest.raises(AdapterMismatchError, match="a base model of another architecture or shape"):
        load_adapter(other, tmp_path / "a")
    load_adapter(tiny_llama(layers=3), tmp_path / "a", allow_other_base=True)  # shapes fit: allowed


def test_missing_tensor_and_bad_config(tmp_path, llama):
    from safetensors.torch import load_file, save_file

    apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(llama, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if k.endswith("lora_B.weight")))
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match="lora_B.weight is missing"):
        load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path / "a")


def _load_with_config_field(tmp_path, llama, key, value):
    """Save an adapter of `llama`, set one field of its adapter_config.json, load it onto a fresh model."""
    apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(llama, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    load_adapter(tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize("key,value,words", [("lora_dropout", "x", "lora_dropout must be a number"),
                                             ("lora_dropout", 1.5, "lora_dropout must be a number"),
                                             ("use_dora", "yes", "use_dora must be true or false"),
                                             ("target_modules", [1, 2], "target_modules must be"),
                                             ("base_model_name_or_path", 5, "base_model_name_or_path must be")])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, llama, key, value, words):
    with pytest.raises(AdapterFileError, match=words):
        _load_with_config_field(tmp_path, llama, key, value)


@pytest.mark.parametrize("key,value,words", [
    ("kasa_config", {"kasa": True}, "the PEFT option kasa_config="),
    ("velora_config", {"rank": 2}, "velora_config="), ("monteclora_config", {"n": 2}, "monteclora_config="),
    ("use_bdlora", {"nblocks": 2}, "the PEFT option use_bdlora="), ("arrow_config", {"top_k": 2}, "arrow_config="),
    ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga' rewrites the base weights when PEFT creates")])
def test_peft_variants_with_another_forward_are_refused_by_name(tmp_path, llama, key, value, words):
    with pytest.raises(AdapterFileError, match=words):
        _load_with_config_field(tmp_path, llama, key, value)


def test_saved_config_fields(tmp_path):
    model = tiny_gpt2()
    apply_lora(model, LoraConfig(r=4, alpha=8, scaling="rslora"))
    save_adapter(model, tmp_path / "a", base_model_name="my/base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] and config["fan_in_fan_out"]
    assert config["base_model_name_or_path"] == "my/base" and config["task_type"] == "CAUSAL_LM"
    assert len(config["target_modules"]) == 8


def test_a_peft_adapter_with_dropout_loads_in_eval_mode_onto_an_eval_model(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3)
    peft_model = randomize_lora(peft.get_peft_model(tiny_llama(), config))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter"))  # PEFT: eval mode
    model = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5  # no dropout drawn (was ~0.4 off)


def _llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def test_lora_stays_out_of_a_task_head_that_trains_in_full_so_peft_loads_the_adapter(tmp_path):
    model = _llama_classifier()
    with pytest.warns(UserWarning, match="score left out of the LoRA targets: the task head 'score' trains in full"):
        apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "score"]))
    randomize_lora(model)
    with torch.no_grad():
        model.score.weight.add_(0.1)  # trained in full
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(_llama_classifier(), tmp_path / "adapter").eval()
    assert (logits(peft_model) - expected).abs().max() <= 1e-5
    from lorakit.errors import TargetMatchError

    with pytest.raises(TargetMatchError, match="only score, in the task head 'score', which trains in full"):
        apply_lora(_llama_classifier(), LoraConfig(r=2, alpha=4, target_modules=["score"]))


def test_modules_to_save_that_holds_an_adapted_layer_is_refused(llama):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="modules_to_save 'model.layers.0.self_attn' overlaps the adapted layer "
                                          "model.layers.0.self_attn.q_proj"):
        apply_lora(llama, LoraConfig(r=2, alpha=4, target_modules=["q_proj"],
                                     modules_to_save=["model.layers.0.self_attn"]))


def test_peft_modules_to_save_match_by_name_ending_and_survive_a_resave(tmp_path):
    # PEFT takes every module whose name ends in the entry: "norm" is model.norm and every *_layernorm
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    expected = _saved_peft_adapter(tiny_llama(), config, tmp_path / "adapter", shift=0.1)
    model = load_adapter(tiny_llama(), tmp_path / "adapter")
    assert (logits(model) - expected).abs().max() <= 1e-5
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    assert (logits(again) - expected).abs().max() <= 1e-5  # was 0.05 off: the layer norms were dropped


def test_a_module_the_adapter_holds_in_full_without_naming_it_is_saved_again(tmp_path):
    # PEFT's ensure_weight_tying saves a tied lm_head beside the embed_tokens that modules_to_save names
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                             ensure_weight_tying=True)
    expected = _saved_peft_adapter(tiny_llama(tie_word_embeddings=True), config, tmp_path / "adapter", shift=0.1)
    model = load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "adapter")
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "again").eval()
    assert (logits(again) - expected).abs().max() <= 1e-5  # was 3.7 off: lm_head.weight was not saved again


def _distilbert_classifier():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=256, num_labels=3,
                              max_position_embeddings=64)
    return DistilBertForSequenceClassification(config).eval()


def test_a_head_whose_name_ends_another_module_trains_and_saves_both_as_peft_does(tmp_path):
    # PEFT's SEQ_CLS head "classifier" takes DistilBERT's pre_classifier too (name ending)
    model = _distilbert_classifier()
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    assert getattr(model, "lorakit_config").modules_to_save == ["pre_classifier", "classifier"]
    randomize_lora(model)
    with torch.no_grad():
        model.pre_classifier.weight.add_(0.1)
        model.classifier.weight.add_(0.1)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    assert (logits(load_adapter(_distilbert_classifier(), tmp_path / "adapter")) - expected).abs().max() <= 1e-5
    peft_model = peft.PeftModel.from_pretrained(_distilbert_classifier(), tmp_path / "adapter").eval()
    assert (logits(peft_model) - expected).abs().max() <= 1e-5
    # lorakit's adapters of before held "classifier" only: still loaded, pre_classifier left as the base's
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "pre_classifier" not in k}, weights)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    older = load_adapter(_distilbert_classifier(), tmp_path / "adapter")
    assert torch.equal(older.pre_classifier.weight, _distilbert_classifier().pre_classifier.weight)


def test_an_adapter_made_for_some_layers_only_loads_as_peft_computes_it(tmp_path, llama):
    # layers_to_transform only chose which layers got tensors: the tensors say the same
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(llama, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      layers_to_transform=[1], init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(tmp_path / "a")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = load_adapter(tiny_llama(), tmp_path / "a")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_modules_to_save_by_the_end_of_a_name_trains_and_saves_as_peft_reads_it(tmp_path):
    # PEFT takes ["ln_f"] for every module whose name ends in ".ln_f": GPT-2's transformer.ln_f
    model = tiny_gpt2()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] == [
        "transformer.ln_f.weight", "transformer.ln_f.bias"]
    randomize_lora(model)
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(0.5)
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    assert (logits(peft_model) - expected).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="no module of that name or ending in '.nope'"):
        apply_lora(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=["nope"]))
