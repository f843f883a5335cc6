"""Safe file IO: atomic writes, checked safetensors loads, pickle refusal, path containment.

Every file lorakit writes goes through one of the ``atomic_*`` helpers, so a run killed at any
instant leaves either the old file or the new one, never a half-written one:

    path.tmp-XXXX  --write, flush, fsync-->  os.replace(tmp, path)  --fsync(folder)-->  done

The temp file lives in the *same* folder (a rename across file systems is not atomic), and the
folder is fsynced after the rename so the new name itself survives a power cut. Any OSError
while writing (disk full, read-only, permission denied) removes the temp file and becomes an
``OutputError`` with a message saying what to do.

Reading is defensive in the other direction:

- ``load_safetensors_checked`` reads the whole file into memory and parses it, so a truncated
  or corrupt file is an ``AdapterFileError`` naming the file (never zeros from a short mmap).
- ``refuse_pickle`` / ``load_tensor_file``: pickle files (``.bin .pt .pth .pkl``) can run code
  when loaded. They are refused unless the user passes ``--allow-pickle``, and even then are
  loaded with ``torch.load(weights_only=True)`` on torch >= 2.6 (CVE-2025-32434) only.
- ``ensure_inside`` stops a relative path from a config or adapter file from escaping its
  base folder (``..``, absolute paths, symlinks that resolve outside).

Public API::

    atomic_write_bytes(path, data)            atomic_write_text(path, text)
    atomic_write_json(path, obj)              atomic_save_safetensors(path, tensors, metadata)
    save_figure(figure, path, made_by)        figure_made_by(path, made_by) -> bool
    load_safetensors_checked(path) -> dict[str, Tensor]
    refuse_pickle(path, allow_pickle) -> bool          load_tensor_file(path, allow_pickle)
    ensure_inside(base_dir, path, what=..., error=OutputError) -> Path
    sha256_file(path) -> str                  fsync_dir(path)
    output_error(exc, path) -> OutputError    with translate_os_errors(path): ...
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save_file as _safetensors_save_file

from lorakit.errors import AdapterFileError, LorakitError, OutputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# errno -> (what happened, the fix for a `{target}` the user gave): one wording wherever lorakit
# names a failed write or a path the system refused (--output, a path on the command line, a cache)
_FREE_SPACE = "free space or choose another {target}"
_FIX_PERMISSIONS = "fix the folder's permissions or choose another {target}"
OS_ERROR_WORDS = {
    errno.ENOSPC: ("disk full", _FREE_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE),
    errno.EROFS: ("read-only file system", "choose a writable {target}"),
    errno.EACCES: ("permission denied", _FIX_PERMISSIONS),
    errno.EPERM: ("operation not permitted", _FIX_PERMISSIONS),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another {target}"),
    errno.ENAMETOOLONG: ("a file name or the path is too long", "choose a shorter {target}"),
    errno.ELOOP: ("a symbolic-link loop", "fix the symbolic-link loop or choose another {target}"),
}


def os_error_words(exc: OSError, target: str) -> tuple[str, str] | None:
    """(what happened, the fix) for an errno in OS_ERROR_WORDS; None for another."""
    if exc.errno not in OS_ERROR_WORDS:
        return None
    what, fix = OS_ERROR_WORDS[exc.errno]
    return what, fix.format(target=target)


def output_error(exc: OSError, path: str | os.PathLike, fix: str | None = None) -> OutputError:
    """Turn an OSError raised while writing ``path`` into one actionable OutputError (``fix``: the
    advice, where the output is not --output)."""
    if exc.errno == errno.EEXIST and exc.filename and os.path.isfile(exc.filename):  # mkdir(parents=True) under a file
        exc = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename)
    what, advice = os_error_words(exc, "--output") or (exc.strerror or str(exc), "check the output folder")
    if exc.errno is None and "requested and" in str(exc):  # numpy's tofile on a full disk: no errno
        what, advice = f"a short write ({exc}; the disk is likely full)", _FREE_SPACE.format(target="--output")
    return OutputError(f"{what} while writing {path}: {fix or advice}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk. A no-op where unsupported."""
    if os.name == "nt":  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def translate_os_errors(path: str | os.PathLike, fix: str | None = None) -> Iterator[None]:
    """Inside this block, an OSError (or the I/O error of a Rust library, which is not one:
    safetensors' SafetensorError, tokenizers' plain Exception ending in "(os error 28)") becomes
    an OutputError about writing ``path``; ``fix`` replaces the advice about --output (for a path
    that is not one the user gave)."""
    try:
        yield
    except LorakitError:
        raise
    except OSError as exc:
        raise output_error(exc, path, fix) from exc
    except Exception as exc:
        bare_with_errno = type(exc) is Exception and _RUST_OS_ERROR.search(str(exc))  # how tokenizers raises
        if type(exc).__name__ != "SafetensorError" and not bare_with_errno:
            raise
        raise output_error(_as_os_error(exc), path, fix) from exc


