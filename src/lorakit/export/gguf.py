"""Write a PEFT-format adapter as a llama.cpp LoRA adapter GGUF.

The file matches what llama.cpp's ``convert_lora_to_gguf.py`` writes and what its loader
(``src/llama-adapter.cpp``) checks (docs/export.md cites each source):

    general.architecture = "llama" | "qwen2" | ...   must equal the base model's GGUF
    general.type         = "adapter"
    adapter.type         = "lora"
    adapter.lora.alpha   = lora_alpha (float32)
    blk.N.attn_q.weight.lora_a   numpy (r, in)  = A          GGUF ne = [in, r]
    blk.N.attn_q.weight.lora_b   numpy (out, r) = B          GGUF ne = [r, out]

Tensor names come from the gguf package's own HF -> GGUF tables (gguf.get_tensor_name_map),
the same tables the converter uses. Two transforms keep the adapter consistent with the base
GGUF it will be applied to:

- Llama-family bases (llama, mistral): the converter permutes the rows of q_proj and k_proj
  (``LlamaModel.permute``) to interleave rotary pairs, so the same row permutation is applied
  to lora_B of those modules (B's rows are the output rows; A is untouched).
- Scale: llama.cpp applies ``alpha / rank`` with ONE alpha per file and the rank read from each
  tensor. PEFT applies ``alpha_m / r_m`` per module (alpha_pattern) or ``alpha / sqrt(r)``
  (rsLoRA). Where they differ, the ratio is baked into lora_b, so that
  ``gguf_alpha / r_m * b @ a == peft_scaling_m * B @ A`` for every module.

Embedding LoRA (lora_embedding_A/B on embed_tokens) is written as llama.cpp expects it: lora_a
transposed, (vocab, r). DoRA, LoRA bias and modules_to_save full weights have no GGUF adapter
form and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from lorakit.errors import AdapterFileError, ConfigError, OutputError
from lorakit.export.adapter_files import (Adapter, LoraPair, base_shape_problems, export_tensor_problems,
                                         find_base_config, read_for_export, refuse_another_base)
from lorakit.lora.io import base_rewriting_init, unsupported_options
from lorakit.safe_io import atomic_write_with, translate_os_errors

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
DEFAULT_OUTTYPE = "f32"  # convert_lora_to_gguf.py's default --outtype


@dataclass(frozen=True)
class ArchSpec:
    """How a Hugging Face architecture maps onto a GGUF one."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # the converter permutes q/k rows for rotary (LlamaModel.permute)


# Hugging Face architectures -> what convert_hf_to_gguf.py registers them as
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "LLaMAForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, False),
    "GPT2LMHeadModel": ArchSpec(gguf.MODEL_ARCH.GPT2, False),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@dataclass
class GgufExport:
    output: Path
    arch: str
    alpha: float
    outtype: str
    tensors: int
    baked: dict[str, float] = field(default_factory=dict)  # module -> factor folded into lora_b

    def to_dict(self) -> dict:
        return {"format": "gguf", "output": str(self.output), "arch": self.arch, "alpha": self.alpha,
                "outtype": self.outtype, "tensors": self.tensors, "baked_scale_factors": self.baked}


