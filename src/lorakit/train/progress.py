"""The progress bar: loss, learning rate, tokens/s, ETA and memory, with rich.

On a terminal it redraws in place; elsewhere (CI, log files) it prints a line every ~10% of
the run so logs stay short.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

from lorakit.host import peak_rss_bytes
from lorakit.terminal import Console


def peak_memory_bytes(device: torch.device) -> int:
    """The run's peak so far: tensors allocated on a GPU; the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def memory_text(device: torch.device) -> str:
    return f"{peak_memory_bytes(device) / 2**30:.1f} GiB{' RSS' if device.type != 'cuda' else ''}"


class PauseClock:
    """The seconds spent in `paused()` blocks: mid-run evals and checkpoints, which the tokens/s
    leaves out (the progress line's, and summary.json's through the session)."""

    paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - began


class Progress(PauseClock):
    def __init__(self, total: int, start: int, device: torch.device, start_tokens: int = 0):
        self.total, self.start, self.device = total, start, device
        self.tokens0 = start_tokens
        self.live = Console(stderr=True).is_terminal
        # asked once: rich asks the terminal again before each redraw, and one that hung up says
        # "no terminal" instead of failing the write that tells the run its output is gone
        self.console = Console(stderr=True, force_terminal=self.live)
        self.started = time.perf_counter()
        self._last_print = -1
        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=self.console, transient=False, disable=not self.live)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, state, result) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (state.seen_tokens - self.tokens0) / max(elapsed - self.paused_seconds, 1e-9)
        done = state.step - self.start
        eta = elapsed / max(done, 1) * (self.total - state.step)  # pauses in: the steps left will pause as often
        info = (f"loss {result.loss:.4f}  lr {result.lr:.2e}  {rate:,.0f} tok/s  "
                f"ETA {eta:,.0f}s  mem {memory_text(self.device)}")
        self.bar.update(self.task, completed=state.step, info=info)
        if not self.live and self._due(state.step):
            print(f"step {state.step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def _due(self, step: int) -> bool:
        bucket = step * 10 // max(self.total, 1)
        if bucket != self._last_print or step == self.total:
            self._last_print = bucket
            return True
        return False

    def note(self, text: str) -> None:
        if text:
            self.console.print(text)


class SilentProgress(PauseClock):
    """The progress bar's interface, silent: ranks other than 0."""

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, state, result) -> None:
        pass

    def note(self, text: str) -> None:
        pass