def _create_temp_beside(path: Path) -> str:
    """An empty new file next to ``path``. Not mkstemp: its 0600 mode would stick after the
    rename, while a file made with 0666 gets the user's umask like any other new file."""
    tmp = str(path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


def atomic_write_with(path: str | os.PathLike, fill: Callable[[str], None], fix: str | None = None) -> Path:
    """Create a temp file beside ``path``, let ``fill(tmp_name)`` write it, then swap it in
    (``fix``: the advice on failure, where ``path`` is not under --output)."""
    path = Path(path)
    with translate_os_errors(path, fix):
        tmp = _create_temp_beside(path)
        try:
            fill(tmp)
            with open(tmp, "rb+") as fh:  # fsync through a fresh handle: fill may not expose one
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_dir(path.parent)
    return path


def _write_with(
    mode: str, payload: bytes | str, encoding: str | None = None
) -> Callable[[str], None]:
    def fill(tmp: str) -> None:
        with open(tmp, mode, encoding=encoding) as fh:
            fh.write(payload)
            fh.flush()

    return fill


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    return atomic_write_with(path, _write_with("wb", data))


def save_figure(figure: Any, path: str | os.PathLike, made_by: str = "lorakit") -> Path:
    """A matplotlib Figure as a PNG at 110 dpi, written atomically (rendered in memory first), its
    Software field naming the command that made it (see `figure_made_by`)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": made_by})
    return atomic_write_bytes(path, buffer.getvalue())


def figure_made_by(path: str | os.PathLike, made_by: str) -> bool:
    """Whether the PNG at `path` is one `save_figure(..., made_by=made_by)` wrote: a command may
    replace its own picture, not a file of the user's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == made_by
    except (OSError, UnidentifiedImageError):
        return False


def atomic_write_text(path: str | os.PathLike, text: str, fix: str | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_with(path, _write_with("w", text, encoding="utf-8"), fix)


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """Where a folder is to be made: the file at that path, or at the nearest path above it that
    exists, if there is one (the folder could not be made there)."""
    path = Path(folder).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def read_json(path: str | os.PathLike) -> Any:
    """A UTF-8 JSON file's value. ValueError for bad JSON or UTF-8, a number too long to convert,
    or nesting beyond Python's recursion limit (json recurses once per level), as "nested too
    deeply"; OSError where the file cannot be read."""
    text = Path(path).read_text(encoding="utf-8-sig")  # Windows editors may put a byte-order mark first
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def atomic_write_json(path: str | os.PathLike, obj: Any, fix: str | None = None) -> Path:
    """Write ``obj`` as indented JSON atomically. Serialise first, so a TypeError writes nothing."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text, fix)


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save tensors (moved to CPU, made contiguous) as a safetensors file atomically."""
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}

    def fill(tmp: str) -> None:
        mode = os.stat(tmp).st_mode & 0o777  # the new empty file's: 0666 less the umask
        _safetensors_save_file(plain, tmp, metadata=meta)  # replaces it with a file of mode 0600
        os.chmod(tmp, mode)  # readable like any other written file (a server under another user)
        _sort_metadata_in_header(tmp)

    return atomic_write_with(path, fill)


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error prints an errno


def _as_os_error(exc: Exception) -> OSError:
    """The OSError a Rust library's write error stands for, so it reads like any failed write."""
    text = str(exc)
    rust_errno = _RUST_OS_ERROR.search(text)
    if rust_errno:
        return OSError(int(rust_errno.group(1)), os.strerror(int(rust_errno.group(1))))
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return OSError(errno.EIO, text)


def give_default_modes(folder: str | os.PathLike) -> None:
    """Files under `folder` get 0666 less the umask, as a plain open() makes them: libraries that
    write through a private temp file (safetensors) leave 0600, unreadable to other users."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def _sort_metadata_in_header(path: str) -> None:
    """safetensors writes ``__metadata__`` in hash-map order, which changes from process to
    process; sort it in place so the same tensors and metadata always give the same bytes
    (same checksums, byte-identical resumed runs). Sorting keeps the header's length."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (size - len(text))
        if len(text) == size:  # else leave the valid, merely unsorted, header alone
            fh.seek(8)
            fh.write(text)


def load_safetensors_checked(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is an AdapterFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist: check the path") from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return _safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a valid safetensors file ({exc}); it is probably truncated or "
            "corrupt: re-download or re-create it"
        ) from exc


def _looks_like_pickle(path: Path) -> bool:
    """Zip (torch.save since 1.6) or raw pickle protocol 2+ magic bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5)


def refuse_pickle(path: str | os.PathLike, allow_pickle: bool) -> bool:
    """Return True if ``path`` is a pickle file that may be loaded; raise if it may not.

    Pickle is recognised by suffix or by magic bytes. Without ``allow_pickle`` it is refused;
    with it, torch must be new enough for ``weights_only=True`` to be a real safeguard.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors" and (
        path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path)
    ):
        if not allow_pickle:
            raise AdapterFileError(
                f"{path} is a pickle file, which can run code when loaded; convert it to "
                "safetensors or pass --allow-pickle to load it with weights_only=True"
            )
        _require_safe_torch_load(path)
        return True
    return False


