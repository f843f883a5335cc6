"""Prompts for `lorakit generate`: one read from stdin, or many from a file, all checked before a
model loads.

- ``.txt``: one prompt per non-blank line, its surrounding whitespace stripped (as training's
  .txt reader strips its examples).
- ``.jsonl``: one JSON object per line, holding the prompt side of a record the trainer reads:
  a chat (``messages``, ShareGPT ``conversations``, or TRL's ``prompt`` as a list of turns) whose
  trailing assistant turns (a training record's answer) are left out, so that the model writes
  its own; or the text of ``instruction`` (its ``input``/``context`` after it, as training joins
  them), ``prompt``, ``question``, ``query``, ``text`` or ``input``, the first of them present.
  An optional ``system`` field is the record's system turn. The answer's fields (``output``,
  ``response``, ...) are not read, so a training or test file serves as it is.

``--columns FIELD=COLUMN`` renames a .jsonl line's own fields to those, as it renames a training
file's columns (a run's mapping, applied by default, renames only the fields a line has).

Stdin is one prompt, the whole of it, less the line breaks that end it (as a shell's `$(...)`
drops them: `echo` adds one the positional prompt would not have). Every problem is a DataError
that names the file and line and what to write instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

from lorakit.data.columns import column_map, pair_and_fix
from lorakit.data.formats import CHAT_COLUMNS, INPUT_OUTPUT, INSTRUCTION_FIELDS
from lorakit.data.messages import CONTEXT_FIELDS, chat_messages, with_context
from lorakit.data.reading import check_not_binary, not_utf8, parse_jsonl_line
from lorakit.errors import DataError

# the fields a record's prompt text is read from, in the order the trainer prefers them (the
# instruction pairs' first fields, then text, then input/output's input)
TEXT_FIELDS = tuple(dict.fromkeys([*(pair[0] for pair in INSTRUCTION_FIELDS), "text", INPUT_OUTPUT[0]]))
PROMPT_FIELDS = (*CHAT_COLUMNS, *TEXT_FIELDS)
# every field a line's prompt is read from: a mapped column whose field is not one (an answer's) need not be there
FIELDS_READ = frozenset((*PROMPT_FIELDS, *CONTEXT_FIELDS, "system"))
SUFFIXES = (".txt", ".jsonl")
JSONL_SHAPE = '{"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}'


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: a user message, or a chat's turns up to the reply to write."""

    content: str | list[dict]
    system: str | None = None  # the record's own system turn (None: the command's)
    where: str = "the prompt"  # for messages: "prompts.jsonl line 3"
    line: int | None = None  # its line in the file


@dataclass(frozen=True)
class _Record:
    """What messages.chat_messages needs to read a record's turns and name it in its errors."""

    place: str
    fields: tuple[str, ...]
    fmt: str = "chat"

    def where(self, index: int) -> str:
        return self.place


def read_prompt_file(path: str | Path, columns: Sequence[str] = (), from_the_run: bool = False) -> list[Prompt]:
    """Every prompt in a .txt or .jsonl file, a .jsonl line's fields renamed by `columns`
    (FIELD=COLUMN pairs); DataError for a missing, empty or malformed file. A mapping
    `from_the_run` (an adapter's training run's) need not find its columns: the file may use
    lorakit's names already, or be a .txt."""
    path = Path(path)
    _check_readable(path)
    mapping = column_map(columns)
    if path.suffix.lower() == ".txt":
        if mapping and not from_the_run:
            raise DataError(f"prompts file {path} holds one prompt per line, without fields for --columns to rename; "
                            "leave --columns out, or write the prompts as a .jsonl file")
        prompts = _read_txt(path)
    else:
        prompts = _read_jsonl(path, mapping, from_the_run)
    if not prompts:
        example = "one prompt per line" if path.suffix.lower() == ".txt" else f"one object per line, {JSONL_SHAPE}"
        raise DataError(f"prompts file {path} holds no prompt (it is empty, or blank lines only); write {example}")
    return prompts


def read_stdin_prompt(stream: IO | None) -> str:
    """The whole of `stream` (stdin) as one prompt, less the line breaks that end it."""
    if stream is None:  # no stdin at all (closed, or a process started without one)
        raise DataError("PROMPT - reads the prompt from stdin, and this process has none; pass the prompt itself")
    data = getattr(stream, "buffer", stream).read()
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise DataError(f"stdin line {line} is not valid UTF-8; send the prompt "
                            "as UTF-8 (e.g. iconv -f latin1 -t utf-8 prompt.txt | lorakit generate ... -)") from None
    text = data.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")  # as files are read
    if not text.strip():
        raise DataError("stdin held no prompt (it was empty); pipe the text in, e.g. "
                        "echo \"Define 'knoll'.\" | lorakit generate --adapter DIR -")
    return text


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"prompts file {path} does not exist; check the path")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"prompts file {path}: unsupported extension {path.suffix or '(none)'!r}; use .txt (one "
                        f"prompt per line) or .jsonl (one object per line, {JSONL_SHAPE})")
    if not path.is_file():
        raise DataError(f"prompts file {path} is not a file (a folder?); pass a .txt or .jsonl file")
    check_not_binary(path)


