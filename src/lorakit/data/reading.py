"""Read training records from files with Hugging Face `datasets`.

Inputs: one or more ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.txt`` files, a folder
written by ``datasets.Dataset.save_to_disk``, or a folder of data files (data/folders.py). Each
file is loaded through ``datasets`` (which converts it to Arrow in its cache and memory-maps it,
so files larger than RAM work) and the parts are kept in the order given, one dataset per file
(files whose columns differ in type still combine: formats.py tokenises together only parts
whose columns agree). Consecutive files the builder reads alike (data/shards.py: one kind, one
record shape) share one load, cut back into one part per file: a load costs about 60 ms before
it reads a record, minutes for a folder of many shards.

``datasets`` reports malformed input with errors that rarely name the line, so every text file
is first streamed once, cheaply, to check what ``datasets`` would choke on::

    file ──> exists? supported extension? not empty? not binary (NUL bytes)? UTF-8?
        .jsonl: every non-blank line parses as a JSON object  (line number in the error)
        .parquet: starts and ends with the ``PAR1`` magic
    ──> datasets.load_dataset(...)  ──> one part per file  (alike files: one load, then split)

Plain text (``.txt``): one example per paragraph (blocks separated by blank or
whitespace-only lines). A file with no blank line between two lines of text (trailing blank
lines do not count) has one example per line. Surrounding whitespace is stripped and empty
examples are skipped. lorakit splits ``.txt`` files itself, into an Arrow dataset like the
others: ``datasets``' own paragraph mode splits on an exact ``"\n\n"`` only.

``read_records`` returns a `RecordSet` (data/records.py): the loaded datasets plus where each row
came from, so later stages can name "data.jsonl line 18" in their errors.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Hashable, Sequence

import datasets

from lorakit.data import folders, shards
from lorakit.data.records import RecordSet, SourceFile
from lorakit.errors import DataError, OutputError
from lorakit.safe_io import os_error_words, read_json

# extension -> datasets builder name
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_CHUNK = 1 << 20
_PREVIEW = 80


def read_records(
    paths: str | Path | Sequence[str | Path], cache_dir: str | Path | None = None
) -> RecordSet:
    """Validate and load every path, then concatenate them into one `RecordSet`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given; pass at least one .jsonl/.json/.csv/.parquet/.txt file")
    checked = [_checked(path) for path in data_files(paths)]  # every file's own errors before any load
    loads, sources = [], []
    for run in shards.runs(checked):
        files = iter(run)
        for load, counts in shards.read_together(run, lambda group: _load_together(group, cache_dir),
                                                 lambda file: _load_checked(file, cache_dir)):
            loads.append(load)
            for count, file in zip(counts, files):  # counts first: zip would take a file past the last count
                start = sources[-1].start + sources[-1].count if sources else 0
                sources.append(SourceFile(file.path, file.kind, start, count, tuple(load.column_names)))
    return RecordSet(loads, sources)


def data_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to read: a folder of data files (not a saved dataset) stands for its files
    (data/folders.py). A file named directly and through its folder would train twice."""
    files, named_as = [], {}
    for raw in map(Path, paths):
        inside = raw.is_dir() and not folders.is_saved_dataset(raw)
        for path in folders.data_files_in(raw, BUILDERS) if inside else [raw]:
            key = path.resolve() if path.exists() else path
            if key in named_as:
                raise DataError(f"{path} is read twice, through {named_as[key]} and {raw}; name each file once "
                                "(--epochs trains on the data more than once)")
            named_as[key] = raw
            files.append(path)
    return files


def _hub_dataset_hint(path: Path) -> str:
    """A missing path spelled like a Hugging Face dataset id (`tatsu-lab/alpaca`): how to get it."""
    text = str(path)
    if path.is_absolute() or path.suffix or text.count("/") != 1:
        return ""
    return (f" (lorakit reads local files; for the hub dataset {text}: python -c \"import datasets; "
            f"datasets.load_dataset('{text}', split='train').save_to_disk('{path.name}')\", then --data {path.name})")


def _checked(path: Path) -> shards.Checked:
    """The file's checks (what datasets would choke on, named with the line), before any load."""
    if not path.exists():
        if path.is_symlink():  # exists() follows the link: a dangling one, or a loop
            raise DataError(f"data file {path} is a symbolic link to nothing readable (a missing target or a "
                            "loop); point it at the file, or pass the file's own path")
        raise DataError(f"data file {path} does not exist; check the path{_hub_dataset_hint(path)}")
    if path.is_dir():
        return shards.Checked(path, "saved", {})
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):  # `train --data d.jsonl run.yaml`: --data takes every name after it
        raise DataError(f"{path} is a YAML config, not a data file (.jsonl, .json, .csv, .parquet, .txt); if it is "
                        f"train's CONFIG.yaml, put it before the flags (`lorakit train {path} --data ...`): a data "
                        "flag takes every name after it")
    if suffix not in BUILDERS:
        raise DataError(
            f"{path}: unsupported extension {suffix or '(none)'!r}; use .jsonl, .json, .csv, "
            ".parquet or .txt, or a folder written by datasets' save_to_disk"
        )
    if not path.is_file():  # a FIFO, a device: its size says nothing, and datasets would read it twice
        raise DataError(f"{path} is not a regular file (a pipe or a device); write the data to a file and pass that")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it needs at least one record")
    return _validate(path, suffix[1:])


