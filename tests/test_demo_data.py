"""The bundled WordNet demo set: shape, counts, no train/eval leak, licence, determinism."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from lorakit.demo import (
    DEMO_EVAL,
    DEMO_EVAL_SIZE,
    DEMO_LICENSE,
    DEMO_TRAIN,
    DEMO_TRAIN_SIZE,
    demo_example,
    demo_prompt,
)

ROOT = Path(__file__).resolve().parent.parent
WORDNET = Path("/usr/share/wordnet")
INSTRUCTION = re.compile(
    r'^(?:Define the word "(?P<a>[a-z]+)" \((?P<pa>noun|verb|adjective|adverb)\)\.'
    r'|What does the (?P<pb>noun|verb|adjective|adverb) "(?P<b>[a-z]+)" mean\?'
    r'|Give a short dictionary definition of the (?P<pc>noun|verb|adjective|adverb) "(?P<c>[a-z]+)"\.)$'
)


def _load_builder():
    """Import scripts/build_demo_data.py (a script, not part of the package)."""
    if "build_demo_data" in sys.modules:
        return sys.modules["build_demo_data"]
    spec = importlib.util.spec_from_file_location("build_demo_data", ROOT / "scripts" / "build_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_demo_data"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def _records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _word(record: dict) -> str:
    match = INSTRUCTION.match(record["instruction"])
    assert match, record["instruction"]
    return match.group("a") or match.group("b") or match.group("c")


@pytest.mark.parametrize("path, count", [(DEMO_TRAIN, DEMO_TRAIN_SIZE), (DEMO_EVAL, DEMO_EVAL_SIZE)])
def test_files_parse_with_the_documented_fields_and_counts(path, count):
    assert path.stat().st_size < 1_000_000
    records = _records(path)
    assert len(records) == count
    for record in records:
        assert set(record) == {"instruction", "output"}
        assert 20 <= len(record["output"]) <= 160
        assert '"' not in record["output"]  # examples were cut off
        assert _word(record) not in record["output"].lower().split()


def test_one_definition_per_word_and_no_word_in_both_splits():
    train = [_word(r) for r in _records(DEMO_TRAIN)]
    held_out = [_word(r) for r in _records(DEMO_EVAL)]
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)


def test_all_phrasings_are_used():
    starts = {r["instruction"].split('"')[0] for r in _records(DEMO_TRAIN)}
    assert len(starts) >= 3 + 3  # 3 templates; two of them name the part of speech first


def test_demo_prompt_is_held_out():
    prompt = demo_prompt()
    assert prompt == demo_example()["instruction"] == _records(DEMO_EVAL)[0]["instruction"]
    assert prompt not in {r["instruction"] for r in _records(DEMO_TRAIN)}


def test_licence_ships_with_the_data():
    text = DEMO_LICENSE.read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University." in text
    assert "Permission to use, copy, modify and distribute this software" in text
    assert "Princeton University and LICENSEE agrees to preserve same." in text
    assert not re.search(r"^\s+\d+ ", text, re.MULTILINE)  # line numbers stripped


@pytest.mark.parametrize(
    "gloss, definition",
    [
        ('a tangible and visible entity; "it was full of rackets"', "a tangible and visible entity"),
        ('an area of control: "the range of a jet"', "an area of control"),
        ('not movable; e.g. "a fixed point"', "not movable"),
        ('independent of order; as in e.g. "a+b"', "independent of order"),
        ("a heavy canvas  ", "a heavy canvas"),
        ('a heavy canvas; "x"', "a heavy canvas"),
    ],
)
def test_definition_drops_examples(gloss, definition):
    assert _load_builder().definition_of(gloss) == definition


HEADER = "  1 This software and database is being provided to you  \n  2 WordNet 3.0 Copyright 2006  \n"


def _fake_wordnet(folder: Path) -> Path:
    """A miniature WordNet: one noun file and one verb file with a licence header."""
    nouns = {
        100: ("apple 0", "fleshy red or yellow fruit of a tree; \"an apple a day\""),
        200: ("pear 0 perry 0", "sweet juicy gritty-textured fruit"),
        300: ("grove 0", "a small wood without underbrush"),
        400: ("r2d2 0", "a robot from the films of the seventies"),
        500: ("plum 0", "tiny"),  # gloss too short
        600: ("stone 0", "a lump or mass of hard consolidated mineral matter"),
        700: ("mint 0", "a place where the money is coined by the government"),
    }
    verbs = {800: ("stone 0", "kill by throwing stones at someone"), 900: ("walk 0", "use one's feet to advance; advance by steps")}
    index_n = ["apple n 1 0 1 3 100", "pear n 1 0 1 2 200", "perry n 1 0 1 1 200", "grove n 1 0 1 1 300", "r2d2 n 1 0 1 1 400",
               "plum n 1 0 1 1 500", "stone n 1 0 1 4 600", "mint n 1 0 1 0 700"]
    index_v = ["stone v 1 0 1 1 800", "walk v 1 1 @ 1 9 900"]
    for pos, synsets, index in (("noun", nouns, index_n), ("verb", verbs, index_v)):
        lines = [f"{off:08d} 05 n 01 {words} 000 | {gloss}  " for off, (words, gloss) in synsets.items()]
        (folder / f"data.{pos}").write_text(HEADER + "\n".join(lines) + "\n")
        (folder / f"index.{pos}").write_text(HEADER + "\n".join(f"{row}  " for row in index) + "\n")
    for pos in ("adj", "adv"):
        (folder / f"data.{pos}").write_text(HEADER)
        (folder / f"index.{pos}").write_text(HEADER)
    return folder


def test_selection_rules_on_a_miniature_wordnet(tmp_path):
    builder = _load_builder()
    (tmp_path / "wn").mkdir()
    wordnet = _fake_wordnet(tmp_path / "wn")
    counts = builder.build(wordnet, tmp_path / "out", n_train=4, n_eval=1)
    # apple, pear, grove, stone (noun beats verb: 4 tagged senses vs 1), walk; not r2d2 (digits),
    # plum (gloss too short), mint (untagged), perry (not its synset's first lemma)
    assert counts == {"candidates": 5, "train": 4, "eval": 1}
    records = _records(tmp_path / "out" / builder.TRAIN_NAME) + _records(tmp_path / "out" / builder.EVAL_NAME)
    by_word = {_word(r): r for r in records}
    assert set(by_word) == {"apple", "pear", "grove", "stone", "walk"}
    assert by_word["apple"]["output"] == "fleshy red or yellow fruit of a tree"
    assert by_word["stone"]["output"] == "a lump or mass of hard consolidated mineral matter"
    assert "noun" in by_word["stone"]["instruction"]
    assert by_word["walk"]["output"] == "use one's feet to advance; advance by steps"
    with pytest.raises(SystemExit, match="only 5 candidate words"):
        builder.build(wordnet, tmp_path / "out2", n_train=5, n_eval=1)
    licence = (tmp_path / "out" / builder.LICENSE_NAME).read_text()
    assert "WordNet 3.0 Copyright 2006" in licence and "  1 " not in licence


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="WordNet not installed (apt-get install wordnet-base)")
def test_builder_is_deterministic_and_matches_the_committed_files(tmp_path):
    builder = _load_builder()
    builder.build(WORDNET, tmp_path / "one")
    builder.build(WORDNET, tmp_path / "two")
    for name in (builder.TRAIN_NAME, builder.EVAL_NAME, builder.LICENSE_NAME):
        first = (tmp_path / "one" / name).read_bytes()
        assert first == (tmp_path / "two" / name).read_bytes()
        assert first == (DEMO_TRAIN.parent / name).read_bytes(), f"{name} is stale: rerun the script"
