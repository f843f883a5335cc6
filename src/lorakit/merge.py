"""Merge an adapter into its base and save a plain transformers model folder.

    base + adapter ─► probe logits (reference)
                   ─► merge in fp32, cast once, unwrap ─► save_pretrained to a temp folder
                   ─► reload that folder with plain transformers ─► logits must match the probe
                   ─► rename into place (a failed check leaves nothing behind)

A QLoRA adapter is merged into the base as it was trained: loaded in 4/8 bits, each quantised
linear dequantised into a dense layer (checked against its kernel), merged in fp32, cast once
(bf16 by default), saved as a plain dense folder.

The reloaded model knows nothing of lorakit, so the check proves the folder loads anywhere.
A sequence- or token-classification adapter (PEFT's task_type) merges into that kind of model
(`task_model`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, MergeError, OutputError
from lorakit.publish import check_placeable, move_into_place, recover_leftovers, temp_beside
from lorakit.safe_io import file_in_the_way, give_default_modes, translate_os_errors

PROBE_TOKENS = 32
# A quantised base (QLoRA) is checked three ways (figures: max |logit difference| / max |logit|,
# on a tiny 2-layer Llama and on SmolLM2-135M, 30 layers, with a random 32-token probe):
# 1. each dequantised layer against its own kernel (quantize.check_dequantized);
# 2. the reloaded folder, in fp32, against the exact adapted model: the dequantised weights + the
#    unmerged adapter in fp32. The one bf16 rounding of the merged weights moved the logits by
#    0.2% (tiny) and 0.7% (SmolLM2): tolerance 2%.
# 3. the merged model against the quantised model + adapter as trained, both in bf16: bf16
#    arithmetic alone moves SmolLM2's logits by 4.3%, and LLM.int8's int8 rounding of the
#    activations (which no dense model reproduces) by 11%: tolerance 10% (4bit), 25% (8bit).
# Merging into the unquantised weights instead moves them by 13% (tiny) to 41% (SmolLM2) with
# NF4, 0.8% to 3.9% with LLM.int8 (check 1 catches both: the int8 rounding is > 3x its tolerance).
QUANTIZED_MERGE_RTOL = 0.02  # check 2, 16-bit merged weights (fp32 weights: no rounding, 1e-4)
KERNEL_MERGE_RTOL = {"4bit": 0.10, "8bit": 0.25}  # check 3


# fp32 rounding of W + s B A: the demo adapter with B x 10 moved SmolLM2's logits by 1.5e-4 at a largest
# logit of 35 (4e-6 of it; PEFT's merge_and_unload by the same), which a fixed 1e-4 refused
DENSE_FP32_MERGE_RTOL = 2e-5


def merge_tolerance(reference: torch.Tensor) -> float:
    """Max abs logit difference accepted between base+adapter and the merged model, both fp32: a
    fraction of the largest logit, as the rounding's effect scales with the logits, at least 1e-4
    (16-bit results: rounded_merge_tolerance)."""
    return max(1e-4, DENSE_FP32_MERGE_RTOL * float(reference.abs().max()))


def rounded_merge_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Max abs logit difference accepted between the exact adapted model (fp32: a dequantised base,
    or a 16-bit base read in fp32) and the merged folder, rounded once to `dtype`, evaluated in
    fp32: a fraction of the largest logit (the rounding's effect scales with the logits)."""
    rtol = 1e-4 if dtype == torch.float32 else QUANTIZED_MERGE_RTOL
    return rtol * float(reference.abs().max())


def merge_to_folder(adapter_dir: str | Path, output_dir: str | Path, base: str | None = None,
                    dtype: str | None = None, allow_other_base: bool = False, overwrite: bool = False,
                    quantize: str | None = None, allow_pickle: bool = False) -> dict:
    """dtype: of the merged weights (default: the base's own, as its config.json records it, else
    float32; bfloat16 for a quantised base).
    quantize: "4bit"/"8bit" loads the base as it was trained with QLoRA (see lorakit.quantize)."""
    from lorakit.adapters import base_model_for
    from lorakit.terminal import saving_bar_only_when_slow

    output_dir = Path(output_dir)
    spec = base or base_model_for([str(adapter_dir)])
    recover_leftovers(output_dir)
    _check_output(output_dir, overwrite, inputs={"the adapter": adapter_dir, "the base model": spec})
    quantize = None if quantize in (None, "none") else quantize
    task = task_model(adapter_dir, allow_pickle)
    if quantize:
        if task.name != "causal LM":  # before the 4/8-bit base loads: that takes minutes on a large model
            raise ConfigError(f"--quantize merges a causal LM's QLoRA adapter; this one is for a {task.name} model: "
                              "merge it without --quantize")
        merged = _merge_quantized(spec, adapter_dir, dtype or "bfloat16", quantize, allow_other_base, allow_pickle)
    else:
        merged = _merge_dense(spec, adapter_dir, dtype, allow_other_base, allow_pickle, task)
    tmp = temp_beside(output_dir)
    out_dtype = merged.model.dtype
    try:
        with translate_os_errors(output_dir):
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            with saving_bar_only_when_slow(merged.model):
                merged.model.save_pretrained(tmp, safe_serialization=True)
            _keep_training_chat_format(merged.tokenizer).save_pretrained(tmp)
            give_default_modes(tmp)
        merged.model = None  # the reloaded copy needs the memory
        _free_memory()
        reload_dtype = merged.reload_dtype or out_dtype
        difference = _reload_difference(tmp, merged.probe, merged.reference, reload_dtype, merged.tolerance, out_dtype,
                                        task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, output_dir, overwrite, "the checked merged model")
    return {"output": str(output_dir), "max_abs_logit_difference": difference, "tolerance": merged.tolerance,
            "dtype": str(out_dtype).removeprefix("torch."), "quantize": quantize or "none", **merged.figures}