def export_gguf(
    adapter_dir: str | Path,
    output: str | Path,
    base_config_dir: str | Path | None = None,
    outtype: str = DEFAULT_OUTTYPE,
    allow_pickle: bool = False,
    allow_other_base: bool = False,
) -> GgufExport:
    """Convert the adapter in ``adapter_dir`` to a llama.cpp LoRA GGUF at ``output``."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    adapter = read_for_export(adapter_dir, allow_pickle=allow_pickle)
    base_config = find_base_config(adapter, base_config_dir)
    refuse_another_base(adapter, base_config, allow_other_base)
    _refuse_unconvertible(adapter, base_config)
    spec = arch_spec(base_config)
    alpha = float(adapter.config["lora_alpha"])
    tensors, baked = gguf_tensors(adapter, base_config, spec, alpha)
    path = _output_path(Path(output), adapter.folder, outtype)
    arch_name = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    _write_gguf(path, arch_name, adapter.folder.name, alpha, outtype, tensors)
    return GgufExport(path, arch_name, alpha, outtype, len(tensors), baked)


def _refuse_unconvertible(adapter: Adapter, base_config: dict | None) -> None:
    problems = base_shape_problems(adapter, base_config)
    if adapter.config.get("use_dora") or adapter.magnitudes:
        problems.append("it is a DoRA adapter: llama.cpp has no DoRA; use --format merged")
    if adapter.biases or adapter.config.get("lora_bias") or adapter.config.get("bias", "none") != "none":
        problems.append("it trains biases: llama.cpp LoRA adapters have no bias; use --format merged")
    if adapter.other_keys or adapter.config.get("modules_to_save"):
        shown = adapter.other_keys[:3] or adapter.config.get("modules_to_save")
        problems.append(f"it holds fully trained modules ({shown}): a GGUF adapter carries only LoRA "
                        "factors; use --format merged")
    problems += [f"it sets the PEFT option {option}: a GGUF adapter holds plain LoRA factors only; load it "
                 "with PEFT instead" for option in unsupported_options(adapter.config)]
    init = base_rewriting_init(adapter.config)
    if init is not None:
        problems.append(f"init_lora_weights is {init!r}: its factors apply to a rewritten base weight, which "
                        "llama.cpp does not make; use --format merged")
    problems += export_tensor_problems(adapter)
    if problems:
        raise AdapterFileError(f"{adapter.folder} cannot be written as a GGUF adapter:\n  - " + "\n  - ".join(problems))


def arch_spec(base_config: dict | None) -> ArchSpec:
    """The GGUF architecture for a base model's config.json."""
    if base_config is None:
        raise ConfigError(
            "the base model's architecture is unknown: the adapter's base_model_name_or_path is not a "
            "local folder with config.json; pass --model DIR (the base model's folder)"
        )
    names = list(base_config.get("architectures") or [])
    if base_config.get("model_type") in _MODEL_TYPES:
        names.append(_MODEL_TYPES[base_config["model_type"]])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConfigError(
        f"base architecture {names or base_config.get('model_type')!r} is not supported for GGUF export; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def gguf_tensors(
    adapter: Adapter, base_config: dict, spec: ArchSpec, alpha: float
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """GGUF base-tensor name -> (lora_a, lora_b) as float32 arrays, and the baked factors."""
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, _block_count(base_config, adapter))
    out, baked, unmapped = {}, {}, []
    for module in sorted(adapter.pairs):
        pair = adapter.pairs[module]
        name = name_map.get_name(_hf_weight_name(module), try_suffixes=(".weight",))
        if name is None:
            unmapped.append(module)
            continue
        _refuse_tied_output(name, base_config)
        factor = adapter.scaling(module) / (alpha / pair.rank)
        if not math.isclose(factor, 1.0, rel_tol=1e-6):
            baked[module] = factor
        out[name] = _factors(pair, name, factor, base_config, spec)
    if unmapped:
        raise AdapterFileError(
            f"no GGUF tensor for these {gguf.MODEL_ARCH_NAMES[spec.gguf_arch]} modules: {', '.join(unmapped)}; "
            "check that the adapter was trained on this base model (--model)"
        )
    return out, baked


def _hf_weight_name(module: str) -> str:
    # vision-language wrappers put the text model under language_model (as the converter strips)
    for prefix, replacement in (("model.language_model.", "model."), ("language_model.", "")):
        if module.startswith(prefix):
            module = replacement + module[len(prefix):]
            break
    return module + ".weight"


def _block_count(base_config: dict, adapter: Adapter) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(base_config.get(key), int):
            return base_config[key]
    indices = [int(p) for m in adapter.pairs for p in m.split(".") if p.isdigit()]
    return max(indices, default=0) + 1


def _refuse_tied_output(name: str, base_config: dict) -> None:
    # a tied lm_head has no output tensor of its own in the base GGUF (llama.cpp issue 9065)
    if name == "output.weight" and base_config.get("tie_word_embeddings", False):
        raise AdapterFileError(
            "the adapter has LoRA on lm_head, but the base model ties lm_head to embed_tokens, so its "
            "GGUF has no separate output tensor to apply it to; retrain without lm_head or use --format merged"
        )


