"""Crash-safe training checkpoints: everything needed for an exact resume, and no pickle.

Layout, one folder per saved step::

    OUTPUT/checkpoints/
      step-000120/
        adapter_model.safetensors   trainable tensors under their state-dict names
        optimizer.safetensors       optimizer state tensors: state.{param_index}.{exp_avg|...}
        optimizer.json              param_groups and non-tensor state (tensors as references)
        rng.safetensors             torch CPU / CUDA / named generator states (see rng.py)
        trainer_state.json          step, scheduler state, RNG metadata, library versions and
                                    whatever the trainer passes (epoch, batch index, counters,
                                    resolved config, base-model fingerprint)
        manifest.json               size and sha256 of every file above; written LAST
      step-000100/ ...

How a save survives a kill at any instant (SIGKILL skips ``finally``, so nothing relies on it)::

    .tmp-step-000120-<pid>/   write each file (fsynced), manifest last, fsync the folder
    os.rename -> step-000120/ fsync checkpoints/; only now prune the oldest beyond ``keep``

A folder named ``step-*`` therefore either holds a full manifest or is damaged by something
other than us (disk, user); ``.tmp-*`` folders are leftovers of killed saves and are deleted on
the next save or resume, never read. Resume verifies the manifest (every file present, sizes
and hashes match) newest first and falls back to the previous checkpoint with a WARNING.

Public API::

    save_checkpoint(ckpt_root, step, *, model_tensors, optimizer, scheduler_state,
                    trainer_state, keep, rng=None) -> Path
    find_latest_valid(ckpt_root) -> Path | None
    load_checkpoint(path) -> Checkpoint
    load_optimizer_state(optimizer, checkpoint)   # checks shapes, then optimizer.load_state_dict
    verify_checkpoint(path) -> str | None         # the problem, or None when complete
    list_checkpoints(ckpt_root) -> list[Path]     # step folders, newest first
    library_versions() -> dict[str, str]

Single writer: only one process (rank 0) may save into a checkpoints folder, since a save
deletes every ``.tmp-*`` folder it finds there.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError, AdapterMismatchError
from lorakit.safe_io import (
    atomic_save_safetensors,
    atomic_write_json,
    ensure_inside,
    fsync_dir,
    load_safetensors_checked,
    sha256_file,
    translate_os_errors,
)
from lorakit.train.rng import CPU_KEY, capture_rng, restore_rng, rng_problem

log = logging.getLogger(__name__)

FORMAT = "lorakit-checkpoint"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DATA_FILES = (ADAPTER_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, RNG_FILE, TRAINER_STATE)
TEMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REPLACED_DIR = re.compile(r"^\.tmp-replaced-(step-\d+)-\d+$")  # `_publish`'s aside name


@dataclass
class Checkpoint:
    """A verified checkpoint, loaded into memory (tensors on CPU)."""

    path: Path
    step: int
    model_tensors: dict[str, torch.Tensor]
    optimizer_state_dict: dict[str, Any]  # ready for optimizer.load_state_dict
    trainer_state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]

    @property
    def scheduler_state(self) -> Any:
        return self.trainer_state.get("scheduler")

    def restore_rng(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        restore_rng(self.rng_tensors, self.rng_meta, generators)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Nested state <-> JSON + flat tensors. Tensors become {"__tensor__": name} references and
# tuples {"__tuple__": [...]}, so the optimizer gets back exactly the types it saved.


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{name} is a tensor; this part of a checkpoint must be plain JSON")
        if name in tensors:  # e.g. keys "a.b" and "a" -> "b" flatten to the same name
            raise ValueError(f"two tensors would both be stored as {name!r}")
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{name} has non-string keys; a checkpoint can only store those")
        return {key: _encode(v, f"{name}.{key}", tensors) for key, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {name} of type {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return {key: _decode(v, tensors) for key, v in value.items()}


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors named state.{index}.{key}, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state = {str(i): _encode(s, f"state.{i}", tensors) for i, s in state_dict["state"].items()}
    groups = [
        _encode(group, f"param_groups.{n}", tensors)
        for n, group in enumerate(state_dict["param_groups"])
    ]
    return tensors, {"state": state, "param_groups": groups}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    """Inverse of ``flatten_optimizer_state``: integer parameter indices, real tuples."""
    state = {_param_key(k): _decode(v, tensors) for k, v in meta["state"].items()}
    return {"state": state, "param_groups": _decode(meta["param_groups"], tensors)}


def _param_key(key: str) -> int | str:
    return int(key) if key.isdigit() else key


# ---------------------------------------------------------------------------------------------
# Saving


def library_versions() -> dict[str, str]:
    """Versions recorded with each checkpoint, to explain a resume that is not bit-identical."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "safetensors", "numpy", "lorakit"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["cuda"] = str(torch.version.cuda)
    return versions


