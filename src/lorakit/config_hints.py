"""What an unknown key in a YAML config probably meant: a typo of a lorakit option, or the name
another tool gives the same setting (PEFT, transformers' TrainingArguments, Axolotl,
LLaMA-Factory, torchtune), so a config carried over from one is told lorakit's spelling.

Only a hint: lorakit reads one spelling per option, so a config never means two things.
"""

from __future__ import annotations

import difflib

# other tools' names -> lorakit's option (the flat key, as `lorakit train --help` spells the flag)
PEER_NAMES = {
    "base_model": "model", "model_name_or_path": "model", "model_name": "model", "model_id": "model",
    "torch_dtype": "dtype", "bf16": "dtype", "fp16": "dtype",
    "load_in_4bit": "quantize", "load_in_8bit": "quantize",
    "datasets": "data", "dataset": "data", "train_file": "data", "data_files": "data",
    "sequence_len": "seq_len", "max_seq_length": "seq_len", "max_seq_len": "seq_len", "cutoff_len": "seq_len",
    "max_length": "seq_len", "sample_packing": "packing",
    "val_set_size": "eval_split", "val_size": "eval_split",
    "field_instruction": "columns", "field_input": "columns", "field_output": "columns", "field_system": "columns",
    "field_messages": "columns", "column_mapping": "columns",
    "lora_r": "r", "rank": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target": "targets", "lora_target_modules": "targets",
    "lora_attn_modules": "targets", "lora_target_linear": "targets",
    "exclude_modules": "exclude", "use_rslora": "rslora", "use_dora": "dora", "init_lora_weights": "init",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler": "schedule", "lr_scheduler_type": "schedule",
    "gradient_checkpointing": "grad_checkpointing", "enable_activation_checkpointing": "grad_checkpointing",
    "eval_steps": "eval_every", "save_steps": "save_every", "logging_steps": "log_every",
    "output_dir": "output", "resume_from_checkpoint": "resume", "save_total_limit": "keep_checkpoints",
    "overwrite_output_dir": "overwrite", "report_to": "tensorboard",
}


def hint(key, section: str | None, known: list[str], owners: dict[str, str], sections: tuple[str, ...] = ()) -> str:
    """`key` with what it probably meant, e.g. "learning_rate (lorakit's name: lr)", or the key
    alone. `section` is where it stood (`train.learning_rate`) or None for a flat key; `known`
    the keys that place may hold; `owners` every option's section, by each of its spellings;
    `sections` the sections' names."""
    shown = f"{section}.{key}" if section else str(key)  # YAML keys may be numbers, booleans or null
    normal = str(key).strip().lower().replace("-", "_")
    if section and normal in sections:  # `train: {lora: ...}`
        return f"{shown} ({normal}: is a section of its own, at the top level)"
    close = difflib.get_close_matches(normal, [*known, *PEER_NAMES], n=1, cutoff=0.75)
    meant = normal if normal in PEER_NAMES or normal in owners else (close[0] if close else None)
    name = PEER_NAMES.get(meant, meant)
    if section and owners.get(name, section) != section:  # `lora: {lr: ...}`
        return f"{shown} (lorakit's {name} goes under {owners[name]}: or at the top level)"
    if meant in PEER_NAMES:  # another tool's name, or a typo of one
        return f"{shown} (lorakit's name: {name})"
    return f"{shown} (did you mean {meant}?)" if meant else shown