def _keep_training_chat_format(tokenizer):
    """A base without a chat template was trained on lorakit's fallback format ("### User:"); the
    merged model's tokenizer carries it, so that its chats are rendered as in training."""
    from lorakit.data.formats import chat_template_for

    fallback = chat_template_for(tokenizer)
    if fallback is not None:
        tokenizer.chat_template = fallback
    return tokenizer


@dataclass
class Merged:
    """A merged model in memory and how to check its saved folder: reload it in reload_dtype (None:
    its own dtype) and compare its logits on `probe` with `reference` within `tolerance`."""

    model: Any
    tokenizer: Any
    probe: torch.Tensor
    reference: torch.Tensor
    tolerance: float
    reload_dtype: torch.dtype | None = None
    figures: dict = field(default_factory=dict)


def _merge_dense(spec, adapter_dir, dtype: str | None, allow_other_base: bool, allow_pickle: bool,
                 task: TaskModel) -> Merged:
    """`dtype` None: the base's own dtype. The base is read and merged in fp32 (the exact adapted
    model's logits are the reference); a 16-bit result is rounded once, as PEFT's merge keeps the
    base's dtype, and checked in fp32 against the reference."""
    from lorakit.lora import load_adapter, remove_lora
    from lorakit.models import load_model_and_tokenizer

    target = getattr(torch, dtype) if dtype else _stored_dtype(spec)
    model, tokenizer, _ = load_model_and_tokenizer(spec, dtype="float32", allow_pickle=allow_pickle, auto_class=task)
    load_adapter(model, adapter_dir, allow_other_base=allow_other_base, allow_pickle=allow_pickle)
    probe = _probe_ids(model)
    reference = _logits(model, probe)
    remove_lora(model, merge=True)
    if target in (torch.bfloat16, torch.float16):
        model.to(target)  # the one rounding
        return Merged(model, tokenizer, probe, reference, rounded_merge_tolerance(target, reference), torch.float32)
    return Merged(model, tokenizer, probe, reference, merge_tolerance(reference))


def _stored_dtype(spec) -> torch.dtype | None:
    """The dtype a base model folder's (or hub repository's) config.json records for its weights;
    None where it records none, or for a .gguf file or the built-in model, which lorakit converts."""
    from lorakit.errors import ModelLoadError
    from lorakit.models import read_model_config, resolve_model

    source = resolve_model(spec)
    if source.kind not in ("local", "hub"):
        return None
    try:
        config = read_model_config(source)
    except ModelLoadError:  # loading the model says what is wrong with it
        return None
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, stored, None) if isinstance(stored, str) else stored


# PEFT's task types whose models end in a task head instead of the language-model head


@dataclass
class TaskModel:
    """What an adapter's task_type loads its base as: transformers' auto class and, for a task
    head the adapter trained in full, that head's number of labels (the base's config may not
    have it)."""

    name: str
    auto_class: Any = None  # None: AutoModelForCausalLM
    head_labels: int | None = None

    def from_pretrained(self, target, **kwargs):
        from transformers import AutoModelForCausalLM

        from lorakit.models import WITHOUT_HUB_KERNELS

        labels = {} if self.head_labels is None else {"num_labels": self.head_labels}
        return (self.auto_class or AutoModelForCausalLM).from_pretrained(target, **labels,
                                                                         **{**WITHOUT_HUB_KERNELS, **kwargs})


def task_model(adapter_dir: str | Path, allow_pickle: bool = False) -> TaskModel:
    import transformers

    from lorakit.adapters import TASK_HEAD_TYPES
    from lorakit.lora.adapter_folder import read_adapter_config, read_adapter_folder

    task = read_adapter_config(Path(adapter_dir)).get("task_type")
    if task not in TASK_HEAD_TYPES:
        return TaskModel("causal LM")
    tensors = read_adapter_folder(adapter_dir, allow_pickle, check_tensors=False).parameter_tensors()
    head = next((tensors[name] for name in ("score.weight", "classifier.weight", "classifier.out_proj.weight")
                 if name in tensors), None)
    if head is None:  # the base's head would be merged, random where the base is not a classifier itself
        raise ConfigError(f"{adapter_dir} is a {task} adapter without its task head (no score or classifier in "
                          "modules_to_save): merge it with the Python API onto your classifier (load_adapter, "
                          "remove_lora(model, merge=True), save_pretrained)")
    return TaskModel(task, getattr(transformers, TASK_HEAD_TYPES[task]), int(head.shape[0]))


