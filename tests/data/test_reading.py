"""Reading data files: every supported kind, concatenation, provenance, and each error path."""

import json
import os
from pathlib import Path

import datasets
import pytest

from lorakit.data.folders import folder_notices, split_of
from lorakit.data.reading import BUILDERS, read_records
from lorakit.data.records import locate
from lorakit.errors import DataError


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]


def only_part(recs):
    """The one file's records."""
    assert len(recs.parts) == 1
    return recs.parts[0]


def test_jsonl(tmp_path, cache):
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", ROWS), cache_dir=cache)
    assert only_part(recs)[:] == {"instruction": ["q0", "q1", "q2"], "output": ["a0", "a1", "a2"]}


def test_json_array_csv_and_parquet(tmp_path, cache):
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "d.csv").write_text("instruction,output\nq0,a0\nq1,a1\nq2,a2\n", encoding="utf-8")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.csv", "d.parquet"):
        recs = read_records(tmp_path / name, cache_dir=cache)
        assert only_part(recs)["output"][:] == ["a0", "a1", "a2"], name


def test_txt_paragraphs_when_blank_lines(tmp_path, cache):
    path = tmp_path / "d.txt"
    path.write_text("first para\nstill first\n\n\n\nsecond para\n  \n", encoding="utf-8")
    recs = read_records(path, cache_dir=cache)
    assert only_part(recs)["text"][:] == ["first para\nstill first", "second para"]


def test_txt_lines_when_no_blank_line(tmp_path, cache):
    path = tmp_path / "d.txt"
    path.write_text("one\n two \nthree", encoding="utf-8")
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == ["one", "two", "three"]


def test_txt_trailing_blank_lines_keep_one_example_per_line(tmp_path, cache):
    # a blank line only at the end separates nothing: the file was read as ONE paragraph before
    path = tmp_path / "d.txt"
    path.write_text("".join(f"line {i}\n" for i in range(50)) + "\n\n \n", encoding="utf-8")
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == [f"line {i}" for i in range(50)]


def test_txt_whitespace_only_lines_separate_paragraphs(tmp_path, cache):
    # datasets' own paragraph mode splits on an exact "\n\n" and kept these three as one example
    path = tmp_path / "d.txt"
    path.write_bytes(b"one a\r\none b\r\n \r\ntwo\n\t\nthree\n")
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == ["one a\none b", "two", "three"]


def test_txt_with_cr_line_ends_splits_into_paragraphs(tmp_path, cache, monkeypatch):
    """Old Mac line ends: the blank-line check split on LF only, found no blank line, and the file
    was read one line per example (a hunt); a CR LF across two read chunks is one line end."""
    from lorakit.data import reading

    path = tmp_path / "cr.txt"
    path.write_bytes(b"para one a\rpara one b\r\rpara two\r")
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == ["para one a\npara one b", "para two"]
    monkeypatch.setattr(reading, "_CHUNK", 7)  # "line a\r" | "\nline b" | ...: a CR LF split between reads
    lines = tmp_path / "crlf.txt"
    lines.write_bytes(b"line a\r\nline b\r\nline c\r\n")
    assert only_part(read_records(lines, cache_dir=cache))["text"][:] == ["line a", "line b", "line c"]


def test_txt_edited_file_is_read_anew(tmp_path, cache):
    import os

    path = tmp_path / "d.txt"
    path.write_text("old one\nold two\n", encoding="utf-8")
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == ["old one", "old two"]
    stamp = (path.stat().st_atime_ns, path.stat().st_mtime_ns)
    path.write_text("new one\nnew two\n", encoding="utf-8")  # the same size
    os.utime(path, ns=stamp)  # and the same time, as cp -p or rsync -t leave it
    assert only_part(read_records(path, cache_dir=cache))["text"][:] == ["new one", "new two"]


def test_saved_dataset_and_dict(tmp_path, cache):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert len(read_records(tmp_path / "saved", cache_dir=cache)) == 3
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert only_part(read_records(tmp_path / "dict", cache_dir=cache))["output"][:] == ["a0", "a1"]


