"""The adapter folder as export sees it: lorakit.lora.adapter_folder's reader, plus what a
converted or served adapter needs on top of what lorakit can load.

- ``read_for_export`` does not raise on tensor problems: vLLM and GGUF export list every problem
  at once (``export_tensor_problems``), beside their own;
- r and lora_alpha must be written out (vLLM and llama.cpp read them, they have no default);
- every factor must be 2-D and have the rank adapter_config gives its module, because the
  serving side sizes its buffers from the config, not from the tensors;
- ``find_base_config`` locates the base model's config.json, which names the architecture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.lora import adapter_folder
from lorakit.lora.adapter_folder import Adapter, LoraPair, split_key  # noqa: F401  (re-exported)

_PEFT_DEFAULTS = {"r": adapter_folder.PEFT_DEFAULT_R, "lora_alpha": adapter_folder.PEFT_DEFAULT_ALPHA}


def read_for_export(folder: str | Path, allow_pickle: bool = False) -> Adapter:
    """Read and group an adapter folder; tensor problems are left to ``export_tensor_problems``."""
    adapter = adapter_folder.read_adapter_folder(folder, allow_pickle, check_tensors=False)
    for key, default in _PEFT_DEFAULTS.items():
        if key not in adapter.config:
            raise AdapterFileError(f"{adapter.folder / adapter_folder.CONFIG_FILE} has no {key!r}; an exported adapter "
                                   f"must state it (PEFT's default is {default}): add it or re-save the adapter")
    return adapter


def export_tensor_problems(adapter: Adapter) -> list[str]:
    """The reader's tensor problems (ranks the config contradicts included), then factors that are not 2-D."""
    problems = adapter_folder.tensor_problems(adapter)
    for module in sorted(adapter.pairs):
        pair = adapter.pairs[module]
        for factor in ("A", "B"):
            tensor = getattr(pair, factor)
            if tensor is not None and tensor.dim() != 2:
                problems.append(f"{pair.peft_key(factor)} has shape {tuple(tensor.shape)}; a LoRA factor is 2-D")
    return problems


# decoders whose every layer has the seven projections of plan/model_shapes.py's sizes
_PLAIN_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo2", "smollm3")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DECODER_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|"
                                 r"up_proj|down_proj)$")


def base_shape_problems(adapter: Adapter, base_config: dict | None) -> list[str]:
    """Factors whose sizes contradict the base's config.json (an adapter for another model):
    A (r, in) and B (out, r) against each Llama-style projection's (in, out). Other
    architectures, and a missing config, are not checked here."""
    from lorakit.plan.model_shapes import shape_from_dict

    if base_config is None or base_config.get("model_type") not in _PLAIN_DECODERS:
        return []  # MoE experts, vision towers, MLA attention: sizes the table does not describe
    try:
        shape = shape_from_dict(base_config, "config.json")
    except ConfigError:
        return []
    projections, problems = shape.projection_shapes(), []
    for module in sorted(adapter.pairs):
        layer = _LAYER_INDEX.search(module)
        if layer is not None and int(layer.group(1)) >= shape.num_layers:
            problems.append(f"{module}: the base has {shape.num_layers} layers (0-{shape.num_layers - 1}): "
                            "the adapter was made for another base model")
            continue
        pair, match = adapter.pairs[module], _DECODER_PROJECTION.search(module)
        if match is None or pair.A is None or pair.B is None or pair.A.dim() != 2 or pair.B.dim() != 2:
            continue
        kind = match.group(1)
        (want_in, want_out), have = projections[kind], (pair.A.shape[1], pair.B.shape[0])
        if have != (want_in, want_out):
            problems.append(f"{module}: the factors map {have[0]} -> {have[1]}, the base's {kind} maps "
                            f"{want_in} -> {want_out}: the adapter was made for another base model")
    return problems[:3] + ([f"... and {len(problems) - 3} more"] if len(problems) > 3 else [])


def refuse_another_base(adapter: Adapter, base_config: dict | None, allow_other_base: bool = False) -> None:
    """The check merge, eval and generate make on a loaded base, made on its config.json: an
    adapter lorakit saved records its base's fingerprint (architecture fields and every weight's
    shape), which a base of other depth or vocabulary fails where the factors' shapes fit."""
    if allow_other_base or base_config is None or adapter.base_fingerprint is None:
        return
    from lorakit.lora.io import check_fingerprint

    current = config_fingerprint(base_config)
    if current is not None:
        check_fingerprint(adapter.base_fingerprint, current, adapter.folder)


def config_fingerprint(base_config: dict) -> str | None:
    """lorakit.lora.model.base_fingerprint of the model `base_config` describes, built on the meta
    device (no weights, no memory); None where transformers cannot build it from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.lora.model import base_fingerprint

    try:
        config = AutoConfig.for_model(**base_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- any model transformers cannot build here: no check, as without a config
        return None
    return base_fingerprint(model)


def find_base_config(adapter: Adapter, base_config_dir: str | Path | None = None) -> dict | None:
    """The base model's config.json: from ``base_config_dir`` if given, else from the adapter's
    base_model_name_or_path when that is a local folder or lorakit's built-in model (the folder
    it was converted to for training). None when neither is available."""
    if base_config_dir is not None:
        from lorakit.models import names_the_builtin

        if names_the_builtin(base_config_dir):  # --model smollm2-135m-instruct, as the adapter records it
            folder = _builtin_folder()
            return None if folder is None else _read_json(folder / "config.json")
        path = Path(base_config_dir)
        if path.suffix.lower() == ".gguf":
            raise ConfigError(f"--model {path} is a GGUF file; give the base model's folder (with config.json), "
                              "or leave --model out for the adapter's own base")
        path = path if path.name == "config.json" or path.is_file() else path / "config.json"  # a file, any name
        if not path.is_file():
            raise ConfigError(f"--model: {path} does not exist; give the base model's folder (with config.json)")
        return _read_json(path)
    base = adapter.config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    from lorakit.models import names_the_builtin  # transformers, only when needed

    if names_the_builtin(base):
        folder = _builtin_folder()
        return None if folder is None else _read_json(folder / "config.json")
    for candidate in (Path(base), adapter.folder / base):
        if (candidate / "config.json").is_file():
            return _read_json(candidate / "config.json")
    return None


def _builtin_folder() -> Path | None:
    """The folder the built-in model was converted to (converted now if it never was), or None
    where the package that ships it is not installed: the adapter exports without a base config
    where its format allows."""
    from lorakit.errors import ModelLoadError
    from lorakit.gguf_convert import ensure_gguf_converted
    from lorakit.models import builtin_gguf_path

    try:
        path = builtin_gguf_path()
    except ModelLoadError:  # its package is not installed
        return None
    return ensure_gguf_converted(path, builtin=True)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); --model "
                          "takes the base model's folder or its config.json") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a JSON text file (a binary file?); --model takes the base model's "
                          "folder or its config.json") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a model config; --model takes the base "
                          "model's folder or its config.json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a model's config.json)")
    _refuse_malformed_names(data, path)
    return data


def _refuse_malformed_names(base_config: dict, path: Path) -> None:
    """model_type and architectures name the base; the exporters look them up in tables."""
    kind = base_config.get("model_type")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{path}: model_type is {kind!r}, not a name; give the base model's own config.json")
    names = base_config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{path}: architectures is {names!r}, not a list of class names; "
                          "give the base model's own config.json")
