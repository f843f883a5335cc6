"""Check an adapter against vLLM's LoRA loader and write a clean copy vLLM will accept.

vLLM serves many LoRA adapters over one base model, so it accepts a narrower set of adapters
than PEFT. The rules below are read from vLLM's source (docs/export.md cites the file of each):

    adapter_config.json                      adapter_model.safetensors
      r, rank_pattern <= --max-lora-rank       only lora_A / lora_B (and lora_embedding_A/B)
      use_dora false, bias "none",             every module a layer vLLM's model declares
      lora_bias false, modules_to_save None,   (q/k/v/o/gate/up/down_proj for Llama-family)
      no PiSSA/OLoRA/LoftQ/CorDA init,         embed_tokens / lm_head only when asked for
      no aLoRA / layer_replication / QALoRA

check_vllm() collects every incompatibility (and warnings, e.g. a rank above vLLM's default
--max-lora-rank of 16); export_vllm() raises AdapterFileError listing them all, or writes
``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT-prefixed keys and nothing
else (PEFT's saved copies of embedding base weights are dropped; vLLM skips them anyway).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import AdapterFileError, ConfigError, OutputError
from lorakit.export.adapter_files import (Adapter, base_shape_problems, export_tensor_problems, find_base_config,
                                         read_for_export, refuse_another_base)
from lorakit.lora.config import lora_scale
from lorakit.lora.io import unsupported_options
from lorakit.publish import check_placeable, move_into_place, recover_leftovers, temp_beside
from lorakit.safe_io import atomic_save_safetensors, atomic_write_json, translate_os_errors

# vllm/config/lora.py: MaxLoRARanks and the default of LoRAConfig.max_lora_rank
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

# Layers vLLM's model implementations accept LoRA on (their linear layers, plus the names
# packed_modules_mapping fuses them into), per Hugging Face model_type.
_LLAMA_FAMILY = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
)
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "llama": _LLAMA_FAMILY, "mistral": _LLAMA_FAMILY, "qwen2": _LLAMA_FAMILY, "qwen3": _LLAMA_FAMILY,
}
# model_type -> why vLLM cannot serve LoRA on it
VLLM_NO_LORA = {
    "gpt2": "vLLM's GPT2LMHeadModel does not implement SupportsLoRA (vllm/model_executor/models/gpt2.py)",
}
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})
# PEFT inits that only set the starting factors, so the saved adapter is plain LoRA
# (vllm/lora/peft_helper.py _init_is_supported); PiSSA, OLoRA, CorDA, LoftQ also change the base
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


@dataclass
class VllmCheck:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_rank: int = 0
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK  # the --max-lora-rank vLLM needs

    def to_dict(self) -> dict:
        return {"problems": self.problems, "warnings": self.warnings, "max_rank": self.max_rank,
                "max_lora_rank": self.max_lora_rank}


@dataclass
class VllmExport:
    output: Path
    tensors: int
    modules: int
    check: VllmCheck

    def to_dict(self) -> dict:
        return {"format": "vllm", "output": str(self.output), "tensors": self.tensors,
                "modules": self.modules, **self.check.to_dict()}


def check_vllm(
    adapter: Adapter,
    max_lora_rank: int | None = None,
    allow_embeddings: bool = False,
    base_config: dict | None = None,
) -> VllmCheck:
    """Everything that stops vLLM from loading ``adapter``, and what to pass it."""
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ConfigError(
            f"--max-lora-rank {max_lora_rank} is not one vLLM accepts; choose one of "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}"
        )
    check = VllmCheck()
    if not adapter.config.get("target_modules"):
        check.warnings.append(
            "adapter_config.json has no target_modules, a field vLLM requires; the copy lists the adapted modules"
        )
    check.problems += feature_problems(adapter.config)
    if str(adapter.config.get("init_lora_weights", "")).lower().startswith("lora_ga"):
        check.warnings.append(
            "init_lora_weights is 'lora_ga': its factors were trained on base weights LoRA-GA rewrote (W - s B0 A0), "
            "and vLLM, like PEFT, applies them to the original base; have PEFT convert the adapter to a plain LoRA "
            "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    check.problems += tensor_key_problems(adapter)
    check.problems += export_tensor_problems(adapter)
    check.problems += base_shape_problems(adapter, base_config)
    _check_modules(check, adapter, allow_embeddings, base_config)
    _check_rank(check, adapter, max_lora_rank)
    _check_scaling(check, adapter)
    return check


def _check_scaling(check: VllmCheck, adapter: Adapter) -> None:
    """Modules scaled otherwise than lora_alpha / r (rank_pattern, alpha_pattern): served right by
    vLLM's PEFTHelper.get_rank_and_scaling, which older releases lack."""
    config = adapter.config
    if check.problems or not (adapter.pairs and config.get("r") and config.get("lora_alpha")):
        return  # refused already: a damaged pair's scaling may not even be a number (rank 0)
    uniform = lora_scale(int(config["r"]), float(config["lora_alpha"]), "rslora" if adapter.uses_rslora() else "standard")
    own = sorted(m for m in adapter.pairs if not math.isclose(adapter.scaling(m), uniform, rel_tol=1e-6))
    if own:
        check.warnings.append(
            f"{len(own)} module{'s' * (len(own) != 1)} ({own[0]}{', ...' * (len(own) > 1)}) take their own scaling "
            "from rank_pattern / alpha_pattern, which vLLM applies in releases whose PEFTHelper has "
            "get_rank_and_scaling; an older vLLM scales every module by lora_alpha / r (--format gguf or merged "
            "fold the scaling into the weights)")


