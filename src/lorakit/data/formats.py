"""Turn raw records into token ids and loss masks (labels), once, with ``datasets.map``.

Formats (``auto`` picks one from the columns: ``messages``/``conversations`` -> chat, an
instruction field pair -> instruction, ``text`` -> text):

- ``text``: a ``text`` column; causal LM on every token, EOS appended so the model learns to stop.
  A text longer than ``seq_len`` becomes several examples (``_text_pieces``), not one cut short.
- ``instruction``: ``instruction`` + ``output`` or ``response`` (optional ``input``, or Dolly's
  ``context``, appended to the instruction after a blank line), or the pairs ``prompt``/``response``,
  ``question``/``answer``, ``prompt``/``completion``, ``query``/``response``, and ``input``/``output``
  where there is no ``text`` column; optional ``system``. The stats name the columns a format
  leaves unread. Rendered as a one-turn chat (below). TRL's
  conversational prompt/completion (both lists of {role, content} turns) is read as a chat in
  which only the completion's turns train.
- ``chat``: ``messages`` = [{role, content}] with roles system/user/assistant (content a string,
  or OpenAI's text parts [{type: text, text}], joined), or ShareGPT
  ``conversations`` = [{from, value}] with human/gpt/system (mapped to user/assistant/system);
  optional ``system`` column prepended as a system turn.

Chats are rendered with the tokenizer's chat template, so an instruct model sees its own
format. A tokenizer without one gets `FALLBACK_CHAT_TEMPLATE`::

    <bos>### System:
    {system}

    ### User:
    {instruction}

    {input}

    ### Assistant:
    {output}<eos>

Masking renders prefixes instead of searching strings. For every assistant turn i::

    start_i = len(render(messages[:i], add_generation_prompt=True))   # characters
    end_i   = len(render(messages[:i + 1]))
    full    = render(messages)         # each prefix must be a prefix of this string

A token of ``full`` is trained when its first character lies in some [start_i, end_i); that
includes the template's end-of-turn token (``<|im_end|>``) so the tuned model stops. With
``train_on_inputs=True`` every token is trained. Masked labels are -100. Labels are aligned
with ``input_ids`` (the model shifts them). The first label of every example is always -100:
no token precedes it, and packing relies on it so no example predicts its neighbour's start.

Chat and instruction examples longer than ``seq_len`` are cut (counted); examples left with no
trained token are dropped (counted). `DataStats` (data/examples.py) summarises a run for
``--dry-run``; `render_marked` shows one example with its trained text wrapped in ``[[...]]``. `generation_prompt_ids` renders a prompt
for generation exactly as training rendered it (same template or fallback). ``datasets``
caches the tokenised result, so a re-run on the same files and tokenizer does not re-tokenise.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import datasets
import jinja2
import numpy as np

from lorakit import __version__
from lorakit.config import DATA_FORMATS
from lorakit.data.batching import IGNORE_INDEX
from lorakit.data.examples import NO_EOS_WARNING, ReadFigures, TokenizedData, compute_stats, numeric_columns
from lorakit.data.messages import CONTEXT_FIELDS, UNTRAINED, chat_messages, field_text, instruction_messages
from lorakit.data.reading import name_datasets_cache_failures
from lorakit.data.records import RecordSet, SourceFile, locate
from lorakit.errors import ConfigError, DataError

INSTRUCTION_FIELDS = (("instruction", "output"), ("prompt", "response"), ("question", "answer"),
                      ("prompt", "completion"), ("instruction", "response"), ("query", "response"))
# a pair weaker than a `text` column: [input, output, text] stays text, as it was read before
INPUT_OUTPUT = ("input", "output")
CHAT_COLUMNS = ("messages", "conversations")
TOKENIZE_REVISION = 4  # bump when the tokenised output changes, to invalidate datasets' cache (2: the straddling
# answer token trained; slow tokenizers place spans by decoding; 3: no whitespace after an end-of-turn token;
# 4: long texts split, a record column; the top_id column needed no bump: the cache key's digest
# of the encoding code re-tokenises, and resumes see the same examples; nor did the system column)

# Newlines are Jinja string literals because HF compiles templates with trim_blocks=True.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Assistant:\\n' }}{% endif %}"
)


@functools.cache
def _encoding_revision() -> str:
    """lorakit's version, TOKENIZE_REVISION and a digest of this module's and messages.py's source
    (what turns a record into an example): a change to them that forgot to bump TOKENIZE_REVISION
    still re-tokenises. Where the source cannot be read (lorakit imported from a zip), the version."""
    from lorakit.data import messages

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], messages):
        try:
            digest.update(module.__loader__.get_data(module.__file__))
        except (OSError, AttributeError, ImportError):
            return f"{__version__}/{TOKENIZE_REVISION}"
    return f"{__version__}/{TOKENIZE_REVISION}/{digest.hexdigest()[:12]}"


@dataclass
class _Encoder:
    """Everything the per-batch map function needs (hashed by datasets for its cache)."""

    tokenizer: Any
    fmt: str
    seq_len: int
    train_on_inputs: bool
    template: str | None  # None: the tokenizer's own chat template
    fields: tuple[str, ...]  # the columns the format reads
    sources: list[SourceFile]  # the files it reads (theirs alone: the hash of every file's, per map, added up)
    end_tokens: tuple[str, ...] = ()  # the EOS and the special tokens: what may end an assistant turn
    # datasets caches map results by a hash of the function and these fields, but it hashes
    # module functions by name: the revision makes a new lorakit, or new encoding code, re-tokenise
    revision: str = field(default_factory=_encoding_revision)

    def where(self, index: int) -> str:
        return locate(self.sources, index)


# ---------------------------------------------------------------- format detection


def detect_format(ds: datasets.Dataset) -> str:
    """``chat``, ``instruction`` or ``text`` from the column names; DataError if none fits."""
    return _detect(list(ds.column_names))[0]


def _detect(columns: list[str]) -> tuple[str, str]:
    for name in CHAT_COLUMNS:
        if name in columns:
            return "chat", f"auto-detected chat from column '{name}'"
    pair = _instruction_pair(columns, with_input_output=False)
    if pair:
        # Alpaca's optional `input` (Dolly's `context`) is added to the instruction (messages.py): name it
        extra = "".join(f", '{c}'" for c in CONTEXT_FIELDS if c in columns) if pair[0] == "instruction" else ""
        return "instruction", f"auto-detected instruction from columns '{pair[0]}', '{pair[1]}'{extra}"
    if "text" in columns:
        return "text", "auto-detected text from column 'text'"
    if all(c in columns for c in INPUT_OUTPUT):
        return "instruction", "auto-detected instruction from columns 'input', 'output'"
    raise DataError(
        f"cannot tell the data format from the columns {columns}; expected 'messages' or "
        f"'conversations' (chat), {_pairs_text()} (instruction), or 'text' (text); or name yours with "
        "--columns FIELD=COLUMN (e.g. --columns instruction=question output=answer)"
    )


def _per_file_reading(records: RecordSet, fmt: str) -> tuple[str, list[tuple[str, ...]], str]:
    """(the format, each load's fields, the note): files may name their fields differently
    (instruction/output beside question/answer), each read through its own (the files of one load
    share their columns, so their reading); files of different formats (instruction beside chat or
    text) are refused, since a run trains one format."""
    loads = records.by_load()
    readings = [_file_reading(load.column_names, fmt, files[0] if files else None) for load, files in loads]
    per_file = [(src, reading) for (_, files), reading in zip(loads, readings) for src in files or [None]]
    formats = {reading[0] for reading in readings}
    if len(formats) > 1:
        listed = ", ".join(f"{src.path}: {f} ({', '.join(fields)})" for src, (f, fields, _) in per_file)
        raise DataError(f"the data files hold different formats ({listed}); give every file the same format, or "
                        "train on one kind at a time")
    notes = [note for _, (_, _, note) in per_file]
    if len(set(notes)) > 1:
        notes = [f"{src.path.name}: {note}" for src, (_, _, note) in per_file]
    return formats.pop(), [fields for _, fields, _ in readings], "; ".join(dict.fromkeys(notes))


def _file_reading(columns: list[str], fmt: str, src: SourceFile | None) -> tuple[str, tuple[str, ...], str]:
    try:
        return _resolve_format(columns, fmt)
    except DataError as exc:
        raise DataError(f"{src.path}: {exc}" if src else str(exc)) from None


def _instruction_pair(columns: Sequence[str], with_input_output: bool = True) -> tuple[str, str] | None:
    pairs = (*INSTRUCTION_FIELDS, INPUT_OUTPUT) if with_input_output else INSTRUCTION_FIELDS
    return next((p for p in pairs if p[0] in columns and p[1] in columns), None)


def _pairs_text() -> str:
    return " or ".join(f"'{a}'+'{b}'" for a, b in (*INSTRUCTION_FIELDS, INPUT_OUTPUT))


def columns_read(columns: list[str], fmt: str) -> tuple[str, tuple[str, ...], set[str]]:
    """(the format a file with these columns is read as, its main fields, every column it reads)."""
    fmt, fields, _ = _format_and_fields(columns, fmt)
    return fmt, fields, {*fields, *(("system",) if fmt != "text" else ()),
                         *(CONTEXT_FIELDS if fields[0] == "instruction" else ())}


def _resolve_format(columns: list[str], fmt: str) -> tuple[str, tuple[str, ...], str]:
    """(format, the columns it reads, a note saying how it was chosen and which columns it leaves)."""
    fmt, fields, note = _format_and_fields(columns, fmt)
    read = columns_read(columns, fmt)[2]
    unread = [c for c in columns if c not in read]
    return fmt, fields, note + (f"; columns not read: {', '.join(map(repr, unread))}" if unread else "")


def _format_and_fields(columns: list[str], fmt: str) -> tuple[str, tuple[str, ...], str]:
    if fmt == "auto":
        fmt, note = _detect(columns)
    else:
        note = f"format {fmt} (chosen)"
    if fmt == "text" and "text" in columns:
        return fmt, ("text",), note
    if fmt == "chat":
        column = next((c for c in CHAT_COLUMNS if c in columns), None)
        if column:
            return fmt, (column,), note
    if fmt == "instruction":
        pair = _instruction_pair(columns)
        if pair:
            return fmt, pair, note
    need = {"text": "'text'", "chat": "'messages' or 'conversations'", "instruction": _pairs_text()}
    raise DataError(f"format {fmt} needs the column(s) {need[fmt]}, but the data has {columns}")


# ---------------------------------------------------------------- rendering and masking


def _render(enc: _Encoder, messages: list[dict], generation: bool, index: int) -> str:
    messages = [{k: v for k, v in m.items() if k != UNTRAINED} for m in messages]  # lorakit's mark, not the template's
    try:
        return enc.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, chat_template=enc.template
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:  # transformers raises ValueError too
        raise DataError(f"{enc.where(index)}: the chat template rejected this conversation: {exc}") from exc


def _assistant_spans(enc: _Encoder, messages: list[dict], full: str, index: int) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns inside ``full``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get(UNTRAINED):
            continue
        before = _render(enc, messages[:i], True, index)
        through = full if i == len(messages) - 1 else _render(enc, messages[: i + 1], False, index)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{enc.where(index)}: the chat template renders a conversation prefix differently "
                "from the whole conversation, so the response tokens cannot be located; train with "
                "--train-on-inputs, or use a tokenizer whose template renders turns independently"
            )
        spans.append((len(before), _end_of_turn(enc.end_tokens, through)))
    return spans


def _end_of_turn(end_tokens: tuple[str, ...], through: str) -> int:
    """Where an assistant turn's trained text ends: before the whitespace a template writes after
    its end-of-turn token (ChatML's "<|im_end|>\n"), which the tuned model never generates, since
    it stops at that token; as Hugging Face's assistant-token masks and TRL place it."""
    stripped = through.rstrip()
    return len(stripped) if stripped.endswith(end_tokens) else len(through)


def _token_mask(tokenizer: Any, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``full`` and whether each token is trained: it starts inside one of
    ``spans``, or straddles a span's start. A template whose assistant prefix ends in a space
    ("Answer: ") has the answer's first token (" a") start on that space; it is still the
    answer's first word and must be learnt."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        trained = [any(s <= a < e or a < s < b for s, e in spans) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), trained
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    trained = [False] * len(ids)
    for first, stop in _slow_span_tokens(tokenizer, full, ids, spans):
        trained[first:stop] = [True] * (stop - first)
    return ids, trained


def _slow_span_tokens(tokenizer: Any, full: str, ids: list[int], spans) -> list[tuple[int, int]]:
    """[first, stop) token indices of each span, for a tokenizer without offsets.

    Where decoding reproduces ``full``, the text of the first n tokens gives each token's
    boundaries: the span's first token is the first that ends after its start. (Tokenising the
    prompt alone can end in a token the whole text does not have: "\n\n" alone, "\n" + "\n"
    before a word.) Otherwise: the prefix's tokens, as far as they agree with the whole text's."""
    decoded = functools.lru_cache(maxsize=None)(
        lambda n: tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    if decoded(len(ids)) == full:
        ranges = [(_first_index(len(ids), lambda n: len(decoded(n + 1)) > s),
                   _first_index(len(ids), lambda n: len(decoded(n)) >= e)) for s, e in spans]
        if all(full.startswith(decoded(n)) for pair in ranges for n in pair):
            return ranges
    return [(_common_prefix_length(tokenizer(full[:s], add_special_tokens=False)["input_ids"], ids),
             len(tokenizer(full[:e], add_special_tokens=False)["input_ids"])) for s, e in spans]


def _first_index(count: int, holds: Callable[[int], bool]) -> int:
    """The smallest n in [0, count] where ``holds`` (monotonic: false, then true) is true; count if none."""
    low, high = 0, count
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _common_prefix_length(prefix: list[int], ids: list[int]) -> int:
    return next((i for i, (p, t) in enumerate(zip(prefix, ids)) if p != t), min(len(prefix), len(ids)))


def _encode_messages(messages: list[dict], index: int, enc: _Encoder) -> tuple[list[int], list[int]]:
    full = _render(enc, messages, False, index)
    if enc.train_on_inputs:
        spans = [(0, len(full))]
    else:
        spans = _assistant_spans(enc, messages, full, index)
    ids, trained = _token_mask(enc.tokenizer, full, spans)
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]


def _encode_texts(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Tokenise plain texts in one call (fast tokenizers parallelise it) and append EOS. A blank
    text gets no tokens (it is dropped as an empty text): whitespace then EOS would teach the model
    to end a text at once, as wikitext's empty rows would."""
    eos = tokenizer.eos_token_id

    def ended(ids: list[int]) -> list[int]:
        return list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])

    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [ended(ids) if text.strip() else [] for text, ids in zip(texts, encoded)]


# what `_finish` gives each example; `_encode_batch` adds the record it came from
EXAMPLE_COLUMNS = ("input_ids", "labels", "length", "num_labels", "truncated", "top_id")


def _finish(ids: list[int], labels: list[int], seq_len: int) -> dict[str, Any]:
    # cut only where a trained token is lost: ChatML's newline after the last <|im_end|> is not one
    truncated = any(label != IGNORE_INDEX for label in labels[seq_len:])
    ids, labels = ids[:seq_len], labels[:seq_len]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (see module docstring)
    num_labels = sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "length": len(ids), "num_labels": num_labels,
            "truncated": truncated, "top_id": max(ids, default=-1)}


def _encode_batch(batch: dict[str, list], indices: list[int], enc: _Encoder, first: int = 0) -> dict[str, list]:
    """`indices` within one file, whose first record is record `first` of all (for messages)."""
    rows = [{name: batch[name][k] for name in batch} for k in range(len(indices))]
    indices = [first + i for i in indices]
    if enc.fmt == "text":
        texts = [field_text(row, "text", i, enc) for row, i in zip(rows, indices)]
        pairs = [(record, piece, list(piece), "") for record, ids in zip(indices, _encode_texts(texts, enc.tokenizer))
                 for piece in _text_pieces(ids, enc.seq_len)]
    else:
        chats = [(i, _record_messages(row, i, enc)) for row, i in zip(rows, indices)]
        pairs = [(i, *_encode_messages(messages, i, enc), _system_digest(messages)) for i, messages in chats]
    out: dict[str, list] = {k: [] for k in (*EXAMPLE_COLUMNS, "record", "system")}
    for record, ids, labels, system in pairs:
        for key, value in {**_finish(ids, labels, enc.seq_len), "record": record, "system": system}.items():
            out[key].append(value)
    return out


def _record_messages(row: dict, index: int, enc: _Encoder) -> list[dict]:
    return (chat_messages if enc.fmt == "chat" else instruction_messages)(row, index, enc)


def _system_digest(messages: list[dict]) -> str:
    """A digest of the record's system turn, '' when it has none: the examples' column of them says
    whether every record shares one (a column of the texts could repeat a long prompt a million times)."""
    if messages and messages[0]["role"] == "system" and messages[0]["content"].strip():
        return hashlib.sha256(messages[0]["content"].encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return ""


def _shared_system_turn(kept: datasets.Dataset, groups: list[tuple[datasets.Dataset, _Encoder]]) -> str | None:
    """The system turn every kept example's record opens with, when they all share one (None when
    they differ or have none): generate answers with it unless told otherwise."""
    if groups[0][1].fmt == "text" or len(kept.unique("system")) != 1 or not kept[0]["system"]:
        return None
    index = row = int(kept[0]["record"])
    for part, enc in groups:  # the record's group of files, and its row there
        if row < len(part):
            break
        row -= len(part)
    text = _record_messages(part[row], index, enc)[0]["content"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a JSON "\\ud800" escape): the metadata could not hold it
        return None
    return text


def _text_pieces(ids: list[int], seq_len: int) -> list[list[int]]:
    """A text as pieces of at most seq_len tokens, each starting on the previous one's last token,
    so that every token but the text's first is predicted, once. A document is not thrown away
    past seq_len, as pretraining-style tools (Axolotl's completion, LLaMA-Factory's pt) also do."""
    if len(ids) <= seq_len:
        return [ids]
    return [ids[start:start + seq_len] for start in range(0, len(ids) - 1, seq_len - 1)]


# ---------------------------------------------------------------- public entry points


def tokenize_records(
    records: RecordSet | datasets.Dataset,
    tokenizer: Any,
    fmt: str = "auto",
    seq_len: int = 512,
    train_on_inputs: bool = False,
    num_proc: int | None = None,
) -> TokenizedData:
    """Tokenise every record once; drop untrainable ones; DataError if none is left."""
    if not isinstance(records, RecordSet):
        records = RecordSet([records], [])
    if fmt not in DATA_FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of {', '.join(DATA_FORMATS)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if len(records) == 0:
        raise DataError("the data holds no records")
    fmt, fields_per_load, note = _per_file_reading(records, fmt)
    template = chat_template_for(tokenizer)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    end_tokens = tuple(sorted({token for token in [tokenizer.eos_token, *specials] if token}))
    groups = [(part, _Encoder(tokenizer, fmt, seq_len, train_on_inputs, template, fields, sources, end_tokens))
              for part, fields, sources in _alike_loads(records, fields_per_load)]
    mapped, first = [], 0
    for part, enc in groups:  # one map per group: a map costs a cache file and a hash of the encoder
        with name_datasets_cache_failures():
            mapped.append(part.map(_encode_batch, fn_kwargs={"enc": enc, "first": first}, batched=True,
                                   with_indices=True, remove_columns=part.column_names, num_proc=num_proc,
                                   desc=f"Tokenizing ({fmt})"))
        first += len(part)
    joined = datasets.concatenate_datasets(mapped) if len(mapped) > 1 else mapped[0]
    read_fields = tuple(dict.fromkeys(field for _, enc in groups for field in enc.fields))  # every file's
    tokenized = _keep_trainable(joined, groups[0][1], note, read_fields)
    tokenized.system_turn = _shared_system_turn(tokenized.dataset, groups)
    return tokenized


def _alike_loads(records: RecordSet, fields_per_load: list[tuple[str, ...]]):
    """(dataset, fields, its files) for each run of consecutive loads with the same columns, of the
    same types, read through the same fields: they are tokenised as one. Loads that differ are
    tokenised apart, so that their tokenised columns always agree."""
    runs: list[tuple[list[datasets.Dataset], tuple[str, ...], list[SourceFile]]] = []
    for (load, files), fields in zip(records.by_load(), fields_per_load):
        if runs and runs[-1][1] == fields and runs[-1][0][-1].features == load.features:
            runs[-1][0].append(load)
            runs[-1][2].extend(files)
        else:
            runs.append(([load], fields, list(files)))
    return [(datasets.concatenate_datasets(loads) if len(loads) > 1 else loads[0], fields, files)
            for loads, fields, files in runs]


def _keep_trainable(mapped: datasets.Dataset, enc: _Encoder, note: str, read_fields: tuple[str, ...]) -> TokenizedData:
    columns = numeric_columns(mapped)
    num_labels, truncated = columns["num_labels"], columns["truncated"]
    keep = np.flatnonzero(num_labels > 0)
    if keep.size == 0:
        raise DataError(_nothing_left(len(mapped), int(truncated.sum()), enc, read_fields))
    kept = mapped if keep.size == len(mapped) else mapped.select(keep)
    examples_per_record = np.bincount(columns["record"])
    read = ReadFigures(records=int((examples_per_record > 0).sum()), dropped=len(mapped) - keep.size,
                       dropped_cut=int((truncated & (num_labels == 0)).sum()), truncated=int(truncated.sum()),
                       split=int((examples_per_record > 1).sum()))
    stats = compute_stats({name: values[keep] for name, values in columns.items()}, enc.fmt, note, enc.seq_len, read)
    first_record = columns["record"][keep] == columns["record"][keep[0]]
    stats.warnings += _eos_warning(kept[int(np.flatnonzero(first_record)[-1])], enc)  # its last piece: EOS is there
    return TokenizedData(kept, enc.fmt, stats)


def _nothing_left(total: int, cut: int, enc: _Encoder, read_fields: tuple[str, ...]) -> str:
    if cut == total:
        return (f"no usable examples: all {total} examples are longer than --seq-len {enc.seq_len} "
                "and were cut before any trained (response) token; raise --seq-len")
    return (f"no usable examples: none of the {total} examples has a trained token "
            f"({cut} were cut at --seq-len {enc.seq_len} before their response, the others have nothing "
            f"to train: {_NOTHING_TO_TRAIN[enc.fmt]}); check the {', '.join(read_fields)} fields")


# why an example that was not cut has no trained token, per format
_NOTHING_TO_TRAIN = {"chat": "no assistant turn", "instruction": "no response", "text": "an empty text"}


def _eos_warning(example: dict, enc: _Encoder) -> list[str]:
    """Warn when the first example's trained tokens hold no EOS/end-of-turn token."""
    if example["truncated"]:
        return []
    tokenizer = enc.tokenizer
    stops = {tokenizer.eos_token_id} | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if any(label in stops for label in example["labels"] if label != IGNORE_INDEX):
        return []
    return [NO_EOS_WARNING]


def render_marked(example: dict, tokenizer: Any, start: str = "[[", end: str = "]]") -> str:
    """The example's text with every run of trained tokens wrapped in ``start``/``end``."""
    ids, labels = example["input_ids"], example["labels"]
    pieces = []
    for trained, run in itertools.groupby(range(len(ids)), key=lambda i: labels[i] != IGNORE_INDEX):
        text = tokenizer.decode([ids[i] for i in run], skip_special_tokens=False)
        pieces.append(f"{start}{text}{end}" if trained else text)
    return "".join(pieces)


def chat_template_for(tokenizer: Any) -> str | None:
    """The template lorakit renders chats with: None means the tokenizer's own."""
    return None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE


def generation_prompt_ids(tokenizer: Any, prompt: str | list[dict], fmt: str = "chat",
                          system: str | None = None) -> list[int]:
    """Token ids to generate from, rendered exactly like the training data of ``fmt``."""
    if fmt == "text":  # a training text's ids up to the EOS it ends with, which some tokenizers add
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        added_eos = ids[-1:] == [tokenizer.eos_token_id] and not prompt.rstrip().endswith(str(tokenizer.eos_token))
        return ids[:-1] if added_eos and len(ids) > 1 else ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template_for(tokenizer))
    except (jinja2.TemplateError, ValueError, TypeError) as exc:  # Gemma's refuses a system turn
        raise ConfigError(f"the model's chat template refused this prompt: {exc}"
                          + ("; leave out --system (--system \"\" where the adapter brings its training's system turn)"
                             if system else "")) from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with (never trained or attended): pad, else eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
