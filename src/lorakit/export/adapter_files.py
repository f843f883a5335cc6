"""Read a PEFT-format adapter folder safely and group its tensors per adapted module.

An adapter folder holds::

    adapter_config.json          r, lora_alpha, target_modules, use_rslora, use_dora,
                                 rank_pattern, alpha_pattern, base_model_name_or_path, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_B.weight   (out, r)
                                 base_model.model.<module>.lora_embedding_A (r, vocab)
                                 base_model.model.<module>.lora_embedding_B (hidden, r)

so that a module's update is  delta_W = scaling * B @ A  (out, in), with
scaling = alpha / r (or alpha / sqrt(r) for rsLoRA) after rank_pattern / alpha_pattern.

Safety and clear failures come first, because exports are usually run on files copied from
elsewhere:

- the safetensors header is checked against the file size before loading, so a truncated
  file names the tensors it lost instead of failing with a parser message;
- pickle weights (``adapter_model.bin``) are refused unless ``allow_pickle``, and then read
  with ``torch.load(weights_only=True)`` (see ``lorakit.safe_io``);
- keys are normalised to PEFT's ``base_model.model.`` prefix (and an adapter-name infix such
  as ``lora_A.default.weight`` is dropped), so adapters saved by other tools pair up too;
- ``tensor_problems`` names every lora_A without its lora_B (and the reverse), every shape
  that does not chain, and every tensor that is not floating point or not finite.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.lora.config import pattern_value
from lorakit.safe_io import load_safetensors_checked, load_tensor_file, refuse_pickle

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."

# the parts of a key that say which LoRA factor it is; the text before them is the module
_FACTOR_ROLES = {
    "lora_A": ("A", "linear"),
    "lora_B": ("B", "linear"),
    "lora_embedding_A": ("A", "embedding"),
    "lora_embedding_B": ("B", "embedding"),
    "lora_magnitude_vector": ("magnitude", "dora"),
}


@dataclass
class LoraPair:
    """The two factors of one adapted module. ``module`` has no ``base_model.model.`` prefix."""

    module: str
    kind: str = "linear"  # "linear" (lora_A/lora_B) or "embedding" (lora_embedding_A/B)
    A: torch.Tensor | None = None  # (r, in) linear, (r, vocab) embedding
    B: torch.Tensor | None = None  # (out, r) linear, (hidden, r) embedding

    @property
    def rank(self) -> int:
        return int(self.A.shape[0]) if self.A is not None else int(self.B.shape[-1])

    def peft_key(self, factor: str) -> str:
        """The canonical PEFT key of factor "A" or "B"."""
        if self.kind == "embedding":
            return f"{PEFT_PREFIX}{self.module}.lora_embedding_{factor}"
        return f"{PEFT_PREFIX}{self.module}.lora_{factor}.weight"


@dataclass
class Adapter:
    """A loaded adapter folder: its config, its tensors grouped per module, and the rest."""

    folder: Path
    config: dict
    weights_file: Path
    pairs: dict[str, LoraPair]
    magnitudes: list[str] = field(default_factory=list)  # DoRA magnitude-vector keys
    biases: list[str] = field(default_factory=list)  # lora_B.bias keys (PEFT lora_bias)
    base_copies: list[str] = field(default_factory=list)  # *.base_layer.weight copies
    other_keys: list[str] = field(default_factory=list)  # full weights: modules_to_save, ...

    def uses_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def expected_rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and alpha of ``module`` per adapter_config (rank_pattern / alpha_pattern)."""
        r = pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        """The factor PEFT multiplies B @ A by for ``module``, using the tensors' rank."""
        _, alpha = self.expected_rank_and_alpha(module)
        rank = self.pairs[module].rank
        return alpha / math.sqrt(rank) if self.uses_rslora() else alpha / rank


def read_adapter(folder: str | Path, allow_pickle: bool = False) -> Adapter:
    """Read and group an adapter folder. Raises AdapterFileError naming what is wrong."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_file = find_weights_file(folder, allow_pickle)
    tensors = read_tensors(weights_file, allow_pickle)
    adapter = Adapter(folder, config, weights_file, pairs={})
    for key, tensor in tensors.items():
        _file_tensor(adapter, key, tensor)
    return adapter


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json as a dict, with r and lora_alpha checked."""
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist or is not a folder: check --adapter")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: an adapter folder needs {CONFIG_FILE} and {SAFETENSORS_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterFileError(
            f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix or re-save the adapter"
        ) from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}")
    _check_config_fields(path, config)
    return config