def _trainer_state_json(
    step: int, trainer_state: Mapping, scheduler_state: Any, rng_meta: dict
) -> dict:
    return {
        **_encode(dict(trainer_state), "trainer_state", None),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "scheduler": _encode(scheduler_state, "scheduler_state", None),
        "rng": rng_meta,
        "versions": library_versions(),
    }


def _check_model_tensors(model_tensors: Mapping[str, torch.Tensor]) -> None:
    # ZeRO-3 style empty shards once produced adapters of size-0 tensors (peft#1443).
    if not model_tensors:
        raise ValueError("refusing to save a checkpoint with no model tensors")
    empty = [name for name, t in model_tensors.items() if t.numel() == 0]
    if empty:
        raise ValueError(f"refusing to save empty tensors into a checkpoint: {empty[:5]}")


def _write_manifest(folder: Path, step: int) -> None:
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in DATA_FILES
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)


def _write_folder(folder: Path, step: int, parts: dict[str, Any]) -> None:
    with translate_os_errors(folder):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    atomic_save_safetensors(folder / ADAPTER_FILE, parts["model"])
    atomic_save_safetensors(folder / OPTIMIZER_TENSORS, parts["optimizer_tensors"])
    atomic_write_json(folder / OPTIMIZER_JSON, parts["optimizer_json"])
    atomic_save_safetensors(folder / RNG_FILE, parts["rng_tensors"])
    atomic_write_json(folder / TRAINER_STATE, parts["trainer_state"])
    _write_manifest(folder, step)
    with translate_os_errors(folder):
        fsync_dir(folder)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; a same-step folder is moved aside first."""
    root = final.parent
    with translate_os_errors(final):
        aside = None
        if final.exists():
            aside = root / f"{TEMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    *,
    model_tensors: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    scheduler_state: Any,
    trainer_state: Mapping[str, Any],
    keep: int | None,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``ckpt_root/step-NNNNNN`` atomically and return its path.

    ``optimizer`` is an optimizer or its ``state_dict()``. ``scheduler_state`` and
    ``trainer_state`` must be JSON-able (tuples are kept). ``rng`` defaults to
    ``capture_rng()`` now; pass ``capture_rng(generators=...)`` to include a sampler's generator.
    ``keep`` newest step folders survive (None keeps all), pruned only after this save is
    complete. Raises OutputError (disk full, read-only ...) leaving earlier checkpoints intact.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1 (or None for all), got {keep}")
    _check_model_tensors(model_tensors)
    optimizer_sd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    opt_tensors, opt_json = flatten_optimizer_state(optimizer_sd)
    rng_tensors, rng_meta = rng if rng is not None else capture_rng()
    parts = {
        "model": model_tensors,
        "optimizer_tensors": opt_tensors,
        "optimizer_json": opt_json,
        "rng_tensors": rng_tensors,
        "trainer_state": _trainer_state_json(step, trainer_state, scheduler_state, rng_meta),
    }
    root = Path(ckpt_root)
    with translate_os_errors(root):
        root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    final = root / step_dir_name(step)
    tmp = root / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _write_folder(tmp, step, parts)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep, up_to_step=step)
    return final


# ---------------------------------------------------------------------------------------------
# Housekeeping


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Step folders (complete or not), newest step first. Temp folders are never listed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def remove_stale_temp_dirs(ckpt_root: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of killed saves; returns what was removed. A complete
    checkpoint moved aside by a same-step re-save (`_publish`) whose new copy never got its name
    is put back instead."""
    root = Path(ckpt_root)
    removed = []
    for entry in root.iterdir() if root.is_dir() else []:
        if not entry.name.startswith(TEMP_PREFIX) or _restored(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        except OSError as exc:  # never read, so a leftover we cannot delete is only clutter
            log.warning("could not delete unfinished checkpoint folder %s: %s", entry, exc)
    return removed


def _restored(entry: Path) -> bool:
    match = _REPLACED_DIR.match(entry.name)
    if match is None or (entry.parent / match.group(1)).exists() or verify_checkpoint(entry) is not None:
        return False
    try:
        os.rename(entry, entry.parent / match.group(1))
    except OSError:
        return False
    log.warning("put back checkpoint %s, which an interrupted re-save had moved aside", match.group(1))
    return True


def prune_checkpoints(ckpt_root: str | os.PathLike, keep: int | None, up_to_step: int | None = None) -> None:
    """Delete all but the ``keep`` newest step folders (of steps up to ``up_to_step``).

    ``up_to_step`` is the step just saved: later folders are neither counted nor deleted. A run
    resumes from its newest valid checkpoint, so the only later ones are damaged ones it skipped;
    counting them deleted the checkpoint just written (keep=1) and left nothing to resume from.
    Each doomed folder is first renamed to ``.tmp-delete-*`` so a kill mid-delete leaves no
    half-deleted ``step-*`` folder behind. A failure here only warns: training can go on.
    """
    if keep is None:
        return
    root = Path(ckpt_root)
    folders = [path for path in list_checkpoints(root)
               if up_to_step is None or _step_of(path) <= up_to_step]
    for path in folders[keep:]:
        trash = root / f"{TEMP_PREFIX}delete-{path.name}-{os.getpid()}"
        try:
            os.rename(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:
            log.warning("could not delete old checkpoint %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------
# Verifying and loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # JSON nested thousands deep
        raise AdapterFileError(f"cannot read {path}: it is nested too deep to be one lorakit wrote") from None
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"cannot read {path}: {exc}") from exc


def _file_problem(folder: Path, name: str, expected: Mapping[str, Any]) -> str | None:
    try:
        path = ensure_inside(folder, name, what="manifest entry", error=AdapterFileError)
    except AdapterFileError as exc:
        return str(exc)
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{name} has {size} bytes, the manifest says {expected.get('size')}"
    if sha256_file(path) != expected.get("sha256"):
        return f"{name} does not match its sha256 in the manifest"
    return None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Return what is wrong with a checkpoint folder, or None if it is complete and intact."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the save did not finish)"
    try:
        manifest = _read_json(folder / MANIFEST)
    except AdapterFileError as exc:
        return f"{MANIFEST} is unreadable: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is not a {FORMAT} manifest"
    if not isinstance(manifest.get("format_version", 0), int):
        return f"{MANIFEST} has no format version"
    if manifest.get("format_version", 0) > FORMAT_VERSION:  # before the files: a newer one may list them otherwise
        return f"it was written by a newer lorakit (format {manifest['format_version']}): upgrade"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        return f"{MANIFEST} does not list its files as a save writes them"
    missing = [name for name in DATA_FILES if name not in files]
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)}"
    for name, expected in files.items():
        problem = _file_problem(folder, name, expected)
        if problem:
            return problem
    return None


