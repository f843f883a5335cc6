"""Reading an adapter folder in PEFT's format: the one reader behind load, analyze and export.

    ADAPTER_DIR/
      adapter_config.json          peft_type "LORA", r, lora_alpha, use_rslora, use_dora,
                                   rank_pattern, alpha_pattern, modules_to_save, ...
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight         (r, in)
        (adapter_model.bin / .pt   base_model.model.<module>.lora_B.weight         (out, r)
         only with allow_pickle)   base_model.model.<module>.lora_embedding_A      (r, vocab)
                                   base_model.model.<module>.lora_embedding_B      (hidden, r)
                                   base_model.model.<module>.lora_magnitude_vector (DoRA, out)
                                   base_model.model.<module>.<param>               (modules_to_save)
        metadata                   lorakit_base_fingerprint, lorakit_version (PEFT ignores them)

A module's update is  delta_W = scaling * B @ A  with scaling = alpha / r (rsLoRA: alpha /
sqrt(r)), r the tensors' rank and alpha from alpha_pattern over lora_alpha.

Adapters are often copied from elsewhere, so each step fails with an AdapterFileError that names
the file and the fix:

1. the folder and adapter_config.json: valid JSON, a JSON object, peft_type LORA, r / lora_alpha
   / rank_pattern / alpha_pattern of the right types (absent ones take PEFT's defaults);
2. the weights: safetensors, or a pickle file only with ``allow_pickle`` (then loaded with
   ``weights_only=True``, see ``lorakit.safe_io``); the safetensors header is checked against
   the file size first, so a truncated file names the tensors it lost;
3. the keys: the ``base_model.model.`` prefix and an adapter-name infix (``lora_A.default.weight``)
   are dropped and the tensors grouped per module; two tensors for one factor are refused;
4. ``tensor_problems``: a factor without its partner, not floating point, NaN / inf anywhere,
   factors whose ranks do not chain. ``read_adapter_folder`` raises them; export passes
   ``check_tensors=False`` to list them beside its own problems.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import AdapterFileError, shortened
from lorakit.lora.config import lora_scale, pattern_value
from lorakit.safe_io import load_safetensors_checked, load_tensor_file, refuse_pickle
from lorakit.values import is_number, is_positive_int, is_positive_number

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "lorakit_base_fingerprint"
# the system turn every training record opened with (generate's default for --system)
SYSTEM_TURN_KEY = "lorakit_system_turn"
# a PiSSA adapter is saved as rank 2r against the original base (lora/io.py); this records the r it trained with
PISSA_RANK_KEY = "lorakit_pissa_trained_r"
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
_REFETCH = "re-copy or re-save the adapter"
_DIVERGED = "the adapter is damaged (a diverged run?): train it again or use an earlier checkpoint"

# the part of a key that says which tensor it is; the text before it is the module
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
        if self.A is not None and self.A.dim() >= 1:
            return int(self.A.shape[0])
        return int(self.B.shape[1]) if self.B is not None and self.B.dim() >= 2 else 0

    def peft_key(self, factor: str) -> str:
        """The canonical PEFT key of factor "A" or "B"."""
        if self.kind == "embedding":
            return f"{PEFT_PREFIX}{self.module}.lora_embedding_{factor}"
        return f"{PEFT_PREFIX}{self.module}.lora_{factor}.weight"


@dataclass
class Adapter:
    """An adapter read into memory: its config, its tensors grouped per module, its metadata.

    The key lists hold the keys as the file spells them."""

    folder: Path
    config: dict
    weights_file: Path
    tensors: dict[str, torch.Tensor]  # every tensor, under its key in the file
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata ({} for pickle)
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    magnitudes: list[str] = field(default_factory=list)  # DoRA magnitude-vector keys
    biases: list[str] = field(default_factory=list)  # lora_B.bias keys (PEFT lora_bias)
    base_copies: list[str] = field(default_factory=list)  # *.base_layer.weight copies
    other_keys: list[str] = field(default_factory=list)  # full weights: modules_to_save, ...

    @property
    def base_fingerprint(self) -> str | None:
        """The fingerprint of the base lorakit trained on (None: saved by another tool)."""
        return self.metadata.get(FINGERPRINT_KEY)

    def uses_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and alpha of ``module`` per adapter_config (rank_pattern / alpha_pattern)."""
        r = pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", PEFT_DEFAULT_R))
        alpha = pattern_value(self.config.get("alpha_pattern"), module,
                              self.config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        """The factor PEFT multiplies B @ A by for ``module``, using the tensors' rank."""
        _, alpha = self.rank_and_alpha(module)
        rank = self.pairs[module].rank
        return lora_scale(rank, alpha, "rslora" if self.uses_rslora() else "standard")

    def parameter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under the name its parameter has in a model lorakit adapted (prefix and
        adapter-name infix dropped): ``<module>.lora_A.weight``, ``lm_head.weight``, ..."""
        return {parameter_name(key): tensor for key, tensor in self.tensors.items()}


# ---- reading ------------------------------------------------------------------------------------

def read_adapter_folder(folder: str | Path, allow_pickle: bool = False, check_tensors: bool = True) -> Adapter:
    """Read, group and (unless ``check_tensors=False``) check an adapter folder."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_file = find_weights_file(folder, allow_pickle)
    tensors, metadata = read_weights(weights_file, allow_pickle)
    adapter = group_tensors(folder, config, weights_file, tensors, metadata)
    if check_tensors:
        raise_tensor_problems(adapter)
    return adapter


def adapter_from_memory(config: dict, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                        source: str | Path = "<memory>") -> Adapter:
    """The same checks and grouping for an adapter already in memory; ``source`` names it."""
    check_adapter_config(config, source)
    adapter = group_tensors(Path(str(source)), config, Path(str(source)), tensors, metadata or {})
    raise_tensor_problems(adapter)
    return adapter


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json as a dict, its fields checked (see check_adapter_config)."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():  # a mistyped path: the folder, not its file, is what is missing
        raise AdapterFileError(f"no adapter folder at {folder}; pass the folder that holds {CONFIG_FILE} "
                               f"and {WEIGHTS_FILE} (or a training run's folder)")
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; {missing_config_hint(folder)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON or UTF-8, or a number too long to read
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); restore it from the original adapter") from None
    except RecursionError:
        raise AdapterFileError(f"{path} is nested too deeply to be an adapter config; restore it from the original "
                               "adapter") from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    check_adapter_config(config, path)
    return config


def adapter_or_run_folder(path: str | Path) -> Path | str:
    """The adapter folder a command was given: a training run's folder (runs/NAME) stands for its
    adapter (runs/NAME/adapter), what users type after `lorakit train --output runs/NAME`. An empty
    path stays the empty string, for the command line's check of empty flags (Path("") is ".")."""
    if path == "":
        return path
    folder = Path(path)
    inside = folder / "adapter"
    if not (folder / CONFIG_FILE).exists() and (inside / CONFIG_FILE).is_file():
        return inside
    return folder


def lost_system_turn_note(adapter: str | Path) -> str | None:
    """For merge and export, whose outputs carry no metadata: the system turn the adapter was
    trained under, which whoever serves the result must now give as the system prompt."""
    path = Path(adapter) / WEIGHTS_FILE
    try:
        turn = safetensors_metadata(path).get(SYSTEM_TURN_KEY) if path.is_file() else None
    except (AdapterFileError, OSError):  # the command that read it has said what is wrong with it
        return None
    if not turn:
        return None
    return (f"note: the adapter was trained with every record opening on the system turn {shortened(turn)!r}; "
            "the result does not keep it: give it as the system prompt where you serve it")


def run_of(adapter: str | Path) -> Path | None:
    """The training run a folder is the adapter of (runs/NAME for runs/NAME/adapter, beside the
    run's config.yaml), or None."""
    folder = Path(adapter).resolve()
    run = folder.parent
    return run if folder.name == "adapter" and (run / "config.yaml").is_file() else None


def missing_config_hint(folder: Path) -> str:
    """What to pass instead of a folder without adapter_config.json: a run folder's adapter."""
    folder = Path(folder)
    if (folder / "adapter" / CONFIG_FILE).is_file():
        return f"this looks like a training run's folder: pass its adapter, {folder / 'adapter'}"
    run = folder.parent.parent  # runs/X/checkpoints/step-N: the training state, not an adapter folder
    if (folder / "manifest.json").is_file() and folder.parent.name == "checkpoints":
        return (f"this is a training checkpoint (for --resume), not an adapter folder: pass the run's adapter, "
                f"{run / 'adapter'}, once the run has finished")
    return f"an adapter folder needs {CONFIG_FILE} beside its weights"


def check_adapter_config(config, where: str | Path) -> None:
    """The fields lorakit reads must have PEFT's types; absent ones take PEFT's defaults."""
    if not isinstance(config, dict):
        raise AdapterFileError(f"{where} must hold a JSON object, not {type(config).__name__}; "
                               "restore it from the original adapter")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterFileError(f"{where} describes a {peft_type} adapter; lorakit reads LoRA adapters only: "
                               "pass a LoRA adapter folder")
    if "r" in config and not is_positive_int(config["r"]):
        raise AdapterFileError(f"{where}: r must be a positive integer, got {config['r']!r}; fix it or re-save the adapter")
    if "lora_alpha" in config and not _fits_a_scale(config["lora_alpha"]):
        raise AdapterFileError(f"{where}: lora_alpha must be a number above 0 that fits in float32 (at most "
                               f"{FLOAT32_MAX:.3g}), got {config['lora_alpha']!r}; fix it or re-save the adapter")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (is_number(dropout) and 0 <= dropout < 1):
        raise AdapterFileError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}; "
                               "fix it or re-save the adapter")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFileError(f"{where}: base_model_name_or_path must be the base model's id or folder, got "
                               f"{base!r}; fix it (a string, or null) or re-save the adapter")
    for key in ("use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise AdapterFileError(f"{where}: {key} must be true or false, got {config[key]!r}; "
                                   "fix it or re-save the adapter")
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterFileError(f"{where}: {key} must be a module name, a list of names or null, "
                                   f"got {value!r}; fix it or re-save the adapter")
        if isinstance(value, str) and key != "modules_to_save":
            _check_regex(value, key, where)
    for key, valid, what in (("rank_pattern", is_positive_int, "positive integers"),
                             ("alpha_pattern", _fits_a_scale, "numbers above 0 that fit in float32")):
        _check_pattern(config.get(key) or {}, key, valid, what, where)


