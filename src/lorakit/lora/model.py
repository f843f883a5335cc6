"""Putting adapters on a model and taking them off: apply, merge, unmerge, disable, report.

apply_lora wraps each targeted layer in place (the model object stays the same, so callers'
references, hooks and devices keep working) and freezes everything except the adapters and
`modules_to_save`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from lorakit.errors import ConfigError, LorakitWarning, MergeError, TargetMatchError
from lorakit.lora.config import LoraConfig, pattern_matches
from lorakit.lora.layer import LoraLinear, in_out_features, layer_kind
from lorakit.lora.targets import ModuleInfo, narrow_layers_left_out, select_targets

CONFIG_ATTR = "lorakit_config"
# base parameters a loaded adapter overwrote in full (modules_to_save, PEFT's trained biases):
# name -> the original values, on the CPU, so that disabling or removing the adapter restores them
ORIGINALS_ATTR = "_lorakit_originals"


def describe_modules(model: nn.Module) -> list[ModuleInfo]:
    infos = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind == "lora":
            continue
        name = name.removesuffix(".base_layer")
        features = in_out_features(module) if kind in ("linear", "conv1d") else (0, 0)
        infos.append(ModuleInfo(name, kind, *features))
    return infos


def output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def on_the_compiled_model(function: Callable) -> Callable:
    """Run `function` on the module torch.compile wraps: the wrapper's names start with
    "_orig_mod.", which a saved adapter must not hold (nor a fingerprint count). The wrapper
    recompiles on its next call. Returns the caller's own object where `function` returns the model."""
    @functools.wraps(function)
    def on_inner(model, *args, **kwargs):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return function(model, *args, **kwargs)
        result = function(inner, *args, **kwargs)
        return model if result is inner else result
    return on_inner


@on_the_compiled_model
def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the targeted layers with LoRA, in place. Returns the same model."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("this model already has LoRA adapters; load the base model again to apply a new config")
    config = _modules_to_save_by_full_name(model, config)
    modules = describe_modules(model)
    names = select_targets(
        modules, config.target_modules, exclude=config.exclude_modules,
        model_type=model_type(model), output_head=output_head_name(model),
    )
    names = _without_narrow_layers(config, modules, names)
    head = classification_head(model)
    if head:
        # a task head starts random: it must train and be saved with the adapter (PEFT does the same,
        # taking every module whose name ends in the head's: DistilBERT's pre_classifier too)
        heads = [name for name, _ in model.named_modules() if name.endswith(head)]
        names = _outside_the_head(names, heads)
        config = dataclasses.replace(config, modules_to_save=[*config.modules_to_save,
                                                              *(h for h in heads if h not in config.modules_to_save)])
    _refuse_unused_patterns(config, names)
    _refuse_adapted_modules_to_save(config, names)
    ranks = {name: config.rank_and_alpha(name) for name in names}
    _check_ranks(model, ranks)
    wrap_modules(model, config, ranks)
    return model


