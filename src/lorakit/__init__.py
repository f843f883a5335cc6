"""lorakit: fine-tune LLMs with LoRA, and choose rank, alpha and target modules with evidence."""

__version__ = "0.1.0"

from lorakit.lora import (  # noqa: E402  (version first: io reads it)
    LoraConfig,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_report,
    merge_lora,
    remove_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)

__all__ = [
    "LoraConfig", "apply_lora", "disable_adapters", "load_adapter", "lora_report", "merge_lora", "remove_lora",
    "save_adapter", "trainable_parameters", "unmerge_lora", "__version__",
]