def _check_pattern(pattern, key: str, valid, what: str, where) -> None:
    if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
        raise AdapterFileError(f"{where}: {key} must map module patterns to {what}, got {pattern!r}; "
                               "fix it or re-save the adapter")
    for regex in pattern:
        _check_regex(regex, f"{key} key", where)


def _check_regex(regex: str, what: str, where) -> None:
    try:
        re.compile(regex)
    except re.error as exc:
        raise AdapterFileError(f"{where}: {what} {regex!r} is not a valid regular expression ({exc}); "
                               "fix it or re-save the adapter") from None


FLOAT32_MAX = 3.4028234663852886e38


def _fits_a_scale(value) -> bool:
    """An alpha the GEMMs can scale by: above 0, finite in float32 (1e300 passed, then overflowed)."""
    return is_positive_number(value) and value <= FLOAT32_MAX


def find_weights_file(folder: Path, allow_pickle: bool = False) -> Path:
    """adapter_model.safetensors, or a pickle file only when ``allow_pickle``."""
    safetensors_path = folder / WEIGHTS_FILE
    if safetensors_path.is_file():
        return safetensors_path
    for name in PICKLE_WEIGHTS_FILES:
        path = folder / name
        if path.is_file():
            refuse_pickle(path, allow_pickle)  # raises AdapterFileError without allow_pickle
            return path
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise AdapterFileError(f"{folder} has no {WEIGHTS_FILE}; the adapter's weights are missing (the folder "
                           f"holds: {present}): copy them in or save the adapter again")


