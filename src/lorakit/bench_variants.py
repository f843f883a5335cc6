"""The variants `lorakit bench` compares, built: a fresh seeded model each, its adapters, loss and
optimizer, as its row of bench_table.VARIANTS says (the table lists them and what each measures)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lorakit.bench_table import TARGETS, VARIANTS, Variant
from lorakit.host import keep_freed_memory
from lorakit.kernels.cuda_graph import CapturedStep, keep_plain_rows_unmasked
from lorakit.kernels.llama_patch import wants_triton
from lorakit.train.memory_plan import checkpoint_layers

LR = 1e-4


def build_model(plan) -> torch.nn.Module:
    """A random-initialised LlamaForCausalLM of the plan's shape, dtype and device (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**plan.shape)
    torch.manual_seed(plan.settings.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, plan.dtype))  # built in place: an 8b fp32 copy is 32 GB
    try:
        with torch.device(plan.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if plan.settings.grad_checkpointing:
        with warnings.catch_warnings():  # renamed in recent transformers; the old name works in all
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@dataclass
class Prepared:
    model: torch.nn.Module
    loss_fn: object  # batch -> 0-dim loss
    optimizer: torch.optim.Optimizer
    inputs_key: str  # "lorakit" or "peft": which batch this variant trains on
    notices: list[str]
    gemm_backend: str | None = None  # cpu_gemm's backend for this variant's steps; None: its own choice
    triton_launch: str | None = None  # triton_launch's launch mode for this variant's steps; None: the process's
    captured: CapturedStep | None = None  # lorakit-graphed: forward and backward as one replayed graph


def prepare_variant(name: str, plan) -> Prepared:
    """A fresh model with the variant's adapters, loss and optimizer."""
    variant = VARIANTS[name]
    if variant.liger:
        _apply_liger()  # before the model exists: it swaps classes' forwards
    model = build_model(plan)
    if variant.peft:
        model = add_peft_adapters(model, plan, autocast_adapter_dtype=variant.fp32_adapters)
        loss_fn, notices, key = hf_loss(model), [], "peft"
    else:
        notices = _lorakit_fast_paths(model, variant, plan)
        key = "lorakit" if variant.fused and not variant.mask_4d else "lorakit-4d"  # packed: varlen rows or 4D mask
        loss_fn = lorakit_loss(model, plan, chunked=variant.chunked)
        _lorakit_checkpointing(model, name, variant, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    fused_adamw = {} if variant.peft else {"fused": True}  # the trainer's (CUDA and CPU)
    optimizer = torch.optim.AdamW(params, lr=LR, **fused_adamw)
    captured = None
    if variant.graphed:
        keep_plain_rows_unmasked(model)
        captured = CapturedStep(loss_fn, params)
    return Prepared(model, loss_fn, optimizer, key, notices, gemm_backend=variant.gemm_backend,
                    triton_launch=variant.triton_launch, captured=captured)


def _lorakit_fast_paths(model, variant: Variant, plan) -> list[str]:
    triton = variant.triton and wants_triton("auto", torch.device(plan.device))  # as the trainer
    notices = add_lorakit_adapters(model, plan, fused=variant.fused, triton=triton, varlen=not variant.mask_4d,
                                   native=variant.native, stack=variant.stack)
    if variant.fused and plan.device == "cpu":  # as the trainer's fast paths (a CPU variant has its own process)
        keep_freed_memory()
    if variant.per_document:
        from lorakit.kernels.varlen_attention import per_document_only

        per_document_only(model)
    return notices


def _lorakit_checkpointing(model, name: str, variant: Variant, plan) -> None:
    """--memory-budget's earliest layers, or with --grad-checkpointing the trainer's checkpointing
    (transformers' own, which build_model set, for `checkpointing="transformers"`)."""
    if plan.checkpoint_layers.get(name):
        checkpoint_layers(model, plan.checkpoint_layers[name])
    if plan.settings.grad_checkpointing and variant.checkpointing != "transformers":
        checkpoint_layers(model, offload=variant.checkpointing == "offload")


def add_lorakit_adapters(model, plan, fused: bool, triton: bool = False, varlen: bool = True,
                         native: bool = True, stack: bool | None = None) -> list[str]:
    """apply_lora; with `fused` the trainer's fast paths (and, packed, its varlen attention)."""
    from lorakit.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=plan.settings.r, alpha=2 * plan.settings.r, target_modules=TARGETS,
                                 dropout=plan.settings.dropout))
    if not fused:
        return []
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.kernels.varlen_attention import use_varlen_attention

    notices = enable_fast_paths(model, triton=triton, native=native, stack=stack)
    return notices + (use_varlen_attention(model) if varlen and plan.settings.packing else [])


def add_peft_adapters(model, plan, autocast_adapter_dtype: bool = True):
    from lorakit.quantize import quiet_hub_kernel_advice

    quiet_hub_kernel_advice()  # PEFT imports bitsandbytes
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=plan.settings.r, lora_alpha=2 * plan.settings.r, lora_dropout=plan.settings.dropout,
                            target_modules=TARGETS)
    return get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)


def hf_loss(model):
    """The model's own loss: full logits, upcast to fp32, then cross-entropy."""
    return lambda batch: model(**batch, use_cache=False).loss


def lorakit_loss(model, plan, chunked: bool):
    if not chunked:
        return hf_loss(model)
    from lorakit.kernels.causal_loss import causal_lm_loss

    return lambda batch: causal_lm_loss(model, batch, chunk_size=plan.settings.chunk_size)


def _apply_liger() -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
