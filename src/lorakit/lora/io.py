"""Adapters on disk, in PEFT's format, so PEFT, vLLM, TGI and llama.cpp's converter load them.

    ADAPTER_DIR/
      adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                   base_model.model.<module>.lora_B.weight   (out, r)
                                   base_model.model.<module>.lora_magnitude_vector (DoRA, out)
                                   base_model.model.<module>.<param>         (modules_to_save)

lorakit adds entries to the safetensors metadata, which PEFT ignores: the base model's
fingerprint (architecture fields + parameter shapes), the lorakit version, and for a PiSSA
adapter (saved as rank 2r) the rank it trained with. Loading onto a
model with another fingerprint is refused unless `allow_other_base=True`.

Reading and checking the folder is lorakit.lora.adapter_folder's job (shared with analyze and
export); this module saves, and fits what was read onto a model. Loading takes the adapted
modules and their ranks from the tensors themselves rather than re-matching `target_modules`, so
any PEFT adapter (rank_pattern, regex targets) maps exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, AdapterMismatchError, ConfigError
from lorakit.lora.adapter_folder import (
    CONFIG_FILE,
    FINGERPRINT_KEY,
    PISSA_RANK_KEY,
    SYSTEM_TURN_KEY,
    WEIGHTS_FILE,
    Adapter,
    adapter_from_memory,
    raise_tensor_problems,
    read_adapter_folder,
)
from lorakit.lora.adapter_folder import PEFT_PREFIX as PREFIX
from lorakit.lora.config import LoraConfig, lora_scale
from lorakit.lora.layer import LoraLinear
from lorakit.lora.model import (CONFIG_ATTR, base_fingerprint, is_adapter_parameter, lora_layers, on_the_compiled_model,
                                overwritten_originals, refuse_meta_tensors, remember_original, untie_modules_to_save,
                                within, wrap_modules)
from lorakit.safe_io import atomic_save_safetensors, atomic_write_json

# PEFT options lorakit does not implement: loading them would silently compute something else
# (layers_to_transform is not here: it only chose which layers got tensors, and the tensors say so)
_UNSUPPORTED = {"layer_replication": None, "lora_bias": False,
                "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
                "alora_invocation_tokens": None,
                # LoRA variants of PEFT 0.21 whose forward is not a plain (x A) B: KaSA, VeLoRA,
                # MonteCLoRA, block-diagonal BD-LoRA, Arrow's routing among adapters
                "kasa_config": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
                "arrow_config": None}


# PEFT initialisations that also rewrite the base weight when PEFT creates the adapter (W - s B0 A0
# for PiSSA, OLoRA and LoRA-GA; CorDA from data statistics; LoftQ a quantised residual): the saved
# factors were trained on that rewritten base. lorakit rebuilds PiSSA's (an exact SVD of W, as its
# own --init pissa does); the others it refuses (PEFT itself loads LoRA-GA's onto the original W).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def base_rewriting_init(config: dict) -> str | None:
    """The adapter's init_lora_weights when PEFT rewrites the base weight for it, else None."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        return init
    return None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (PiSSA converted to a plain LoRA)."""
    config: LoraConfig = getattr(model, CONFIG_ATTR)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        a, b = _portable_factors(layer, config.scaling == "rslora")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
        if layer.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    for module_name in config.modules_to_save:
        for pname, param in model.get_submodule(module_name).named_parameters():
            tensors[f"{PREFIX}{module_name}.{pname}"] = param.detach()
    for name in _trained_biases(model):
        tensors[f"{PREFIX}{name}"] = model.get_parameter(name).detach()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def _trained_biases(model: nn.Module) -> list[str]:
    """Biases a loaded PEFT adapter (bias "all" or "lora_only") set: saved again with it."""
    config: LoraConfig = getattr(model, CONFIG_ATTR)
    return [name for name in overwritten_originals(model)
            if name.endswith(".bias") and not _in_modules_to_save(name, config)]


def _bias_mode(model: nn.Module) -> str:
    """ "all" whenever the adapter sets biases: PEFT saves and loads every bias key then, while its
    "lora_only" looks for "<module>.bias" and would drop the wrapped layers' "base_layer.bias"."""
    return "all" if _trained_biases(model) else "none"