def _lines(path: Path):
    """(line number, text) of each non-blank line, decoded as UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise not_utf8(path, number) from None
            if text.removeprefix("\ufeff").strip():  # str.strip keeps a byte-order mark
                yield number, text


def _read_txt(path: Path) -> list[Prompt]:
    return [Prompt(text.removeprefix("\ufeff").strip(), where=f"{path} line {number}", line=number)
            for number, text in _lines(path)]


def _read_jsonl(path: Path, mapping: dict[str, str], from_the_run: bool) -> list[Prompt]:
    rows = [(number, parse_jsonl_line(path, number, text, JSONL_SHAPE)) for number, text in _lines(path)]
    if mapping and not from_the_run:
        _refuse_missing_columns(path, [row for _, row in rows], mapping)
    return [_record_prompt(_renamed(row, mapping, f"{path} line {number}", from_the_run), f"{path} line {number}",
                           number) for number, row in rows]


def _renamed(row: dict, mapping: dict[str, str], where: str, from_the_run: bool) -> dict:
    """The line's mapped fields under lorakit's names (a training file's columns are renamed so)."""
    here = {column: field for column, field in mapping.items() if column in row}
    doubled = [(column, field) for column, field in here.items() if field in row and field not in here]
    if doubled:
        column, field = doubled[0]
        pair, fix = pair_and_fix(field, column, from_the_run,
                                 f"leave that pair out, or map {field!r} to another field as well")
        raise DataError(f"{where} already has a field {field!r}: {pair} would give it two; {fix}")
    return {here.get(key, key): value for key, value in row.items()}


def _refuse_missing_columns(path: Path, rows: list[dict], mapping: dict[str, str]) -> None:
    """A mapped column that the prompt would be read from, in no line: a typo, as train refuses it.
    An answer's column (output=answer, kept from train's --columns) may be missing."""
    present = list(dict.fromkeys(key for row in rows for key in row))
    missing = [column for column, field in mapping.items() if field in FIELDS_READ and column not in present]
    if missing:
        raise DataError(f"--columns {mapping[missing[0]]}={missing[0]}: no line of {path} has a field {missing[0]!r}; "
                        f"its lines' fields: {', '.join(map(repr, present)) or 'none'}")


def _record_prompt(row: dict, where: str, line: int) -> Prompt:
    name = next((field for field in PROMPT_FIELDS if row.get(field) is not None), None)
    if name is None:
        present = f"its fields: {', '.join(map(repr, row))}" if row else "it is {}"
        raise DataError(f"{where} has no field to read a prompt from ({present}); give it one of "
                        f"{', '.join(map(repr, CHAT_COLUMNS))} (a chat) or {', '.join(map(repr, TEXT_FIELDS))} "
                        "(its text), with an optional 'system'")
    system = _system(row, where)
    if name in CHAT_COLUMNS or (name == "prompt" and isinstance(row[name], list)):  # TRL's turns too
        prompt = Prompt(_turns_to_answer(row, name, where), where=where, line=line)
    else:
        prompt = Prompt(_text(row, name, where), system, where, line)
    _check_encodable(prompt, where)
    return prompt


def _system(row: dict, where: str) -> str | None:
    """The record's system turn; a blank one counts as none, as in training."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' is {_a_kind(system)}, not a string; give it the system turn's text "
                        "or leave it out")
    return system if system and system.strip() else None


def _text(row: dict, name: str, where: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {_a_kind(value)}, not a string; give it the prompt's text")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty; give it the text to answer, or delete the line")
    return with_context(row, name, value)  # as training reads them


def _turns_to_answer(row: dict, name: str, where: str) -> list[dict]:
    """The record's turns (checked as training checks them, its system field first) less the
    assistant's closing ones: those are the answer the model is to write."""
    turns = chat_messages(row, 0, _Record(where, (name,)))
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"{where}: '{name}' has no user turn for the model to answer; end it with a "
                        "{\"role\": \"user\", \"content\": \"...\"} turn")
    return turns


def _check_encodable(prompt: Prompt, where: str) -> None:
    """A JSON escape of half a surrogate pair ("\\ud800") reads as a string that no UTF-8 output
    (the JSONL written, the tokenizer) can hold."""
    try:
        json.dumps([prompt.content, prompt.system], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where} holds a lone surrogate escape (\\ud800-\\udfff), which is not a character; "
                        "remove it or write the character it was meant to pair into") from None


def _a_kind(value: Any) -> str:
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