def feature_problems(config: dict) -> list[str]:
    """PEFT features in adapter_config.json that vLLM rejects (vllm/lora/peft_helper.py)."""
    out = []
    if config.get("use_dora"):
        out.append("use_dora is true: vLLM does not support DoRA; train without DoRA or use --format merged")
    if config.get("bias", "none") != "none":
        out.append(f"bias is {config['bias']!r}: vLLM supports only bias 'none'")
    if config.get("lora_bias"):
        out.append("lora_bias is true: vLLM does not support LoRA bias; use --format merged")
    out += _modules_to_save_problems(config.get("modules_to_save"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        out.append(
            f"init_lora_weights is {init!r}: this init also changes the base weights, which vLLM does "
            "not do; convert it to a plain LoRA adapter first or use --format merged"
        )
    named = {"alora_invocation_tokens": "Activated LoRA (aLoRA)", "layer_replication": "layer_replication",
             "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA"}
    for name, what in named.items():
        if config.get(name):
            out.append(f"{name} is set: vLLM does not support {what}")
    # the other PEFT variants lorakit's engine refuses: vLLM would read their factors as plain LoRA
    out += [f"{option}: this PEFT variant is more than plain LoRA factors, which is all vLLM applies; use PEFT"
            for option in unsupported_options(config)
            if option.split("=")[0] not in named and not option.startswith("lora_bias=")]
    return out


def _modules_to_save_problems(modules_to_save) -> list[str]:
    # vLLM loads no full weights from an adapter: only classification heads are allowed
    names = [m for m in (modules_to_save or []) if m not in ("classifier", "score")]
    if not names:
        return []
    return [
        f"modules_to_save is {names}: vLLM loads no fully trained modules from an adapter "
        "(modules_to_save must be None). Retrain with LoRA on those layers instead "
        "(target_modules plus --allow-embeddings for embed_tokens / lm_head), or use --format merged"
    ]


def tensor_key_problems(adapter: Adapter) -> list[str]:
    """Tensors vLLM's loader cannot parse (vllm/lora/utils.py parse_fine_tuned_lora_name)."""
    out = []
    if adapter.magnitudes:
        out.append(f"DoRA magnitude vectors present ({adapter.magnitudes[0]}, ...): vLLM does not support DoRA")
    if adapter.biases:
        out.append(f"LoRA bias tensors present ({adapter.biases[0]}, ...): vLLM does not support lora_bias")
    if adapter.other_keys:
        shown = ", ".join(adapter.other_keys[:5]) + (" ..." if len(adapter.other_keys) > 5 else "")
        out.append(f"tensors that are not LoRA factors: {shown}; vLLM accepts only lora_A / lora_B tensors")
    return out


def _check_modules(check: VllmCheck, adapter: Adapter, allow_embeddings: bool, base_config: dict | None) -> None:
    model_type = (base_config or {}).get("model_type")
    if model_type in VLLM_NO_LORA:
        check.problems.append(f"base model type {model_type!r}: {VLLM_NO_LORA[model_type]}")
        return
    allowed = VLLM_LORA_MODULES.get(model_type)
    if allowed is None:
        allowed = _LLAMA_FAMILY
        if base_config is None:
            check.warnings.append("no base config found: module names were checked against the Llama-family "
                                  "projections; pass --model DIR to check them against the base model's")
        else:
            named = ("names no model_type" if model_type is None
                     else f"model type {model_type!r} is not in lorakit's table")
            check.warnings.append(f"the base config {named}: module names were checked against the Llama-family "
                                  "projections")
    check.problems += module_problems(adapter, allowed, allow_embeddings)


def module_problems(adapter: Adapter, allowed: frozenset[str], allow_embeddings: bool) -> list[str]:
    """Adapted modules vLLM has no LoRA layer for (vllm/lora/lora_model.py check_unexpected_modules)."""
    embeddings, unknown = set(), set()
    for module, pair in adapter.pairs.items():
        leaf = module.rsplit(".", 1)[-1]
        if leaf in EMBEDDING_MODULES or pair.kind == "embedding":
            embeddings.add(leaf)
        elif leaf not in allowed:
            unknown.add(leaf)
    out = []
    if embeddings and not allow_embeddings:
        out.append(
            f"LoRA on {', '.join(sorted(embeddings))}: vLLM handles embedding / lm_head LoRA only for some "
            "models and versions; pass --allow-embeddings if yours does"
        )
    if unknown:
        out.append(
            f"modules {', '.join(sorted(unknown))} are not linear projections vLLM applies LoRA to "
            f"(it accepts {', '.join(sorted(allowed))})"
        )
    return out


def _check_rank(check: VllmCheck, adapter: Adapter, max_lora_rank: int | None) -> None:
    config = adapter.config
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    ranks += [pair.rank for pair in adapter.pairs.values()]
    check.max_rank = max_rank = max(int(r) for r in ranks)
    needed = next((c for c in VLLM_MAX_LORA_RANKS if c >= max_rank), None)
    if needed is None:
        check.problems.append(
            f"rank {max_rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
            "retrain with a smaller r or use --format merged"
        )
    elif max_lora_rank is not None and max_rank > max_lora_rank:
        check.problems.append(
            f"rank {max_rank} is above --max-lora-rank {max_lora_rank}; serve it with --max-lora-rank {needed}"
        )
    elif max_lora_rank is None and max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
        check.warnings.append(
            f"rank {max_rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
            f"start vLLM with --max-lora-rank {needed}"
        )
    check.max_lora_rank = max_lora_rank or max(needed or 0, VLLM_DEFAULT_MAX_LORA_RANK)


def export_vllm(
    adapter_dir: str | Path,
    output_dir: str | Path,
    max_lora_rank: int | None = None,
    allow_embeddings: bool = False,
    base_config_dir: str | Path | None = None,
    allow_pickle: bool = False,
    allow_other_base: bool = False,
) -> VllmExport:
    """Check the adapter for vLLM and write a clean copy to ``output_dir`` (a new folder)."""
    adapter = read_for_export(adapter_dir, allow_pickle=allow_pickle)
    base_config = find_base_config(adapter, base_config_dir)
    refuse_another_base(adapter, base_config, allow_other_base)
    check = check_vllm(adapter, max_lora_rank, allow_embeddings, base_config)
    if check.problems:
        raise AdapterFileError(
            f"{adapter.folder} cannot be served by vLLM (fix what each line says, or re-save the adapter "
            "from its training run):\n  - " + "\n  - ".join(check.problems)
        )
    output = Path(output_dir)
    recover_leftovers(output)
    _check_output_folder(output, adapter.folder)
    tensors = clean_tensors(adapter)
    _write_folder(output, clean_config(adapter), tensors)
    return VllmExport(output, len(tensors), len(adapter.pairs), check)


def clean_tensors(adapter: Adapter) -> dict:
    """Only the LoRA factors, under PEFT's canonical keys, contiguous."""
    out = {}
    for pair in adapter.pairs.values():
        out[pair.peft_key("A")] = pair.A.contiguous()
        out[pair.peft_key("B")] = pair.B.contiguous()
    return out


def clean_config(adapter: Adapter) -> dict:
    clean = dict(adapter.config)
    clean["peft_type"] = "LORA"
    if not clean.get("target_modules"):
        clean["target_modules"] = sorted({module.rsplit(".", 1)[-1] for module in adapter.pairs})
    if not clean.get("modules_to_save"):
        clean["modules_to_save"] = None
    return clean


def _check_output_folder(output: Path, adapter_folder: Path) -> None:
    if output.resolve() == adapter_folder.resolve():
        raise OutputError(f"--output {output} is the adapter folder itself; choose a new folder")
    check_placeable(output, "export")
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file; give a folder path")
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(f"--output {output} already holds files; choose a new folder or empty it")


def _write_folder(output: Path, config: dict, tensors: dict) -> None:
    """Write into a temp folder beside ``output`` (publish.temp_beside: a killed export's is
    removed by the next export into that path), then rename it into place."""
    tmp = temp_beside(output)
    try:
        with translate_os_errors(output):
            tmp.mkdir(parents=True)
            atomic_save_safetensors(tmp / "adapter_model.safetensors", tensors)
            atomic_write_json(tmp / "adapter_config.json", config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, output, overwrite=False, what="the exported adapter")
