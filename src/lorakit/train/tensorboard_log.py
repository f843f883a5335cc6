"""TensorBoard events beside metrics.jsonl, when tensorboard is installed.

They are an optional copy: every figure is in metrics.jsonl too. So a failure of TensorBoard's
writer (a full disk, a file where its folder should be) turns it off with one warning and the run
goes on. Its writer thread re-raises what killed it, and Python would print that traceback
from the thread: `_quiet_writer_threads` leaves the telling to the warning."""

from __future__ import annotations

import contextlib
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator


class TensorBoardLog:
    def __init__(self, folder: Path, purge_step: int | None, warn: Callable[[str], None]):
        self.warn, self.writer = warn, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        _quiet_writer_threads()
        before = set(threading.enumerate())
        with self._guarded():
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)
        _OUR_WRITER_THREADS.update(set(threading.enumerate()) - before)

    def add(self, entry: dict) -> None:
        """An entry of metrics.jsonl: its numbers under `kind/key` at its step."""
        with self._guarded():
            for key, value in entry.items():
                if self.writer is not None and key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])

    def close(self) -> None:
        with self._guarded():
            if self.writer is not None:
                self.writer.close()
        self.writer = None

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # any failure of an optional copy: the run must go on
            self.warn(f"warning: TensorBoard logging stopped ({type(exc).__name__}: {exc}); "
                      "every figure is in metrics.jsonl")
            self.writer = None


_OUR_WRITER_THREADS: weakref.WeakSet = weakref.WeakSet()  # the writer threads of lorakit's own logs


def _quiet_writer_threads() -> None:
    """Python prints an uncaught exception of any thread; TensorBoard's writer thread re-raises
    its I/O errors, which the next add or close raises again in the training thread (and
    `_guarded` turns into one warning). Other threads, a user's own SummaryWriter's among them,
    keep the hook they had."""
    previous = threading.excepthook
    if getattr(previous, "lorakit_quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread not in _OUR_WRITER_THREADS:
            previous(args)

    hook.lorakit_quiets_tensorboard = True
    threading.excepthook = hook
