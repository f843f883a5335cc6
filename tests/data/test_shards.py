"""Many data files read in one datasets load (data/shards.py): the same records, rows and errors
as reading them one by one."""

import csv
import json

import datasets
import pytest
from tiny_models import tiny_tokenizer

from lorakit.data import reading, shards
from lorakit.data.formats import tokenize_records
from lorakit.data.reading import read_records
from lorakit.data.records import locate
from lorakit.errors import DataError


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def write_jsonl(path, rows, blank_every=0):
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        if blank_every and i % blank_every == 0:
            lines.append("")  # a blank line moves the next record's line number
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path, rows, blank_every=0):
    """A header and the rows, with a blank line after every `blank_every`-th (pandas skips those)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow(row)
            if blank_every and i % blank_every == 0:
                f.write("\r\n")
    return path


def shard_folder(root, files=12, kind="jsonl"):
    """`files` shards of 1 to 4 instruction records each, some with blank lines between records."""
    folder = root / "shards"
    folder.mkdir()
    for f in range(files):
        rows = [{"instruction": f"q{f}.{i}", "output": f"a{f}.{i}"} for i in range(1 + f % 4)]
        if kind == "jsonl":
            write_jsonl(folder / f"part-{f:03d}.jsonl", rows, blank_every=f % 3)
        elif kind == "csv":
            write_csv(folder / f"part-{f:03d}.csv", rows, blank_every=f % 3)
        elif kind == "txt":  # a line per example, or (every third file) paragraphs of two lines
            lines = [f"{row['instruction']} {row['output']}" for row in rows]
            text = "\n\n".join(f"{line}\n  more of {line}" for line in lines) if f % 3 == 2 else "\n".join(lines)
            (folder / f"part-{f:03d}.txt").write_text(text + "\n" * (f % 2), encoding="utf-8")
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(folder / f"part-{f:03d}.parquet"))
    return folder


def one_by_one(files, cache):
    """Each file read on its own: its records and how `locate` names each."""
    records, where = [], []
    for path in files:
        own = read_records(path, cache_dir=cache)
        records += own.loads[0].to_list()
        where += [locate(own.sources, i).split(" (", 1)[1] for i in range(len(own))]
    return records, where


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "txt"])
def test_a_folder_of_alike_files_is_one_load_with_each_files_records_and_rows(tmp_path, cache, kind):
    folder = shard_folder(tmp_path, kind=kind)
    recs = read_records(folder, cache_dir=cache)
    assert len(recs.loads) == 1 and len(recs.sources) == 12  # one datasets load, twelve files
    files = sorted(folder.iterdir())
    records, where = one_by_one(files, cache)
    assert recs.loads[0].to_list() == records
    assert [locate(recs.sources, i) for i in range(len(recs))] == [f"record {i + 1} ({w}" for i, w in enumerate(where)]
    assert [part.to_list() for part in recs.parts] == [read_records(p, cache_dir=cache).parts[0].to_list()
                                                       for p in files]
    if kind == "jsonl":  # part-002 writes a blank line after every other record: its 2nd record is on line 3
        assert locate(recs.sources, 1 + 2 + 1) == f"record 5 ({folder / 'part-002.jsonl'} line 3)"


def test_alike_files_tokenise_as_they_do_one_by_one(tmp_path, cache):
    folder = shard_folder(tmp_path)
    tokenizer = tiny_tokenizer()
    together = tokenize_records(read_records(folder, cache_dir=cache), tokenizer, seq_len=64).dataset
    alone = [tokenize_records(read_records(p, cache_dir=cache), tokenizer, seq_len=64).dataset
             for p in sorted(folder.iterdir())]
    assert together["input_ids"] == [ids for part in alone for ids in part["input_ids"]]
    assert together["labels"] == [labels for part in alone for labels in part["labels"]]
    assert together["record"] == list(range(len(together)))


def test_a_bad_line_in_a_later_file_is_named_with_its_file_and_line(tmp_path, cache):
    folder = shard_folder(tmp_path, files=30)
    bad = folder / "part-017.jsonl"
    bad.write_text(bad.read_text(encoding="utf-8") + '{"instruction": "q", "output": \n', encoding="utf-8")
    lines = bad.read_text(encoding="utf-8").count("\n")
    with pytest.raises(DataError, match=f"{bad} line {lines} is not valid JSON"):
        read_records(folder, cache_dir=cache)


def test_a_bad_record_in_a_later_file_of_one_load_is_named_with_its_file_and_line(tmp_path, cache):
    folder = tmp_path / "chats"
    folder.mkdir()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for f in range(8):
        write_jsonl(folder / f"part-{f}.jsonl", [{"messages": turns}] * 3)
    write_jsonl(folder / "part-5.jsonl", [{"messages": turns}, {"messages": turns[::-1]}, {"messages": turns}])
    recs = read_records(folder, cache_dir=cache)
    assert len(recs.loads) == 1  # the same shape: a turn is an object of role and content either way
    with pytest.raises(DataError, match=f"record 17 \\({folder / 'part-5.jsonl'} line 2\\): the conversation starts "
                                        "with the assistant's turn"):
        tokenize_records(recs, tiny_tokenizer(), seq_len=64)


def test_files_that_differ_in_columns_or_types_are_read_apart_as_before(tmp_path, cache):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "q0", "output": "a0", "id": 1}])
    write_jsonl(folder / "b.jsonl", [{"instruction": "q1", "output": "a1", "id": "b"}])  # id: text, not a number
    write_jsonl(folder / "c.jsonl", [{"question": "q2", "answer": "a2"}])  # other field names
    write_jsonl(folder / "d.jsonl", [{"question": "q3", "answer": "a3"}, {"question": "q4", "answer": "a4"}])
    write_jsonl(folder / "e.jsonl", [{"instruction": "q5", "output": "a5", "input": "ctx", "id": 2}])
    recs = read_records(folder, cache_dir=cache)
    assert [len(load) for load in recs.loads] == [1, 1, 3, 1]  # c and d alike; a's number kept apart from b's text
    assert [part.to_list() for part in recs.parts] == [
        [{"instruction": "q0", "output": "a0", "id": 1}], [{"instruction": "q1", "output": "a1", "id": "b"}],
        [{"question": "q2", "answer": "a2"}], [{"question": "q3", "answer": "a3"}, {"question": "q4", "answer": "a4"}],
        [{"instruction": "q5", "output": "a5", "input": "ctx", "id": 2}]]
    assert [src.columns for src in recs.sources] == [("instruction", "output", "id"), ("instruction", "output", "id"),
                                                     ("question", "answer"), ("question", "answer"),
                                                     ("instruction", "output", "input", "id")]
    assert locate(recs.sources, 4) == f"record 5 ({folder / 'd.jsonl'} line 2)"
    tokenized = tokenize_records(recs, tiny_tokenizer(), seq_len=64)  # each file read through its own fields
    assert tokenized.dataset["record"] == [0, 1, 2, 3, 4, 5]
    assert "a.jsonl: auto-detected instruction from columns 'instruction', 'output'" in tokenized.stats.format_note
    assert "c.jsonl: auto-detected instruction from columns 'question', 'answer'" in tokenized.stats.format_note


def test_csv_files_with_one_header_are_one_load_of_text_cells_and_others_are_read_apart(tmp_path, cache):
    folder = tmp_path / "csv"
    folder.mkdir()
    write_csv(folder / "a.csv", [{"question": "q0", "answer": "42"}, {"question": "two\nlines", "answer": "NA"}])
    write_csv(folder / "b.csv", [{"question": "q2", "answer": ""}, {"question": "q3", "answer": "007"}], blank_every=1)
    write_csv(folder / "c.csv", [{"answer": "a4", "question": "q4"}])  # the columns in another order
    (folder / "d.csv").write_text("question,\nq5,a5\n", encoding="utf-8")  # an unnamed column: pandas names it
    write_csv(folder / "e.csv", [{"question": "q6", "answer": "a6"}])
    recs = read_records(folder, cache_dir=cache)
    assert [len(load) for load in recs.loads] == [4, 1, 1, 1]
    files = sorted(folder.iterdir())
    records, where = one_by_one(files, cache)
    assert [row for load in recs.loads for row in load.to_list()] == records
    assert records[:4] == [{"question": "q0", "answer": "42"}, {"question": "two\nlines", "answer": "NA"},
                           {"question": "q2", "answer": None}, {"question": "q3", "answer": "007"}]
    assert locate(recs.sources, 3) == f"record 4 ({folder / 'b.csv'} data row 2)"


def test_txt_files_each_split_by_their_own_rule_are_one_load(tmp_path, cache):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"one\r\ntwo\r\n\r\n  \r\nthree\r\n")  # CRLF paragraphs
    (folder / "b.txt").write_bytes(b"\xef\xbb\xbf first\rsecond\r\r")  # a byte-order mark, CR lines
    (folder / "c.txt").write_text("x" * 2**20 + "\n\n" + "y\n" * 3, encoding="utf-8")  # past a read chunk
    recs = read_records(folder, cache_dir=cache)
    assert len(recs.loads) == 1
    assert recs.loads[0]["text"] == ["one\ntwo", "three", "first", "second", "x" * 2**20, "y\ny\ny"]
    assert recs.loads[0].to_list() == one_by_one(sorted(folder.iterdir()), cache)[0]
    assert locate(recs.sources, 3) == f"record 4 ({folder / 'b.txt'} example 2)"


def test_the_shape_tells_apart_what_the_builder_would_type_apart():
    def shape(*records):
        shapes = shards.RecordShapes()
        for record in records:
            shapes.add(record)
        return shapes.signature()

    assert shape({"a": "x", "b": 1}) == shape({"a": "y", "b": 2}, {"a": "z"})
    assert shape({"a": "x", "b": 1}) != shape({"b": 1, "a": "x"})  # column order
    assert shape({"a": 1}) != shape({"a": 1.5}) != shape({"a": True})
    assert shape({"a": "text"}) != shape({"a": "2024-01-02"})  # pyarrow reads that as a timestamp
    assert shape({"m": [{"role": "user"}]}) != shape({"m": [{"role": "user", "name": "x"}]})
    assert shape({"a": 1}, {"a": 1.5}) != shape({"a": 1.5}, {"a": 1})  # the kinds' order too


def test_a_load_that_fails_or_miscounts_is_redone_file_by_file(tmp_path, cache, monkeypatch):
    folder = shard_folder(tmp_path, files=5)
    expected = read_records(folder, cache_dir=cache)

    def fails(files, cache_dir):
        raise RuntimeError("An error occurred while generating the dataset")

    def one_row_short(files, cache_dir):
        return datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * (sum(f.rows for f in files) - 1))

    for load_together in (fails, one_row_short):
        monkeypatch.setattr(reading, "_load_together", load_together)
        recs = read_records(folder, cache_dir=cache)
        assert len(recs.loads) == 5
        assert [part.to_list() for part in recs.parts] == [part.to_list() for part in expected.parts]
        assert recs.sources == expected.sources