def _load_checked(file: shards.Checked, cache_dir) -> datasets.Dataset:
    """One checked file (or saved folder) loaded on its own."""
    path, kind, options = file.path, file.kind, file.options
    if kind == "saved":
        return _load_saved(path)
    with name_datasets_cache_failures(cache_dir, reading=path):
        ds = _load_text([file], cache_dir) if kind == "txt" else _load_file(path, kind, cache_dir, options)
    if len(ds) == 0:
        raise DataError(f"{path} holds no records (only a header or blank lines?)")
    return ds


def _validate(path: Path, kind: str) -> shards.Checked:
    """Cheap streaming checks; the file with the extra options for the datasets builder and, where
    it may be read with others, its rows and shape (data/shards.py)."""
    if kind == "parquet":
        rows, shape = _check_parquet(path)
        return shards.Checked(path, kind, {}, rows, shape)
    check_not_binary(path)
    if kind == "jsonl":
        shapes = shards.RecordShapes() if path.stat().st_size < shards.JSON_CHUNK else None
        _check_jsonl(path, shapes)
        options = {"encoding": "utf-8-sig"} if _starts_with_bom(path) else {}
        return shards.Checked(path, kind, options, *((shapes.rows, shapes.signature()) if shapes else ()))
    has_blank, digest, examples = _check_utf8(path)
    if kind == "txt":
        return shards.Checked(path, kind, {}, examples, "text", text_split=(digest, has_blank))
    if kind == "json":
        _check_json_array_of_objects(path)
        _check_not_columns(path)
    if kind != "csv":
        return shards.Checked(path, kind, {})
    options = _cells_as_text(path)
    return shards.Checked(path, kind, options, *(_csv_rows_and_header(path) if options else ()))


def _csv_rows_and_header(path: Path) -> tuple[int | None, tuple | None]:
    """A small CSV file's records and its header, which with every cell read as text make its shape
    (data/shards.py); (None, None), read alone, for a large file, whose load's fixed cost is small
    beside its reading, or one Python's csv module cannot read (a cell past its size limit)."""
    if path.stat().st_size >= shards.SMALL_FILE:
        return None, None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            return sum(1 for row in reader if row), tuple(header)  # pandas skips blank lines too
    except csv.Error:
        return None, None


