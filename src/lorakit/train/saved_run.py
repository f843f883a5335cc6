"""Reading back what a run saved, before a resume trusts it: a checkpoint's trainer state and
tensors (a file may be damaged or hand-edited), the settings it was made with, metrics.jsonl and
summary.json (a finished run's, which sweep's table reads too)."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from lorakit.errors import AdapterFileError, AdapterMismatchError
from lorakit.lora import trainable_parameters
from lorakit.safe_io import read_json
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import TrainState
from lorakit.values import is_number


def check_tensors_fit(path: Path, model, tensors: dict[str, torch.Tensor]) -> None:
    """The checkpoint must hold exactly this run's trainable tensors, with the same shapes."""
    params = {name: tuple(p.shape) for name, p in trainable_parameters(model)}
    extra = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors))
    wrong = [n for n in sorted(set(params) & set(tensors)) if tuple(tensors[n].shape) != params[n]]
    if not (extra or missing or wrong):
        return
    if wrong:
        problem = f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)} there, {params[wrong[0]]} now (another --r?)"
    elif extra:
        problem = f"it holds {len(extra)} tensor(s) this run does not train, e.g. {extra[0]} (other --targets?)"
    else:
        problem = f"it lacks {len(missing)} tensor(s) this run trains, e.g. {missing[0]} (other --targets?)"
    raise AdapterMismatchError(f"the checkpoint {path} does not fit this run's LoRA layers: {problem}; "
                               "resume with the LoRA settings of that run (see its config.yaml), "
                               "or start a new --output")


_STATE_FIELDS = {f.name: f.type for f in fields(TrainState)}
_LATER_STATE_FIELDS = {"loss_scale", "finite_at_scale"}  # a checkpoint made before them holds neither


def _finite_or_none(value) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value))


def train_state_from(path: Path, saved: dict) -> TrainState:
    """TrainState from a checkpoint's JSON, checked: the file may be damaged or hand-edited."""
    problem = _trainer_state_problem(path, saved)
    if problem:
        raise AdapterFileError(f"{path / ckpt.TRAINER_STATE} is not a valid lorakit training state ({problem}); "
                               "delete this checkpoint folder to resume from the previous one")
    return TrainState(**saved["state"])


# trainer_state.json's other entries a resume reads: key -> the JSON types it may have (or null)
_SAVED_TYPES = {"config": dict, "base_eval": dict, "history_len": int, "train_seconds": (int, float),
                "paused_seconds": (int, float),
                "micro_batches_per_step": int, "world_size": int, "requested_grad_accum": int,
                "peak_memory_bytes": int, "peak_memory_device": str}


def _trainer_state_problem(path: Path, saved) -> str | None:
    if not isinstance(saved, dict):
        return "it is not a JSON object"
    raw = saved.get("state")
    if not isinstance(raw, dict) or not set(_STATE_FIELDS) - _LATER_STATE_FIELDS <= set(raw) <= set(_STATE_FIELDS):
        return "its 'state' entry does not have the training-state fields"
    counters = [k for k in raw if k not in ("loss_ema", "loss_scale")]
    bad = [k for k in counters if isinstance(raw[k], bool) or not isinstance(raw[k], int) or raw[k] < 0]
    bad += [k for k in ("loss_ema", "loss_scale") if not _finite_or_none(raw.get(k))]
    if "loss_scale" not in bad and raw.get("loss_scale") is not None and raw["loss_scale"] < 1:
        bad.append("loss_scale")
    bad += [k for k, kinds in _SAVED_TYPES.items() if saved.get(k) is not None
            and (isinstance(saved[k], bool) or not isinstance(saved[k], kinds) or (kinds is int and saved[k] < 0))]
    if isinstance(saved.get("base_eval"), dict) and not is_number(saved["base_eval"].get("loss")):
        bad.append("base_eval")  # the summary reports its loss
    if bad:
        return f"invalid value(s) for {', '.join(bad)}"
    if ckpt.step_dir_name(raw["step"]) != path.name:
        return f"its step {raw['step']} is not the step its folder {path.name} names"
    return None


_NOT_COMPARED = {"output.resume", "output.overwrite", "output.output", "output.dry_run", "output.keep_checkpoints"}


def config_changes(saved: dict, now: dict) -> list[str]:
    changes = []
    for section, values in now.items():
        before = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in _NOT_COMPARED and key in before and _effective(name, before[key]) != _effective(name, value):
                changes.append(f"{name} {before[key]!r} -> {value!r}")
    return changes


def _effective(name: str, value):
    """What a setting does here: train.triton_kernels was a boolean before it had auto (a checkpoint
    saved then reads false), and auto is on or off by the device, as the run decides it."""
    if name != "train.triton_kernels":
        return value
    from lorakit.kernels.llama_patch import wants_triton
    from lorakit.train.distributed import device_of_rank

    setting = ("on" if value else "off") if isinstance(value, bool) else value
    return wants_triton(setting, device_of_rank())


# what a finished run's summary.json holds for lorakit's own readers (sweep's table and plot)
SUMMARY_NUMBERS = {"trainable_params": False, "wall_seconds": False, "peak_memory_bytes": False,
                   "final_eval_loss": True, "base_eval_loss": True, "train_loss": True}  # key -> may be null


def read_summary(path: Path) -> dict | None:
    """A run's summary.json with those numbers; None where it is missing, damaged or edited."""
    try:
        summary = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    for key, nullable in SUMMARY_NUMBERS.items():
        value = summary.get(key)
        if not (value is None and nullable) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return None
    return summary


def finished_summary(out: Path) -> dict | None:
    """A finished run's summary, where its summary.json and its adapter are whole; None otherwise
    (the run then finishes again: its final eval, adapter and summary)."""
    from lorakit.lora.adapter_folder import CONFIG_FILE, WEIGHTS_FILE

    if not all((out / "adapter" / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
        return None
    return read_summary(out / "summary.json")


def read_history(path: Path, up_to_step: int, count: int | None = None) -> list[dict]:
    """The metrics logged before the checkpoint was taken: its first `count` lines (older
    checkpoints without a count: the entries up to its step)."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if count is not None and number >= count:
            break
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            break  # a line cut by the kill: everything after it is newer than the checkpoint anyway
        # a line edited out of shape is left out (the resume names the entries missing)
        if _well_formed(entry) and (count is not None or entry["step"] <= up_to_step):
            entries.append(entry)
    return entries


def _well_formed(entry) -> bool:
    """An entry as Session.record writes it: the summary and loss.png read its kind, step and loss."""
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
        return False
    loss_key = {"train": "loss", "eval": "eval_loss"}.get(entry.get("kind"))
    value = entry.get(loss_key)  # NaN too: a skipped step's loss
    return loss_key is not None and isinstance(value, (int, float)) and not isinstance(value, bool)


def changes_what_base_eval_measured(saved: dict, now: dict) -> bool:
    """The base model's eval loss depends on the model, its precision and the eval examples (the
    split's seed, and with eval_batches the batches that are evaluated)."""
    keys = [("model", "name"), ("model", "dtype"), ("model", "quantize"), ("data", "data"), ("data", "eval_data"),
            ("data", "eval_split"), ("data", "seq_len"), ("data", "format"), ("data", "columns"),
            ("data", "train_on_inputs"), ("data", "packing"), ("train", "seed"), ("train", "eval_batches"),
            ("train", "batch_size")]
    return any((saved.get(section) or {}).get(name) != (now.get(section) or {}).get(name) for section, name in keys
               if section in saved)
