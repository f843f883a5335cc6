"""The rich console every lorakit command prints through."""

from __future__ import annotations

from rich.console import Console as RichConsole


class Console(RichConsole):
    """A closed pipe (`lorakit estimate | head -1`) raises BrokenPipeError, which the command
    line's one handler turns into a quiet exit 141, as for plain prints; rich's own handler
    would exit 1."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError
