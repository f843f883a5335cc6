#!/usr/bin/env python3
"""Build lorakit's built-in demo data set (define-the-word) from WordNet 3.0.

Source: Debian's ``wordnet-base`` (``/usr/share/wordnet``). Each ``index.<pos>`` line lists a
lemma's synsets most frequent sense first, with ``tagsense_cnt`` (how many of its senses occur
in the sense-tagged corpus, a rough frequency); each ``data.<pos>`` line holds a synset's
lemmas and, after `` | ``, its gloss: a definition optionally followed by quoted examples
(``; "..."``).

Selection, so that a small model can learn the task in minutes:
- single-word lowercase lemmas of letters only (no digits, underscores, hyphens, names);
- moderate frequency: the lemma occurs in the tagged corpus (tagsense_cnt >= 1) but is not
  one of the most polysemous words (at most MAX_SENSES senses);
- its most frequent sense, and only when the lemma is that synset's first lemma;
- the definition (examples dropped) is 20-160 characters and does not use the word itself;
- one definition per word: when a word is several parts of speech, the most frequent one.

The sample is deterministic: candidates are ordered by a seeded SHA-256 of the word, the
first N_EVAL words are held out for evaluation and the next N_TRAIN are training data, so
train and eval share no word. Running the script twice writes byte-identical files.

Usage: python scripts/build_demo_data.py [--wordnet-dir /usr/share/wordnet] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo"
TRAIN_NAME = "wordnet_define_train.jsonl"
EVAL_NAME = "wordnet_define_eval.jsonl"
LICENSE_NAME = "WORDNET_LICENSE.txt"

SEED = "lorakit-demo-v1"
N_TRAIN = 3000
N_EVAL = 200
MIN_GLOSS, MAX_GLOSS = 20, 160
MAX_SENSES = 12

POS_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}
PHRASINGS = (
    'Define the word "{word}" ({pos}).',
    'What does the {pos} "{word}" mean?',
    'Give a short dictionary definition of the {pos} "{word}".',
)
_LEMMA = re.compile(r"^[a-z]{2,20}$")
_EXAMPLE_LEAD_IN = re.compile(r"(?:[\s;:,]*\b(?:as in|e\.g\.|i\.e\.|as))*[\s;:,]*$")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers, e.g. "open(p)"


@dataclass(frozen=True)
class Entry:
    word: str
    pos: str
    definition: str
    tagged_senses: int


def is_licence_line(line: str) -> bool:
    return line.startswith("  ")


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: everything before the first quoted example.

    Examples usually follow ``; "``, but a few glosses introduce them with ``: "``, ``, "``,
    ``e.g. "`` or ``as in "``, so cut at the first quote and drop the lead-in.
    """
    if '"' not in gloss:
        return gloss.strip().rstrip(";").strip()
    definition = gloss.split('"', 1)[0]
    return _EXAMPLE_LEAD_IN.sub("", definition).strip()


