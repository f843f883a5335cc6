"""Tokenised examples once made: the set (`TokenizedData`), the figures a dry run shows and the
warnings worth a user's attention (`compute_stats`), and the split into train and eval by record
(`split_eval`). data/formats.py makes the examples; nothing here changes a token, so the
tokenisation cache's key (formats._encoding_revision) leaves this module out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import datasets
import numpy as np

from lorakit.errors import ConfigError, DataError

MASKED_WARN_FRACTION = 0.9


@dataclass
class DataStats:
    """Figures for a dry run; ``warnings`` are sentences worth showing to the user."""

    format: str
    format_note: str
    seq_len: int
    records: int  # rows read
    examples: int  # rows kept
    dropped: int  # rows with no trained token (cut before one, or none to begin with)
    truncated: int  # rows cut at seq_len (kept or dropped)
    total_tokens: int
    label_tokens: int
    masked_fraction: float
    length_min: int
    length_mean: float
    length_max: int
    dropped_cut: int = 0  # of `dropped`: those cut at seq_len before a trained token
    split: int = 0  # texts longer than seq_len, each become several examples
    largest_token_id: int = -1  # the model's embedding table must have a row for it
    warnings: list[str] = field(default_factory=list)


@dataclass
class TokenizedData:
    """Columns: input_ids, labels (-100 = not trained), length, num_labels, truncated, top_id (the
    largest token id), record (the number of the record an example came from: a long text gives several),
    system (a digest of its record's system turn, '' for none)."""

    dataset: datasets.Dataset
    format: str
    stats: DataStats
    known_lengths: np.ndarray | None = field(default=None, repr=False, compare=False)
    system_turn: str | None = None  # the system turn every record opens with, when they share one

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self) -> np.ndarray:
        """Every example's length, read once (each epoch's plan, the fingerprint and the run's checks ask;
        on the part of a split, an index-mapped dataset, a read gathers the column anew)."""
        if self.known_lengths is None:
            table = self.dataset.select_columns(["length"]).with_format("numpy")[:]
            self.known_lengths = np.asarray(table["length"], dtype=np.int64)
        return self.known_lengths

    def fingerprint(self) -> str:
        """A digest of the examples: every length, and the tokens and labels of up to 256 spread
        over the set (a resume on changed data is told so; hashing every token of a large set would
        cost seconds for no better answer in practice)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.lengths(), dtype=np.int64).tobytes())
        for index in np.linspace(0, len(self) - 1, num=min(len(self), 256), dtype=np.int64).tolist():
            row = self.dataset[index]
            digest.update(np.asarray(row["input_ids"] + row["labels"], dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ReadFigures:
    """What tokenising the records found: records read, examples dropped (with no trained token;
    `dropped_cut` of them cut before one), examples cut at seq_len, texts split into several."""

    records: int
    dropped: int = 0
    dropped_cut: int = 0
    truncated: int = 0
    split: int = 0


def numeric_columns(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    """length, num_labels, truncated, top_id and record as numpy arrays, read in one batch (not row by row)."""
    table = ds.select_columns(["length", "num_labels", "truncated", "top_id", "record"]).with_format("numpy")[:]
    return {"length": np.asarray(table["length"], dtype=np.int64),
            "num_labels": np.asarray(table["num_labels"], dtype=np.int64),
            "truncated": np.asarray(table["truncated"], dtype=bool),
            "top_id": np.asarray(table["top_id"], dtype=np.int64),
            "record": np.asarray(table["record"], dtype=np.int64)}


def compute_stats(columns: dict[str, np.ndarray], fmt: str, note: str, seq_len: int,
                  read: ReadFigures | None = None) -> DataStats:
    """Stats of tokenized examples (their `numeric_columns`) plus warnings; `read`: what
    tokenising found (default: these examples' own records, and those of them that were cut)."""
    lengths, num_labels = columns["length"], columns["num_labels"]
    cut_kept = int(columns["truncated"].sum())
    read = read or ReadFigures(records=len(np.unique(columns["record"])), truncated=cut_kept)
    total, trained = int(lengths.sum()), int(num_labels.sum())
    stats = DataStats(
        format=fmt, format_note=note, seq_len=seq_len, records=read.records, examples=len(lengths),
        dropped=read.dropped, truncated=read.truncated, total_tokens=total, label_tokens=trained,
        masked_fraction=1.0 - trained / total if total else 0.0,
        length_min=int(lengths.min()), length_mean=float(lengths.mean()), length_max=int(lengths.max()),
        dropped_cut=read.dropped_cut, split=read.split, largest_token_id=int(columns["top_id"].max()),
    )
    stats.warnings = _warnings(stats, cut_kept)
    return stats


def _warnings(stats: DataStats, cut_kept: int) -> list[str]:
    notes = []
    if stats.masked_fraction > MASKED_WARN_FRACTION:
        notes.append(
            f"{stats.masked_fraction:.0%} of the tokens are masked (only {stats.label_tokens} of "
            f"{stats.total_tokens} are trained); fine for short answers, otherwise check the "
            "response fields, or train with --train-on-inputs (eval then scores every token too)"
        )
    if stats.split:
        notes.append(f"{stats.split} text{'s' * (stats.split != 1)} longer than --seq-len {stats.seq_len} "
                     f"became several examples each ({stats.examples} examples from {stats.records} "
                     f"record{'s' * (stats.records != 1)})")
    if cut_kept:
        notes.append(f"{cut_kept} of {stats.examples} examples were cut at --seq-len "
                     f"{stats.seq_len}; raise --seq-len to train on their ends")
    if stats.dropped:
        cut, empty = stats.dropped_cut, stats.dropped - stats.dropped_cut
        reasons = [f"{cut} cut at --seq-len {stats.seq_len} before the response"] if cut else []
        reasons += [f"{empty} with nothing to train"] if empty else []
        notes.append(f"{stats.dropped} record{'s' * (stats.dropped != 1)} with no trained token skipped "
                     f"({', '.join(reasons)})")
    return notes


NO_EOS_WARNING = ("the trained tokens hold no EOS or end-of-turn token, so the tuned model may not stop "
                  "generating; use a tokenizer with an eos_token (and a chat template that ends turns)")


def split_eval(tok: TokenizedData, fraction_or_count: float | int,
               seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(train, eval) by record: a float in (0, 1) is a fraction, an int >= 1 a count; same seed,
    same split. The pieces of a long text stay together, so eval holds no text trained on."""
    columns = numeric_columns(tok.dataset)  # read once: on an index-mapped dataset each read is a gather
    records = np.unique(columns["record"])
    k = _eval_count(fraction_or_count, len(records))
    held_out = np.isin(columns["record"], records[np.random.default_rng(seed).permutation(len(records))[:k]])
    return (_subset(tok, columns, np.flatnonzero(~held_out), reads_for_the_whole=True),
            _subset(tok, columns, np.flatnonzero(held_out)))


def _eval_count(value: float | int, n: int) -> int:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if number and 0 < value < 1:
        k = max(1, round(value * n))
    elif number and value >= 1 and float(value).is_integer():
        k = int(value)
    else:
        raise ConfigError(f"eval split must be a fraction in (0, 1) or a whole count >= 1, got {value!r}")
    if k >= n:
        raise DataError(f"an eval split of {k} record{'s' * (k != 1)} leaves none of the {n} for training; use a "
                        "smaller eval split, more data, or --eval-data")
    return k


def _subset(tok: TokenizedData, columns: dict[str, np.ndarray], indices: np.ndarray,
            reads_for_the_whole: bool = False) -> TokenizedData:
    """The examples at `indices` (`columns`: the whole set's `numeric_columns`). The training part
    of a split also keeps what reading the files found (records skipped or cut, a missing EOS):
    the user is told once, about every record."""
    ds, whole = tok.dataset.select(indices), tok.stats
    mine = {name: values[indices] for name, values in columns.items()}
    if not reads_for_the_whole:
        return TokenizedData(ds, tok.format, compute_stats(mine, tok.format, whole.format_note, whole.seq_len),
                             mine["length"], tok.system_turn)
    moved = len(np.unique(columns["record"])) - len(np.unique(mine["record"]))  # to the other part
    cut_moved = int(columns["truncated"].sum() - mine["truncated"].sum())
    read = ReadFigures(records=whole.records - moved, dropped=whole.dropped, dropped_cut=whole.dropped_cut,
                       truncated=whole.truncated - cut_moved, split=int((np.bincount(mine["record"]) > 1).sum()))
    stats = compute_stats(mine, tok.format, whole.format_note, whole.seq_len, read)
    stats.warnings += [w for w in whole.warnings if w == NO_EOS_WARNING]
    return TokenizedData(ds, tok.format, stats, mine["length"], tok.system_turn)
