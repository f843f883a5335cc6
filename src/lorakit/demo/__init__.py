"""The built-in demo data set: define-the-word instructions from WordNet 3.0.

``lorakit train`` with no arguments fine-tunes the built-in SmolLM2 on these files, so the
whole tool works offline with nothing but the pip package. Records are instruction-format
JSONL::

    {"instruction": "Define the word \\"knoll\\" (noun).", "output": "a small natural hill"}

3000 training and 200 evaluation examples, no word in both; the eval file lists the most common
words first. Built by ``scripts/build_demo_data.py`` (deterministic); WordNet's licence is in
``WORDNET_LICENSE.txt`` next to the data and must ship with it.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_TRAIN = DEMO_DIR / "wordnet_define_train.jsonl"
DEMO_EVAL = DEMO_DIR / "wordnet_define_eval.jsonl"
DEMO_LICENSE = DEMO_DIR / "WORDNET_LICENSE.txt"
DEMO_TRAIN_SIZE = 3000
DEMO_EVAL_SIZE = 200


def demo_example() -> dict[str, str]:
    """The first held-out record (a common word, never seen in training)."""
    with open(DEMO_EVAL, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def demo_prompt() -> str:
    """One held-out instruction, for the before/after sample answer of the demo."""
    return demo_example()["instruction"]