def read_synsets(data_path: Path) -> dict[int, tuple[str, str]]:
    """offset -> (first lemma, definition) for every synset in a ``data.<pos>`` file."""
    synsets = {}
    with open(data_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if is_licence_line(line) or " | " not in line:
                continue
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            first_lemma = _ADJ_MARKER.sub("", parts[4])  # offset lex_filenum ss_type w_cnt word
            synsets[int(parts[0])] = (first_lemma, definition_of(gloss))
    return synsets


def read_index(index_path: Path) -> list[tuple[str, int, int, int]]:
    """(lemma, sense count, tagsense_cnt, most frequent synset offset) per index line."""
    rows = []
    with open(index_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if is_licence_line(line):
                continue
            parts = line.split()
            synset_cnt, pointer_cnt = int(parts[2]), int(parts[3])
            tagged = int(parts[5 + pointer_cnt])
            offsets = parts[6 + pointer_cnt :]
            rows.append((parts[0], synset_cnt, tagged, int(offsets[0])))
    return rows


def candidates_for_pos(wordnet_dir: Path, pos: str) -> list[Entry]:
    suffix = POS_FILES[pos]
    synsets = read_synsets(wordnet_dir / f"data.{suffix}")
    entries = []
    for lemma, senses, tagged, offset in read_index(wordnet_dir / f"index.{suffix}"):
        if not _LEMMA.match(lemma) or tagged < 1 or senses > MAX_SENSES:
            continue
        first_lemma, definition = synsets[offset]
        if first_lemma != lemma or not MIN_GLOSS <= len(definition) <= MAX_GLOSS:
            continue
        if "`" in definition or re.search(rf"\b{lemma}\b", definition, re.IGNORECASE):
            continue  # a definition that uses the word teaches nothing
        entries.append(Entry(lemma, pos, definition, tagged))
    return entries


def one_entry_per_word(entries: list[Entry]) -> dict[str, Entry]:
    """Keep each word's most frequent part of speech (ties: noun, verb, adjective, adverb)."""
    order = list(POS_FILES)
    best: dict[str, Entry] = {}
    for entry in entries:
        kept = best.get(entry.word)
        rank = (-entry.tagged_senses, order.index(entry.pos))
        if kept is None or rank < (-kept.tagged_senses, order.index(kept.pos)):
            best[entry.word] = entry
    return best


def _digest(word: str, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SEED}:{purpose}:{word}".encode()).digest()[:8], "big")


def to_record(entry: Entry) -> dict[str, str]:
    phrasing = PHRASINGS[_digest(entry.word, "phrasing") % len(PHRASINGS)]
    return {"instruction": phrasing.format(word=entry.word, pos=entry.pos), "output": entry.definition}


def split_sample(words: dict[str, Entry], n_train: int, n_eval: int) -> tuple[list[Entry], list[Entry]]:
    """Seeded order by word hash; the eval words come first and are never trained on.

    Eval is then sorted most common word first, so ``demo_prompt()`` (its first record) asks
    about a familiar word.
    """
    if len(words) < n_train + n_eval:
        raise SystemExit(f"only {len(words)} candidate words, need {n_train + n_eval}")
    ordered = sorted(words.values(), key=lambda e: (_digest(e.word, "split"), e.word))
    held_out = sorted(ordered[:n_eval], key=lambda e: (-e.tagged_senses, e.word))
    return ordered[n_eval : n_eval + n_train], held_out


def write_jsonl(path: Path, entries: list[Entry]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for entry in entries:
            handle.write(json.dumps(to_record(entry), ensure_ascii=False) + "\n")


def licence_text(wordnet_dir: Path) -> str:
    """WordNet's licence, as it stands in the header of its data files (line numbers dropped)."""
    lines = []
    with open(wordnet_dir / "data.noun", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not is_licence_line(line):
                break
            lines.append(re.sub(r"^\s+\d+ ?", "", line.rstrip()).rstrip())
    intro = (
        "lorakit's demo files wordnet_define_train.jsonl and wordnet_define_eval.jsonl are\n"
        "derived from WordNet 3.0 (word definitions, examples removed), built by\n"
        "scripts/build_demo_data.py. WordNet's licence notice follows, as required by it.\n\n"
    )
    return intro + "\n".join(lines).strip() + "\n"


def build(wordnet_dir: Path = WORDNET_DIR, out_dir: Path = OUT_DIR,
          n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> dict[str, int]:
    """Write the train/eval JSONL files and the licence into ``out_dir``; return counts."""
    entries = [e for pos in POS_FILES for e in candidates_for_pos(wordnet_dir, pos)]
    words = one_entry_per_word(entries)
    train, held_out = split_sample(words, n_train, n_eval)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / TRAIN_NAME, train)
    write_jsonl(out_dir / EVAL_NAME, held_out)
    (out_dir / LICENSE_NAME).write_text(licence_text(wordnet_dir), encoding="utf-8", newline="\n")
    return {"candidates": len(words), "train": len(train), "eval": len(held_out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR,
                        help="folder with WordNet's data.* and index.* files (apt install wordnet-base)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where to write the files")
    args = parser.parse_args(argv)
    if not (args.wordnet_dir / "data.noun").is_file():
        parser.error(f"no WordNet data in {args.wordnet_dir}; install it with `apt-get install wordnet-base`")
    counts = build(args.wordnet_dir, args.out_dir)
    print(f"{counts['candidates']} candidate words; wrote {counts['train']} train and "
          f"{counts['eval']} eval examples to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
