"""Several adapters on one base model, switched without reloading the base.

Adapters are small (megabytes), the base is large: AdapterSet reads each adapter's tensors
once into host memory and, on `activate`, unwraps the current one (the base weights are never
touched while unmerged) and attaches the next. Switching costs a copy of the adapter tensors.

    adapters = AdapterSet(model)
    adapters.add("runs/legal/adapter", name="legal")
    adapters.add("runs/medical/adapter", name="medical")
    adapters.activate("legal"); ...; adapters.activate("medical"); ...; adapters.deactivate()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.lora.adapter_folder import FINGERPRINT_KEY, SYSTEM_TURN_KEY, adapter_or_run_folder, read_adapter_config
from lorakit.lora.io import attach_adapter, base_rewriting_init, check_fingerprint, read_adapter
from lorakit.lora.model import CONFIG_ATTR, base_fingerprint, remove_lora


@dataclass
class _Stored:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict


class AdapterSet:
    def __init__(self, model: nn.Module, allow_other_base: bool = False, allow_pickle: bool = False):
        if hasattr(model, CONFIG_ATTR):
            raise ConfigError("AdapterSet needs a base model without adapters attached")
        self.model, self.allow_other_base, self.allow_pickle = model, allow_other_base, allow_pickle
        self.fingerprint = base_fingerprint(model)
        self._adapters: dict[str, _Stored] = {}
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, path: str | Path, name: str | None = None) -> str:
        path = Path(path)
        default = path.parent.name if path.name == "adapter" else path.name
        if name is None and default in self._adapters:  # runs/a/adapter beside old/a/adapter: its path names it
            name = str(path.resolve())
        name = name or default
        if name in self._adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded; give this one another name")
        config, tensors, metadata = read_adapter(path, self.allow_pickle)
        self._refuse_base_rewriting_among_several(config, path)
        if not self.allow_other_base:
            check_fingerprint(metadata.get(FINGERPRINT_KEY), self.fingerprint, path)
        self._adapters[name] = _Stored(path, config, tensors, metadata)
        return name

    def _refuse_base_rewriting_among_several(self, config: dict, path: Path) -> None:
        """A PEFT PiSSA adapter rewrites the base's weights each time it is attached, which rounds
        them a little every switch: it may be the set's only adapter, not one of several."""
        rewriting = [str(p) for p, c in [(path, config)] + [(s.path, s.config) for s in self._adapters.values()]
                     if base_rewriting_init(c)]
        if rewriting and self._adapters:
            raise ConfigError(f"{rewriting[0]} is a PiSSA adapter, which rewrites the base weights when attached; "
                              "switching it with others would drift them: load it alone, or re-save it as a "
                              "plain LoRA (load_adapter, then save_adapter) first")

    def activate(self, name: str) -> nn.Module:
        """The adapter loaded under `name`, or from the folder `name` names (a run's folder too)."""
        key = self.loaded_name(name)
        stored = self._adapters[key]
        self.deactivate()
        attach_adapter(self.model, stored.config, stored.tensors, stored.metadata, stored.path,
                       allow_other_base=self.allow_other_base)
        self.active = key
        return self.model

    def system_turn(self, name: str | None = None) -> str | None:
        """The system turn the training records of adapter `name` (default: the active one) all
        opened with, if it saved one."""
        key = self.active if name is None else self.loaded_name(name)
        return None if key is None else self._adapters[key].metadata.get(SYSTEM_TURN_KEY)

    def deactivate(self) -> nn.Module:
        if self.active is not None:
            remove_lora(self.model, merge=False)
            self.active = None
        return self.model

    def loaded_name(self, name: str) -> str:
        """The name an adapter is loaded under, given it or the folder it was read from."""
        if name in self._adapters:
            return name
        wanted = adapter_or_run_folder(name).resolve()  # --use runs/NAME, as --adapter takes it
        by_path = [n for n, s in self._adapters.items() if s.path.resolve() == wanted]
        if by_path:
            return by_path[0]
        raise ConfigError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self._adapters) or 'none'}")


# PEFT task types whose adapter trains a classifier's head with it (merge loads their base as one)
TASK_HEAD_TYPES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}


def refuse_classifier_adapters(adapter_paths: list[str], command: str) -> None:
    """eval and generate run causal LMs: a classifier's adapter would load its base as one, which
    then lacks the LM head (transformers' load report, and a misleading 'weights lack' error)."""
    for path in adapter_paths:
        try:
            task = read_adapter_config(Path(path)).get("task_type")
        except LorakitError:  # no folder, no config: the loading names that, in its own words
            continue
        if task in TASK_HEAD_TYPES:
            raise ConfigError(f"{path} is a {task} adapter (a classifier's); {command} works with causal LM adapters: "
                              "merge it with lorakit merge, or load it onto the classifier with the Python API "
                              "(lorakit.lora.load_adapter)")


def base_model_for(adapter_paths: list[str]) -> str | None:
    """The base model named in the first adapter's config (None: use the built-in default)."""
    if not adapter_paths:
        return None
    name = read_adapter_config(Path(adapter_paths[0])).get("base_model_name_or_path")
    return None if name in (None, "", "unknown") else name
