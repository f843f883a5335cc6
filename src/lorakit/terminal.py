"""The rich console every lorakit command prints through, the streams a training run prints
through while its steps run, and transformers' progress bars, kept only where loading or saving
weights takes a while."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console as RichConsole

LOADING_BAR_BYTES = 2 * 1024**3  # smaller local weights load (and save) in seconds: no progress bar
# a write to a pipe whose reader exited (`| head`, a dead `tee`), or to a terminal that hung up
GONE_ERRNOS = (errno.EPIPE, errno.EIO)


class Console(RichConsole):
    """A closed pipe (`lorakit estimate | head -1`) raises BrokenPipeError, which the command
    line's one handler turns into a quiet exit 141, as for plain prints; rich's own handler
    would exit 1."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


class _SurvivingStream:
    """sys.stdout or sys.stderr, whose first write that finds its reader gone points the file
    descriptor at /dev/null (every later write, the interpreter's last flush included, lands
    there) and calls `on_gone` with the stream's name."""

    def __init__(self, stream, name: str, on_gone: Callable[[str], None]):
        self._stream, self._name, self._on_gone = stream, name, on_gone

    def write(self, text: str) -> int:
        self._guarded(lambda: self._stream.write(text))
        return len(text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:
            if exc.errno not in GONE_ERRNOS:
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            with contextlib.suppress(OSError):
                self._stream.flush()  # what the failed write left in the buffer: now into /dev/null
            self._on_gone(self._name)

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def surviving_closed_output(on_gone: Callable[[str], None]) -> Iterator[None]:
    """While training steps run, a reader that goes away must not end the process mid-step with
    the steps since the last checkpoint lost: the output goes to /dev/null from then on and
    `on_gone("stdout" or "stderr")` lets the run stop as for a signal, with a checkpoint."""
    saved = sys.stdout, sys.stderr
    sys.stdout = _SurvivingStream(sys.stdout, "stdout", on_gone)
    sys.stderr = _SurvivingStream(sys.stderr, "stderr", on_gone)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def loading_bar_only_when_slow(target: str):
    """transformers draws a "Loading weights" bar for every model; it is noise before lorakit's
    own output for a small local model (the built-in loads in under a second), and kept where
    loading takes a while (large weights, or a hub id whose size is not known here)."""
    folder = Path(target)
    weights = (sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
               if folder.is_dir() else None)
    return bars_only_when_slow(weights)


def saving_bar_only_when_slow(model):
    """As loading_bar_only_when_slow, for save_pretrained's "Writing model shards" bar."""
    return bars_only_when_slow(sum(p.numel() * p.element_size() for p in model.parameters()))


@contextlib.contextmanager
def bars_only_when_slow(weight_bytes: int | None):
    """transformers' progress bars hidden while it moves fewer than LOADING_BAR_BYTES of weights
    (None: a size not known here, the bars kept)."""
    from transformers.utils import logging as hf_logging

    hide = weight_bytes is not None and weight_bytes < LOADING_BAR_BYTES and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