def read_weights(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor of a weights file, its safetensors metadata; {} for a pickle file)."""
    if path.suffix == ".safetensors":
        metadata = safetensors_metadata(path)
        return load_safetensors_checked(path), metadata
    return load_tensor_file(path, allow_pickle=allow_pickle), {}


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The file's metadata, after checking its header's byte ranges against the file size
    (layout: 8-byte little-endian header length, JSON header, then the tensors' bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path} is truncated ({size} bytes, no header), so it is not a valid "
                                   f"safetensors file: {_REFETCH}")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise AdapterFileError(f"{path} is truncated inside its header ({size} bytes, the header needs "
                                   f"{8 + header_len}), so it is not a valid safetensors file: {_REFETCH}")
        header = _parse_header(path, fh.read(header_len))
    metadata = header.pop("__metadata__", None) or {}
    cut = sorted(name for name, info in header.items() if 8 + header_len + info["data_offsets"][1] > size)
    if cut:
        shown = ", ".join(cut[:8]) + (f" and {len(cut) - 8} more" if len(cut) > 8 else "")
        raise AdapterFileError(f"{path} is truncated ({size} bytes), so it is not a valid safetensors file: "
                               f"these tensors are cut off: {shown}; {_REFETCH}")
    return metadata


def _parse_header(path: Path, raw: bytes) -> dict:
    damaged = f"{path} has a damaged header, so it is not a valid safetensors file: {_REFETCH}"
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFileError(damaged) from None
    if not isinstance(header, dict):
        raise AdapterFileError(damaged)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFileError(f"{path}: header entry for {name!r} has no valid data_offsets, so it is not "
                                   f"a valid safetensors file: {_REFETCH}")
    return header


# ---- grouping -----------------------------------------------------------------------------------

def split_key(key: str) -> tuple[str, str, str]:
    """(module, role, kind) of a tensor key. role: "A", "B", "magnitude", "bias",
    "base_copy" or "other"; kind: "linear", "embedding", "dora" or ""."""
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    # the role sits among the last three parts: lora_A[.<adapter name>][.weight|.bias]
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


def parameter_name(key: str) -> str:
    """The key's parameter name in a lorakit-adapted model (see Adapter.parameter_tensors)."""
    module, role, kind = split_key(key)
    if role in ("A", "B"):
        return f"{module}.lora_embedding_{role}" if kind == "embedding" else f"{module}.lora_{role}.weight"
    if role == "magnitude":
        return f"{module}.lora_magnitude_vector"
    if role == "bias":
        return f"{module}.lora_B.bias"
    if role == "base_copy":
        return f"{module}.base_layer.weight"
    return module