def _portable_factors(layer: LoraLinear, rslora: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA changed the base; express its update against the original W as a rank-2r LoRA."""
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    if layer.init != "pissa":
        return a, b
    # s*B@A - s*B0@A0 == s*[B, -B0] @ [A; A0]; saved with r'=2r, so rescale to keep s
    saved_scaling = lora_scale(2 * layer.r, layer.lora_alpha, "rslora" if rslora else "standard")
    scale_fix = math.sqrt(layer.scaling / saved_scaling)
    a2 = torch.cat([a, layer.pissa_A0.to(a.dtype)], dim=0) * scale_fix
    b2 = torch.cat([b, -layer.pissa_B0.to(b.dtype)], dim=1) * scale_fix
    return a2, b2


def adapter_config_dict(model: nn.Module, base_model_name: str | None) -> dict:
    config: LoraConfig = getattr(model, CONFIG_ATTR)
    layers = dict(lora_layers(model))
    rank_of = {name: _saved_rank(layer) for name, layer in layers.items()}
    rank_pattern = {re.escape(n): r for n, r in rank_of.items() if r != _saved_rank_default(config)}
    alpha_pattern = {re.escape(n): l.lora_alpha for n, l in layers.items() if l.lora_alpha != config.alpha}
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name,
        "r": _saved_rank_default(config),
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "use_rslora": config.scaling == "rslora",
        "use_dora": config.use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(l.fan_in_fan_out for l in layers.values()),
        "bias": _bias_mode(model),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _saved_rank(layer: LoraLinear) -> int:
    return 2 * layer.r if layer.init == "pissa" else layer.r


def _saved_rank_default(config: LoraConfig) -> int:
    return 2 * config.r if config.init == "pissa" else config.r


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


@on_the_compiled_model
def save_adapter(model: nn.Module, path: str | Path, base_model_name: str | None = None,
                 system_turn: str | None = None) -> Path:
    """Write the adapter folder. Each file is written atomically. ``system_turn``: the one every
    training record opened with, kept in the weights' metadata for generate."""
    if not hasattr(model, CONFIG_ATTR):
        raise AdapterFileError("this model has no LoRA adapters to save; call apply_lora or load_adapter first")
    refuse_meta_tensors(model, "save its adapter")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if base_model_name is None:
        base_model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(model),
                "lorakit_version": _version()}
    if any(layer.init == "pissa" for _, layer in lora_layers(model)):
        metadata[PISSA_RANK_KEY] = str(getattr(model, CONFIG_ATTR).r)
    if system_turn:
        metadata[SYSTEM_TURN_KEY] = system_turn
    atomic_save_safetensors(path / WEIGHTS_FILE, adapter_state_dict(model), metadata)
    atomic_write_json(path / CONFIG_FILE, adapter_config_dict(model, base_model_name))
    return path


def _version() -> str:
    from lorakit import __version__

    return __version__


def read_adapter(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config, tensors under the model's parameter names, safetensors metadata), checked."""
    adapter = _read_supported(path, allow_pickle)
    return adapter.config, adapter.parameter_tensors(), adapter.metadata


def _read_supported(path: str | Path, allow_pickle: bool) -> Adapter:
    """The folder read, the options checked, then the tensors: an option the engine lacks (PEFT's
    target_parameters: rank r per expert) would otherwise show as a tensor problem."""
    adapter = read_adapter_folder(path, allow_pickle, check_tensors=False)
    check_engine_supports(adapter.config, adapter.folder / CONFIG_FILE)
    raise_tensor_problems(adapter)
    return adapter


def unsupported_options(config: dict) -> list[str]:
    """`key=value` of each PEFT option set in `config` that makes the adapter compute something
    other than plain LoRA factors (the engine, merge and the GGUF export cannot)."""
    return [f"{key}={config[key]!r}" for key, neutral in _UNSUPPORTED.items()
            if config.get(key, neutral) not in (neutral, None, False, [], {})]


def check_engine_supports(config: dict, where) -> None:
    """Refuse PEFT options the engine does not implement: loading them would compute something else."""
    unsupported = unsupported_options(config)
    if unsupported:
        raise AdapterFileError(f"{where}: the PEFT option {unsupported[0]} is not supported by lorakit; "
                               "load this adapter with PEFT instead")
    init = base_rewriting_init(config)
    if init is not None and init.lower() == "pissa" and config.get("use_dora"):
        raise AdapterFileError(f"{where}: a PiSSA adapter with DoRA is not supported by lorakit; load this adapter "
                               "with PEFT instead")
    if init is not None and init.lower() != "pissa":
        raise AdapterFileError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights when PEFT creates the adapter, and "
            "its factors were trained on that rewritten base, which lorakit does not reproduce; have PEFT convert "
            "it to a plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that")