def _require_safe_torch_load(path: Path) -> None:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise AdapterFileError(
            f"refusing to load pickle file {path} with torch {torch.__version__}: "
            "weights_only=True is unsafe before torch 2.6 (CVE-2025-32434); upgrade torch "
            "or convert the file to safetensors"
        )


def load_tensor_file(
    path: str | os.PathLike, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load a tensor file: safetensors always, pickle only with ``allow_pickle`` (weights_only)."""
    path = Path(path)
    if not refuse_pickle(path, allow_pickle):
        return load_safetensors_checked(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist: check the path") from None
    except Exception as exc:  # the unpickler raises many types; all mean "unsafe or damaged"
        raise AdapterFileError(
            f"{path} could not be loaded with weights_only=True ({exc}); it holds objects "
            "other than tensors or is damaged: convert it to safetensors"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterFileError(f"{path} does not hold a flat name -> tensor dictionary")
    return obj


def ensure_inside(
    base_dir: str | os.PathLike,
    path: str | os.PathLike,
    what: str = "path",
    error: type[LorakitError] = OutputError,
) -> Path:
    """Resolve relative ``path`` under ``base_dir``; raise ``error`` if it would escape it.

    Rejects absolute paths, ``..`` that climbs out, and symlinks resolving outside. Pass
    ``error=ConfigError`` for paths read from a config, ``AdapterFileError`` for adapter files.
    Returns the resolved path.
    """
    raw = Path(path)
    if raw.is_absolute() or raw.drive:
        raise error(f"{what} {str(path)!r} is an absolute path: give a path relative to {base_dir}")
    base = Path(base_dir).resolve()
    resolved = (base / raw).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise error(
            f"{what} {str(path)!r} points outside {base} (via '..' or a symlink): "
            f"keep it inside {base}"
        )
    return resolved


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()