def _check_config_fields(path: Path, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {peft_type!r}; only LoRA adapters can be exported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterFileError(f"{path}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterFileError(f"{path}: field 'lora_alpha' must be a positive number, got {alpha!r}")


def find_weights_file(folder: Path, allow_pickle: bool) -> Path:
    """adapter_model.safetensors, or a pickle file only when ``allow_pickle``."""
    safetensors_path = folder / SAFETENSORS_FILE
    if safetensors_path.is_file():
        return safetensors_path
    for name in PICKLE_FILES:
        path = folder / name
        if path.is_file():
            refuse_pickle(path, allow_pickle)  # raises AdapterFileError without allow_pickle
            return path
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise AdapterFileError(f"{folder} has no {SAFETENSORS_FILE} (it holds: {present}): save the adapter again")


def read_tensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a weights file; a truncated safetensors file names the tensors it lost."""
    if path.suffix == ".safetensors":
        check_safetensors_complete(path)
        return load_safetensors_checked(path)
    return load_tensor_file(path, allow_pickle=allow_pickle)


def check_safetensors_complete(path: Path) -> None:
    """Compare the header's byte ranges with the file size (safetensors layout:
    8-byte little-endian header length, JSON header, then the tensors' bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path} is truncated ({size} bytes, no header): re-copy or re-save the adapter")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise AdapterFileError(
                f"{path} is truncated inside its header ({size} bytes, header needs {8 + header_len}): "
                "re-copy or re-save the adapter"
            )
        header = _parse_header(path, fh.read(header_len))
    cut = [name for name, info in header.items() if 8 + header_len + info["data_offsets"][1] > size]
    if cut:
        shown = ", ".join(sorted(cut)[:8]) + (f" and {len(cut) - 8} more" if len(cut) > 8 else "")
        raise AdapterFileError(
            f"{path} is truncated ({size} bytes): these tensors are cut off: {shown}; "
            "re-copy or re-save the adapter"
        )


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFileError(
            f"{path} has a damaged header: it is not a safetensors file; re-save the adapter"
        ) from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} has a damaged header: re-save the adapter")
    header.pop("__metadata__", None)
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFileError(f"{path}: header entry for {name!r} has no valid data_offsets; re-save the adapter")
    return header


def split_key(key: str) -> tuple[str, str, str]:
    """(module, role, kind) of a tensor key. role: "A", "B", "magnitude", "bias",
    "base_copy" or "other"; kind: "linear", "embedding", "dora" or ""."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    # the factor name sits among the last three parts: lora_A[.<adapter name>][.weight|.bias]
    for i in range(len(parts) - 1, max(len(parts) - 4, 0), -1):
        if parts[i] in _FACTOR_ROLES:
            module = ".".join(parts[:i])
            role, kind = _FACTOR_ROLES[parts[i]]
            if parts[i] == "lora_B" and parts[-1] == "bias":
                return module, "bias", kind
            return module, role, kind
    if name.endswith(".base_layer.weight"):
        return name.removesuffix(".base_layer.weight"), "base_copy", ""
    return name, "other", ""


def _file_tensor(adapter: Adapter, key: str, tensor: torch.Tensor) -> None:
    module, role, kind = split_key(key)
    if role in ("A", "B"):
        pair = adapter.pairs.setdefault(module, LoraPair(module, kind))
        if getattr(pair, role) is not None:
            raise AdapterFileError(f"{adapter.weights_file}: two tensors give lora_{role} of {module} (one is {key})")
        pair.kind = kind
        setattr(pair, role, tensor)
        return
    bucket = {"magnitude": adapter.magnitudes, "bias": adapter.biases, "base_copy": adapter.base_copies}
    bucket.get(role, adapter.other_keys).append(key)


def tensor_problems(adapter: Adapter) -> list[str]:
    """Every pairing, shape, dtype and rank problem of the LoRA factors, one line each."""
    problems: list[str] = []
    if not adapter.pairs:
        problems.append(f"{adapter.weights_file} holds no lora_A / lora_B tensors")
    for module in sorted(adapter.pairs):
        problems += _pair_problems(adapter, adapter.pairs[module])
    return problems


def _pair_problems(adapter: Adapter, pair: LoraPair) -> list[str]:
    for have, missing in (("A", "B"), ("B", "A")):
        if getattr(pair, missing) is None:
            return [f"{pair.module}: has lora_{have} but {pair.peft_key(missing)} is missing"]
    out: list[str] = []
    for factor in ("A", "B"):
        tensor = getattr(pair, factor)
        if tensor.dim() != 2:
            out.append(f"{pair.peft_key(factor)} has shape {tuple(tensor.shape)}; a LoRA factor is 2-D")
        elif not tensor.is_floating_point():
            out.append(f"{pair.peft_key(factor)} has dtype {tensor.dtype}; LoRA factors must be floating point")
        elif not torch.isfinite(tensor).all():
            out.append(f"{pair.peft_key(factor)} holds NaN or inf values; the adapter is damaged")
    if out:
        return out
    return _shape_problems(adapter, pair)


def _shape_problems(adapter: Adapter, pair: LoraPair) -> list[str]:
    if pair.A.shape[0] != pair.B.shape[1]:
        return [
            f"{pair.module}: lora_A is {tuple(pair.A.shape)} and lora_B is {tuple(pair.B.shape)}; "
            "their ranks differ (A is (r, in), B is (out, r))"
        ]
    expected, _ = adapter.expected_rank_and_alpha(pair.module)
    if pair.rank != expected:
        return [f"{pair.module}: tensors have rank {pair.rank} but adapter_config gives r={expected} for it"]
    return []


def find_base_config(adapter: Adapter, base_config_dir: str | Path | None = None) -> dict | None:
    """The base model's config.json: from ``base_config_dir`` if given, else from the adapter's
    base_model_name_or_path when that is a local folder. None when neither is available."""
    if base_config_dir is not None:
        path = Path(base_config_dir)
        path = path if path.name == "config.json" else path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--base-config: {path} does not exist; give the base model's folder (with config.json)")
        return _read_json(path)
    base = adapter.config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    for candidate in (Path(base), adapter.folder / base):
        if (candidate / "config.json").is_file():
            return _read_json(candidate / "config.json")
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
