"""`--columns FIELD=COLUMN ...`: a dataset's own column names mapped onto the fields lorakit reads
(`instruction=question output=answer`), for data whose columns no format recognises. The files'
columns are renamed before the format is detected, so everything after sees lorakit's names."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lorakit.data.formats import CHAT_COLUMNS, INPUT_OUTPUT, INSTRUCTION_FIELDS, columns_read
from lorakit.data.messages import CONTEXT_FIELDS
from lorakit.data.records import RecordSet
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


def column_map_problems(items: Sequence[str]) -> list[str]:
    """What is wrong with a mapping, for the config's list of problems."""
    try:
        column_map(items)
    except ConfigError as exc:
        return [str(exc)]
    return []


def rename_columns(record_sets: list[RecordSet], items: Sequence[str], fmt: str = "auto",
                   from_the_run: bool = False) -> list[RecordSet]:
    """Each set's files with their mapped columns under lorakit's names (before tokenize_records).
    A mapped column must be in some file (the training or the eval data), unless the mapping is a
    run's, applied to data that may already use lorakit's names; a mapped field a file's format
    would not read (another format won its detection) is refused rather than dropped."""
    mapping = column_map(items)
    if not mapping:
        return record_sets
    present = list(dict.fromkeys(column for records in record_sets for column in records.columns))
    missing = [column for column in mapping if column not in present]
    if missing and not from_the_run:
        raise DataError(f"--columns {mapping[missing[0]]}={missing[0]}: no data file has a column {missing[0]!r}; "
                        f"the files' columns: {', '.join(map(repr, present))}")
    return [_renamed_set(records, mapping, fmt, from_the_run) for records in record_sets]


def pair_and_fix(field: str, column: str, from_the_run: bool, fix: str) -> tuple[str, str]:
    """How an error names a mapped pair, and the fix it offers: the user's own --columns, or the
    pair the adapter's run was trained with, which the user did not type and replaces with --columns."""
    if from_the_run:
        return (f"the run's columns {field}={column} (its config.yaml)",
                "pass --columns with the pairs this file needs (they replace the run's)")
    return f"--columns {field}={column}", fix


def _renamed_set(records: RecordSet, mapping: dict[str, str], fmt: str, from_the_run: bool) -> RecordSet:
    """Each load renamed once: the files it holds share their columns (the first is named in errors)."""
    loads, sources = [], []
    for load, files in records.by_load():
        renamed = _renamed(load, files[0] if files else None, mapping, fmt, from_the_run)
        loads.append(renamed)
        sources += [dataclasses.replace(src, columns=tuple(renamed.column_names)) for src in files]
    return RecordSet(loads, sources)


def _renamed(part, src, mapping: dict[str, str], fmt: str, from_the_run: bool):
    here = {column: field for column, field in mapping.items() if column in part.column_names}
    where = src.path if src else "the data"
    # a field the file has already, not itself renamed away, would be a second column of that name
    doubled = [(column, field) for column, field in here.items() if field in part.column_names and field not in here]
    if doubled:
        column, field = doubled[0]
        pair, fix = pair_and_fix(field, column, from_the_run,
                                 f"leave that pair out, or map {field!r} to another field as well")
        raise DataError(f"{where} already has a column {field!r}: {pair} would give it two; {fix}")
    part = part.rename_columns(here) if here else part
    _refuse_unread(part.column_names, here, fmt, where, from_the_run)
    return part


def _refuse_unread(columns: list[str], here: dict[str, str], fmt: str, where, from_the_run: bool) -> None:
    try:
        read_as, fields, read = columns_read(columns, fmt)
    except DataError:  # no format at all: tokenize_records says so, naming the file
        return
    unread = [(column, field) for column, field in here.items() if field not in read]
    if unread:
        column, field = unread[0]
        pair, fix = pair_and_fix(field, column, from_the_run,
                                 "map those fields instead, pass --format, or leave that pair out")
        raise DataError(f"{where}: {pair} maps a field that is not read: the file reads as {read_as} through "
                        f"{', '.join(fields)}; {fix}")
