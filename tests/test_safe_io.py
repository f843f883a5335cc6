"""Tests for lorakit.safe_io: atomic writes, disk-full handling, checked loads, pickle refusal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit.safe_io as safe_io
from lorakit.errors import AdapterFileError, ConfigError, OutputError
from lorakit.safe_io import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_inside,
    load_safetensors_checked,
    load_tensor_file,
    refuse_pickle,
    sha256_file,
)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_atomic_writes_replace_content_and_leave_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    obj = {"x": [1, 2.5, None], "t": "ü"}
    atomic_write_json(tmp_path / "b.json", obj)
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == obj
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_atomic_write_honours_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})  # safetensors itself makes 0600
        (tmp_path / "lib").mkdir()
        (tmp_path / "lib" / "model.bin").touch(mode=0o600)
        safe_io.give_default_modes(tmp_path / "lib")
    finally:
        os.umask(old)
    for path in ("a.txt", "w.safetensors", "lib/model.bin"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o644, path


def test_unserialisable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_write_error_becomes_output_error_and_keeps_old_file(tmp_path, monkeypatch, code, words):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"old": True})

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safe_io.os, "fsync", failing_fsync)
    with pytest.raises(OutputError) as info:
        atomic_write_json(target, {"new": True})
    message = str(info.value)
    assert words in message and str(target) in message and "--output" in message
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_a_path_under_a_file_is_named_as_such(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(OutputError, match="a part of the path is a file, not a folder"):
        with safe_io.translate_os_errors(tmp_path / "notes" / "x.png"):
            (tmp_path / "notes" / "x.png").parent.mkdir(parents=True, exist_ok=True)
    assert (tmp_path / "notes").read_text() == "mine"


def test_partial_safetensors_write_on_disk_full_is_cleaned(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    atomic_save_safetensors(target, {"w": torch.ones(3)})
    real_save = safe_io._safetensors_save_file

    def half_then_enospc(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io, "_safetensors_save_file", half_then_enospc)
    with pytest.raises(OutputError, match="disk full while writing .*w.safetensors"):
        atomic_save_safetensors(target, {"w": torch.zeros(1000)})
    assert torch.equal(load_file(target)["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_safetensors_own_io_error_on_a_full_disk_is_an_output_error(tmp_path, monkeypatch):
    # safetensors raises its SafetensorError (not an OSError) when the disk fills up
    SafetensorError = type("SafetensorError", (Exception,), {})

    def enospc(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(safe_io, "_safetensors_save_file", enospc)
    with pytest.raises(OutputError, match="disk full while writing .*w.safetensors"):
        atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(10)})
    assert _leftovers(tmp_path) == []


def test_safetensors_round_trip_with_metadata_and_views(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    bf16 = torch.tensor([1, 2], dtype=torch.bfloat16)
    tensors = {"t": base.t(), "b": bf16, "s": torch.tensor(7.0)}
    atomic_save_safetensors(tmp_path / "x.safetensors", tensors, {"note": "hi"})
    loaded = load_safetensors_checked(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", "pt") as fh:
        assert fh.metadata()["note"] == "hi"


@pytest.mark.parametrize("damage", ["truncate", "header", "garbage", "empty"])
def test_damaged_safetensors_is_adapter_file_error(tmp_path, damage):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": torch.randn(16, 16)}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "header":
        data[0:8] = (10**12).to_bytes(8, "little")
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file at all")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        load_safetensors_checked(path)


def test_missing_safetensors_is_adapter_file_error(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_safetensors_checked(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl"])
def test_pickle_suffixes_refused_without_flag(tmp_path, suffix):
    path = tmp_path / f"adapter_model{suffix}"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AdapterFileError) as info:
        refuse_pickle(path, allow_pickle=False)
    assert "pickle file" in str(info.value) and "--allow-pickle" in str(info.value)
    with pytest.raises(AdapterFileError):
        load_tensor_file(path)
    assert refuse_pickle(path, allow_pickle=True) is True
    assert torch.equal(load_tensor_file(path, allow_pickle=True)["w"], torch.ones(2))


def test_pickle_detected_by_content_under_a_safe_looking_name(tmp_path):
    path = tmp_path / "weights.data"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_tensor_file(path)
    save_file({"w": torch.ones(2)}, tmp_path / "ok.safetensors")
    assert refuse_pickle(tmp_path / "ok.safetensors", allow_pickle=False) is False


class _RunsCode:
    """Unpickling this would create a marker file: the attack weights_only must stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_allowed_pickle_still_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": _RunsCode(str(marker))}, path)
    with pytest.raises(AdapterFileError, match="weights_only=True"):
        load_tensor_file(path, allow_pickle=True)
    assert not marker.exists()


def test_ensure_inside_accepts_paths_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    assert ensure_inside(tmp_path, "sub/file.txt") == (tmp_path / "sub" / "file.txt").resolve()
    assert ensure_inside(tmp_path, "sub/../other.txt") == (tmp_path / "other.txt").resolve()


@pytest.mark.parametrize("bad", ["../x", "sub/../../x", "/etc/passwd"])
def test_ensure_inside_rejects_escapes(tmp_path, bad):
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError):
        ensure_inside(tmp_path, bad)
    with pytest.raises(ConfigError, match="data file"):
        ensure_inside(tmp_path, bad, what="data file", error=ConfigError)


def test_ensure_inside_rejects_symlink_out(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterFileError, match="outside"):
        ensure_inside(base, "link/secret", error=AdapterFileError)


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1024) == hashlib.sha256(data).hexdigest()


def test_a_rust_librarys_io_error_reads_like_any_failed_write(tmp_path):
    # tokenizers raises a plain Exception whose text ends in Rust's "(os error N)"
    with pytest.raises(OutputError, match=r"disk full while writing .*tok: free space"):
        with safe_io.translate_os_errors(tmp_path / "tok"):
            raise Exception("No space left on device (os error 28)")
    with pytest.raises(OutputError, match=r"read-only file system while writing .*cache: set LORAKIT_CACHE"):
        with safe_io.translate_os_errors(tmp_path / "cache", fix="set LORAKIT_CACHE"):  # not a path the user gave
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(ValueError):  # anything else passes through
        with safe_io.translate_os_errors(tmp_path / "tok"):
            raise ValueError("reading failed (os error 28)")  # not a bare Exception: not a Rust write error