def test_a_folder_of_data_files_reads_them_in_name_order_skipping_hidden_and_other_files(tmp_path, cache):
    folder = tmp_path / "copy_of_a_hub_repo"
    (folder / "data").mkdir(parents=True)
    (folder / ".git").mkdir()
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", ROWS[2:])
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", ROWS[:2])
    write_jsonl(folder / ".git" / "stray.jsonl", [{"text": "not data"}])
    (folder / "README.md").write_text("# card\n", encoding="utf-8")
    recs = read_records(folder, cache_dir=cache)
    assert [p[:]["output"] for p in recs.parts] == [["a0", "a1"], ["a2"]]
    assert [src.path.name for src in recs.sources] == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
    assert folder_notices([folder], BUILDERS) == [
        f"data folder {folder}/: 2 .jsonl files read in name order "
        "(data/train-00000-of-00002.jsonl, data/train-00001-of-00002.jsonl)"]


def test_a_file_named_and_read_through_its_folder_too_is_refused(tmp_path, cache):
    (tmp_path / "d").mkdir()
    shard = write_jsonl(tmp_path / "d" / "part-0.jsonl", ROWS)
    with pytest.raises(DataError, match=f"{shard} is read twice, through {tmp_path / 'd'} and {shard}; name each"):
        read_records([tmp_path / "d", shard], cache_dir=cache)


def test_a_folder_holding_several_splits_is_refused_with_the_train_files_named(tmp_path, cache):
    (tmp_path / "d").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        write_jsonl(tmp_path / "d" / name, ROWS)
    with pytest.raises(DataError, match="several splits: train \\(1 file\\), validation \\(1 file\\)") as err:
        read_records(tmp_path / "d", cache_dir=cache)
    assert f"--data {tmp_path / 'd' / 'train.jsonl'} (and another's to --eval-data)" in str(err.value)


def test_a_folder_holding_several_kinds_of_file_is_refused(tmp_path, cache):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "part1.jsonl", ROWS)
    (tmp_path / "d" / "LICENSE.txt").write_text("MIT\n", encoding="utf-8")
    with pytest.raises(DataError, match="2 kinds \\(1 .jsonl, 1 .txt\\)") as err:
        read_records(tmp_path / "d", cache_dir=cache)
    assert str(err.value).endswith(f"--data {tmp_path / 'd' / 'part1.jsonl'}")


def test_a_linked_folder_is_read_once_and_a_saved_dataset_inside_is_named(tmp_path, cache):
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "d"
    elsewhere.mkdir()
    folder.mkdir()
    write_jsonl(elsewhere / "b.jsonl", ROWS[1:])
    write_jsonl(folder / "a.jsonl", ROWS[:1])
    (folder / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(folder)  # a link back up the tree ends the walk there
    assert [p[:]["output"] for p in read_records(folder, cache_dir=cache).parts] == [["a0"], ["a1", "a2"]]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder / "saved"))
    with pytest.raises(DataError, match=f"holds a dataset saved with datasets' save_to_disk in {folder / 'saved'}; "
                                        "pass that folder itself"):
        read_records(folder, cache_dir=cache)


def test_two_hub_splits_that_start_alike_are_two_splits(tmp_path, cache):
    (tmp_path / "d").mkdir()
    for split in ("train_sft", "train_gen"):
        write_jsonl(tmp_path / "d" / f"{split}-00000-of-00001.jsonl", ROWS)
    with pytest.raises(DataError, match=r"several splits: train_gen \(1 file\), train_sft \(1 file\)"):
        read_records(tmp_path / "d", cache_dir=cache)


def test_a_folder_without_data_files_is_refused(tmp_path, cache):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("hi\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no data files .* and is not a dataset saved with datasets' "
                                        "save_to_disk"):
        read_records(tmp_path / "d", cache_dir=cache)


@pytest.mark.parametrize("relative, split", [
    ("data/train-00000-of-00002.parquet", "train"), ("validation/part-0.jsonl", "validation"),
    ("dev.csv", "validation"), ("en/test_2023.jsonl", "test"), ("notes.jsonl", None),
    ("dev/train_test_mix.jsonl", "validation"),  # the file names two splits: its folder decides
    ("trainer_logs/x.jsonl", None),  # a word that starts like a split is not one
    ("data/train_sft-00000-of-00003.parquet", "train_sft"),  # a hub shard names its split whole
    ("data/Validation-00000-of-00001.parquet", "validation"),
])
def test_the_split_a_files_path_names(relative, split):
    assert split_of(Path(relative)) == split


def test_saved_dict_without_train_split_is_an_error(tmp_path, cache):
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS), "b": datasets.Dataset.from_list(ROWS)})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="several splits"):
        read_records(tmp_path / "dict", cache_dir=cache)


