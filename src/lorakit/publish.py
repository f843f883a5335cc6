"""Put a finished output folder (a merged model, a GGUF model's dense copy in the cache:
gigabytes, minutes to make; a vLLM export) under its name, whole or not at all, beside other
processes doing the same.

    tmp = temp_beside(output)            # .tmp-NAME-HOST-PID-XXXXXXXX: this process's own
    ... write and check the folder in tmp ...
    move_into_place(tmp, output, overwrite, "the checked merged model")

With overwrite the old folder is renamed aside (.old-...) and deleted only once the new one is in
place: a kill leaves one whole folder under the name, or none and the old one aside.
`recover_leftovers(output)`, when the next run into that path starts, puts such an old folder
back and deletes the temp folders of this host's processes that are gone (on a shared file
system another host's are left alone: its processes cannot be seen from here). A move that fails
keeps the new folder as NAME.unplaced-XXXXXXXX, which no recovery touches, and says where."""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
import re
import shutil
import socket
import uuid
from pathlib import Path

from lorakit.errors import LorakitWarning, OutputError
from lorakit.host import process_alive
from lorakit.safe_io import fsync_dir, output_error

LONGEST_NAME = 255  # bytes in a file name, on the file systems lorakit meets


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def longest_output_name() -> int:
    """The longest output name whose temp folder's name still fits (`temp_beside`)."""
    return LONGEST_NAME - len(f".old--{_host()}-4194304-{'0' * 8}")  # Linux's largest pid has 7 digits


def temp_beside(output: Path, kind: str = "tmp") -> Path:
    resolved = output.resolve()  # "." has no name: the folder goes beside the real one
    return resolved.parent / f".{kind}-{resolved.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_placeable(output: Path, what: str) -> None:
    """Refuse, before the work, an output that `move_into_place` could not fill: a symbolic link
    (the rename would replace the link, not fill the folder it names) or a name too long for the
    temp folder beside it."""
    if output.is_symlink():
        raise OutputError(f"--output {output} is a symbolic link; give the folder's own path")
    if len(output.resolve().name.encode()) > longest_output_name():
        raise OutputError(f"--output {output}: the folder name is too long for the {what}'s temp folder beside "
                          f"it (at most {longest_output_name()} bytes); choose a shorter name")


def move_into_place(tmp: Path, output: Path, overwrite: bool, what: str) -> None:
    """Rename `tmp` to `output` (an empty folder there is replaced; a full one only with
    `overwrite`, renamed aside first)."""
    old = temp_beside(output, "old") if overwrite and output.exists() else None
    try:
        if old is not None:
            output.rename(old)
        tmp.rename(output)
    except OSError as exc:
        raise OutputError(f"{output_error(exc, output)}; {_keep(tmp, output, old, what)}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        fsync_dir(output.parent)  # the new name survives a power cut
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):  # a parent this user may not read: nothing to say
            # the folder is in place and checked: an error now would have the work redone for nothing
            warnings.warn(f"{what} is in place in {output}, but flushing its name to disk failed "
                          f"({exc.strerror}): it may not survive a power cut", LorakitWarning, stacklevel=2)


def _keep(tmp: Path, output: Path, old: Path | None, what: str) -> str:
    """After a failed move: the old folder back under its name where it can go, the new one under
    a name no recovery deletes; the words saying where each is."""
    said = []
    if old is not None and old.exists() and not output.exists():
        try:
            old.rename(output)
        except OSError:
            said.append(f"the folder it replaces is in {old}")
    kept = tmp.parent / f"{output.resolve().name}.unplaced-{uuid.uuid4().hex[:8]}"
    try:
        tmp.rename(kept)
    except OSError:
        kept = tmp
    return "; ".join([f"{what} is complete in {kept}: move it there yourself", *said])


def recover_leftovers(output: Path) -> None:
    resolved = output.resolve()
    if not resolved.parent.is_dir():
        return
    leftover = re.compile(rf"\.(tmp|old)-{re.escape(resolved.name)}-{re.escape(_host())}-(\d+)-[0-9a-f]{{8}}")
    for path in sorted(resolved.parent.iterdir()):
        found = leftover.fullmatch(path.name)
        if found is None or process_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not resolved.exists():
            with contextlib.suppress(OSError):  # left aside: nothing is lost
                path.rename(resolved)
        else:
            shutil.rmtree(path, ignore_errors=True)