def _merge_quantized(spec, adapter_dir, dtype: str, quantize: str, allow_other_base: bool,
                     allow_pickle: bool = False) -> Merged:
    """The base loaded in 4/8 bits as trained, its adapter attached; each quantised linear becomes
    a dense fp32 layer on the CPU holding the weight its kernel multiplies by (checked); the exact
    adapted model's fp32 logits are the reference; merge in fp32, cast once to `dtype`."""
    from lorakit.lora import load_adapter, remove_lora
    from lorakit.models import torch_dtype
    from lorakit.quantize import dequantize_model, load_quantized

    target_dtype = torch_dtype(dtype, "cpu")
    model, tokenizer, _ = load_quantized(spec, quantize, allow_pickle)
    load_adapter(model, adapter_dir, allow_other_base=allow_other_base, allow_pickle=allow_pickle)
    kernel_logits = _logits(model, _probe_ids(model))  # bf16, through the 4/8-bit kernels
    layers = dequantize_model(model, dtype=torch.float32, device="cpu")  # check 1, layer by layer
    model.to(device="cpu", dtype=torch.float32)
    probe = _probe_ids(model)
    reference = _logits(model, probe)  # the same adapted model, exactly, in fp32
    remove_lora(model, merge=True)
    model.to(target_dtype)  # the one rounding
    figures = {"dequantized_layers": layers, **_kernel_check(model, probe, kernel_logits, quantize)}
    return Merged(model, tokenizer, probe, reference, rounded_merge_tolerance(target_dtype, reference),
                  torch.float32, figures)


def _kernel_check(model, probe, kernel_logits: torch.Tensor, quantize: str) -> dict:
    """Check 3: the merged model (in memory; check 2 proves the folder equals it) against the
    quantised model as trained, both in 16-bit arithmetic."""
    gap = float((_logits(model, probe) - kernel_logits.to(probe.device)).abs().max())
    tolerance = KERNEL_MERGE_RTOL[quantize] * float(kernel_logits.abs().max())
    if not gap <= tolerance:
        raise MergeError(f"the merged model's logits differ from the {quantize} base + adapter by {gap:.3g} "
                         f"(tolerance {tolerance:.3g}); nothing was written")
    return {"max_abs_logit_difference_vs_quantized": gap, "tolerance_vs_quantized": tolerance}


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_output(output_dir: Path, overwrite: bool, inputs: dict[str, str | Path | None]) -> None:
    """Before any work: the output can be a new folder there (created only when the merge is done),
    and replacing it would delete none of the inputs, nor the folder the command runs in."""
    _refuse_output_holding(output_dir, {**inputs, "the current folder": Path.cwd()})
    check_placeable(output_dir, "merge")
    blocking = file_in_the_way(output_dir)
    if blocking is not None:
        where = "is a file" if blocking == output_dir.absolute() else f"is under {blocking}, which is a file"
        raise OutputError(f"--output {output_dir} {where}; choose a folder path")
    if output_dir.exists() and not overwrite:
        raise OutputError(f"--output {output_dir} already exists; choose a new folder or pass --overwrite")
    above = next((p for p in output_dir.absolute().parents if p.exists()), None)
    if above is not None and not os.access(above, os.W_OK):
        raise OutputError(f"cannot write under {above} for --output {output_dir} (permission denied or read-only); "
                          "choose a writable folder")


def _refuse_output_holding(output_dir: Path, inputs: dict[str, str | Path | None]) -> None:
    target = output_dir.resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():  # a hub id, or the built-in model
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise OutputError(f"--output {output_dir} is or holds {what} ({path}), which --overwrite would "
                              "delete; choose a new folder elsewhere")


def _probe_ids(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator).to(next(model.parameters()).device)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(ids).logits.float()


def _reload_difference(folder: Path, probe, reference, dtype, tolerance: float, saved_dtype,
                       task: TaskModel) -> float:
    from lorakit.terminal import loading_bar_only_when_slow

    with loading_bar_only_when_slow(str(folder)):
        reloaded = task.from_pretrained(folder, dtype=dtype).to(probe.device)
    difference = float((_logits(reloaded, probe) - reference).abs().max())
    if not difference <= tolerance:
        advice = ("; merge with --dtype float32, where no rounding can account for it"
                  if saved_dtype in (torch.bfloat16, torch.float16) else "")
        raise MergeError(f"the merged model's logits differ from base+adapter by {difference:.3g} "
                         f"(tolerance {tolerance:.3g}); nothing was written{advice}")
    return difference
