"""The variants `lorakit bench` compares: a fresh seeded model each, its adapters, loss and optimizer,
as its row of VARIANTS says (where it departs from lorakit, and where it measures something of its own).

    lorakit        apply_lora + enable_fast_paths + causal_lm_loss (chunked lm_head + CE):
                   what `lorakit train` runs (on CUDA with the Triton RMSNorm, SwiGLU and RoPE)
    peft           get_peft_model defaults (autocast_adapter_dtype=True: fp32 adapters)
    peft-bf16      autocast_adapter_dtype=False: adapters in the base dtype
    peft-liger     PEFT + Liger's Triton kernels (patches transformers classes: runs last)
    lorakit-native CUDA ablation: lorakit with torch's ops for RMSNorm, SwiGLU, RoPE and the loss's
                   softmax instead of the Triton kernels (`lorakit train --no-triton-kernels`)
    lorakit-plain, lorakit-ce, lorakit-fused
                   ablations: no fast path / only the chunked loss / only the fused blocks
                   (with the native RMSNorm and RoPE on a CPU)
    lorakit-eager  CPU ablation: lorakit with transformers' own RMSNorm, RoPE and SDPA attention
                   (enable_fast_paths(native=False))
    lorakit-aten   CPU ablation: lorakit with torch's own GEMMs (MKL) where lorakit takes
                   oneDNN's (kernels/cpu_gemm.py; LORAKIT_CPU_GEMM=aten in the trainer)
    lorakit-4d     packed runs: lorakit with a block-causal 4D mask instead of per-document
                   (varlen) attention
    lorakit-perdoc packed runs on CUDA: lorakit with an SDPA call per document length instead of
                   torch's varlen kernel (the CPU's way)
    lorakit-offload
                   with --grad-checkpointing on CUDA: lorakit with each checkpointed layer's
                   input in host memory (the trainer's `--grad-checkpointing offload`)
    lorakit-fullrecompute
                   with --grad-checkpointing: lorakit under transformers' own checkpointing, whose
                   recompute also computes the MLP's output (the trainer's leaves it out)
    lorakit-unstacked
                   CUDA ablation: lorakit with the frozen gate and up weights each in its own
                   storage (enable_fast_paths(stack=False)): a GEMM each, not one for both
    lorakit-directlaunch
                   CUDA: lorakit with its Triton kernels launched directly (triton_launch.launch_mode
                   "direct", LORAKIT_TRITON_LAUNCH=direct in the trainer), not through Triton's
                   per-call binding; opt-in until measured
    lorakit-graphed
                   CUDA, plain rows: lorakit's forward and backward captured once as a CUDA graph and
                   replayed (kernels/cuda_graph.py; the optimizer steps outside it): what the host's
                   launches cost lorakit's step; bench only until measured

With --memory-budget GiB the lorakit variants checkpoint the earliest layers the memory estimate
says are needed to fit it (bench_settings.budget_checkpoint_layers), as `lorakit train --memory-budget` plans.

Packed runs (--packing): lorakit, lorakit-fused, lorakit-native and lorakit-perdoc switch the model to
lorakit_varlen attention and train on varlen rows, as the trainer does with its fast paths.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lorakit.kernels import cpu_gemm
from lorakit.kernels.cuda_graph import CapturedStep, keep_plain_rows_unmasked
from lorakit.kernels.llama_patch import wants_triton
from lorakit.train.memory_plan import checkpoint_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4

@dataclass(frozen=True)
class RunsWhere:
    """Where a variant measures something of its own; elsewhere it would equal another row."""

    why: str  # the skip notice when a need is not met
    device: str | None = None  # "cpu" or "cuda"
    packing: bool = False
    checkpointing: bool = False
    half_precision: bool = False  # a 16-bit model (an fp32 one makes peft-bf16 equal peft)
    plain_rows: bool = False  # neither packed rows nor checkpointed layers (a CUDA graph's capture)
    package: str | None = None  # an import name that must be installed


@dataclass(frozen=True)
class Variant:
    """What one variant runs: each field is where it departs from `lorakit`, what the trainer runs."""

    peft: bool = False  # PEFT's adapters and the model's own loss, not lorakit's
    fp32_adapters: bool = True  # peft: autocast_adapter_dtype (its default)
    liger: bool = False  # peft: Liger's kernels patched into transformers first
    fused: bool = True  # the fused LoRA blocks (enable_fast_paths)
    chunked: bool = True  # the chunked lm_head + loss
    native: bool = True  # the native CPU RMSNorm, RoPE and attention
    triton: bool = True  # the Triton kernels, where the trainer takes them
    mask_4d: bool = False  # packed rows: a block-causal 4D mask instead of varlen attention
    per_document: bool = False  # packed CUDA rows: an SDPA call per document, not the varlen kernel
    stack: bool | None = None  # gate and up stacked; None: as the trainer decides
    checkpointing: str = "lorakit"  # under checkpointing: "lorakit", "offload" or "transformers"
    gemm_backend: str | None = None  # cpu_gemm's backend; None: its own choice
    triton_launch: str | None = None  # triton_launch's mode; None: the process's
    graphed: bool = False  # forward and backward captured once as a CUDA graph, then replayed
    runs_where: RunsWhere | None = None


VARIANTS = {
    "lorakit": Variant(),
    "peft": Variant(peft=True),
    "peft-bf16": Variant(peft=True, fp32_adapters=False,
                         runs_where=RunsWhere("the model is fp32 here, so it would equal peft", half_precision=True)),
    "peft-liger": Variant(peft=True, liger=True,
                          runs_where=RunsWhere("Liger's kernels are Triton, GPU only", device="cuda",
                                               package="liger_kernel")),
    "lorakit-native": Variant(triton=False, runs_where=RunsWhere(
        "lorakit takes the Triton kernels it leaves out on CUDA only: here it equals lorakit", device="cuda")),
    "lorakit-plain": Variant(fused=False, chunked=False),
    "lorakit-ce": Variant(fused=False),
    "lorakit-fused": Variant(chunked=False),
    "lorakit-eager": Variant(native=False, runs_where=RunsWhere(
        "the native RMSNorm, RoPE and attention it leaves out run on CPU tensors only: here it equals lorakit",
        device="cpu")),
    "lorakit-aten": Variant(gemm_backend=cpu_gemm.ATEN, runs_where=RunsWhere(
        "lorakit takes oneDNN's GEMMs on CPU tensors only: here it equals lorakit", device="cpu")),
    "lorakit-4d": Variant(mask_4d=True, runs_where=RunsWhere(
        "it differs from lorakit only in packed rows (--packing)", packing=True)),
    "lorakit-perdoc": Variant(per_document=True, runs_where=RunsWhere(
        "it differs from lorakit only in packed rows on CUDA (an SDPA call per document instead of torch's "
        "varlen kernel)", device="cuda", packing=True)),
    "lorakit-offload": Variant(checkpointing="offload", runs_where=RunsWhere(
        "it offloads checkpointed layers' inputs from a GPU: needs --grad-checkpointing on CUDA", device="cuda",
        checkpointing=True)),
    "lorakit-fullrecompute": Variant(checkpointing="transformers", runs_where=RunsWhere(
        "it differs from lorakit only in what a checkpoint recomputes: needs --grad-checkpointing",
        checkpointing=True)),
    "lorakit-unstacked": Variant(stack=False, runs_where=RunsWhere(
        "lorakit stacks the frozen gate and up weights on CUDA only: here it equals lorakit", device="cuda")),
    "lorakit-directlaunch": Variant(triton_launch="direct", runs_where=RunsWhere(
        "it differs from lorakit only in how its Triton kernels launch, on CUDA", device="cuda")),
    "lorakit-graphed": Variant(graphed=True, runs_where=RunsWhere(
        "it replays lorakit's step as a CUDA graph: needs CUDA, and rows neither packed nor checkpointed (no "
        "--packing, --grad-checkpointing or --memory-budget)",
        device="cuda", plain_rows=True)),
}


def fast_paths(name: str) -> tuple[bool, bool, bool]:
    """A lorakit variant's (fused blocks, chunked loss, native CPU kernels): what it runs and what
    the memory estimate must assume for it."""
    variant = VARIANTS[name]
    return variant.fused, variant.chunked, variant.native


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

    apply_lora(model, LoraConfig(r=plan.settings.r, alpha=2 * plan.settings.r, target_modules=TARGETS))
    if not fused:
        return []
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.kernels.varlen_attention import use_varlen_attention

    notices = enable_fast_paths(model, triton=triton, native=native, stack=stack)
    return notices + (use_varlen_attention(model) if varlen and plan.settings.packing else [])


def add_peft_adapters(model, plan, autocast_adapter_dtype: bool = True):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=plan.settings.r, lora_alpha=2 * plan.settings.r, lora_dropout=0.0,
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