def _factors(pair: LoraPair, name: str, factor: float, base_config: dict, spec: ArchSpec):
    a = pair.A.detach().to(torch.float32)  # (r, in); embedding: (r, vocab)
    b = pair.B.detach().to(torch.float32) * factor  # (out, r); embedding: (hidden, r)
    if pair.kind == "embedding":
        return a.T.contiguous().numpy(), b.numpy()  # llama.cpp reads token_embd.lora_a as (vocab, r)
    if spec.permute_qk and name.endswith((".attn_q.weight", ".attn_k.weight")):
        n_head = int(base_config["num_attention_heads"])
        heads = n_head if ".attn_q." in name else int(base_config.get("num_key_value_heads") or n_head)
        b = rotary_permute(b, heads, name)
    return a.numpy(), b.contiguous().numpy()


def rotary_permute(rows: torch.Tensor, n_head: int, name: str = "tensor") -> torch.Tensor:
    """Reorder output rows as convert_hf_to_gguf.py's LlamaModel.permute does: within each head,
    HF's split halves [x0..x(d/2-1), y0..y(d/2-1)] become interleaved pairs [x0, y0, x1, y1, ...]."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise AdapterFileError(f"{name}: {out} output rows do not split into {n_head} rotary heads; wrong base config?")
    head_half = out // n_head // 2
    # (n_head, 2, d/2, r) -> (n_head, d/2, 2, r): row h*d + j*(d/2) + i moves to h*d + 2*i + j
    return rows.reshape(n_head, 2, head_half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _output_path(output: Path, adapter_folder: Path, outtype: str) -> Path:
    path = output / f"{_adapter_name(adapter_folder)}-lora-{outtype}.gguf" if output.is_dir() else output
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"--output {output} must be a file name ending in .gguf (e.g. adapter.gguf), or an "
                          "existing folder to write into")
    if path.exists():  # as vllm and merged exports: never replace a file the user has
        raise OutputError(f"{path} already exists; choose another --output, or delete it first")
    return path


def _adapter_name(adapter_folder: Path) -> str:
    """The folder's name, or for a training run's adapter (runs/NAME/adapter) the run's: every run's
    adapter folder is called "adapter", and two runs exported into one folder would collide."""
    from lorakit.lora.adapter_folder import run_of

    return (run_of(adapter_folder) or adapter_folder.resolve()).name


def _write_gguf(path: Path, arch: str, name: str, alpha: float, outtype: str, tensors: dict) -> None:
    """Write to a temp file beside ``path``, read it back, and rename it into place."""
    qtype, file_type = OUTTYPES[outtype]

    def fill(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        _add_metadata(writer, name, alpha, file_type)
        for base_name, (lora_a, lora_b) in tensors.items():
            writer.add_tensor(f"{base_name}.lora_a", _encode(lora_a, qtype), raw_dtype=qtype)
            writer.add_tensor(f"{base_name}.lora_b", _encode(lora_b, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_written(tmp, path, 2 * len(tensors))

    with translate_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, fill)


def _check_written(tmp: Path, path: Path, expected_tensors: int) -> None:
    """Read the file back: numpy's tofile, which the writer uses, can lose a failed write (a full
    disk) without raising, and the cut-off file would be renamed into place."""
    try:
        found = len(gguf.GGUFReader(tmp).tensors)
    except Exception:  # noqa: BLE001  (any parse failure: the file is not what was written)
        found = -1
    if found != expected_tensors:
        raise OutputError(f"{path} could not be written completely (is the disk full?); nothing was written: "
                          "free some space or choose another --output")


def _add_metadata(writer: gguf.GGUFWriter, name: str, alpha: float, file_type: gguf.LlamaFileType) -> None:
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):  # an overflow is reported below, in one line
            half = np.ascontiguousarray(array, dtype=np.float16)
        if not np.isfinite(half).all():
            raise AdapterFileError("a LoRA factor exceeds float16's range (65504); use --outtype f32 or bf16")
        return half
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)  # bf16 as raw bytes
