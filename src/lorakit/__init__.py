"""lorakit: fine-tune LLMs with LoRA, and choose rank, alpha and target modules with evidence."""

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "apply_lora", "disable_adapters", "load_adapter", "lora_report", "merge_lora", "remove_lora",
    "save_adapter", "trainable_parameters", "unmerge_lora", "__version__",
]


def __getattr__(name: str):
    """The engine's API, imported when first used: `import lorakit.cli` (every command's start)
    then loads no torch, so that `lorakit --help` is quick and a Ctrl-C while the libraries load
    reaches the command line's handler instead of a traceback."""
    if name in __all__:
        from lorakit import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
