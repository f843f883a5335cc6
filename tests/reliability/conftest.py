"""Shared inputs for the reliability tests: one tiny chat model, one data file, one trained run.

Everything is session-scoped and built once (a tiny random Llama, 48 instruction examples, a
3-step training run with three checkpoints), so the whole folder stays within a few minutes on
a 2-core machine.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reliability_kit import Tiny, train_args  # noqa: E402
from tiny_models import save_tiny_chat_model, write_define_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("reliability")
    model = save_tiny_chat_model(root / "model")
    data = write_define_data(root / "train.jsonl", count=48)
    return Tiny(root, Path(model), Path(data))


@pytest.fixture(scope="session")
def other_model(tiny) -> Path:
    """Another base model: one layer instead of two (another fingerprint)."""
    return Path(save_tiny_chat_model(tiny.root / "other-model", layers=1))


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory) -> Path:
    """A finished run: adapter/, checkpoints step-1..3, summary.json. Copy it before changing it."""
    from lorakit.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(tiny, out)) == 0
    return out


@pytest.fixture
def adapter_copy(trained, tmp_path) -> Path:
    """A private copy of the trained adapter, free to damage."""
    return Path(shutil.copytree(trained / "adapter", tmp_path / "adapter"))


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the whole trained run, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))