def _cells_as_text(path: Path) -> dict:
    """Builder options that read every CSV cell as the text it is, an empty one as missing: pandas
    would type them (a column of numeric answers becomes ints, which no format renders) and read
    "None", "NA" or "null" as missing."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:  # pandas would read the second as 'text.1', and the first alone would be trained on
        raise DataError(f"{path}: the header names the column{'s' * (len(repeated) > 1)} "
                        f"{', '.join(map(repr, repeated))} twice; give each column its own name")
    if not header or "" in header:
        return {}  # pandas names unnamed columns itself: leave them to it
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def _starts_with_bom(path: Path) -> bool:
    """A UTF-8 byte-order mark, which Windows tools (Notepad, Excel's 'CSV UTF-8') put first."""
    with open(path, "rb") as f:
        return f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8


def check_not_binary(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8192)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 encoded; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (it contains NUL bytes), not a {path.suffix} text file")


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _check_utf8(path: Path) -> tuple[bool, str, int]:
    """Stream-decode the file as UTF-8; return whether a blank (or whitespace-only) line stands
    between two lines of text, the sha256 of its bytes, and its examples as a .txt file (its
    paragraphs where such a blank line splits it, else its lines of text)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a byte-order mark is no text
    line, seen_text, blank_after_text, has_blank, carry = 1, False, False, False, ""
    text_lines, paragraphs, in_paragraph = 0, 0, False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad_line = line + chunk[: exc.start].count(b"\n")
                raise not_utf8(path, bad_line) from exc
            line += chunk.count(b"\n")
            # CRLF, LF and CR end lines, as _text_examples reads them; a CR at a chunk's end waits
            # for the next chunk, whose LF may complete it
            joined = carry + text
            held = "\r" if joined.endswith("\r") else ""
            lines = _LINE_BREAK.split(joined[:len(joined) - len(held)])
            carry = lines.pop() + held
            for piece in lines:
                has_text = bool(piece.strip())
                if has_text:
                    has_blank = has_blank or blank_after_text
                    seen_text = True
                    text_lines, paragraphs = text_lines + 1, paragraphs + (not in_paragraph)
                else:
                    blank_after_text = blank_after_text or seen_text
                in_paragraph = has_text
    if carry.strip():
        has_blank = has_blank or blank_after_text
        text_lines, paragraphs = text_lines + 1, paragraphs + (not in_paragraph)
    if not (seen_text or carry.strip()):
        raise DataError(f"{path} is empty (only whitespace); it needs at least one record")
    return has_blank, digest.hexdigest(), paragraphs if has_blank else text_lines


def _check_jsonl(path: Path, shapes: shards.RecordShapes | None = None) -> None:
    """Every non-blank line must be a JSON object; errors name the line and show its start. Each
    record's shape goes into `shapes`, if given."""
    seen = False
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(path, number) from exc
            if not text.removeprefix("\ufeff").strip():  # str.strip keeps a byte-order mark
                continue
            seen = True
            record = parse_jsonl_line(path, number, text)
            if shapes is not None:
                shapes.add(record)
    if not seen:
        raise DataError(f"{path} is empty (only blank lines); it needs at least one JSON record")


def parse_jsonl_line(path: Path, number: int, text: str, shape: str = '{"text": "..."}') -> dict:
    """Line `number` of a .jsonl file as the JSON object it must be (`shape`: an example of one)."""
    preview = text.strip()[:_PREVIEW]
    if number == 1:  # Windows tools write a byte-order mark; the json builder is told to skip it
        text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text, object_pairs_hook=_refusing_repeated_keys)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {number} is not valid JSON ({exc.msg}): {preview!r}; each line of a "
            ".jsonl file must be one JSON object"
        ) from exc
    except _RepeatedKey as exc:
        raise DataError(f"{path} line {number} gives the key {exc.args[0]!r} twice in one object: {preview!r}; "
                        "keep one") from None
    except RecursionError:
        raise DataError(f"{path} line {number} nests its values too deeply to read: {preview!r}; "
                        "a record holds text fields and lists of turns") from None
    except ValueError:  # Python's limit on the digits of an integer it converts
        raise DataError(f"{path} line {number} holds a number too long to read (over 4300 digits): "
                        f"{preview!r}; write it as a string, or leave that field out") from None
    if not isinstance(value, dict):
        raise DataError(
            f"{path} line {number} is a JSON {type(value).__name__}, not an object: {preview!r}; "
            f"each line must look like {shape}"
        )
    return value


class _RepeatedKey(Exception):
    pass


def _refusing_repeated_keys(pairs: list) -> dict:
    """json.loads keeps a repeated key's last value; datasets' reader refuses the line in its own words."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


def not_utf8(path: Path, line: int) -> DataError:
    return DataError(
        f"{path} line {line} is not valid UTF-8; re-save the file as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8 in.txt > out.txt)"
    )


def _check_parquet(path: Path) -> tuple[int, Hashable]:
    """The file's rows and shape (data/shards.py), once it is known to be Parquet datasets can read."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"{path} is not a Parquet file (no PAR1 magic); check the file or its extension")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"could not read {path} as parquet: {exc}") from None
    if rows == 0:
        raise DataError(f"{path} holds no records (a Parquet file of 0 rows)")
    maps = [f.name for f in schema if _holds_a_map(f.type)]
    if maps:  # datasets has no type for them, and refuses the whole file
        raise DataError(f"{path}: column(s) {', '.join(map(repr, maps))} hold Parquet maps, which lorakit cannot "
                        "read; drop them (no data format reads them) or store them as JSON text")
    return rows, shards.parquet_shape(schema)