def find_latest_valid(ckpt_root: str | os.PathLike, clean: bool = True) -> Path | None:
    """Newest checkpoint whose manifest verifies; damaged ones are skipped with a WARNING.

    With ``clean`` the ``.tmp-*`` leftovers of killed saves are deleted first.
    """
    if clean:
        for stale in remove_stale_temp_dirs(ckpt_root):
            log.info("removed unfinished checkpoint folder %s", stale)
    for path in list_checkpoints(ckpt_root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s (%s); trying the previous one", path, problem)
    return None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify and load a checkpoint folder; a damaged one raises AdapterFileError."""
    folder = Path(path)
    problem = verify_checkpoint(folder)
    if problem is not None:
        raise _damaged(folder, problem)
    try:
        trainer_state = _decode(_read_json(folder / TRAINER_STATE), {})
    except (KeyError, TypeError, RecursionError) as exc:  # a tensor reference, or nesting, a save does not write
        raise _damaged(folder, f"its {TRAINER_STATE} holds what a save does not write ({type(exc).__name__})") from None
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int) \
            or not isinstance(trainer_state.get("rng"), dict):
        raise _damaged(folder, f"its {TRAINER_STATE} lacks the step or the random state")
    try:  # files whose checksums match but whose contents are not what a save writes (an edit)
        optimizer_sd = unflatten_optimizer_state(
            load_safetensors_checked(folder / OPTIMIZER_TENSORS), _read_json(folder / OPTIMIZER_JSON)
        )
        if not all(isinstance(group, dict) and isinstance(group.get("params"), list)
                   for group in optimizer_sd["param_groups"]):
            raise KeyError("params")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise _damaged(folder, f"its {OPTIMIZER_JSON} does not describe an optimizer state ({exc!r})") from None
    rng_tensors, rng_meta = load_safetensors_checked(folder / RNG_FILE), trainer_state["rng"]
    if CPU_KEY not in rng_tensors or not {"python", "numpy"} <= set(rng_meta):
        raise _damaged(folder, f"its random state ({RNG_FILE}, {TRAINER_STATE}) is incomplete")
    problem = rng_problem(rng_tensors, rng_meta)
    if problem is not None:
        raise _damaged(folder, f"its random state ({RNG_FILE}, {TRAINER_STATE}) cannot be restored ({problem})")
    return Checkpoint(
        path=folder,
        step=int(trainer_state["step"]),
        model_tensors=load_safetensors_checked(folder / ADAPTER_FILE),
        optimizer_state_dict=optimizer_sd,
        trainer_state=trainer_state,
        rng_tensors=rng_tensors,
        rng_meta=rng_meta,
    )


def _damaged(folder: Path, problem: str) -> AdapterFileError:
    return AdapterFileError(f"checkpoint {folder} is damaged: {problem}; resume from an earlier checkpoint or "
                            "delete this folder")


def _optimizer_mismatch(optimizer: torch.optim.Optimizer, state_dict: Mapping) -> str | None:
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        return f"{len(saved_groups)} parameter groups saved, {len(groups)} now"
    params = [p for group in groups for p in group["params"]]
    saved_count = sum(len(group["params"]) for group in saved_groups)
    if saved_count != len(params):
        return f"{saved_count} trainable tensors saved, {len(params)} now"
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if isinstance(index, int) and value.shape != params[index].shape:
                    saved, now = tuple(value.shape), tuple(params[index].shape)
                    return f"state {key} of tensor #{index} has shape {saved}, the parameter {now}"
    return None


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load the checkpoint's optimizer state (AdamW's moments and step counts) after checking it
    fits the trainable tensors. The hyperparameters other than the schedule's learning rate stay
    this run's (a resume with a new --weight-decay uses it, as the resume notice says);
    load_state_dict alone would restore the saved ones."""
    problem = _optimizer_mismatch(optimizer, checkpoint.optimizer_state_dict)
    if problem is not None:
        raise AdapterMismatchError(
            f"checkpoint {checkpoint.path} does not fit this run's trainable parameters "
            f"({problem}): resume with the same LoRA config and base model, or start a new --output"
        )
    schedule_owned = ("params", "lr", "initial_lr")
    settings = [{key: value for key, value in group.items() if key not in schedule_owned}
                for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint.optimizer_state_dict)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
