"""`--columns FIELD=COLUMN ...`: a dataset's own column names mapped onto the fields lorakit reads
(`instruction=question output=answer`), for data whose columns no format recognises. The files'
columns are renamed before the format is detected, so everything after sees lorakit's names."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lorakit.data.formats import CHAT_COLUMNS, INPUT_OUTPUT, INSTRUCTION_FIELDS
from lorakit.data.messages import CONTEXT_FIELDS
from lorakit.data.reading import RecordSet
from lorakit.errors import ConfigError, DataError

# every column name some format reads
FIELDS = tuple(dict.fromkeys(("text", *CHAT_COLUMNS, *(f for pair in (*INSTRUCTION_FIELDS, INPUT_OUTPUT) for f in pair),
                              *CONTEXT_FIELDS, "system")))


def column_map(items: Sequence[str]) -> dict[str, str]:
    """{the file's column: lorakit's field}; ConfigError for a malformed or repeated pair."""
    mapping: dict[str, str] = {}
    for item in items:
        field, sep, column = (part.strip() for part in str(item).partition("="))
        if not (sep and field and column):
            raise ConfigError(f"--columns takes FIELD=COLUMN pairs (e.g. instruction=question output=answer), "
                              f"got {item!r}")
        if field not in FIELDS:
            raise ConfigError(f"--columns {item}: {field!r} is not a field lorakit reads; map to one of "
                              f"{', '.join(FIELDS)}")
        if field in mapping.values() or column in mapping:
            raise ConfigError(f"--columns {item}: the field {field!r} or the column {column!r} is mapped twice; "
                              "map each once")
        mapping[column] = field
    return mapping


def rename_columns(records: RecordSet, items: Sequence[str]) -> RecordSet:
    """The records with each file's mapped columns under lorakit's names (before tokenize_records)."""
    mapping = column_map(items)
    if not mapping:
        return records
    missing = [column for column in mapping if column not in records.columns]
    if missing:
        raise DataError(f"--columns {mapping[missing[0]]}={missing[0]}: no data file has a column {missing[0]!r}; "
                        f"the files' columns: {', '.join(map(repr, records.columns))}")
    sources = records.sources or [None] * len(records.parts)
    renamed = [_renamed(part, src, mapping) for part, src in zip(records.parts, sources)]
    return RecordSet([part for part, _ in renamed], [src for _, src in renamed] if records.sources else [])


def _renamed(part, src, mapping: dict[str, str]):
    here = {column: field for column, field in mapping.items() if column in part.column_names}
    taken = [field for field in here.values() if field in part.column_names and field not in here]
    if taken:
        column = next(c for c, f in here.items() if f == taken[0])
        where = src.path if src else "the data"
        raise DataError(f"{where} already has a column {taken[0]!r}: --columns {taken[0]}={column} would give it "
                        f"two; leave that pair out, or map {taken[0]!r} to another field as well")
    part = part.rename_columns(here) if here else part
    return part, (dataclasses.replace(src, columns=tuple(part.column_names)) if src else None)
