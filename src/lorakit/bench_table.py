"""The variants `lorakit bench` compares, as a table: what each runs where it departs from
`lorakit` (what the trainer runs), and where it measures something of its own. Torch-free, so
`lorakit bench --help` lists them without loading torch; bench_variants.py builds them.

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

from dataclasses import dataclass

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

@dataclass(frozen=True)
class RunsWhere:
    """Where a variant measures something of its own; elsewhere it would equal another row."""

    why: str  # the skip notice when a need is not met
    device: str | None = None  # "cpu" or "cuda"
    packing: bool = False
    checkpointing: bool = False
    half_precision: bool = False  # a 16-bit model (an fp32 one makes peft-bf16 equal peft)
    plain_rows: bool = False  # no packed rows, checkpointed layers or dropout (a CUDA graph's capture)
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
    "lorakit-aten": Variant(gemm_backend="aten", runs_where=RunsWhere(
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
        "it replays lorakit's step as a CUDA graph: needs CUDA, and rows neither packed nor checkpointed, "
        "without dropout (no --packing, --grad-checkpointing, --memory-budget or --dropout)",
        device="cuda", plain_rows=True)),
}


def fast_paths(name: str) -> tuple[bool, bool, bool]:
    """A lorakit variant's (fused blocks, chunked loss, native CPU kernels): what it runs and what
    the memory estimate must assume for it."""
    variant = VARIANTS[name]
    return variant.fused, variant.chunked, variant.native