def test_several_files_concatenate_in_order_and_locate(tmp_path, cache):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2], blank_lines=True)
    b = tmp_path / "b.csv"
    b.write_text("instruction,output,input\nq9,a9,ctx\n", encoding="utf-8")
    recs = read_records([a, b], cache_dir=cache)
    assert [part["instruction"][:] for part in recs.parts] == [["q0", "q1"], ["q9"]]
    assert recs.parts[1]["input"][:] == ["ctx"] and recs.columns == ["instruction", "output", "input"]
    # a.jsonl has a blank line between its two records: the second record is on line 3
    assert locate(recs.sources, 1) == f"record 2 ({a} line 3)"
    assert locate(recs.sources, 2) == f"record 3 ({b} data row 1)"


def test_missing_file(tmp_path, cache):
    with pytest.raises(DataError, match="does not exist") as err:
        read_records(tmp_path / "nope.jsonl", cache_dir=cache)
    assert "nope.jsonl" in str(err.value) and "hub dataset" not in str(err.value)


def test_a_hub_dataset_id_is_told_how_to_save_it_locally(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)  # all four peers take hub ids: say why this one does not, and what to do
    with pytest.raises(DataError, match=r"data file tatsu-lab/alpaca does not exist; check the path \(lorakit reads "
                                        r"local files; .*load_dataset\('tatsu-lab/alpaca', split='train'\)"
                                        r"\.save_to_disk\('alpaca'\)\", then --data alpaca\)"):
        read_records("tatsu-lab/alpaca", cache_dir=cache)


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file(tmp_path, cache, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        read_records(path, cache_dir=cache)


def test_empty_txt_file(tmp_path, cache):
    path = tmp_path / "d.txt"
    path.write_bytes(b" \n\n ")
    with pytest.raises(DataError, match="empty"):
        read_records(path, cache_dir=cache)


def test_binary_file(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match="binary"):
        read_records(path, cache_dir=cache)


def test_not_utf8_names_the_line(tmp_path, cache):
    for name in ("d.jsonl", "d.txt", "d.csv"):
        path = tmp_path / name
        jsonl = name.endswith("l")
        path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n' if jsonl else b"text\nok\ncaf\xe9\n")
        with pytest.raises(DataError, match="not valid UTF-8") as err:
            read_records(path, cache_dir=cache)
        line = 2 if jsonl else 3
        assert f"{name} line {line}" in str(err.value)


def test_a_utf8_byte_order_mark_is_read_past_in_every_text_kind(tmp_path, cache):
    """Windows tools (Notepad, Excel's 'CSV UTF-8') write one; it must not reach a record or a column name."""
    bom = "\ufeff"
    (tmp_path / "d.jsonl").write_text(bom + "\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    (tmp_path / "d.json").write_text(bom + json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "d.csv").write_text(bom + "instruction,output\nq0,a0\nq1,a1\nq2,a2\n", encoding="utf-8")
    for name in ("d.jsonl", "d.json", "d.csv"):
        part = only_part(read_records(tmp_path / name, cache_dir=cache))
        assert part[:] == {"instruction": ["q0", "q1", "q2"], "output": ["a0", "a1", "a2"]}, name
    (tmp_path / "d.txt").write_text(bom + "one\ntwo\n", encoding="utf-8")
    assert only_part(read_records(tmp_path / "d.txt", cache_dir=cache))["text"][:] == ["one", "two"]


def test_a_byte_order_mark_on_a_blank_first_line_is_a_blank_line(tmp_path, cache):
    (tmp_path / "d.jsonl").write_text("\ufeff\n" + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert only_part(read_records(tmp_path / "d.jsonl", cache_dir=cache))["output"][:] == ["a0"]
    (tmp_path / "d.txt").write_text("\ufeff\none\ntwo\n", encoding="utf-8")  # no paragraph break after text
    assert only_part(read_records(tmp_path / "d.txt", cache_dir=cache))["text"][:] == ["one", "two"]


def test_a_byte_order_mark_does_not_hide_a_bad_jsonl_line_or_a_json_array_of_values(tmp_path, cache):
    (tmp_path / "d.jsonl").write_text("\ufeff" + json.dumps(ROWS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match="d.jsonl line 2 is not valid JSON"):
        read_records(tmp_path / "d.jsonl", cache_dir=cache)
    (tmp_path / "d.json").write_text("\ufeff[1, 2, 3]", encoding="utf-8")
    with pytest.raises(DataError, match="JSON array of values like 1"):
        read_records(tmp_path / "d.json", cache_dir=cache)


def test_utf16_is_named(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "hi"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_records(path, cache_dir=cache)


def test_bad_jsonl_line_names_file_line_and_start(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(path, cache_dir=cache)
    message = str(err.value)
    assert "d.jsonl line 3" in message and '{"text": "b"' in message


def test_jsonl_line_that_is_not_an_object(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is a JSON list"):
        read_records(path, cache_dir=cache)


def test_json_lines_named_json_reports_the_line(tmp_path, cache):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match="d.json line 2"):
        read_records(path, cache_dir=cache)


def test_broken_json_array(tmp_path, cache):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, {"text": ', encoding="utf-8")
    with pytest.raises(DataError, match="could not read .*d.json"):
        read_records(path, cache_dir=cache)


def test_unsupported_extension(tmp_path, cache):
    path = tmp_path / "d.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported extension '.xlsx'"):
        read_records(path, cache_dir=cache)


def test_a_folder_that_is_not_a_save_stands_for_its_data_file(tmp_path, cache):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "d.jsonl", ROWS)
    assert only_part(read_records(folder, cache_dir=cache))["output"][:] == ["a0", "a1", "a2"]


def test_an_empty_parquet_and_one_with_a_map_column_are_named(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet holds no records"):
        read_records(tmp_path / "empty.parquet", cache_dir=cache)
    mapped = pa.array([[("a", 1)]] * 2, pa.map_(pa.string(), pa.int64()))
    pq.write_table(pa.table({"text": pa.array(["a", "b"]), "meta": mapped}), tmp_path / "maps.parquet")
    with pytest.raises(DataError, match="column.s. 'meta' hold Parquet maps, which lorakit cannot read; drop them"):
        read_records(tmp_path / "maps.parquet", cache_dir=cache)


def test_fake_parquet(tmp_path, cache):
    path = tmp_path / "d.parquet"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a Parquet file"):
        read_records(path, cache_dir=cache)


def test_files_with_clashing_types_are_read_and_kept_apart(tmp_path, cache):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": 3}])
    recs = read_records([a, b], cache_dir=cache)  # tokenised file by file (the bad value is named there)
    assert len(recs) == 2 and recs.columns == ["text"]
    assert [part["text"][:] for part in recs.parts] == [["x"], [3]]


def test_malformed_csv_and_json_name_the_cause(tmp_path, cache):
    # datasets wraps pandas' and pyarrow's errors in "An error occurred while generating the dataset"
    (tmp_path / "ragged.csv").write_text("instruction,output\nx,y\nx,y,z,w\n", encoding="utf-8")
    with pytest.raises(DataError, match="Expected 2 fields in line 3, saw 4"):
        read_records(tmp_path / "ragged.csv", cache_dir=cache)
    (tmp_path / "str.json").write_text('"hello"\n', encoding="utf-8")
    with pytest.raises(DataError, match="not a list of records"):
        read_records(tmp_path / "str.json", cache_dir=cache)


def test_a_file_name_with_glob_characters_is_read_as_named(tmp_path, cache):
    # datasets took "data[1].jsonl" as a pattern and read data1.jsonl instead
    write_jsonl(tmp_path / "data[1].jsonl", ROWS[:1])
    write_jsonl(tmp_path / "data1.jsonl", ROWS)
    assert only_part(read_records(tmp_path / "data[1].jsonl", cache_dir=cache))["output"][:] == ["a0"]


def test_a_jsonl_line_nested_too_deeply_is_named(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + '{"x": ' + "[" * 100000 + "]" * 100000 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 nests its values too deeply"):
        read_records(path, cache_dir=cache)


def test_a_jsonl_number_too_long_for_python_is_named(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + '{"text": "b", "n": ' + "9" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 holds a number too long to read \(over 4300 digits\)"):
        read_records(path, cache_dir=cache)


def test_csv_cells_are_read_as_the_text_they_are_and_only_an_empty_cell_is_missing(tmp_path, cache):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\nWhat is 2+2?,4\nSay none.,None\nSay NA.,NA\n"Zip, please",02134\n'
                    "Nothing here,\n", encoding="utf-8")
    recs = read_records(path, cache_dir=cache)
    assert only_part(recs)["output"][:] == ["4", "None", "NA", "02134", None]
    assert only_part(recs)["instruction"][3] == "Zip, please"


def test_csv_with_header_only(tmp_path, cache):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        read_records(path, cache_dir=cache)


def test_a_small_file_loads_without_datasets_progress_bar(tmp_path, capfd):
    import datasets

    path = tmp_path / "small.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    read_records([path], cache_dir=tmp_path / "cache")
    assert "Generating train split" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled()  # as it was before


def test_a_cache_that_cannot_be_written_is_named_and_an_unreadable_data_file_is_not_blamed_on_it(tmp_path, cache,
                                                                                                 monkeypatch):
    import errno

    from lorakit.data import reading
    from lorakit.errors import OutputError

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')

    def fails_with(code, filename):
        def load_file(*args, **kwargs):
            raise RuntimeError("An error occurred while generating the dataset") from OSError(
                code, os.strerror(code), filename)
        return load_file

    monkeypatch.setattr(reading, "_load_file", fails_with(errno.EROFS, str(tmp_path / "cache" / "x.lock")))
    with pytest.raises(OutputError, match=r"read-only file system while writing datasets' cache \(.*\): set HF_DATASETS_CACHE"):
        read_records(path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(reading, "_load_file", fails_with(errno.EACCES, str(tmp_path / "." / "d.jsonl")))
    with pytest.raises(RuntimeError):  # the data file itself: not the cache's fault
        read_records(path, cache_dir=tmp_path / "cache")
    # a cache path that cannot be made (HF_DATASETS_CACHE naming a file) is the cache's; a data
    # file that is not there is not
    monkeypatch.setattr(reading, "_load_file", fails_with(errno.EEXIST, str(tmp_path / "cache")))
    with pytest.raises(OutputError, match=r"File exists at .*cache while writing datasets' cache"):
        read_records(path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(reading, "_load_file", fails_with(errno.ENOENT, str(tmp_path / "elsewhere.jsonl")))
    with pytest.raises(RuntimeError):
        read_records(path, cache_dir=tmp_path / "cache")


def test_a_jsonl_key_given_twice_is_named_not_kept_last(tmp_path, cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "a", "text": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2 gives the key 'text' twice in one object"):
        read_records(path, cache_dir=cache)


def test_a_dangling_link_and_a_pipe_are_named_as_such(tmp_path, cache):
    import os

    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="is a symbolic link to nothing readable"):
        read_records(link, cache_dir=cache)
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(DataError, match="is not a regular file \\(a pipe or a device\\)"):
        read_records(pipe, cache_dir=cache)


def test_a_json_array_of_plain_values_is_named_not_read_as_a_made_up_field(tmp_path, cache):
    path = tmp_path / "d.json"
    path.write_text("[1, 2, 3]\n")
    with pytest.raises(DataError, match=r"d.json is a JSON array of values like 1, not of objects"):
        read_records(path, cache_dir=cache)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, cache):
    path = tmp_path / "d.csv"
    path.write_text("text,text\nhello,world\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv: the header names the column 'text' twice"):
        read_records(path, cache_dir=cache)


@pytest.mark.parametrize("columns", [{"instruction": ["q0", "q1"], "output": ["a0", "a1"]},
                                     {"messages": [[{"role": "user", "content": "hi"}]] * 2}])
def test_a_json_object_of_columns_is_refused_with_the_layout_to_write(tmp_path, cache, columns):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(columns), encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json is one JSON object of columns \(\w+: 2 values.*write a list of records"):
        read_records(path, cache_dir=cache)


def test_a_json_file_of_one_record_whose_fields_are_turns_is_still_read(tmp_path, cache):
    pair = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    (tmp_path / "d.json").write_text(json.dumps(pair), encoding="utf-8")
    assert len(read_records(tmp_path / "d.json", cache_dir=cache)) == 1


def test_a_json_object_nested_too_deeply_is_one_error_not_a_crash(tmp_path, cache):
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' + "[" * 200_000, encoding="utf-8")
    with pytest.raises(DataError, match="deep.json nests its values too deeply to read"):
        read_records(path, cache_dir=cache)


def test_a_config_file_among_the_data_says_to_put_it_first(tmp_path, cache):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  r: 8\n", encoding="utf-8")
    with pytest.raises(DataError, match="run.yaml is a YAML config, not a data file .* if it is train's CONFIG.yaml, "
                                        "put it before the flags"):
        read_records(path, cache_dir=cache)