def _modules_to_save_by_full_name(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """modules_to_save as full module names: an entry names a module, or the end of module names
    after a '.' (["ln_f"] on GPT-2: transformer.ln_f). PEFT's rule is looser (any name ending in
    the entry: "norm" takes every input_layernorm too); the full names saved read alike in both."""
    names = [name for name, _ in model.named_modules() if name]
    full: list[str] = []
    for entry in config.modules_to_save:
        matches = [name for name in names if name == entry or name.endswith("." + entry)]
        if not matches:
            raise ConfigError(f"modules_to_save names {entry!r}, and the model has no module of that name or "
                              f"ending in '.{entry}'; name one of its modules (model.named_modules())")
        full += [name for name in matches if name not in full]
    return dataclasses.replace(config, modules_to_save=full)


def within(name: str, module: str) -> bool:
    """`name` is `module` or inside it (a parameter's or a submodule's full name)."""
    return name == module or name.startswith(module + ".")


def _outside_the_head(names: list[str], heads: list[str]) -> list[str]:
    """A task head trains in full (modules_to_save, as PEFT's SEQ_CLS/TOKEN_CLS makes it): LoRA
    inside it as well would save a file PEFT cannot load."""
    inside = [name for name in names if any(within(name, head) for head in heads)]
    head = heads[-1]
    if inside and len(inside) == len(names):
        raise TargetMatchError(f"the targets match only {', '.join(inside)}, in the task head {head!r}, which "
                               "trains in full anyway; target the model's projections (e.g. all-linear)")
    if inside:
        warnings.warn(f"{', '.join(inside)} left out of the LoRA targets: the task head {head!r} trains in full",
                      LorakitWarning, stacklevel=4)
    return [name for name in names if name not in inside]


def _refuse_adapted_modules_to_save(config: LoraConfig, names: list[str]) -> None:
    """A module trained in full that holds, or sits in, an adapted layer: PEFT trains that layer
    in full instead and cannot load the file lorakit would save."""
    for module in config.modules_to_save:
        clash = next((name for name in names if within(name, module) or within(module, name)), None)
        if clash is not None:
            raise ConfigError(f"modules_to_save {module!r} overlaps the adapted layer {clash}: a module is trained "
                              "in full or adapted, not both; leave it out of modules_to_save or out of the targets")


def _without_narrow_layers(config: LoraConfig, modules: list[ModuleInfo], names: list[str]) -> list[str]:
    left_out = narrow_layers_left_out(config.target_modules, modules, names, lambda n: config.rank_and_alpha(n)[0])
    if not left_out:
        return names
    if len(left_out) == len(names):
        raise ConfigError(f"every linear layer of this model is narrower than rank {config.r}; lower r")
    shape = next((m.in_features, m.out_features) for m in modules if m.name == left_out[0])
    warnings.warn(f"all-linear leaves out {len(left_out)} layer{'s' * (len(left_out) != 1)} narrower than the rank "
                  f"({left_out[0]}, {shape[0]} -> {shape[1]}{', and the like' * (len(left_out) > 1)}): a rank above "
                  "a layer's smaller side adds parameters that cannot add rank", LorakitWarning, stacklevel=4)
    return [name for name in names if name not in left_out]


def _refuse_unused_patterns(config: LoraConfig, names: list[str]) -> None:
    """A rank_pattern or alpha_pattern key that adapts nothing is a typo, as a target would be."""
    unused = [f"{field}[{key!r}]" for field, pattern in (("rank_pattern", config.rank_pattern),
                                                         ("alpha_pattern", config.alpha_pattern))
              for key in pattern if not any(pattern_matches(key, name) for name in names)]
    if unused:
        raise ConfigError(f"{', '.join(unused)} matches none of the {len(names)} adapted modules (e.g. {names[0]}); "
                          "fix the key or leave it out")


def classification_head(model: nn.Module) -> str | None:
    if not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return None
    return next((n for n in ("classifier", "score") if hasattr(model, n)), None)


def wrap_modules(model: nn.Module, config: LoraConfig, ranks: dict[str, tuple[int, float]]) -> None:
    """Wrap exactly these modules with the given (r, alpha) each; freeze the rest."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, (r, alpha) in ranks.items():
        parent, child = parent_and_child(model, name)
        base = getattr(parent, child)
        layer = LoraLinear(base, r, alpha, config.scale_for(r, alpha), config.dropout, config.use_dora, config.init)
        setattr(parent, child, layer)
    for name in config.modules_to_save:
        _refuse_tied(model, name)
        _refuse_quantized(model, name)
        _module(model, name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)


def _refuse_quantized(model: nn.Module, name: str) -> None:
    """A module trained in full holds full weights: a 4- or 8-bit layer of a quantised base can
    neither train them nor take them back from an adapter (bitsandbytes refuses a gradient)."""
    if any(not p.is_floating_point() for p in _module(model, name).parameters()):
        raise ConfigError(f"modules_to_save names {name!r}, a quantised (4- or 8-bit) layer of this base: its full "
                          "weights cannot be put into it; load the base without --quantize to use this adapter")


def _refuse_tied(model: nn.Module, name: str) -> None:
    """A module trained in full is trained in place: one whose weight is tied to another module
    (a tied lm_head and input embedding) would change both, and PEFT, which trains a copy, would
    load the result differently."""
    names = _names_by_tensor(model)
    others = sorted({other for p in _module(model, name).parameters() for other in names[id(p)]
                     if not other.startswith(name + ".")})
    if others:
        raise ConfigError(
            f"modules_to_save names {name!r}, whose weight is tied to {others[0]} (tied embeddings): training it "
            "would change both; leave it out of modules_to_save (LoRA on the projections adapts the model), "
            "or untie the weights first")


def untie_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Loading an adapter that saved a tied module in full (PEFT's modules_to_save=["lm_head"] on a
    base with tied embeddings: PEFT trained a copy): the module gets its own copy of the weight,
    as in PEFT, so that loading it leaves the input embedding as it was."""
    tensor_names = _names_by_tensor(model)
    for name in names:
        module = _module(model, name)
        for param_name, param in list(module.named_parameters(recurse=False)):
            if any(not other.startswith(name + ".") for other in tensor_names[id(param)]):
                _remember_fingerprint(model)
                setattr(module, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                _mark_untied(model)


_FINGERPRINT_BEFORE_UNTYING = "_lorakit_fingerprint_before_untying"


def _remember_fingerprint(model: nn.Module) -> None:
    """Before a tied weight gets its own copy: the base is the same model, and adapters made for
    it, or saved from it, must keep matching it."""
    model.__dict__.setdefault(_FINGERPRINT_BEFORE_UNTYING, base_fingerprint(model))


def _mark_untied(model: nn.Module) -> None:
    for config in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter tensor goes by: a tied weight has several."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _check_ranks(model: nn.Module, ranks: dict[str, tuple[int, float]]) -> None:
    problems = []
    for name, (r, _) in ranks.items():
        fan_in, fan_out = in_out_features(_module(model, name))
        if r > min(fan_in, fan_out):
            problems.append(f"{name} ({fan_in} -> {fan_out}) cannot take rank {r} (at most {min(fan_in, fan_out)})")
    if problems:
        raise ConfigError("rank too large for some layers; lower r or exclude them:\n  - " + "\n  - ".join(problems))


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"the model has no module named {name!r}") from None


def is_adapter_parameter(name: str) -> bool:
    """A LoRA factor or DoRA magnitude, by its full parameter name."""
    return ".lora_" in name or name.endswith("lora_magnitude_vector")


def parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


@on_the_compiled_model
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight. Merging twice is a no-op."""
    refuse_meta_tensors(model, "merge")
    layers = list(lora_layers(model))
    for name, layer in layers:  # check all first, so a bad adapter leaves nothing half merged
        if not all(torch.isfinite(p).all() for p in adapter_parameters(layer)):
            raise MergeError(f"the adapter of {name} holds NaN or inf values; refusing to merge it")
    _untie_adapted_weights(model, layers)
    for _, layer in layers:
        layer.merge()
    return model


def refuse_meta_tensors(model: nn.Module, action: str) -> None:
    """A model built on the meta device has shapes but no values: nothing can be saved or merged."""
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(f"cannot {action}: the model's weights are on the meta device (shapes without values); "
                          "load or materialise them first (e.g. from_pretrained, or to_empty then load_state_dict)")


def _untie_adapted_weights(model: nn.Module, layers: list[tuple[str, LoraLinear]]) -> None:
    """A merged update belongs to its layer alone: a base weight tied to another module (LoRA on
    a tied lm_head) gets its own copy first, or the input embedding would change too; the model's
    config then says the embeddings are untied, so a saved merged model loads the same way."""
    names = _names_by_tensor(model)
    for _, layer in layers:
        weight = layer.base_layer.weight
        if len(names.get(id(weight), ())) > 1 and not layer.merged:
            _remember_fingerprint(model)
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            _mark_untied(model)


def adapter_parameters(layer: LoraLinear) -> list[torch.Tensor]:
    params = [layer.lora_A.weight, layer.lora_B.weight]
    return params + ([layer.lora_magnitude_vector] if layer.lora_magnitude_vector is not None else [])


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


@on_the_compiled_model
def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each LoRA layer by its base layer: merged first, or with merge=False holding the
    original weights again (a merged update taken out, PiSSA's residual undone, the tensors a
    loaded adapter overwrote in full restored)."""
    if merge:
        merge_lora(model)
    else:
        _put_values(model, overwritten_originals(model))
    for name, layer in list(lora_layers(model)):
        if not merge:
            layer.restore_base()
        parent, child = parent_and_child(model, name)
        setattr(parent, child, layer.base_layer)
    for attr in (CONFIG_ATTR, ORIGINALS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    if merge:  # a new base: its fingerprint is its own (untied weights included), as when saved and reloaded
        model.__dict__.pop(_FINGERPRINT_BEFORE_UNTYING, None)
    return model


def remember_original(model: nn.Module, name: str, param: torch.Tensor) -> None:
    """Keep `param`'s values before an adapter overwrites them in full (the first time only)."""
    originals = overwritten_originals(model)
    if name not in originals:
        originals[name] = param.detach().to("cpu", copy=True)
        setattr(model, ORIGINALS_ATTR, originals)


def overwritten_originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return getattr(model, ORIGINALS_ATTR, {})


@torch.no_grad()
def _put_values(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy each value into its parameter; return what the parameters held before (all read
    before any is written: two names may be one tied tensor)."""
    previous = {name: model.get_parameter(name).detach().clone() for name in values}
    for name, value in values.items():
        param = model.get_parameter(name)
        param.copy_(value.to(param.device, param.dtype))
    return previous


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model without the adapters inside the block: the original model, also when
    an adapter is merged, was initialised with PiSSA (whose base layer holds a residual) or
    overwrote tensors in full when it was loaded (those are swapped back for the block)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    adapted = _put_values(model, overwritten_originals(model))
    try:
        yield model
    finally:
        _put_values(model, adapted)
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@dataclass
class LoraReport:
    adapted_modules: int
    trainable_params: int
    total_params: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (f"{self.adapted_modules} modules adapted; trainable parameters: "
                f"{self.trainable_params:,} of {self.total_params:,} ({self.percent:.3f}%)")


def lora_report(model: nn.Module) -> LoraReport:
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    total = sum(math.prod(_logical_shape(p)) for p in model.parameters())  # a 4-bit weight packs two in a byte
    return LoraReport(sum(1 for _ in lora_layers(model)), trainable, total)


_ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head")


@on_the_compiled_model
def base_fingerprint(model: nn.Module) -> str:
    """A hash of the architecture fields and every base parameter's name and shape: the base's as
    loaded (untying a head for an adapter or a merge keeps the fingerprint it had before)."""
    if _FINGERPRINT_BEFORE_UNTYING in model.__dict__:
        return model.__dict__[_FINGERPRINT_BEFORE_UNTYING]
    config = getattr(model, "config", None)
    arch = {f: getattr(config, f, None) for f in _ARCH_FIELDS} if config is not None else {}
    shapes = []
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            continue
        shapes.append((name.replace(".base_layer", ""), list(_logical_shape(param))))
    blob = json.dumps({"arch": arch, "shapes": sorted(shapes)}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit packs the weight
    return tuple(quant_state.shape) if quant_state is not None else tuple(param.shape)