@on_the_compiled_model
def load_adapter(model: nn.Module, path: str | Path, trainable: bool = False, *,
                 allow_other_base: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Put a saved adapter (lorakit's or PEFT's) on a base model, in place."""
    return _attach(model, _read_supported(path, allow_pickle), path, trainable, allow_other_base)


@on_the_compiled_model
def attach_adapter(model: nn.Module, config_dict: dict, tensors: dict, metadata: dict, path="<memory>", *,
                   trainable: bool = False, allow_other_base: bool = False) -> nn.Module:
    """Wrap and fill a model from an adapter already read into memory (see read_adapter)."""
    check_engine_supports(config_dict, path)
    adapter = adapter_from_memory(config_dict, tensors, metadata, source=path)
    return _attach(model, adapter, path, trainable, allow_other_base)


def _attach(model: nn.Module, adapter: Adapter, path, trainable: bool, allow_other_base: bool) -> nn.Module:
    """`adapter`'s options already checked (check_engine_supports) by the caller."""
    if hasattr(model, CONFIG_ATTR) or any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("this model already has LoRA adapters; take them off first (remove_lora(model, "
                          "merge=False)), or load the base model again")
    _check_fingerprint(model, adapter.base_fingerprint, path, allow_other_base)
    config = _modules_to_save_here(model, lora_config_from_peft(adapter.config), adapter)
    ranks = _ranks(config, adapter, path)
    _check_modules_exist(model, ranks, path)
    untie_modules_to_save(model, config.modules_to_save)
    wrap_modules(model, config, ranks)
    _load_tensors(model, config, adapter.parameter_tensors(), path)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and (is_adapter_parameter(name) or _in_modules_to_save(name, config)))
    for _, layer in lora_layers(model):  # new layers start in training mode: a model in eval keeps no dropout
        layer.train(model.training)
    return model


def _modules_to_save_here(model: nn.Module, config: LoraConfig, adapter: Adapter) -> LoraConfig:
    """modules_to_save as this model's module names, the way PEFT reads them: a name matches every
    module whose name ends in it, and a name matching nothing is skipped unless the adapter holds
    its tensors (PEFT's SEQ_CLS adapters list both "classifier" and "score")."""
    module_names = [name for name, _ in model.named_modules() if name]
    tensor_names = list(adapter.parameter_tensors())
    resolved = []
    for wanted in config.modules_to_save:
        # PEFT's rule: "norm" takes "input_layernorm" too; such a match only where the file holds it
        # (lorakit saved "classifier" without DistilBERT's "pre_classifier" before 2026-11-30)
        matches = [name for name in module_names if name == wanted or name.endswith("." + wanted)
                   or (name.endswith(wanted) and any(key.startswith(name + ".") for key in tensor_names))]
        if not matches and any(key.startswith(wanted + ".") for key in tensor_names):
            raise AdapterMismatchError(f"the adapter trains module {wanted!r} in full, which this model does not "
                                       "have; load it onto the base model it was trained for")
        resolved += [name for name in matches if name not in resolved]
    return dataclasses.replace(config, modules_to_save=resolved + _held_in_full(model, adapter, resolved))


