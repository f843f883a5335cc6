"""Merge an adapter into its base and save a plain transformers model folder.

    base + adapter ─► probe logits (reference)
                   ─► merge in fp32, cast once, unwrap ─► save_pretrained to a temp folder
                   ─► reload that folder with plain transformers ─► logits must match the probe
                   ─► rename into place (a failed check leaves nothing behind)

The reloaded model knows nothing of lorakit, so the check proves the folder loads anywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lorakit.errors import MergeError, OutputError

PROBE_TOKENS = 32


def merge_tolerance(dtype: torch.dtype) -> float:
    """Max abs logit difference accepted between base+adapter and the merged model."""
    return 1e-4 if dtype == torch.float32 else 0.15  # bf16/fp16: one rounding of every weight


def merge_to_folder(adapter_dir: str | Path, output_dir: str | Path, base: str | None = None,
                    dtype: str = "float32", allow_other_base: bool = False, overwrite: bool = False) -> dict:
    from lorakit.adapters import base_model_for
    from lorakit.lora import load_adapter, remove_lora
    from lorakit.models import load_model_and_tokenizer

    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite)
    model, tokenizer, _ = load_model_and_tokenizer(base or base_model_for([str(adapter_dir)]), dtype=dtype)
    load_adapter(model, adapter_dir, allow_other_base=allow_other_base)
    probe = _probe_ids(model)
    reference = _logits(model, probe)
    remove_lora(model, merge=True)
    tmp = output_dir.parent / f".tmp-{output_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        difference = _reload_difference(tmp, probe, reference, model.dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return {"output": str(output_dir), "max_abs_logit_difference": difference,
            "tolerance": merge_tolerance(model.dtype), "dtype": str(model.dtype).removeprefix("torch.")}


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise OutputError(f"--output {output_dir} already exists; choose a new folder or pass --overwrite")
    output_dir.parent.mkdir(parents=True, exist_ok=True)


def _probe_ids(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator).to(next(model.parameters()).device)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(ids).logits.float()


def _reload_difference(folder: Path, probe, reference, dtype) -> float:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(probe.device)
    difference = float((_logits(reloaded, probe) - reference).abs().max())
    if not difference <= merge_tolerance(dtype):
        raise MergeError(f"the merged model's logits differ from base+adapter by {difference:.3g} "
                         f"(tolerance {merge_tolerance(dtype):g}); nothing was written")
    return difference
