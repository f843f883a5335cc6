"""Loss and perplexity of a base model and of it with an adapter, on a data file (`lorakit eval`).

It runs the trainer's own evaluation: the same tokenisation and response-only labels, packed
rows where train packs them, the fast paths, the dtype the run trained in (its summary.json beside
the adapter folder; else the one `lorakit train` picks), and the run's seq_len, train_on_inputs
and data format (its config.yaml). So it reproduces a run's eval loss for the same data, and
scores a new file the way training would have.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lorakit.config import DATA_FORMATS
from lorakit.errors import ConfigError

# for an adapter whose run's config is not beside it
EVAL_DEFAULTS = {"seq_len": 512, "train_on_inputs": False, "format": "auto", "columns": []}


def evaluate_adapter(adapter: str | None, data: str | os.PathLike | Sequence[str], model: str | None = None,
                     fmt: str = "auto", seq_len: int | None = None, batch_size: int = 8, device: str = "auto",
                     dtype: str = "auto", allow_other_base: bool = False, allow_pickle: bool = False,
                     train_on_inputs: bool | None = None, quantize: str | None = None,
                     columns: Sequence[str] | None = None) -> dict:
    """{base_loss, base_perplexity, adapter_loss, adapter_perplexity, tokens, notes} over ``data``;
    ``model`` defaults to the adapter's base_model_name_or_path; ``seq_len`` None: the run's (its
    config.yaml beside the adapter), else 512. The run's train_on_inputs is kept (the same labels)
    unless ``train_on_inputs`` says otherwise, and so are its ``--columns`` and the base's quantisation
    unless ``columns`` or ``quantize`` ("none", "4bit", "8bit") say otherwise.
    Without an adapter, ``model`` alone (a merged one, say): {model_loss, model_perplexity, tokens, notes}."""
    from lorakit.adapters import base_model_for, refuse_classifier_adapters
    from lorakit.lora import load_adapter
    from lorakit.quantize import inference_quantize, load_for_inference

    if adapter is None and model is None:
        raise ConfigError("eval needs --adapter (base and adapter scored), or --model to score a model alone")
    # read once: the run's dtype, and whether its config.yaml is this adapter's
    summary = _run_summary(adapter) if adapter else None
    seq_len, run, inputs_trained, label_notes = _labels_and_cut(adapter if summary else None, seq_len, train_on_inputs)
    fmt, format_notes = _data_format(fmt, run)
    if columns is not None:
        run.pop("columns", None)
    columns = run.get("columns", []) if columns is None else columns
    _check_sizes(seq_len, batch_size)
    if adapter:
        refuse_classifier_adapters([adapter], "eval")
    asked, (quantize, quantize_notes) = quantize, inference_quantize(quantize, adapter)
    run_dtype = _dtype_of(summary, quantize, adapter) if dtype == "auto" else None
    base_model, tokenizer, torch_dtype = load_for_inference(model or base_model_for([adapter]), quantize, device,
                                                            run_dtype or dtype, allow_pickle,
                                                            chosen_by_run=asked is None)
    records, notes = _scored_records(base_model, tokenizer, data, fmt, seq_len, run, inputs_trained, columns)
    notes += label_notes + format_notes + quantize_notes
    notes += [f"dtype {run_dtype}, as the run trained (its summary.json); --dtype to choose another"] if run_dtype else []
    if adapter:
        load_adapter(base_model, adapter, allow_other_base=allow_other_base, allow_pickle=allow_pickle)
    settings, unpacked = _eval_settings(base_model, tokenizer, records, seq_len, batch_size)
    notes += [f"rows unpacked: {unpacked}"] if unpacked else []
    return {**_scores(base_model, records, settings, adapter is not None, torch_dtype), "notes": notes}


def _labels_and_cut(run_adapter: str | None, seq_len: int | None, train_on_inputs: bool | None):
    """(seq_len, the run's settings taken, whether the prompts are scored, notes): the caller's
    where given, else those of the run `run_adapter` came from (its config.yaml), else the defaults;
    a note where the caller's labels differ from the run's."""
    run = _run_data_settings(run_adapter) if run_adapter else {}
    if seq_len is None:
        seq_len = run.get("seq_len", EVAL_DEFAULTS["seq_len"])
    else:
        run.pop("seq_len", None)
    if train_on_inputs is None:
        return seq_len, run, run.get("train_on_inputs") is True, []
    trained_with = run.pop("train_on_inputs", None)
    differs = trained_with is not None and trained_with != train_on_inputs
    return seq_len, run, train_on_inputs, [f"train_on_inputs {train_on_inputs}, where the run trained with "
                                           f"{trained_with}: other labels than its eval loss's"] if differs else []


def _data_format(fmt: str, run: dict) -> tuple[str, list[str]]:
    """The format to read the data as: the caller's, else the run's (auto-detection may read a file
    the run read as text as instruction records), with a note where the caller's differs."""
    trained_as = run.get("format", "auto")
    if fmt == "auto":
        return trained_as, []
    run.pop("format", None)
    differs = trained_as not in ("auto", fmt)
    return fmt, [f"format {fmt}, where the run read its data as {trained_as}: other examples than its eval loss's"] \
        if differs else []


def _scores(model, records, settings, with_adapter: bool, torch_dtype) -> dict:
    """The model's loss and perplexity on the records, and its base's (adapters off) where it has one."""
    from lorakit.lora import disable_adapters
    from lorakit.train.loop import evaluate

    if not with_adapter:
        scored = evaluate(model, records, settings)
        _refuse_non_finite(scored["loss"], None, torch_dtype)
        return {"model_loss": scored["loss"], "model_perplexity": scored["perplexity"], "tokens": scored["tokens"]}
    with disable_adapters(model):
        base = evaluate(model, records, settings)
    tuned = evaluate(model, records, settings)
    _refuse_non_finite(base["loss"], tuned["loss"], torch_dtype)
    return {"base_loss": base["loss"], "base_perplexity": base["perplexity"], "adapter_loss": tuned["loss"],
            "adapter_perplexity": tuned["perplexity"], "tokens": tuned["tokens"]}


def _scored_records(model, tokenizer, data, fmt: str, seq_len: int, run: dict, inputs_trained: bool, columns):
    """The data tokenised as the run's training would (the prompts' tokens scored or not), checked
    against the model; with the notes on what was skipped, cut or taken from the run."""
    from lorakit.data.columns import rename_columns
    from lorakit.data.formats import tokenize_records
    from lorakit.data.reading import read_records
    from lorakit.train.run import check_vocabulary, context_notice, longest_example

    [renamed] = rename_columns([read_records(data)], columns, fmt, from_the_run="columns" in run)
    records = tokenize_records(renamed, tokenizer, fmt, seq_len, inputs_trained)
    check_vocabulary(model, tokenizer, records)
    notes = list(records.stats.warnings)  # records skipped, cut or split
    taken = {k: v for k, v in run.items() if v != EVAL_DEFAULTS[k]}
    notes += [f"{', '.join(f'{k} {v}' for k, v in taken.items())}: the run's own (its config.yaml)"] if taken else []
    notes += context_notice(model, longest_example(records, None))  # raises past a position table
    return records, notes


def _dtype_of(summary: dict | None, quantize: str, adapter) -> str | None:
    """The dtype the run trained in. A quantised base takes a 16-bit one only where the run asked
    for it (--dtype, its config.yaml): auto's bf16 (fp16 on a GPU without bf16) was that machine's
    choice (quantize.compute_dtype), and an emulated one here would cost bitsandbytes' products 26x
    float32's time, which no widening reaches."""
    dtype = (summary or {}).get("dtype")
    if dtype not in ("float32", "bfloat16", "float16"):
        return None
    if quantize != "none" and dtype != "float32" and _asked_dtype(adapter) != dtype:
        return None
    return dtype


def _asked_dtype(adapter) -> str | None:
    """The --dtype the adapter's run was started with (its config.yaml), or None."""
    from lorakit.config import load_yaml
    from lorakit.errors import LorakitError

    try:
        return load_yaml(Path(adapter).resolve().parent / "config.yaml").get("model", {}).get("dtype")
    except LorakitError:  # a config edited since: nothing known
        return None


def _run_summary(adapter: str | os.PathLike) -> dict | None:
    folder = Path(adapter).resolve()
    try:
        summary = json.loads((folder.parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # the summary names the adapter as the run's --output spelled it, perhaps relative: compare names
    if not isinstance(summary, dict) or Path(str(summary.get("adapter", ""))).name != folder.name:
        return None
    return summary


def run_columns(adapter: str | os.PathLike) -> list[str]:
    """The --columns (FIELD=COLUMN pairs) of the run `adapter` was trained by (its config.yaml, where
    its summary.json names this adapter); [] for none, or an adapter not beside its run's files."""
    return _run_data_settings(adapter).get("columns", []) if _run_summary(adapter) else []


def _run_data_settings(adapter: str | os.PathLike) -> dict:
    """seq_len, train_on_inputs and the data format of the adapter's run (its config.yaml beside
    the adapter folder, which the caller found its summary.json to name): the examples, labels and
    cuts its eval loss was measured with."""
    from lorakit.config import load_yaml
    from lorakit.errors import LorakitError

    try:
        data = load_yaml(Path(adapter).resolve().parent / "config.yaml").get("data", {})
    except LorakitError:  # a config edited since: score with the defaults
        return {}
    seq_len, inputs, fmt, columns = (data.get(key) for key in ("seq_len", "train_on_inputs", "format", "columns"))
    return {**({"seq_len": seq_len} if isinstance(seq_len, int) and seq_len >= 2 else {}),
            **({"train_on_inputs": inputs} if isinstance(inputs, bool) else {}),
            **({"format": fmt} if fmt in DATA_FORMATS else {}),
            **({"columns": columns} if isinstance(columns, list) and all(isinstance(c, str) for c in columns) else {})}


def _refuse_non_finite(base_loss: float, adapter_loss: float | None, dtype) -> None:
    """A loss that is not a number is no score; in 16 bits an adapter's large outputs overflow."""
    from lorakit.errors import AdapterFileError, ModelLoadError

    if not math.isfinite(base_loss):  # the base, or a model scored alone
        raise ModelLoadError(f"the model's loss on this data is {base_loss}: its weights or this dtype "
                             f"({dtype}) overflow; try --dtype float32, or check the model's weights")
    if adapter_loss is not None and not math.isfinite(adapter_loss):
        raise AdapterFileError(f"the adapter's loss on this data is {adapter_loss} (the base's is {base_loss:.4f}): "
                               f"its outputs overflow in {dtype}; try --dtype float32, or the adapter is broken")


def _check_sizes(seq_len: int, batch_size: int) -> None:
    problems = [f"--seq-len must be at least 2, got {seq_len}"] if seq_len < 2 else []
    problems += [f"--batch-size must be at least 1, got {batch_size}"] if batch_size < 1 else []
    if problems:
        raise ConfigError("; ".join(problems))


def _eval_settings(model, tokenizer, records, seq_len: int, batch_size: int):
    """The trainer's eval path (fast paths, packed rows without a 4D mask where the model's
    attention allows packing, as train decides): in 16 bits their roundings differ from
    transformers' ops, and eval should reproduce a run's own eval loss. With why rows are not
    packed, if they are not."""
    from lorakit.train.loop import LoopSettings
    from lorakit.train.run import enable_fast_paths_for, forward_settings, longest_example, packing_blocker

    unpacked = packing_blocker(model, longest_example(records, None), seq_len)  # as train decides
    device = next(model.parameters()).device
    enable_fast_paths_for(model, "auto", unpacked is None, device)  # the trainer's default
    settings = LoopSettings(lr=0, total_steps=0, warmup_steps=0, schedule="constant", grad_accum=1, max_grad_norm=0,
                            max_bad_steps=1, seed=0,
                            **forward_settings(model, tokenizer, device, batch_size, seq_len, unpacked is None))
    return settings, unpacked
