"""Batch plans, collation, resume, and packing that is exactly equivalent to no packing."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data.batching import (
    BatchIterator, block_causal_mask, collate, count_label_tokens, plan_batches, varlen_boundaries,
)
from lorakit.errors import ConfigError
from lorakit.kernels.varlen_attention import VARLEN  # registers the attention implementation

VOCAB = 256


def make_examples(lengths, seed=0):
    """Random examples whose first third of tokens is masked like a prompt."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        labels = [-100 if i < n // 3 else t for i, t in enumerate(ids)]
        labels[0] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def token_losses(model, batch, **kwargs):
    """(B, T-1) cross-entropy of predicting labels[:, 1:] in fp32, 0 where masked."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:],
                           ignore_index=-100, reduction="none")


def packed_example_sums(losses, rows, examples):
    """Per-example summed loss from packed rows: example at [a, a+n) predicts from a..a+n-2."""
    sums = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i]["input_ids"])
            sums[i] = losses[r, at:at + n - 1].sum()
            at += n
    return sums


MODES = [("sdpa", "4d"), ("eager", "4d"), ("sdpa", "position_ids"), ("eager", "position_ids"),
         ("sdpa", "varlen"), ("eager", "varlen"), (VARLEN, "varlen"), (VARLEN, "4d")]


def packing_kwargs(attn, packed_attention):
    """Without a mask, sdpa/eager see the packing only in position_ids, and only without a cache;
    lorakit_varlen reads the boundaries itself."""
    return {"use_cache": False} if packed_attention != "4d" and attn != VARLEN else {}


@pytest.mark.parametrize("attn,packed_attention", MODES)
def test_packed_loss_equals_unpacked_loss(attn, packed_attention):
    model = tiny_llama(attn)
    examples = make_examples([5, 9, 3, 7, 4, 6])
    rows = [[0, 1, 2], [3, 4, 5]]
    kwargs = packing_kwargs(attn, packed_attention)
    unpacked = collate(examples, packing=False, seq_len=32, pad_id=0)
    per_example = token_losses(model, unpacked).sum(dim=1)
    alone = [token_losses(model, collate([ex], False, 32, 0)).sum() for ex in examples]
    assert torch.allclose(per_example, torch.stack(alone), atol=1e-5, rtol=0)  # padding is inert
    packed = collate([[examples[i] for i in row] for row in rows], packing=True, seq_len=32, pad_id=0,
                     packed_attention=packed_attention)
    packed_losses = token_losses(model, packed, **kwargs)
    sums = packed_example_sums(packed_losses, rows, examples)
    for i in range(len(examples)):
        assert torch.allclose(sums[i], per_example[i], atol=1e-5, rtol=0), (i, sums[i], per_example[i])
    # nothing is trained across a boundary: the packed total is exactly the examples' total
    assert torch.allclose(packed_losses.sum(), per_example.sum(), atol=1e-4, rtol=0)
    assert count_label_tokens(packed) == count_label_tokens(unpacked)
    with torch.no_grad():  # the model's own (mean) loss agrees too
        hf_packed = model(**packed, **kwargs).loss
        hf_unpacked = model(**unpacked).loss
    assert torch.allclose(hf_packed, hf_unpacked, atol=1e-5, rtol=0)


def _logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits[0]


@pytest.mark.parametrize("attn,packed_attention", MODES)
def test_no_leakage_across_packed_examples(attn, packed_attention):
    model = tiny_llama(attn)
    first, second = make_examples([6, 5], seed=1)
    changed = {"input_ids": [(t + 7) % VOCAB for t in first["input_ids"]], "labels": first["labels"]}
    kwargs = packing_kwargs(attn, packed_attention)
    before = _logits(model, collate([[first, second]], True, 16, 0, packed_attention), **kwargs)
    after = _logits(model, collate([[changed, second]], True, 16, 0, packed_attention), **kwargs)
    assert not torch.allclose(before[:6], after[:6], atol=1e-3)  # the edit is visible where it should be
    assert torch.allclose(before[6:], after[6:], atol=1e-6, rtol=0)


def test_leak_detector_sees_a_leak_without_masking():
    """Guard for the test above: plain concatenation (no mask, no restart) does leak."""
    model = tiny_llama("sdpa")
    first, second = make_examples([6, 5], seed=1)
    ids = torch.tensor([first["input_ids"] + second["input_ids"]])
    other = torch.tensor([[(t + 7) % VOCAB for t in first["input_ids"]] + second["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[0, 6:], model(input_ids=other).logits[0, 6:])


def test_mask_in_model_dtype_runs_in_bf16():
    model = tiny_llama("sdpa").to(torch.bfloat16)
    batch = collate([make_examples([5, 4])], True, 16, 0, mask_dtype=torch.bfloat16)
    assert batch["attention_mask"].dtype == torch.bfloat16
    assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------- collation


def test_unpacked_pads_to_the_longest_in_the_batch():
    examples = make_examples([4, 7])
    examples[0]["labels"][0] = examples[0]["input_ids"][0]  # collate masks the first label anyway
    batch = collate(examples, packing=False, seq_len=512, pad_id=1)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 3, [1] * 7]
    assert batch["input_ids"][0, 4:].tolist() == [1, 1, 1]
    assert batch["labels"][0].tolist() == [-100] + examples[0]["labels"][1:] + [-100] * 3
    assert batch["position_ids"].tolist() == [list(range(7))] * 2
    assert all(t.dtype == torch.long for t in batch.values())


def test_packed_layout():
    a, b = make_examples([3, 2])
    b["labels"] = list(b["input_ids"])  # even a trained first token is masked at the boundary
    batch = collate([[a, b], [b]], packing=True, seq_len=8, pad_id=0, packed_attention="position_ids")
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]  # padding at 0
    assert batch["labels"][0].tolist() == [-100] + a["labels"][1:] + [-100, b["input_ids"][1]]
    assert batch["labels"][1, 2:].tolist() == [-100] * 3
    with pytest.raises(ValueError, match="more than seq_len"):
        collate([[a, b]], packing=True, seq_len=4, pad_id=0)


def test_varlen_layout():
    a, b, c = make_examples([3, 2, 1])
    batch = collate([[a, b], [c], [a, c]], packing=True, seq_len=8, pad_id=0, packed_attention="varlen")
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                          "max_length_q", "max_length_k"}
    # rows of width 5: [a b], [c + 4 padding tokens], [a c + 1 padding token], as one 15-token sequence
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 7, 8, 9, 10, 13, 14, 15]  # each pad token alone
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["cu_seq_lens_q"].dtype == batch["max_length_q"].dtype == torch.int32
    assert batch["max_length_q"].shape == () and int(batch["max_length_q"]) == int(batch["max_length_k"]) == 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0], [0, 1, 2, 0, 0]]
    assert batch["labels"][1, 1:].tolist() == [-100] * 4 and batch["labels"][2, 4] == -100  # tails
    four_d = collate([[a, b], [c], [a, c]], packing=True, seq_len=8, pad_id=0)
    assert count_label_tokens(batch) == count_label_tokens(four_d)
    assert all(torch.equal(batch[k], four_d[k]) for k in ("input_ids", "labels", "position_ids"))
    on_meta = collate([[a, b]], packing=True, seq_len=8, pad_id=0, packed_attention="varlen", device="meta")
    assert {t.device.type for t in on_meta.values()} == {"meta"}
    with pytest.raises(ConfigError, match="varlen"):
        collate([[a, b]], packing=True, seq_len=8, pad_id=0, packed_attention="flash")


def test_varlen_boundaries_of_full_rows_have_no_tail():
    bounds = varlen_boundaries([[2, 2], [4]], width=4)
    assert bounds["cu_seq_lens_q"].tolist() == [0, 2, 4, 8] and int(bounds["max_length_q"]) == 4


def test_block_causal_mask_matches_a_loop():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = k <= q and segments[b, q] == segments[b, k]
                assert (mask[b, 0, q, k] == 0) == allowed


def test_count_label_tokens():
    batch = collate(make_examples([6, 4]), packing=False, seq_len=16, pad_id=0)
    assert count_label_tokens(batch) == int((batch["labels"] != -100).sum()) == (6 - 2) + (4 - 1)


# ---------------------------------------------------------------- plans


LENGTHS = np.random.default_rng(0).integers(1, 100, size=1000)


def flat(plan):
    return sorted(i for batch in plan for row in batch for i in row)


@pytest.mark.parametrize("packing", [False, True])
def test_plan_is_deterministic_per_seed_and_epoch(packing):
    def plan(seed, epoch):
        return plan_batches(LENGTHS, 8, 128, packing=packing, shuffle=True, seed=seed, epoch=epoch)
    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 1) != plan(1, 0) and plan(2, 0) != plan(1, 0)
    assert flat(plan(1, 0)) == list(range(len(LENGTHS)))
    assert all(isinstance(i, int) for batch in plan(1, 0) for row in batch for i in row)


def padding(plan):
    return sum(len(b) * max(LENGTHS[r[0]] for r in b) - sum(LENGTHS[r[0]] for r in b) for b in plan)


def test_unpacked_plan_buckets_by_length():
    plan = plan_batches(LENGTHS, 8, 128, packing=False, shuffle=True, seed=0, epoch=0)
    assert all(len(row) == 1 for batch in plan for row in batch)
    assert sorted(len(batch) for batch in plan)[1:] == [8] * (len(plan) - 1)
    order = np.random.default_rng(0).permutation(len(LENGTHS))
    random_plan = [[[int(i)] for i in order[s:s + 8]] for s in range(0, len(order), 8)]
    assert padding(plan) < 0.1 * padding(random_plan)


def test_unshuffled_plan_keeps_dataset_order():
    plan = plan_batches(LENGTHS[:10], 4, 128, packing=False, shuffle=False, seed=0, epoch=5)
    assert plan == [[[0], [1], [2], [3]], [[4], [5], [6], [7]], [[8], [9]]]


def test_packed_plan_fits_and_fills_rows():
    plan = plan_batches(LENGTHS, 4, 128, packing=True, shuffle=True, seed=0, epoch=0)
    rows = [row for batch in plan for row in batch]
    assert all(sum(LENGTHS[i] for i in row) <= 128 for row in rows)
    assert LENGTHS.sum() / (len(rows) * 128) > 0.95
    assert all(len(batch) == 4 for batch in plan[:-1]) or len(plan) == 1


def test_plan_rejects_examples_longer_than_seq_len():
    with pytest.raises(ValueError, match="lengths"):
        plan_batches([5, 300], 2, 128, packing=True, shuffle=True, seed=0, epoch=0)


# ---------------------------------------------------------------- iteration and resume


@pytest.mark.parametrize("packing,packed_attention", [(False, "4d"), (True, "4d"), (True, "varlen")])
def test_resume_at_batch_index_gives_the_same_batches(packing, packed_attention):
    examples = make_examples(np.random.default_rng(1).integers(2, 30, size=40).tolist())
    dataset = datasets.Dataset.from_list(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    plan = plan_batches(lengths, 4, 64, packing=packing, shuffle=True, seed=7, epoch=2)
    options = dict(packing=packing, seq_len=64, pad_id=0, packed_attention=packed_attention)
    full = list(BatchIterator(dataset, plan, **options))
    assert len(full) == len(plan)
    replanned = plan_batches(lengths, 4, 64, packing=packing, shuffle=True, seed=7, epoch=2)
    resumed = BatchIterator(dataset, replanned, start_index=3, **options)
    assert len(resumed) == len(plan) - 3
    for expected, got in zip(full[3:], resumed, strict=True):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    listed = list(BatchIterator(examples, plan, **options))  # a plain list of dicts works too
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, listed))


def test_batch_iterator_rejects_start_beyond_plan():
    with pytest.raises(ValueError, match="start_index"):
        BatchIterator([], [[[0]]], packing=False, seq_len=8, pad_id=0, start_index=2)


def test_device_places_the_batch_and_builds_the_mask_there():
    rows = [make_examples([3, 2])]
    on_cpu = collate(rows, packing=True, seq_len=8, pad_id=0)
    on_meta = collate(rows, packing=True, seq_len=8, pad_id=0, device="meta")
    assert {t.device.type for t in on_meta.values()} == {"meta"}
    assert on_meta["attention_mask"].shape == on_cpu["attention_mask"].shape == (1, 1, 5, 5)


@pytest.mark.parametrize("packing", [False, True])
def test_roberta_style_positions_start_after_the_padding_index_as_the_models_own(packing):
    import transformers

    from lorakit.model_limits import first_position_id

    from tiny_models import tiny_gpt2, tiny_llama

    torch.manual_seed(0)
    roberta = transformers.AutoModelForCausalLM.from_config(transformers.RobertaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=66, is_decoder=True)).eval()
    assert first_position_id(roberta) == 2  # padding_idx 1
    assert first_position_id(tiny_llama()) == 0 and first_position_id(tiny_gpt2()) == 0
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 4)]
    rows = [examples] if packing else examples
    batch = collate(rows, packing, seq_len=16, pad_id=1, first_position=first_position_id(roberta))
    with torch.no_grad():
        logits = roberta(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for example, start in zip(examples, (0, 7) if packing else (0, 0)):
            own = roberta(input_ids=torch.tensor([example["input_ids"]])).logits[0]  # its own position ids
            row = 0 if packing else examples.index(example)
            got = logits[row, start:start + len(example["input_ids"])]
            torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-5)