def _holds_a_map(arrow_type) -> bool:
    """A map, or a list or struct with one inside (datasets has a type for none of them)."""
    import pyarrow as pa

    if pa.types.is_map(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        return any(_holds_a_map(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _holds_a_map(arrow_type.value_type)
    return False


PROGRESS_BAR_BYTES = 64 * 2**20  # smaller files load in a second or two: no bar


def _load_file(path: Path, kind: str, cache_dir, options: dict) -> datasets.Dataset:
    try:
        return _builder_load([path], kind, cache_dir, options)
    except Exception as exc:  # datasets/pyarrow raise many types for malformed files
        if kind == "json" and _first_char(path) == "{":
            _check_jsonl(path)  # a JSON-lines file named .json: find the bad line
        if kind == "json" and _first_char(path) not in ("[", "{"):
            raise DataError(f"{path} is JSON but not a list of records: a .json file holds an array of objects "
                            "([{...}, ...]) or one object per line") from exc
        if "corresponds to no data" in str(exc):  # datasets' words for "zero rows"
            raise DataError(f"{path} holds no records (only a header or blank lines?)") from exc
        raise DataError(f"could not read {path} as {kind}: {_reason(exc)}") from exc


def _load_together(files: list[shards.Checked], cache_dir) -> datasets.Dataset:
    """Files of one kind, options and shape (data/shards.py) in one load: any failure is the
    caller's cue to load them one by one."""
    if files[0].kind == "txt":
        return _load_text(files, cache_dir)
    return _builder_load([file.path for file in files], files[0].kind, cache_dir, files[0].options)


def _builder_load(paths: list[Path], kind: str, cache_dir, options: dict) -> datasets.Dataset:
    """The files' records, in order, through datasets' builder for their kind, cached."""
    with _quiet_builders(sum(path.stat().st_size for path in paths)):
        return datasets.load_dataset(  # datasets expands * ? [ ] in data_files: "data[1].jsonl" is a name
            BUILDERS["." + kind], data_files=[glob.escape(str(path)) for path in paths], split="train",
            cache_dir=str(cache_dir) if cache_dir else None, **options,
        )


_CACHE_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# a cache path that cannot be made (a file where a folder goes, a parent that cannot exist): the
# cache's own fault only when the path named is inside it
_CACHE_PATH_ERRORS = (errno.EEXIST, errno.ENOTDIR, errno.ENOENT)


@contextlib.contextmanager
def name_datasets_cache_failures(cache_dir: str | Path | None = None, reading: Path | None = None):
    """datasets writes every file it reads, and every tokenised set, into its cache: a failure to
    write there names the cache and the fix (it came out as the data file's, or a traceback)."""
    try:
        yield
    except Exception as exc:
        folder = cache_dir or datasets.config.HF_DATASETS_CACHE
        cause = _cache_write_failure(exc, reading, Path(folder))
        if cause is None:
            raise
        words = os_error_words(cause, "folder")  # none for a path that cannot be made
        what = words[0] if words else f"{cause.strerror or type(cause).__name__} at {os.fsdecode(cause.filename)}"
        raise OutputError(f"{what} while writing datasets' cache ({folder}): set HF_DATASETS_CACHE (or HF_HOME) "
                          "to a writable folder with free space") from exc


def _cache_write_failure(exc: BaseException, reading: Path | None, cache: Path) -> OSError | None:
    """The OSError in the exception's chain that is a failed write, not a file that cannot be read."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _CACHE_PATH_ERRORS and _inside(seen.filename, cache):
            return seen
        if isinstance(seen, OSError) and seen.errno in _CACHE_WRITE_ERRORS:
            unreadable_input = reading is not None and seen.filename is not None and \
                Path(os.fsdecode(seen.filename)).resolve() == reading.resolve()
            return None if unreadable_input else seen
        seen = seen.__cause__ or seen.__context__
    return None


def _inside(filename, folder: Path) -> bool:
    if filename is None:
        return False
    return Path(os.fsdecode(filename)).absolute().is_relative_to(folder.absolute())


def _reason(exc: BaseException) -> str:
    """The first message in the exception's chain that says more than datasets' wrapper does
    ("An error occurred while generating the dataset"): pandas' or pyarrow's, with the line."""
    seen = exc
    while seen is not None:
        text = str(seen).strip()
        if text and "error occurred while generating the dataset" not in text:
            return text.splitlines()[-1][:300]
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip()[:300] or type(exc).__name__


@contextlib.contextmanager
def _quiet_builders(size: int):
    """datasets' CSV and JSON builders log a malformed file's error (with its traceback) before
    raising it; lorakit's own message names it, once. Their progress bar ("Generating train
    split") only for files (`size` bytes in all) big enough to take a while."""
    logger = logging.getLogger("datasets.packaged_modules")
    level, bars_were_off = logger.level, datasets.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    if size < PROGRESS_BAR_BYTES:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _check_json_array_of_objects(path: Path) -> None:
    """A .json array must hold objects: datasets reads [1, 2, 3] as records of a made-up field."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("[") and head[1:].lstrip()[:1] not in ("{", "]", ""):
        first = head[1:].lstrip().split(",")[0].split("]")[0].strip()[:20]
        raise DataError(f"{path} is a JSON array of values like {first}, not of objects; a .json file holds "
                        '[{"text": "..."}, ...] or one object per line')


def _check_not_columns(path: Path) -> None:
    """One object of columns ({"instruction": ["a", "b"], ...}, as a dataset's to_dict writes it)
    reads as a single record whose fields are lists: refused with the layout to write instead. A
    record's own list fields hold turns (objects), never plain texts or lists."""
    if _first_char(path) != "{":
        return
    try:
        top = read_json(path)
    except ValueError as exc:  # one object per line (JSON Lines in a .json file), or broken: read as before
        if str(exc) == "nested too deeply":  # the datasets reader would crash the interpreter on it
            raise DataError(f"{path} nests its values too deeply to read; a record holds texts and turns") from None
        return
    columns = top if isinstance(top, dict) and top and all(isinstance(v, list) for v in top.values()) else {}
    if not columns or all(isinstance(item, dict) for values in columns.values() for item in values):
        return
    sizes = ", ".join(f"{name}: {len(values)} value{'s' * (len(values) != 1)}"
                      for name, values in list(columns.items())[:3])
    fields = ", ".join(f'"{name}": ...' for name in list(columns)[:3])
    raise DataError(f"{path} is one JSON object of columns ({sizes}), which would read as a single record; write a "
                    f"list of records, [{{{fields}}}, ...], or one record per line (.jsonl)")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.strip()[0]
    return ""


# part of the .txt cache key: datasets hashes _text_examples by name, not by its code, so a change
# to how .txt files are split must bump this or old caches would be reused
TXT_SPLITTING = 4


def _load_text(files: list[shards.Checked], cache_dir) -> datasets.Dataset:
    """.txt files' examples (see the module docstring), in order, as one Arrow dataset in the
    cache, keyed by the files' contents (their sha256) and the splitting rule."""
    with _quiet_builders(sum(file.path.stat().st_size for file in files)):
        return datasets.Dataset.from_generator(
            _text_examples, cache_dir=str(cache_dir) if cache_dir else None,
            gen_kwargs={"files": [(str(file.path.resolve()), file.text_split[1]) for file in files],
                        "key": ([file.text_split[0] for file in files], TXT_SPLITTING)},
        )


def _text_examples(files: list[tuple[str, bool]], key: tuple):
    """{"text": ...} per line, or per paragraph, of each (path, paragraphs); stripped, empty ones
    skipped. Read with universal newlines: CRLF and CR end lines too."""
    del key  # only in the cache key
    for path, paragraphs in files:
        yield from _file_examples(path, paragraphs)


def _file_examples(path: str, paragraphs: bool):
    block = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text
        for line in f:
            if not paragraphs:
                if line.strip():
                    yield {"text": line.strip()}
            elif line.strip():
                block.append(line.rstrip())
            elif block:
                yield {"text": "\n".join(block).strip()}
                block = []
    if block:
        yield {"text": "\n".join(block).strip()}


def _load_saved(folder: Path) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a damaged save: name the folder rather than leak internals
        raise DataError(f"could not load the saved dataset in {folder}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(folder, loaded)
    return loaded


def _pick_split(folder: Path, loaded: datasets.DatasetDict) -> datasets.Dataset:
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(
        f"{folder} holds several splits ({', '.join(loaded)}) and none is named 'train'; "
        "pass the split's folder (e.g. path/to/save/<split>)"
    )