def group_tensors(folder: Path, config: dict, weights_file: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict) -> Adapter:
    """File each tensor under its module (factors) or in the list of its role."""
    adapter = Adapter(folder, config, weights_file, dict(tensors), dict(metadata))
    lists = {"magnitude": adapter.magnitudes, "bias": adapter.biases, "base_copy": adapter.base_copies}
    for key, tensor in tensors.items():
        module, role, kind = split_key(key)
        if role not in ("A", "B"):
            lists.get(role, adapter.other_keys).append(key)
            continue
        pair = adapter.pairs.setdefault(module, LoraPair(module, kind))
        if getattr(pair, role) is not None:
            raise AdapterFileError(f"{weights_file}: two tensors give lora_{role} of {module} (one is {key}); "
                                   "keep one adapter per folder")
        pair.kind = kind
        setattr(pair, role, tensor)
    return adapter


# ---- checking -----------------------------------------------------------------------------------

def tensor_problems(adapter: Adapter, check_config: bool = True) -> list[str]:
    """Every pairing, dtype, NaN / inf and shape problem of the tensors, one line each, and
    (check_config) every place adapter_config contradicts them: a rank, a module it does not target."""
    problems: list[str] = []
    if not adapter.pairs:
        problems.append(f"{adapter.weights_file.name} holds no LoRA tensors (no *.lora_A.weight / "
                        "*.lora_B.weight keys): pass a LoRA adapter folder")
    for module in sorted(adapter.pairs):
        problems += _pair_problems(adapter.pairs[module])
    for key in adapter.magnitudes + adapter.biases + adapter.base_copies + adapter.other_keys:
        if not _finite(adapter.tensors[key]):
            problems.append(f"{key} holds NaN or inf values; {_DIVERGED}")
    # PEFT builds each layer at the config's rank and would refuse these tensors; the scale needs it too
    for module, rank, expected in rank_mismatches(adapter) if check_config else []:
        problems.append(f"{module}: tensors have rank {rank} but adapter_config gives r={expected} for it")
    # PEFT builds layers from target_modules and skips tensors of any other module: lorakit would not
    untargeted = untargeted_modules(adapter) if check_config else []
    if untargeted:
        problems.append(f"adapter_config's {_targets_in_words(adapter.config)} does not cover {len(untargeted)} "
                        f"modules the tensors adapt (e.g. {untargeted[0]}), so PEFT would ignore their tensors; "
                        "list them in target_modules")
    return problems


