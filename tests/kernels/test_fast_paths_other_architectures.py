"""The trainer's fast paths on layouts beyond the four families test_llama_patch covers: the
fused layers take Llama's other layouts (biases, another head size, a tied head), step aside with
a notice for the others (softcapping, windows, other norms), and either way the loss and every
adapter's gradient equal the plain model's."""

import pytest
import torch
import transformers

from lorakit.kernels.causal_loss import causal_lm_loss
from lorakit.kernels.llama_patch import enable_fast_paths
from lorakit.lora import LoraConfig, apply_lora

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
# layout -> (config class, model class, config options, whether the fused attention and MLP take its layers)
LAYOUTS = {
    "llama, biases and head_dim 24": ("LlamaConfig", "LlamaForCausalLM",
                                      dict(attention_bias=True, mlp_bias=True, head_dim=24), True),
    "llama, one kv head and a tied head": ("LlamaConfig", "LlamaForCausalLM",
                                           dict(num_key_value_heads=1, tie_word_embeddings=True), True),
    "gemma2, softcapping and a window": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=4),
                                         False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, False),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_key_value_heads=None), False),
}


def _model(config_name: str, model_name: str, extra: dict, targets) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {key: value for key, value in {**SIZES, **extra}.items() if value is not None}
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**options))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.train()


def _batch(padded: bool) -> dict:
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt without loss
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fast_paths_compute_the_plain_models_loss_and_gradients(layout, padded):
    config_name, model_name, extra, fused = LAYOUTS[layout]
    model, batch = _model(config_name, model_name, extra, "all-linear"), _batch(padded)
    plain_loss, plain_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    notices = enable_fast_paths(model)
    patched = any("forward" in module.__dict__ for module in model.modules())  # a layer's fused forward
    assert (patched, notices == []) == (fused, fused)  # where the fused path steps aside, a notice says why
    loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, batch))
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, expected in plain_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name)
