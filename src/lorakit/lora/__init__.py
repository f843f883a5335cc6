"""The LoRA engine: config, layer, target selection, apply/merge, PEFT-format IO."""

from lorakit.lora.config import LoraConfig
from lorakit.lora.io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from lorakit.lora.layer import LoraLinear
from lorakit.lora.model import (
    apply_lora,
    base_fingerprint,
    disable_adapters,
    lora_layers,
    lora_report,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from lorakit.lora.targets import select_targets

__all__ = [
    "LoraConfig", "LoraLinear", "adapter_state_dict", "apply_lora", "base_fingerprint", "disable_adapters",
    "load_adapter", "lora_layers", "lora_report", "merge_lora", "read_adapter", "remove_lora", "save_adapter",
    "select_targets", "trainable_parameters", "unmerge_lora",
]
