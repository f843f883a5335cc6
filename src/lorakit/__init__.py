"""lorakit: fine-tune LLMs with LoRA, and choose rank, alpha and target modules with evidence."""

import importlib

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "apply_lora", "disable_adapters", "load_adapter", "lora_report", "merge_lora", "remove_lora",
    "save_adapter", "trainable_parameters", "unmerge_lora", "__version__",
]


def __getattr__(name: str):
    """The engine's API and lorakit's modules, imported when first used: `import lorakit.cli`
    (every command's start) then loads no torch, so that `lorakit --help` is quick and a Ctrl-C
    while the libraries load reaches the command line's handler instead of a traceback."""
    if name in __all__:
        return getattr(importlib.import_module("lorakit.lora"), name)
    if name.startswith("__"):  # probes (__wrapped__, __file__ of a zip import, ...): never a module
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    try:
        return importlib.import_module(f"lorakit.{name}")  # lorakit.lora, as `import lorakit` once gave
    except ModuleNotFoundError as exc:
        if exc.name != f"lorakit.{name}":
            raise
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
