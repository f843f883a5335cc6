"""What `read_records` (data/reading.py) returns: the records, as the datasets loaded, and where
each came from, so that later stages name "data.jsonl line 18" in their errors (`locate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets


@dataclass(frozen=True)
class SourceFile:
    """One input file (or saved folder) and the rows it contributed."""

    path: Path
    kind: str  # "jsonl", "json", "csv", "parquet", "txt" or "saved"
    start: int  # index of its first row among all the records (the loads, in order)
    count: int
    columns: tuple[str, ...] = ()  # its own fields (RecordSet.columns: every file's)

    def describe_row(self, row: int) -> str:
        """Human position of the file's row ``row`` (0-based), e.g. ``data.jsonl line 18``."""
        if self.kind == "jsonl":
            return f"{self.path} line {_nth_nonblank_line(self.path, row)}"
        if self.kind == "csv":
            return f"{self.path} data row {row + 1}"
        if self.kind == "txt":
            return f"{self.path} example {row + 1}"
        return f"{self.path} record {row + 1}"


@dataclass
class RecordSet:
    """Raw records and their provenance. `loads` are the datasets read, in order: one file's, or
    consecutive files' read alike in one load (data/shards.py), which share their columns and
    types. They are not concatenated into one: a column no format reads, or a key inside a turn,
    may differ in type between files, which one dataset could not hold (formats.tokenize_records
    tokenises together only loads whose columns agree). `sources`: each file's rows, in order."""

    loads: list[datasets.Dataset]
    sources: list[SourceFile]

    def __len__(self) -> int:
        return sum(len(load) for load in self.loads)

    @property
    def columns(self) -> list[str]:
        """Every file's columns, in the order they first appear."""
        return list(dict.fromkeys(name for load in self.loads for name in load.column_names))

    def by_load(self) -> list[tuple[datasets.Dataset, list[SourceFile]]]:
        """Each load with the files it holds, in order (none where the set has no sources)."""
        grouped, files, end = [], iter(self.sources), 0
        file = next(files, None)
        for load in self.loads:
            end += len(load)
            held = []
            while file is not None and file.start < end:
                held.append(file)
                file = next(files, None)
            grouped.append((load, held))
        return grouped

    @property
    def parts(self) -> list[datasets.Dataset]:
        """One dataset per file, views of the loads (a few ms each: to look at a file's records)."""
        if not self.sources:
            return list(self.loads)
        parts = []
        for load, files in self.by_load():
            first = files[0].start
            parts += [load] if len(files) == 1 else \
                [load.select(range(src.start - first, src.start - first + src.count)) for src in files]
        return parts


def locate(sources: Sequence[SourceFile], index: int) -> str:
    """``record 5 (data.jsonl line 7)``; plain ``record 5`` when the origin is unknown."""
    for src in sources:
        if src.start <= index < src.start + src.count:
            return f"record {index + 1} ({src.describe_row(index - src.start)})"
    return f"record {index + 1}"


def _nth_nonblank_line(path: Path, row: int) -> int | str:
    """1-based line number of the ``row``-th (0-based) non-blank line; '?' if not found."""
    seen = -1
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number
    return "?"
