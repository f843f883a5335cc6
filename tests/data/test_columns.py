"""--columns: a dataset's own column names read as lorakit's fields."""

import json

import pytest

from lorakit.data.columns import FIELDS, column_map, rename_columns
from lorakit.data.formats import tokenize_records
from lorakit.data.reading import read_records
from lorakit.errors import ConfigError, DataError
from tiny_models import tiny_tokenizer


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("items, message", [
    (["instruction"], "takes FIELD=COLUMN pairs"),
    (["=question"], "takes FIELD=COLUMN pairs"),
    (["instruction="], "takes FIELD=COLUMN pairs"),
    (["instr=question"], "'instr' is not a field lorakit reads"),
    (["instruction=q", "instruction=r"], "mapped twice"),
    (["instruction=q", "output=q"], "mapped twice"),
])
def test_malformed_pairs_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        column_map(items)


def test_every_field_a_format_reads_can_be_mapped_to():
    assert {"text", "messages", "instruction", "input", "context", "output", "system"} <= set(FIELDS)
    assert column_map([" instruction = Question ", "output=Answer"]) == {"Question": "instruction", "Answer": "output"}


def test_mapped_columns_read_as_the_fields_they_name_in_each_file(tmp_path):
    chatml = tiny_tokenizer()
    odd = write(tmp_path / "odd.jsonl", [{"Q": "Name a colour.", "A": "Blue.", "id": 1}])
    plain = write(tmp_path / "plain.jsonl", [{"instruction": "Name a colour.", "output": "Blue."}])
    [renamed] = rename_columns([read_records([odd])], ["instruction=Q", "output=A"])
    assert renamed.parts[0].column_names == ["instruction", "output", "id"]
    assert renamed.sources[0].columns == ("instruction", "output", "id")
    ours = tokenize_records(renamed, chatml)
    reference = tokenize_records(read_records([plain]), chatml)
    assert ours.dataset["input_ids"] == reference.dataset["input_ids"]
    assert ours.dataset["labels"] == reference.dataset["labels"]
    [both] = rename_columns([read_records([odd, plain])], ["instruction=Q", "output=A"])  # a file without them: as is
    assert [part.column_names for part in both.parts] == [["instruction", "output", "id"], ["instruction", "output"]]


def test_a_column_no_file_has_or_a_field_a_file_already_has_is_named(tmp_path):
    odd = write(tmp_path / "odd.jsonl", [{"Q": "a", "A": "b", "output": "c"}])
    with pytest.raises(DataError, match="--columns instruction=Qx: no data file has a column 'Qx'; the files' "
                                        "columns: 'Q', 'A', 'output'"):
        rename_columns([read_records([odd])], ["instruction=Qx"])
    with pytest.raises(DataError, match="odd.jsonl already has a column 'output': --columns output=A would give "
                                        "it two"):
        rename_columns([read_records([odd])], ["instruction=Q", "output=A"])
    [swapped] = rename_columns([read_records([odd])], ["instruction=Q", "input=output", "output=A"])
    assert swapped.parts[0].column_names == ["instruction", "output", "input"]


def test_a_mapped_field_another_format_would_leave_unread_is_refused(tmp_path):
    both = write(tmp_path / "both.jsonl", [{"body": "a text", "prompt": "Name a colour.", "response": "Blue."}])
    with pytest.raises(DataError, match="--columns text=body maps a field that is not read: the file reads as "
                                        "instruction through prompt, response; map those fields instead, "
                                        "pass --format"):
        rename_columns([read_records([both])], ["text=body"])
    [as_text] = rename_columns([read_records([both])], ["text=body"], fmt="text")  # the format chosen: read
    assert "text" in as_text.columns


def test_a_mapped_column_may_be_in_the_eval_files_only_and_a_runs_mapping_may_find_none(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"instruction": "Name a colour.", "output": "Blue."}])
    held = write(tmp_path / "held.jsonl", [{"Q": "Name a fruit.", "output": "Pear."}])
    renamed = rename_columns([read_records([train]), read_records([held])], ["instruction=Q"])
    assert [r.columns for r in renamed] == [["instruction", "output"], ["instruction", "output"]]
    with pytest.raises(DataError, match="no data file has a column 'Q'"):
        rename_columns([read_records([train])], ["instruction=Q"])
    [as_is] = rename_columns([read_records([train])], ["instruction=Q"], from_the_run=True)  # eval of a run's adapter
    assert as_is.columns == ["instruction", "output"]


def test_a_runs_mapping_that_does_not_fit_is_named_as_the_runs_with_the_override(tmp_path):
    """The user did not type a run's pairs (eval and generate take them from its config.yaml):
    the error says whose they are and that --columns replaces them."""
    both = write(tmp_path / "both.jsonl", [{"Q": "Name a colour.", "instruction": "Name one.", "output": "Blue."}])
    with pytest.raises(DataError, match=r"already has a column 'instruction': the run's columns instruction=Q "
                                        r"\(its config.yaml\) would give it two; pass --columns with the pairs this "
                                        r"file needs \(they replace the run's\)"):
        rename_columns([read_records([both])], ["instruction=Q"], from_the_run=True)
