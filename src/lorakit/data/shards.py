"""Many data files of one kind read in one ``datasets`` load, then cut back into one part per file.

A ``datasets.load_dataset`` call costs about 60 ms before it reads a record (the builder, the
data files' resolution, cache locks, its info file), so a folder of hundreds of small shards
took minutes, one load per file. Reading them together must not change what any file reads as,
and the builders do not promise that: they take the features from the first file and cast every
later one to them (a number becomes text, a column a file lacks is filled with None). So only
files the builder would type alike are read together, consecutive ones in the order given:

- ``.parquet``: the same Arrow schema (and the features ``datasets`` stores in its metadata);
- ``.jsonl`` smaller than the builder's first chunk (types are inferred from that chunk alone):
  the same *shape*, every column in order of first appearance with the kinds of value it holds,
  in order of first appearance too (objects with their keys, lists with their items' kinds, a
  text that pyarrow would read as a timestamp apart from other texts);
- ``.txt``: lorakit splits them itself (data/reading.py), each file by its own rule, into text;
- ``.csv`` smaller than ``SMALL_FILE`` with a header that names every column: the same header
  (its cells are all read as text, so the header alone types them);
- the same builder options (a byte-order mark's encoding).

The row count of each file is known before the load (the non-blank lines, a .txt file's
examples, the CSV records that Python's csv module reads, the Parquet footer):
the load's rows are checked against their sum, and each file's rows within it are its own (a
`SourceFile` range of data/reading.py). A load that fails or disagrees is redone file by file,
which names the file at fault as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import datasets
from datasets.packaged_modules.json.json import JsonConfig

# the json builder infers a file's types from its first chunk of this many bytes
JSON_CHUNK = JsonConfig.chunksize
# a CSV file read with others is this much smaller: a larger one's reading dwarfs a load's fixed cost
SMALL_FILE = 16 * 2**20
# pyarrow's JSON reader reads an ISO date or time as a timestamp, not as text
_TIMESTAMP_LIKE = re.compile(r"\s*\d{4}-\d\d-\d\d")


@dataclass(frozen=True)
class Checked:
    """A data file whose checks passed, and what reading it with others needs."""

    path: Path
    kind: str
    options: dict
    rows: int | None = None  # known before loading; None: only the load tells
    shape: Hashable = None  # files of one kind, options and shape read alike; None: read alone
    text_split: tuple[str, bool] | None = None  # a .txt file's sha256 and whether it splits by paragraph

    def group(self) -> Hashable:
        if self.rows is None or self.shape is None:
            return None
        return self.kind, repr(sorted(self.options.items())), self.shape


class RecordShapes:
    """The shape of a .jsonl file's records, collected while its lines are checked."""

    def __init__(self) -> None:
        self.rows = 0
        self.columns: dict[str, dict] = {}  # column -> {shape of a value: None}, both in order of first appearance

    def add(self, record: dict) -> None:
        self.rows += 1
        for key, value in record.items():
            self.columns.setdefault(key, {}).setdefault(_value_shape(value))

    def signature(self) -> tuple:
        return tuple((key, tuple(shapes)) for key, shapes in self.columns.items())


def _value_shape(value) -> Hashable:
    if value is None or isinstance(value, (bool, int, float)):
        return type(value).__name__
    if isinstance(value, str):
        return "timestamp-like" if _TIMESTAMP_LIKE.match(value) else "str"
    if isinstance(value, list):
        return "list", tuple(dict.fromkeys(map(_value_shape, value)))
    return "object", tuple((key, _value_shape(item)) for key, item in value.items())


def parquet_shape(schema) -> Hashable:
    """A Parquet file's Arrow schema and the features datasets saved with it, if any."""
    return schema.remove_metadata().to_string(), (schema.metadata or {}).get(b"huggingface")


def runs(files: list[Checked]) -> list[list[Checked]]:
    """Consecutive files that may be read in one load; a file that may not stands alone."""
    grouped: list[list[Checked]] = []
    for file in files:
        key = file.group()
        if grouped and key is not None and grouped[-1][0].group() == key:
            grouped[-1].append(file)
        else:
            grouped.append([file])
    return grouped


def read_together(files: list[Checked], load_together: Callable[[list[Checked]], datasets.Dataset],
                  load_alone: Callable[[Checked], datasets.Dataset]) -> list[tuple[datasets.Dataset, list[int]]]:
    """Each dataset read, with the rows of each of `files` it holds, in order: one load where it
    gives every file its known rows, else one per file."""
    if len(files) > 1:
        try:
            whole = load_together(files)
        except Exception:  # a malformed file or a full cache: file by file, the error names the file as before
            whole = None
        if whole is not None and len(whole) == sum(file.rows for file in files):
            return [(whole, [file.rows for file in files])]
    return [(ds, [len(ds)]) for ds in map(load_alone, files)]