def _targets_in_words(config: dict) -> str:
    targets = config.get("target_modules")
    shown = f"{len(targets)} names" if isinstance(targets, list) and len(targets) > 4 else repr(targets)
    return f"target_modules ({shown})" + (" less exclude_modules" if config.get("exclude_modules") else "")


def _pair_problems(pair: LoraPair) -> list[str]:
    for have, missing in (("A", "B"), ("B", "A")):
        if getattr(pair, missing) is None:
            return [f"{pair.module}: has lora_{have} but {pair.peft_key(missing)} is missing; the adapter is incomplete"]
    out: list[str] = []
    for factor in ("A", "B"):
        tensor = getattr(pair, factor)
        if not tensor.is_floating_point():
            out.append(f"{pair.peft_key(factor)} has dtype {tensor.dtype}; LoRA factors must be floating point")
        elif not _finite(tensor):
            out.append(f"{pair.peft_key(factor)} holds NaN or inf values; {_DIVERGED}")
    if not factors_chain(pair):
        out.append(f"{pair.module}: lora_A is {tuple(pair.A.shape)} and lora_B is {tuple(pair.B.shape)}; "
                   "they do not multiply (A is (r, in), B is (out, r))")
    elif pair.A.shape[0] == 0:  # its scale alpha / r would divide by zero
        out.append(f"{pair.module}: lora_A and lora_B have rank 0; the adapter is damaged: re-save it")
    return out


def factors_chain(pair: LoraPair) -> bool:
    """B (out, r[, 1, 1]) @ A (r, in[, k, k]) is defined: both present, ranks equal."""
    a, b = pair.A, pair.B
    if a is None or b is None or a.dim() < 2 or b.dim() < 2:
        return False
    return b.shape[1] == a.shape[0] and b[0].numel() == a.shape[0]


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def raise_tensor_problems(adapter: Adapter, check_config: bool = True) -> None:
    """One AdapterFileError naming every tensor problem (none: returns)."""
    problems = tensor_problems(adapter, check_config)
    if len(problems) == 1:
        raise AdapterFileError(f"{adapter.folder}: {problems[0]}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise AdapterFileError(f"{adapter.folder}: {len(problems)} problems with the adapter's tensors:\n  - "
                               + "\n  - ".join(shown))


def rank_mismatches(adapter: Adapter) -> list[tuple[str, int, int]]:
    """(module, the tensors' rank, adapter_config's r for it) where the two differ."""
    out = []
    for module in sorted(adapter.pairs):
        pair = adapter.pairs[module]
        expected, _ = adapter.rank_and_alpha(module)
        if factors_chain(pair) and pair.rank != expected:
            out.append((module, pair.rank, expected))
    return out


# the output layer's names, which PEFT's "all-linear" leaves out (Llama's, GPT-NeoX's, InternLM2's)
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output")


def untargeted_modules(adapter: Adapter) -> list[str]:
    """Modules holding LoRA factors that adapter_config's target_modules, by PEFT's rule, does not
    target (or exclude_modules removes). "all-linear" targets every linear layer but the output
    layer. An absent target_modules (adapters from some other tools) is read from the tensors: all
    of them (PEFT would take its default for the model type; lorakit's exports write the names)."""
    targets, exclude = adapter.config.get("target_modules"), adapter.config.get("exclude_modules")
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"  # PEFT lower-cases it
    return [module for module in sorted(adapter.pairs)
            if (all_linear and module.rsplit(".", 1)[-1] in OUTPUT_LAYER_NAMES)
            or (targets is not None and not all_linear and not _peft_targets(targets, module))
            or (exclude and _peft_targets(exclude, module))]


def _peft_targets(spec: str | list[str], module: str) -> bool:
    """PEFT's matching: a string is a regular expression the whole name must match; a list holds
    names matching the module's name or its last dotted parts."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == name or module.endswith("." + name) for name in spec)
