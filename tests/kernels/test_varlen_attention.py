"""lorakit_varlen: packed rows without a 4D mask give the same loss and adapter gradients as
the same examples unpacked (one per padded row) and as the 4D-mask packed batch."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit.data.batching import collate, count_label_tokens
from lorakit.kernels import cpu_attention, varlen_attention
from lorakit.kernels.causal_loss import causal_lm_loss
from lorakit.kernels.llama_patch import enable_fast_paths, fast_paths_enabled
from lorakit.kernels.varlen_attention import (VARLEN, bounds_from_position_ids, restore_attention,
                                              segments_from_bounds, use_varlen_attention)
from lorakit.lora import LoraConfig, apply_lora
from tiny_models import randomize_lora, tiny_gpt2, tiny_llama

VOCAB = 256
# rows of document lengths (seq_len 16): documents of length 1, equal lengths across rows
# (batched into one SDPA call), padded tails of 4 and 1 tokens, a row with no tail
ROWS = [[5, 1, 7, 1, 2], [3, 1, 6], [9, 4, 1, 1], [3, 3]]
WIDTH = 16
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB)


def make_rows(rows=ROWS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lengths in rows:
        row = []
        for n in lengths:
            ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
            row.append({"input_ids": ids, "labels": list(ids)})
        out.append(row)
    return out


def lora_model(arch="llama", fast=True, **overrides):
    if arch == "llama":
        model = tiny_llama(**overrides)
    else:
        torch.manual_seed(0)
        config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                     "mistral": (MistralConfig, MistralForCausalLM)}[arch]
        model = model_class(config_class(**{**SIZES, **overrides}))
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    if fast:
        enable_fast_paths(model)
        assert fast_paths_enabled(model)
    return model.train()


def chunked_loss(model, batch):
    return causal_lm_loss(model, batch, normalizer=count_label_tokens(batch))


def model_loss(model, batch):
    return model(**batch, use_cache=False).loss  # mean over label tokens


def loss_and_grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(got, want, atol=1e-5):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=0)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=atol, rtol=1e-4, msg=name)


def with_attention(model, implementation, batch, loss_fn):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        return loss_and_grads(model, batch, loss_fn)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("loss_fn", [chunked_loss, model_loss], ids=["causal_lm_loss", "model_loss"])
def test_varlen_equals_unpacked_and_4d_mask(arch, loss_fn):
    model = lora_model(arch)
    rows = make_rows()
    unpacked = collate([ex for row in rows for ex in row], packing=False, seq_len=WIDTH, pad_id=0)
    packed_4d = collate(rows, packing=True, seq_len=WIDTH, pad_id=0, packed_attention="4d")
    varlen = collate(rows, packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    assert "attention_mask" not in varlen
    assert count_label_tokens(varlen) == count_label_tokens(unpacked) == count_label_tokens(packed_4d)

    want_unpacked = with_attention(model, "sdpa", unpacked, loss_fn)
    want_4d = with_attention(model, "sdpa", packed_4d, loss_fn)
    assert use_varlen_attention(model) == []
    got = loss_and_grads(model, varlen, loss_fn)
    assert_same(got, want_unpacked)
    assert_same(got, want_4d)
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_fast_paths_do_not_change_the_varlen_result():
    rows = make_rows(seed=4)
    varlen = collate(rows, packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    results = []
    for fast in (False, True):
        model = lora_model(fast=fast)
        use_varlen_attention(model)
        results.append(loss_and_grads(model, varlen, chunked_loss))
    assert_same(results[1], results[0])


def _spy_on_causal_calls(monkeypatch):
    """(SDPA calls as (q shape, options), cpu_attention calls as (q shape, scale))."""
    sdpa_calls, cpu_calls = [], []
    real_sdpa, real_cpu = varlen_attention.F.scaled_dot_product_attention, cpu_attention.causal_attention
    monkeypatch.setattr(varlen_attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **o: sdpa_calls.append((q.shape, o)) or real_sdpa(q, k, v, **o))
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda q, k, v, scale: cpu_calls.append((q.shape, scale)) or real_cpu(q, k, v, scale))
    return sdpa_calls, cpu_calls


def test_one_causal_call_per_document_length_without_a_mask(monkeypatch):
    model = lora_model()  # first: enabling the fast paths checks the loss's head with a small forward
    sdpa_calls, cpu_calls = _spy_on_causal_calls(monkeypatch)
    use_varlen_attention(model)
    chunked_loss(model, collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen"))
    lengths = {n for row in ROWS for n in row} | {1}  # each padding token stands alone
    assert len(sdpa_calls) + len(cpu_calls) == len(lengths) * model.config.num_hidden_layers
    # fp32 on the CPU: documents of 2+ tokens take cpu_attention, single tokens SDPA
    assert cpu_calls and all(shape[2] > 1 and scale == 16 ** -0.5 for shape, scale in cpu_calls)
    assert all(o["is_causal"] and o.get("attn_mask") is None and o["enable_gqa"] for _, o in sdpa_calls)
    ones = [shape for shape, _ in sdpa_calls]  # documents of length 1 and every padding token
    padding = sum(WIDTH - sum(row) for row in ROWS)
    assert ones and all(shape[2] == 1 and shape[0] == sum(row.count(1) for row in ROWS) + padding for shape in ones)


def test_without_the_fast_paths_every_document_takes_sdpa(monkeypatch):
    sdpa_calls, cpu_calls = _spy_on_causal_calls(monkeypatch)
    model = lora_model(fast=False)
    use_varlen_attention(model)
    chunked_loss(model, collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen"))
    assert sdpa_calls and cpu_calls == []


def test_dropout_and_scaling_reach_sdpa(monkeypatch):
    seen = []
    model = lora_model(attention_dropout=0.5)
    real = varlen_attention.F.scaled_dot_product_attention
    monkeypatch.setattr(varlen_attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **o: seen.append(o) or real(q, k, v, **o))
    use_varlen_attention(model)
    batch = collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    chunked_loss(model, batch)
    assert seen and all(o["dropout_p"] == 0.5 and o["scale"] == 16 ** -0.5 for o in seen)
    seen.clear()
    with torch.no_grad():
        chunked_loss(model.eval(), batch)
    assert seen and all(o["dropout_p"] == 0.0 for o in seen)


def test_gqa_without_enable_gqa_gives_the_same_result(monkeypatch):
    model = lora_model()
    use_varlen_attention(model)
    batch = collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    want = loss_and_grads(model, batch, chunked_loss)
    monkeypatch.setattr(varlen_attention, "_GQA_IN_SDPA", False)  # torch < 2.5: repeat k/v
    assert_same(loss_and_grads(model, batch, chunked_loss), want)


def test_gradient_checkpointing_gives_the_same_result():
    batch = collate(make_rows(seed=2), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    model = lora_model()
    use_varlen_attention(model)
    want = loss_and_grads(model, batch, chunked_loss)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert_same(loss_and_grads(model, batch, chunked_loss), want)


@pytest.mark.parametrize("mode", ["position_ids", "4d"])
def test_other_batch_layouts_stay_exact_under_varlen(mode):
    """A position_ids batch (boundaries read from restarting positions, even with a cache) and a
    4D-mask batch (handed to sdpa) give what sdpa gives on the 4D-mask batch."""
    model = lora_model()
    rows = make_rows(seed=1)
    want = with_attention(model, "sdpa", collate(rows, True, WIDTH, 0, "4d"), model_loss)
    use_varlen_attention(model)
    batch = collate(rows, True, WIDTH, 0, mode)
    assert_same(loss_and_grads(model, batch, lambda m, b: m(**b).loss), want)  # use_cache left on


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_varlen_batch_is_exact_under_sdpa_and_eager(attn):
    """Without lorakit_varlen the kwargs are ignored and transformers reads packing from position_ids."""
    model = lora_model()
    rows = make_rows(seed=3)
    want = with_attention(model, attn, collate(rows, True, WIDTH, 0, "4d"), chunked_loss)
    got = with_attention(model, attn, collate(rows, True, WIDTH, 0, "varlen"), chunked_loss)
    assert_same(got, want)


def test_padded_batches_and_generation_match_sdpa():
    model = lora_model().eval()
    examples = [ex for row in make_rows(seed=5) for ex in row][:4]
    padded = collate(examples, packing=False, seq_len=WIDTH, pad_id=0)
    prompt = torch.tensor([examples[2]["input_ids"][:6]])
    outputs = {}
    for implementation in ("sdpa", VARLEN):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(**padded).logits
            tokens = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        outputs[implementation] = (logits * padded["attention_mask"][..., None], tokens)
    torch.testing.assert_close(outputs[VARLEN][0], outputs["sdpa"][0], atol=1e-5, rtol=0)
    assert torch.equal(outputs[VARLEN][1], outputs["sdpa"][1])


def test_collated_bounds_match_the_position_ids_rule():
    batch = collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    assert batch["cu_seq_lens_q"].tolist() == bounds_from_position_ids(batch["position_ids"], len(ROWS))
    segments = segments_from_bounds(batch["cu_seq_lens_q"].tolist(), len(ROWS), WIDTH)
    assert segments.rows == ((5, 1, 7, 1, 2), (3, 1, 6) + (1,) * 6, (9, 4, 1, 1, 1), (3, 3) + (1,) * 10)  # padding
    # segment numbers of length 1: five documents and the 16 padding tokens, each standing alone
    assert segments.groups[1] == (1, 3, 6, *range(8, 14), 16, 17, 18, *range(21, 31))


@pytest.mark.parametrize("bounds,match", [([0, 5, 20, 32], "crosses a row"), ([0, 5, 30], "from 0"),
                                          ([0, 5, 5, 32], "empty")])
def test_bad_bounds_are_refused(bounds, match):
    with pytest.raises(ValueError, match=match):
        segments_from_bounds(bounds, 2, 16)


def test_bounds_with_a_mask_are_refused():
    model = lora_model(fast=False)
    use_varlen_attention(model)
    batch = collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, -2:] = 0  # padding: sdpa would need a mask
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**batch)


@pytest.mark.parametrize("fast", [True, False])
def test_documents_longer_than_a_sliding_window_see_only_the_window(fast):
    model = lora_model("mistral", fast=fast, sliding_window=4)  # documents of up to 9 tokens
    rows = make_rows()
    unpacked = collate([ex for row in rows for ex in row], packing=False, seq_len=WIDTH, pad_id=0)
    want = with_attention(model, "sdpa", unpacked, chunked_loss)  # transformers' own sliding-window masks
    assert use_varlen_attention(model) == []
    assert_same(loss_and_grads(model, collate(rows, True, WIDTH, 0, "varlen"), chunked_loss), want)
    unbounded = lora_model("mistral", fast=fast, sliding_window=None)  # the same weights: the window mattered
    assert not torch.allclose(with_attention(unbounded, "sdpa", unpacked, chunked_loss)[0], want[0])


def test_models_outside_the_interface_get_a_notice():
    model = tiny_gpt2()
    notices = use_varlen_attention(model)
    assert len(notices) == 1 and "gpt2" in notices[0]
    assert model.config._attn_implementation != VARLEN
    restore_attention(model)  # nothing to undo: no error


def test_flash_attention_is_kept():
    """flash-attention reads the same cu_seq_lens with its own kernel (not installed here, so the
    implementation is only named, never run)."""
    model = lora_model(fast=False)
    model.config._attn_implementation_internal = "flash_attention_2"
    assert use_varlen_attention(model) == []
    assert model.config._attn_implementation == "flash_attention_2"


# ---- torch's varlen kernel (CUDA only): its plumbing, with a CPU stand-in for the kernel ---------

def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, causal=True, gqa=False):
    """Plain varlen attention over (T, H, D) tensors: one causal SDPA per [cu[i], cu[i+1])."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert scale == q.shape[-1] ** -0.5  # the model's scaling is passed on, not left to a default
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    if k.shape[1] != q.shape[1]:
        assert gqa, "k/v with fewer heads need enable_gqa"
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    bounds = cu_q.tolist()
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), scale=scale,
                                           is_causal=causal)[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def new_style_kernel(calls, causal_ok=True):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_seq_q.tolist(), max_q))
        causal = tuple(window_size) == (-1, 0)
        assert causal, "lorakit asks for causal attention"
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                 causal=causal_ok, gqa=enable_gqa)
    return varlen_attn


