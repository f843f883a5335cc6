"""Capture and restore every random number generator a training run draws from, pickle-free.

An exact resume needs the generators to continue where they stopped, not from the seed:
dropout masks, data shuffling and sampling all draw from them. Four sources matter:

    python  random.getstate()     (version, 625 ints, gauss_next)    -> JSON
    numpy   np.random.get_state() ('MT19937', 624 uint32, pos, ...)  -> JSON (array as a list)
    torch   torch.get_rng_state() uint8 tensor                       -> safetensors "torch.cpu"
    cuda    one uint8 tensor per visible device                      -> safetensors "torch.cuda.{i}"

plus any named ``torch.Generator`` the caller owns (e.g. the data sampler's), stored as
"generator.{name}". Everything is ints, floats and byte tensors, so nothing needs pickle to load
(transformers' pickled rng_state.pth was CVE-2026-1839).

    tensors, meta = capture_rng(generators={"sampler": g})
    ...save tensors with safetensors and meta in JSON, later...
    restore_rng(tensors, meta, generators={"sampler": g})

A state that was saved but cannot be restored (checkpoint from a GPU run resumed on CPU, fewer
GPUs, missing sampler generator) is logged as a WARNING: the run continues but is no longer
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CPU_KEY = "torch.cpu"
CUDA_PREFIX = "torch.cuda."
GENERATOR_PREFIX = "generator."


def _python_state() -> list[Any]:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _numpy_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": name,
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _cuda_states() -> list[torch.Tensor]:
    if not torch.cuda.is_available():
        return []
    return list(torch.cuda.get_rng_state_all())


def capture_rng(
    generators: Mapping[str, torch.Generator] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Snapshot all generators. Returns (byte tensors for safetensors, JSON-able metadata)."""
    tensors = {CPU_KEY: torch.get_rng_state().clone()}
    cuda = _cuda_states()
    for index, state in enumerate(cuda):
        tensors[f"{CUDA_PREFIX}{index}"] = state.cpu().clone()
    for name, generator in (generators or {}).items():
        tensors[f"{GENERATOR_PREFIX}{name}"] = generator.get_state().clone()
    meta = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "cuda_devices": len(cuda),
        "generators": sorted(generators or {}),
    }
    return tensors, meta


def _restore_python(state: list[Any], into: Any = random) -> None:
    version, internal, gauss_next = state
    into.setstate((version, tuple(internal), gauss_next))


def _restore_numpy(state: dict[str, Any], into: Any = np.random) -> None:
    key = np.asarray(state["key"], dtype=np.uint32)
    into.set_state(
        (state["bit_generator"], key, state["pos"], state["has_gauss"], state["cached_gaussian"])
    )


def rng_problem(tensors: Mapping[str, torch.Tensor], meta: Any) -> str | None:
    """What keeps a saved random state from being restored, tried on scratch generators (a file
    edited by hand, its checksum updated, would otherwise fail part way through a resume)."""
    try:
        _restore_python(meta["python"], random.Random())
        _restore_numpy(meta["numpy"], np.random.RandomState())
        torch.Generator().set_state(tensors[CPU_KEY])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _restore_cuda(tensors: Mapping[str, torch.Tensor], saved_devices: int) -> None:
    if saved_devices == 0:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != saved_devices:
        log.warning(
            "checkpoint holds RNG state for %d CUDA device(s) but %d are visible; "
            "the resumed run will not be bit-identical to an uninterrupted one",
            saved_devices,
            available,
        )
    for index in range(min(available, saved_devices)):
        torch.cuda.set_rng_state(tensors[f"{CUDA_PREFIX}{index}"], device=index)


def _restore_generators(
    tensors: Mapping[str, torch.Tensor],
    saved_names: list[str],
    generators: Mapping[str, torch.Generator] | None,
) -> None:
    generators = generators or {}
    for name in saved_names:
        if name in generators:
            generators[name].set_state(tensors[f"{GENERATOR_PREFIX}{name}"])
        else:
            log.warning("checkpoint holds RNG state for generator %r but none was given", name)
    for name in sorted(set(generators) - set(saved_names)):
        log.warning("no RNG state saved for generator %r; it keeps its current state", name)


def restore_rng(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Put every generator back to the state ``capture_rng`` saw."""
    _restore_python(meta["python"])
    _restore_numpy(meta["numpy"])
    torch.set_rng_state(tensors[CPU_KEY])
    _restore_cuda(tensors, int(meta.get("cuda_devices", 0)))
    _restore_generators(tensors, list(meta.get("generators", [])), generators)
