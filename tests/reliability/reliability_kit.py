"""Helpers shared by the reliability tests (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
KILLHOOKS = HERE / "killhooks"
CORPUS = HERE / "corpus"
SRC = HERE.parents[1] / "src"
LORAKIT = [sys.executable, "-m", "lorakit"]


@dataclass
class Tiny:
    root: Path
    model: Path
    data: Path


def train_args(tiny: Tiny, out, *extra) -> list[str]:
    """A small, fast training run (seconds); extra flags override the earlier ones."""
    return ["train", "--model", str(tiny.model), "--data", str(tiny.data), "--output", str(out),
            "--max-steps", "3", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--r", "4",
            "--eval-split", "4", "--seed", "3", "--save-every", "1", "--keep-checkpoints", "3", *extra]


def child_env(kill_at: str | None = None) -> dict[str, str]:
    """Environment for a `python -m lorakit` child: fault hooks importable, one thread (fast
    and the same in every child, so runs are comparable bit for bit), no network."""
    env = dict(os.environ)
    paths = [str(KILLHOOKS), str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LORAKIT_KILL_AT", None)
    if kill_at:
        env["LORAKIT_KILL_AT"] = kill_at
    return env