def _held_in_full(model: nn.Module, adapter: Adapter, named: list[str]) -> list[str]:
    """Modules whose every parameter the adapter file holds though modules_to_save does not name
    them (PEFT's ensure_weight_tying saves a tied lm_head beside embed_tokens): trained in full
    like the named ones, so that a re-saved adapter holds them again."""
    tensors, held = set(adapter.parameter_tensors()), []
    for module_name, module in model.named_modules():
        parameters = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if (module_name and parameters and set(parameters) <= tensors and module_name not in adapter.pairs
                and not any(within(module_name, m) for m in named)):
            held.append(module_name)
    return held


def lora_config_from_peft(config: dict) -> LoraConfig:
    return LoraConfig(
        r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
        target_modules=config.get("target_modules") or "all-linear",
        dropout=float(config.get("lora_dropout") or 0.0),
        scaling="rslora" if config.get("use_rslora") else "standard",
        use_dora=bool(config.get("use_dora")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=list(config.get("modules_to_save") or []),
        # PiSSA: wrapping rebuilds the residual base (and the initial factors a re-save needs)
        init="pissa" if (base_rewriting_init(config) or "").lower() == "pissa" else "kaiming",
    )


def _check_fingerprint(model, saved: str | None, path, allow_other_base: bool) -> None:
    if saved is not None and not allow_other_base:
        check_fingerprint(saved, base_fingerprint(model), path)


def check_fingerprint(saved: str | None, current: str, path) -> None:
    """Refuse an adapter saved for another base (`saved`: its metadata's fingerprint, if any)."""
    if saved is not None and saved != current:
        raise AdapterMismatchError(
            f"the adapter in {path} was trained on a base model of another architecture or shape (fingerprint "
            f"{saved}, this model {current}); load it onto its own base model (--model; without it, the one "
            "adapter_config.json names, else the built-in model), or pass --allow-other-base to load it anyway "
            "where its layers' shapes fit"
        )


def _ranks(config: LoraConfig, adapter: Adapter, path) -> dict[str, tuple[int, float]]:
    """module -> (rank, alpha): the rank from the tensors, so any PEFT rank_pattern maps exactly."""
    embeddings = sorted(m for m, pair in adapter.pairs.items() if pair.kind != "linear")
    if embeddings:
        raise AdapterMismatchError(
            f"the adapter in {path} adapts embeddings ({', '.join(embeddings[:3])}) with lora_embedding_A/B; "
            "lorakit adapts linear layers only: load this adapter with PEFT, or retrain it without them"
        )
    return {module: (pair.rank, config.rank_and_alpha(module)[1]) for module, pair in adapter.pairs.items()}


def _check_modules_exist(model: nn.Module, ranks: dict, path) -> None:
    missing = [name for name in ranks if not _has_module(model, name)]
    if missing:
        raise AdapterMismatchError(
            f"the adapter in {path} targets modules this model does not have ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); load it onto the base model it was trained for"
        )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _load_tensors(model: nn.Module, config: LoraConfig, tensors: dict, path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head keeps its own name
    expected = {k for k in params if is_adapter_parameter(k) or _in_modules_to_save(k, config)}
    missing = sorted(expected - set(tensors))
    if missing:
        raise AdapterFileError(f"{path}: tensor {PREFIX}{missing[0]} is missing ({len(missing)} in all); the adapter is incomplete")
    for key, tensor in tensors.items():
        if key not in params:
            raise AdapterMismatchError(f"{path}: tensor {key} does not fit this model; load it onto its own base model")
        target = params[key]
        if tuple(target.shape) != tuple(tensor.shape):
            raise AdapterMismatchError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}; "
                "the adapter was made for another base model"
            )
    for key in tensors:  # all before any copy: tied names (embed_tokens, lm_head) share one tensor
        if not is_adapter_parameter(key):
            remember_original(model, key, params[key])
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor.to(params[key].dtype))


def _in_modules_to_save(param_name: str, config: LoraConfig) -> bool:
    return any(within(param_name, m) for m in config.modules_to_save)
