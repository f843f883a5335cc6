"""Batch plans (which examples go together, in what order) and collation into tensors.

A *plan* is computed from the example lengths alone, deterministically from (seed, epoch)::

    Plan  = list[Batch]      Batch = list[Row]      Row = list[int]   (example indices)

Without packing each row holds one example; rows are bucketed by length (shuffle, sort
windows of ``batch_size * 64`` examples by length, cut into batches, shuffle the batches), so a
batch pads only to its own longest example. With ``shuffle=False`` batches follow dataset order.
With packing, examples are packed best-fit-decreasing into rows of at most ``seq_len`` tokens
(within windows of shuffled examples), and ``batch_size`` rows make a batch. Resuming at
``(epoch, batch_index)`` rebuilds the same plan and skips ``batch_index`` entries.

A packed row, and what keeps its examples apart::

    input_ids     a0 a1 a2 a3 b0 b1 b2 c0 c1 p  p
    position_ids   0  1  2  3  0  1  2  0  1 0  0     restart per example (RoPE sees no offset); padding at 0
    labels         -  a1 a2 a3 -  b1 b2 -  c1 -  -    first label of each example is -100, so
                                                      a3 is never trained to predict b0
    attention     block-diagonal causal: a token sees only earlier tokens of its own example

Attention for packed rows (``packed_attention``), checked on a Llama model in transformers 5.x:

- ``"4d"`` (default): ``attention_mask`` is a float (B, 1, T, T) mask, 0 where attention is
  allowed and the dtype's minimum elsewhere. transformers passes 4D masks through unchanged,
  and both ``sdpa`` and ``eager`` attention honour it. Pass the model's compute dtype as
  ``mask_dtype`` (a float32 mask also worked with a bf16 model on CPU; on GPU the matching
  dtype is the safe choice and halves the mask's memory, which is B*T*T values).
  (A bool 4D mask works with sdpa but eager adds it to the scores, so it is not used.)
- ``"position_ids"``: no ``attention_mask``; transformers detects packing from the restarting
  ``position_ids`` (flash-attention reads packing from them only for a batch of one row). It
  only does so when no KV cache exists:
  the model MUST be called with ``use_cache=False``, otherwise examples silently see each other.
- ``"varlen"``: no ``attention_mask``; ``position_ids`` as above plus the document boundaries
  flash-attention's varlen API takes: ``cu_seq_lens_q`` = ``cu_seq_lens_k``, int32 cumulative
  lengths over the B*T tokens read as one sequence, and ``max_length_q`` = ``max_length_k``, the
  longest segment as a 0-dim int32 tensor (a tensor so that ``{k: v.to(device)}`` works on every
  batch value). Each padding token is a segment of its own, at position 0: it attends only to
  itself (labels -100) and every token has an output. Exact with no B*T*T tensor under ``lorakit_varlen``
  attention (kernels/varlen_attention.py: ``use_varlen_attention(model)``), which reads these
  kwargs; it is also the layout transformers' flash-attention varlen path reads (not run here).
  Under ``sdpa``/``eager`` the kwargs are ignored and transformers detects packing from
  ``position_ids``: still exact, but it builds a 4D mask itself and needs ``use_cache=False``.

Unpacked batches carry a 2D (B, T) long ``attention_mask`` (1 = token, 0 = padding, on the right).
A batch holds only model kwargs (``input_ids``, ``labels``, ``position_ids``, ``attention_mask``
or the varlen boundaries), all tensors; the number of trained tokens is ``count_label_tokens(batch)``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from itertools import accumulate
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lorakit.errors import ConfigError

IGNORE_INDEX = -100  # a label no loss counts: torch's cross_entropy default, which kernels/chunked_ce.py keeps too
BUCKET_BATCHES = 64  # sort windows hold this many batches' worth of examples
PACK_WINDOW = 8192  # examples packed together (best-fit decreasing) at a time
PACKED_ATTENTION = ("4d", "position_ids", "varlen")

Plan = list[list[list[int]]]


def plan_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, seq_len: int, packing: bool,
                 shuffle: bool, seed: int, epoch: int) -> Plan:
    """The epoch's batches as lists of rows of example indices; same inputs, same plan."""
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_plan_args(lengths, batch_size, seq_len)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if packing:
        rows = [row for start in range(0, len(order), PACK_WINDOW)
                for row in _pack(order[start:start + PACK_WINDOW], lengths, seq_len)]
    else:
        rows = [[int(i)] for i in (_bucket(order, lengths, batch_size) if shuffle else order)]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _check_plan_args(lengths: np.ndarray, batch_size: int, seq_len: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if len(lengths) and (lengths.max() > seq_len or lengths.min() < 1):
        raise ValueError(f"example lengths must lie in [1, {seq_len}] (tokenize with the same seq_len)")


def _bucket(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Sort each window of the shuffled order by length so neighbours pad little."""
    window = batch_size * BUCKET_BATCHES
    parts = [order[s:s + window] for s in range(0, len(order), window)]
    return np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts]) if parts else order


def _pack(indices: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row that still has room."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), kept sorted
    for i in sorted(indices.tolist(), key=lambda k: -lengths[k]):  # stable: ties keep shuffle order
        need = int(lengths[i])
        slot = bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([i])
            insort(free, (seq_len - need, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            insort(free, (room - need, row))
    return rows


def collate(rows: Sequence[Sequence[dict]] | Sequence[dict], packing: bool, seq_len: int, pad_id: int,
            packed_attention: str = "4d", mask_dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None, first_position: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for ``model(**batch)`` from rows of examples (dicts with input_ids, labels).

    With ``device`` the batch is returned there, and a 4D mask is built there (B*T*T values are
    much cheaper to fill on a GPU than on a busy CPU). ``first_position``: the position id of an
    example's first token (model_limits.first_position_id: RoBERTa's start after its padding index).
    """
    if rows and isinstance(rows[0], dict):
        rows = [[example] for example in rows]  # a flat list: one example per row
    if not packing:
        if any(len(row) != 1 for row in rows):
            raise ValueError("unpacked rows must hold exactly one example each")
        return _to(_collate_padded([row[0] for row in rows], pad_id, first_position), device)
    if packed_attention not in PACKED_ATTENTION:
        raise ConfigError(f"packed_attention must be one of {PACKED_ATTENTION}, got {packed_attention!r}")
    batch, segments = _collate_packed(rows, seq_len, pad_id, first_position)
    if packed_attention == "varlen":
        width = batch["input_ids"].shape[1]
        batch.update(varlen_boundaries([[len(ex["input_ids"]) for ex in row] for row in rows], width))
    batch = _to(batch, device)
    if packed_attention == "4d":
        batch["attention_mask"] = block_causal_mask(segments.to(batch["input_ids"].device), mask_dtype)
    return batch


def _to(batch: dict[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def _collate_padded(examples: list[dict], pad_id: int, first_position: int) -> dict[str, torch.Tensor]:
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = _blank(len(examples), width, pad_id)
    attention = torch.zeros(len(examples), width, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = _place(batch, r, 0, ex)
        attention[r, :n] = 1
    batch["position_ids"] = (first_position + torch.arange(width)).expand(len(examples), width).clone()
    batch["attention_mask"] = attention
    return batch


def _collate_packed(rows: Sequence[Sequence[dict]], seq_len: int, pad_id: int,
                    first_position: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The packed batch without its attention mask, and each token's example number (B, T)."""
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    if width > seq_len:
        raise ValueError(f"a packed row holds {width} tokens, more than seq_len {seq_len}")
    batch = _blank(len(rows), width, pad_id)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T) example number per token
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = _place(batch, r, at, ex)
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = s
            at += n
        # each pad token stands alone, at position 0: no position beyond the longest example (a
        # table such as GPT-2's has no row past it) and no segment longer than it (a sliding window)
        positions[r, at:] = 0
        segments[r, at:] = len(row) + torch.arange(width - at)
    batch["position_ids"] = positions + first_position
    return batch, segments


def _blank(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)}


def _place(batch: dict[str, torch.Tensor], row: int, at: int, example: dict) -> int:
    """Copy one example into ``batch`` at (row, at); its first label is masked. Returns its length."""
    n = len(example["input_ids"])
    batch["input_ids"][row, at:at + n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
    batch["labels"][row, at:at + n] = torch.as_tensor(example["labels"], dtype=torch.long)
    batch["labels"][row, at] = IGNORE_INDEX
    return n


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where query t may see key s (same segment, s <= t), else -inf-ish."""
    position = torch.arange(segments.shape[1], device=segments.device)
    same = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
    allowed = same & (position[:, None] >= position[None, :])
    low = torch.finfo(dtype).min
    return torch.full(allowed.shape, low, dtype=dtype, device=segments.device).masked_fill_(allowed, 0)


def varlen_boundaries(row_lengths: Sequence[Sequence[int]], width: int) -> dict[str, torch.Tensor]:
    """cu_seq_lens / max_length kwargs for rows of ``width`` tokens holding documents of these
    lengths; each token of a row's padding tail (width - its total) is one more segment."""
    lengths = []
    for row in row_lengths:
        lengths += [int(n) for n in row] + [1] * (width - sum(row))
    bounds = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)
    longest = torch.tensor(max(lengths), dtype=torch.int32)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the model is trained to predict (labels after the shift that are not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class BatchIterator:
    """Yields the collated batches of ``plan[start_index:]``; batch k is plan entry start_index + k."""

    def __init__(self, dataset: Any, plan: Plan, *, packing: bool, seq_len: int, pad_id: int,
                 start_index: int = 0, packed_attention: str = "4d", mask_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, first_position: int = 0) -> None:
        if not 0 <= start_index <= len(plan):
            raise ValueError(f"start_index {start_index} outside the plan of {len(plan)} batches")
        self.dataset, self.plan, self.start_index = dataset, plan, start_index
        self.options = dict(packing=packing, seq_len=seq_len, pad_id=pad_id,
                            packed_attention=packed_attention, mask_dtype=mask_dtype, device=device,
                            first_position=first_position)

    def __len__(self) -> int:
        return len(self.plan) - self.start_index

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in range(self.start_index, len(self.plan)):
            yield self.batch(index)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """The collated batch of plan entry ``index``."""
        rows = self.plan[index]
        flat = [i for row in rows for i in row]
        examples = iter(_fetch(self.dataset, flat))
        grouped = [[next(examples) for _ in row] for row in rows]
        return collate(grouped, **self.options)


def _fetch(dataset: Any, indices: list[int]) -> list[dict]:
    """input_ids and labels of ``indices`` from a datasets.Dataset or a list of dicts."""
    if hasattr(dataset, "select_columns"):
        columns = dataset.select_columns(["input_ids", "labels"])[indices]
        return [{"input_ids": ids, "labels": labels}
                for ids, labels in zip(columns["input_ids"], columns["labels"])]
    return [dataset[i] for i in indices]