def window_no_gqa_kernel(calls):  # torch 2.11 (the GPU image's): window_size, no enable_gqa
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        calls.append((cu_seq_q.tolist(), max_q))
        assert tuple(window_size) == (-1, 0), "lorakit asks for causal attention"
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)
    return varlen_attn


def old_style_kernel(calls):  # torch 2.9: is_causal, no enable_gqa
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False,
                    scale=None):
        calls.append((cu_seq_q.tolist(), max_q))
        return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                 causal=is_causal)
    return varlen_attn


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Lets the kernel path run on the CPU; returns a function installing a stand-in kernel."""
    monkeypatch.setattr(varlen_attention._FLASH, "trusted", None)
    monkeypatch.setattr(varlen_attention, "_flash_varlen_usable", lambda module, query: (
        varlen_attention._FLASH.trusted is not False
        and not module.__dict__.get(varlen_attention.PER_DOCUMENT_ONLY, False)))
    return lambda kernel: monkeypatch.setattr(varlen_attention, "_torch_varlen_attn", lambda: kernel)


def packed_batch():
    return collate(make_rows(), packing=True, seq_len=WIDTH, pad_id=0, packed_attention="varlen")


def per_document_result():
    model = lora_model()
    use_varlen_attention(model)
    varlen_attention.per_document_only(model)
    return loss_and_grads(model, packed_batch(), chunked_loss)


@pytest.mark.parametrize("style", [new_style_kernel, window_no_gqa_kernel, old_style_kernel])
def test_the_varlen_kernel_gets_every_document_in_one_call(kernel_on_cpu, style):
    want = per_document_result()
    calls = []
    kernel_on_cpu(style(calls))
    model = lora_model()  # GQA: 4 query heads, 2 key/value heads
    use_varlen_attention(model)
    got = loss_and_grads(model, packed_batch(), chunked_loss)
    assert_same(got, want)
    lengths = [n for row in ROWS for n in row + [1] * (WIDTH - sum(row))]  # each padding token a segment
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    # the first call is checked against per-document SDPA, then one call per layer
    assert calls == [(bounds, max(lengths))] * (1 + model.config.num_hidden_layers)
    assert varlen_attention._FLASH.trusted is True
    assert varlen_attention.varlen_kernel_status().startswith("torch's varlen kernel: used")


@pytest.mark.parametrize("broken", ["non-causal", "raises"])
def test_a_kernel_that_disagrees_or_fails_is_dropped_with_one_warning(kernel_on_cpu, broken):
    want = per_document_result()
    calls = []

    def raising(*args, **kwargs):
        calls.append(args[3].tolist())
        raise RuntimeError("no kernel image is available for execution on the device")

    kernel_on_cpu(new_style_kernel(calls, causal_ok=False) if broken == "non-causal" else raising)
    model = lora_model()
    use_varlen_attention(model)
    with pytest.warns(UserWarning, match="varlen kernel is not used") as caught:
        got = loss_and_grads(model, packed_batch(), chunked_loss)
        loss_and_grads(model, packed_batch(), chunked_loss)
    assert len(caught) == 1 and ("disagrees" in str(caught[0].message)) == (broken == "non-causal")
    assert len(calls) == 1 and varlen_attention._FLASH.trusted is False  # tried once, then never again
    assert varlen_attention.varlen_kernel_status().startswith("torch's varlen kernel: not used (")
    assert_same(got, want)


def test_per_document_only_keeps_the_kernel_out(kernel_on_cpu):
    calls = []
    kernel_on_cpu(new_style_kernel(calls))
    per_document_result()
    assert calls == []


def test_the_kernel_is_only_tried_where_it_can_run(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(varlen_attention._FLASH, "trusted", None)
    monkeypatch.setattr(varlen_attention, "_torch_varlen_attn", lambda: new_style_kernel([]))
    module = torch.nn.Module()

    def usable(**changes):
        query = SimpleNamespace(**{**dict(is_cuda=True, dtype=torch.bfloat16, shape=(2, 4, 16, 64)), **changes})
        return varlen_attention._flash_varlen_usable(module, query)

    assert usable() and usable(dtype=torch.float16)
    assert not usable(is_cuda=False) and not usable(dtype=torch.float32)
    assert not usable(shape=(2, 4, 16, 60)) and not usable(shape=(2, 4, 16, 512))  # head dims flash cannot take
    module.__dict__[varlen_attention.PER_DOCUMENT_ONLY] = True
    assert not usable()
    module.__dict__[varlen_attention.PER_DOCUMENT_ONLY] = False
    monkeypatch.setattr(varlen_attention._FLASH, "trusted", False)  # dropped after a failed first call
    assert not usable()
    monkeypatch.setattr(varlen_attention._FLASH, "trusted", None)
    monkeypatch.setattr(varlen_attention, "_torch_varlen_attn", lambda: None)  # torch < 2.10
    assert not usable()


def test_packed_rows_wider_than_a_position_table_run_when_every_example_fits():
    model = tiny_gpt2()  # a table of 128 positions
    rows = make_rows([[100, 60], [30]])  # the second row's 130 padding tokens stand alone at position 0
    batch = collate(rows, packing=True, seq_len=160, pad_id=0, packed_attention="4d")
    assert int(batch["position_ids"].max()) == 99
    with torch.no_grad():
        packed = model(**batch).logits
        alone = model(input_ids=torch.tensor([rows[1][0]["input_ids"]])).logits
    torch.testing.assert_close(packed[1, :30], alone[0], atol=1e-5, rtol=0)
