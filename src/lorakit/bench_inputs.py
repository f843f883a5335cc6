"""`lorakit bench`'s inputs: the same seeded random tokens for every variant, unpacked or packed
as the trainer packs them (kernels and variants in bench.py and bench_variants.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.bench_settings import Plan


def make_inputs(plan: Plan) -> dict:
    """Seeded random tokens: {"lorakit": batch, "lorakit-4d": batch, "peft": batch, "tokens": real
    tokens, "context": s}.

    Unpacked: all get (batch, seq_len) ids with labels = input_ids. Packed: variable-length
    examples; lorakit gets the trainer's packed rows (varlen: document boundaries, no mask),
    lorakit-4d the same rows with a block-causal 4D mask, PEFT the same examples one per row, padded.
    With `prompt_fraction` f the first f of each example's labels are -100, as in instruction data.
    """
    s = plan.settings
    if not s.packing:
        ids = torch.randint(0, plan.shape["vocab_size"], (s.batch, s.seq_len),
                            generator=torch.Generator().manual_seed(s.seed))
        labels = ids.clone()
        labels[:, :int(s.prompt_fraction * s.seq_len)] = -100
        batch = {"input_ids": ids.to(s.device), "labels": labels.to(s.device)}
        return {"lorakit": batch, "lorakit-4d": batch, "peft": batch, "tokens": ids.numel(),
                "context": float(s.seq_len), "labelled": _labelled_fraction(labels, ids.numel())}
    from lorakit.data.batching import collate  # the trainer's collation

    rows = _packed_rows(plan)
    lengths = [len(ex["input_ids"]) for row in rows for ex in row]
    mask_dtype = getattr(torch, plan.dtype)
    padded = collate([ex for row in rows for ex in row], False, s.seq_len, 0, device=s.device)
    return {"lorakit": collate(rows, True, s.seq_len, 0, packed_attention="varlen", device=s.device),
            "lorakit-4d": collate(rows, True, s.seq_len, 0, mask_dtype=mask_dtype, device=s.device),
            "peft": padded, "tokens": sum(lengths), "context": sum(n * n for n in lengths) / sum(lengths),
            "labelled": _labelled_fraction(padded["labels"], sum(lengths))}


def _labelled_fraction(labels: torch.Tensor, tokens: int) -> float:
    """The share of tokens whose next-token loss counts (each row's first label predicts nothing)."""
    return int((labels[:, 1:] != -100).sum()) / tokens


def _packed_rows(plan: Plan) -> list[list[dict]]:
    """The first `batch` packed rows of random examples, 1/8 to 1 times max_doc_len long."""
    from lorakit.data.batching import plan_batches

    s, g = plan.settings, torch.Generator().manual_seed(plan.settings.seed)
    longest = s.max_doc_len or s.seq_len
    examples, total = [], 0
    while total < 2 * s.batch * s.seq_len:  # enough to fill `batch` rows
        n = int(torch.randint(max(1, longest // 8), longest + 1, (1,), generator=g))
        ids = torch.randint(0, plan.shape["vocab_size"], (n,), generator=g).tolist()
        prompt = int(s.prompt_fraction * n)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        total += n
    first = plan_batches([len(e["input_ids"]) for e in examples], s.batch, s.seq_len, True,
                         shuffle=False, seed=s.seed, epoch=0)[0]
    return [[examples[i] for i in row] for row in first]
