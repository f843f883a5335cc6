"""The rich console every lorakit command prints through, and the streams a training run prints
through while its steps run."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Callable, Iterator

from rich.console import Console as RichConsole

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
