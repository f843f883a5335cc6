"""Test-only fault injection for a `python -m lorakit ...` child process: SIGKILL at a chosen point.

Put this folder on the child's PYTHONPATH and set LORAKIT_KILL_AT; Python imports
`sitecustomize` at start-up, so production code carries no test hooks. Specs (n is 1-based,
counted in this process):

    call:MODULE:QUALNAME:n   SIGKILL on entering the n-th call of MODULE.QUALNAME
    write:SUFFIX:n           SIGKILL while writing the n-th file whose path ends with SUFFIX:
                             the temp file is cut to half its size first, then the process
                             dies before the atomic rename (a torn write, as on a real crash)
    rmtree:PREFIX:n          SIGKILL half way through the n-th rmtree (in lorakit's checkpoint
                             module) of a folder whose name starts with PREFIX
    full:SUFFIX:n            no kill: the n-th atomic write of a file whose path ends with SUFFIX
                             fails as on a full disk (OSError ENOSPC), and the process goes on

A spec ending in @R (`call:MODULE:QUALNAME:n@1`) arms the hook only in the torchrun worker whose
RANK is R, so one rank of a distributed run dies while the others wait in a collective.
"""

import os
import signal


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(target: int):
    seen = [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == target

    return hit


def _kill_on_call(module_name: str, qualname: str, hit) -> None:
    import functools
    import importlib

    owner = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if hit():
            _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _kill_on_write(suffix: str, hit) -> None:
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(suffix) and hit():
            size = os.path.getsize(src)
            with open(src, "r+b") as handle:
                handle.truncate(size // 2)
            _die()
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def _full_disk_on_write(suffix: str, hit) -> None:
    import errno

    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(suffix) and hit():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def _kill_in_rmtree(prefix: str, hit) -> None:
    import shutil
    import types

    import lorakit.train.checkpoint as checkpoint

    def rmtree(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith(prefix) and hit():
            files = sorted(os.listdir(path))
            os.remove(os.path.join(path, files[0]))  # half deleted
            _die()
        return shutil.rmtree(path, *args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(shutil, k) for k in dir(shutil) if not k.startswith("__")})
    proxy.rmtree = rmtree
    checkpoint.shutil = proxy


def _install(spec: str) -> None:
    kind, *rest = spec.split(":")
    hit = _counter(int(rest[-1]))
    if kind == "call":
        _kill_on_call(rest[0], rest[1], hit)
    elif kind == "write":
        _kill_on_write(rest[0], hit)
    elif kind == "rmtree":
        _kill_in_rmtree(rest[0], hit)
    elif kind == "full":
        _full_disk_on_write(rest[0], hit)
    else:
        raise SystemExit(f"LORAKIT_KILL_AT: unknown kind {kind!r}")


def _armed_here(spec: str) -> tuple[bool, str]:
    spec, _, rank = spec.partition("@")
    return not rank or os.environ.get("RANK") == rank, spec


if os.environ.get("LORAKIT_KILL_AT"):
    armed, spec = _armed_here(os.environ["LORAKIT_KILL_AT"])
    if armed:
        _install(spec)
