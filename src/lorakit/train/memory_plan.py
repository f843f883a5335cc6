"""Activation checkpointing for a run: chosen from the memory estimate, applied layer by layer.

    --grad-checkpointing auto     off when the step fits the memory budget; else the fewest
                                  decoder layers (the earliest ones) whose checkpointing makes it
                                  fit; else every layer; on CUDA, else every layer with its input
                                  offloaded to host memory; else every layer, with a notice
    --grad-checkpointing on       every layer          --grad-checkpointing off   none
    --grad-checkpointing offload  every layer, inputs in host memory (a CPU run: every layer,
                                  nothing to offload to, with a notice)

The estimate is plan/estimate.py's, for this run's shape (micro-batch, sequence, rank, the
adapted projections, dtype, quantisation, the fused loss; under FSDP one rank's share of the
sharded base, `sharded_run`). The budget is what the device has
free now (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable in /proc/meminfo, shared by the
processes of this node) times SAFETY_MARGIN, plus what the model already holds there, since the
estimate counts the weights that are loaded by now; `--memory-budget GIB` lowers it (`capped`). Models the estimator cannot describe
(not Llama-style) train without checkpointing unless it is asked for.

Checkpointing uses transformers' per-layer switch: every `GradientCheckpointingLayer` checks its
own `gradient_checkpointing` flag at call time, so after the model-wide (non-reentrant) enable
the layers left out are switched back off. Offloading replaces each layer's checkpoint function
with train/offload.py's, which holds the layer's input in (pinned) host memory until backward:
the device then keeps two layer inputs at a time instead of one per layer, for a copy out in
forward and a copy back in backward per layer. Offload comes after full checkpointing because it only saves
those inputs (L - 2 hidden states) and costs PCIe traffic; the host must have room for them
(MemAvailable, as for the CPU budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lorakit.errors import LorakitError
from lorakit.host import available_memory_bytes, torchrun_number

SAFETY_MARGIN = 0.9  # the estimate leaves out allocator fragmentation and library workspaces
GIB = 1024**3


@dataclass(frozen=True)
class Budget:
    bytes: int | None  # None: unknown, the step is assumed to fit
    source: str


@dataclass(frozen=True)
class CheckpointPlan:
    mode: str  # "off" | "selective" | "full" | "offload" (full, the layers' inputs in host memory)
    layers: tuple[int, ...]  # indices of the checkpointed decoder layers
    num_layers: int
    estimate_bytes: int | None  # the estimated peak of one step with this plan (None: not estimated)
    budget: Budget
    notice: str


def choose_checkpointing(model: nn.Module, config, device: torch.device, fsdp: bool | None = None) -> CheckpointPlan:
    """The checkpointing for this run: as requested by --grad-checkpointing on/off/offload, or
    for auto the least that makes the estimated step fit the budget. `fsdp`: whether the base
    will be sharded (the estimate then counts one rank's share); None: as `sharded_run` says."""
    fsdp = sharded_run(config, device) if fsdp is None else fsdp
    needs = checkpointing_needs(model, config, device, fsdp)
    budget = capped(memory_budget(model, device), config)
    num_layers = len(checkpointable_layers(model))
    hints = ["a smaller --batch-size or --seq-len"]
    if device.type == "cuda" and config.model.quantize == "none":
        hints.append("--quantize 4bit")
    if _world_size() > 1 and not fsdp:
        hints.append("--fsdp (each process then holds a share of the base)")
    if config.train.grad_checkpointing != "auto":
        return _requested_plan(model, config, device, needs, budget, hints, fsdp)
    if needs is None:
        return _plan("off", 0, num_layers, None, budget, "the memory estimator does not model this architecture; "
                     "pass --grad-checkpointing on if the step runs out of memory", hints)
    if budget.bytes is None:
        return _plan("off", 0, num_layers, needs[0], budget, f"assumed to fit: {budget.source}", hints)
    # The earliest layers, not a spread: backward reaches them last, after the plain layers'
    # saved tensors are freed, so their recompute never adds to the resident peak.
    k = next((k for k, need in enumerate(needs) if need <= budget.bytes), num_layers)
    if needs[k] > budget.bytes and device.type == "cuda":
        offloaded = _offload_if_it_fits(model, config, device, needs, budget, hints, fsdp)
        if offloaded is not None:
            return offloaded
    mode = "off" if k == 0 else "full" if k == num_layers else "selective"
    why = "" if k == 0 else f"without checkpointing {_size(needs[0])}"
    return _plan(mode, k, num_layers, needs[k], budget, why, hints)


def _requested_plan(model: nn.Module, config, device: torch.device, needs: list[int] | None, budget: Budget,
                    hints: list[str], fsdp: bool) -> CheckpointPlan:
    """--grad-checkpointing on, off or offload, whatever the budget says."""
    requested, num_layers = config.train.grad_checkpointing, len(checkpointable_layers(model))
    why = f"--grad-checkpointing {requested} from {config.sources.get('train.grad_checkpointing', 'default')}"
    full = needs[-1] if needs else None
    if requested == "off":
        return _plan("off", 0, num_layers, needs[0] if needs else None, budget, why,
                     hints + ["--grad-checkpointing auto"])
    if requested == "on":
        return _plan("full", num_layers, num_layers, full, budget, why,
                     hints + (["--grad-checkpointing offload"] if device.type == "cuda" else []))
    if device.type == "cpu":
        return _plan("full", num_layers, num_layers, full, budget, f"{why}: a CPU run's activations are in host "
                     "memory already, so nothing is offloaded", hints)
    if num_layers == 0:
        return _plan("full", 0, 0, full, budget, f"{why}: this transformers version has no per-layer "
                     "checkpointing to offload from (it needs transformers' GradientCheckpointingLayer)", hints)
    offloaded = offload_needs(model, config, device, fsdp)
    return _plan("offload", num_layers, num_layers, offloaded[0] if offloaded else None, budget,
                 why + (f"; {_size(offloaded[1])} in host memory" if offloaded else ""), hints)


def _offload_if_it_fits(model: nn.Module, config, device: torch.device, needs: list[int], budget: Budget,
                        hints: list[str], fsdp: bool) -> CheckpointPlan | None:
    """The offload plan when full checkpointing does not fit the device but offloading does,
    and the host has room for the layers' inputs; else None."""
    offloaded = offload_needs(model, config, device, fsdp)
    if offloaded is None or offloaded[0] > budget.bytes or not _host_has_room(offloaded[1]):
        return None
    num_layers = len(needs) - 1
    why = f"every layer on the device {_size(needs[-1])}; {_size(offloaded[1])} in host memory"
    return _plan("offload", num_layers, num_layers, offloaded[0], budget, why, hints)


def apply_checkpointing(model: nn.Module, plan: CheckpointPlan) -> None:
    """Non-reentrant checkpointing on the plan's decoder layers (the earliest; none when the plan
    is off), their inputs offloaded to host memory when the plan says so."""
    if plan.mode != "off":
        checkpoint_layers(model, len(plan.layers) if plan.mode == "selective" else None, plan.mode == "offload")


def checkpoint_layers(model: nn.Module, count: int | None = None, offload: bool = False) -> None:
    """Non-reentrant checkpointing on the earliest `count` decoder layers (every one when None),
    their inputs in host memory with `offload`; the trainer's, the bench's and the estimator's
    measurement's one way in."""
    enable_checkpointing(model)
    layers = checkpointable_layers(model)
    if count is not None:
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < count
    if offload:
        from lorakit.train.offload import offload_layers

        offload_layers(layers[:count])


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' switch for non-reentrant checkpointing of every decoder layer, each layer's
    checkpoint then told what its recompute may leave out (`layer_checkpoint`)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in checkpointable_layers(model):
        layer._gradient_checkpointing_func = layer_checkpoint(layer)


def layer_checkpoint(layer: nn.Module) -> Callable[..., Any]:
    """torch's non-reentrant checkpoint for one decoder layer, whose recompute skips the fused
    MLP's output where the layer allows at the time of each call (llama_patch.recompute_context_fn)."""
    from lorakit.kernels.llama_patch import recompute_context_fn

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context_fn = recompute_context_fn(layer)
        extra = {} if context_fn is None else {"context_fn": context_fn}
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **extra, **kwargs)

    return run


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers can checkpoint one by one, in forward order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no per-layer switch, so no selective checkpointing
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# ---- the estimate ---------------------------------------------------------------------------

def checkpointing_needs(model: nn.Module, config, device: torch.device, fsdp: bool | None = None) -> list[int] | None:
    """Estimated peak bytes of one step with the earliest k layers checkpointed, k = 0..L, or
    None when the estimator cannot describe this model or cannot checkpoint it layer by layer.
    `fsdp` as for `choose_checkpointing`."""
    from lorakit.plan.estimate import TrainShape, estimate_memory

    step = _estimator_step(model, config, device, fsdp)
    if step is None:
        return None
    shape, sizes = step
    return [estimate_memory(shape, TrainShape(**sizes, grad_checkpointing=k > 0, checkpoint_layers=k)).total
            for k in range(shape.num_layers + 1)]


def offload_needs(model: nn.Module, config, device: torch.device, fsdp: bool | None = None) -> tuple[int, int] | None:
    """(estimated device peak, host bytes) of one step with every layer checkpointed and its
    input offloaded, or None as for `checkpointing_needs`."""
    from lorakit.plan.estimate import TrainShape, estimate_memory

    step = _estimator_step(model, config, device, fsdp)
    if step is None:
        return None
    shape, sizes = step
    estimate = estimate_memory(shape, TrainShape(**sizes, grad_checkpointing=True, offload_checkpoints=True))
    return estimate.total, estimate.offloaded_to_host


def _estimator_step(model: nn.Module, config, device: torch.device,
                    fsdp: bool | None) -> tuple[Any, dict[str, Any]] | None:
    """The estimator's model shape and this run's step sizes (one rank's share when the base is
    sharded), or None when it cannot describe the model or the model has no per-layer
    checkpointing."""
    from lorakit.kernels.llama_patch import attentions_fused, mlps_fused
    from lorakit.plan.model_shapes import model_shape

    try:
        shape = model_shape(model.config)
    except (LorakitError, AttributeError, KeyError, TypeError, ValueError):
        return None
    if not _llama_style(model) or len(checkpointable_layers(model)) != shape.num_layers:
        return None
    return shape, dict(
        batch_size=config.train.batch_size, seq_len=config.data.seq_len, r=config.lora.r,
        targets=_adapted_projections(model), dtype=_compute_dtype(model),
        quantize=None if config.model.quantize == "none" else config.model.quantize, world_size=_world_size(),
        fused_loss=_fused_loss(model), lora_dropout=config.lora.dropout,
        device="cuda" if device.type == "cuda" else "cpu", cpu_attention=_cpu_attention(model, device),
        fused_mlp=mlps_fused(model), fused_attention=attentions_fused(model),
        fsdp=sharded_run(config, device) if fsdp is None else fsdp)


def _llama_style(model: nn.Module) -> bool:
    from lorakit.plan.model_shapes import PROJECTIONS

    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return set(PROJECTIONS) <= leaves


def _adapted_projections(model: nn.Module) -> list[str] | str:
    from lorakit.lora import lora_layers
    from lorakit.plan.model_shapes import PROJECTIONS

    leaves = {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)}
    return [p for p in PROJECTIONS if p in leaves] or "all-linear"


def _compute_dtype(model: nn.Module) -> str:
    # the input embedding stays in the compute dtype, also in a quantised base
    dtype = model.get_input_embeddings().weight.dtype
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")


def _fused_loss(model: nn.Module) -> bool:
    """Whether the trainer's loss (kernels.causal_lm_loss) takes the chunked path, no full logits."""
    from lorakit.kernels.causal_loss import chunked_loss_blocker

    return chunked_loss_blocker(model) is None


def _cpu_attention(model: nn.Module, device: torch.device) -> bool:
    """Whether the fast paths gave the attention lorakit's CPU kernel (it keeps probabilities)."""
    from lorakit.kernels import cpu_attention

    return device.type == "cpu" and any(cpu_attention.enabled_for(m) for m in model.modules())


def _world_size() -> int:
    from lorakit.train import distributed

    return distributed.world_size()


def sharded_run(config, device: torch.device) -> bool:
    """Whether this run shards its base (FSDP): `distributed.choose_fsdp`'s answer for the same
    --fsdp, config, world and device that train.run.prepare() gave it just before the plan
    (it depends on nothing else: the estimate and the GPU's total memory)."""
    from lorakit.train import distributed

    if _world_size() == 1:
        return False
    return distributed.choose_fsdp(distributed.requested_fsdp(config), config, device)[0]


# ---- the budget -----------------------------------------------------------------------------

def memory_budget(model: nn.Module, device: torch.device) -> Budget:
    """Free memory of `device` x SAFETY_MARGIN, plus what the model holds there already."""
    held = _held_bytes(model, device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"{SAFETY_MARGIN:.0%} of the free memory of {device}"
    else:
        free = available_memory_bytes()
        if free is None:
            return Budget(None, "MemAvailable in /proc/meminfo is unreadable")
        processes = _processes_on_node()
        free //= processes
        where = f"{SAFETY_MARGIN:.0%} of MemAvailable" + (f" / {processes} processes" if processes > 1 else "")
    return Budget(int(free * SAFETY_MARGIN) + held, f"{where} + {_size(held)} the model holds")


def capped(budget: Budget, config) -> Budget:
    """The budget, or --memory-budget x SAFETY_MARGIN where that is smaller (or the device's is
    unknown): the same margin for fragmentation and workspaces as a device of that size gets."""
    cap = config.train.memory_budget
    if cap is None:
        return budget
    cap_bytes = int(cap * GIB * SAFETY_MARGIN)
    if budget.bytes is not None and budget.bytes <= cap_bytes:
        return budget
    source = config.sources.get("train.memory_budget", "the config")
    return Budget(cap_bytes, f"{SAFETY_MARGIN:.0%} of --memory-budget {cap:g} GiB from {source}")


def _host_has_room(nbytes: int) -> bool:
    """Whether host memory can take `nbytes` of offloaded layer inputs (this process's share of
    MemAvailable x SAFETY_MARGIN; yes when it cannot be read)."""
    available = available_memory_bytes()
    if available is None:
        return True
    return available * SAFETY_MARGIN // _processes_on_node() >= nbytes


def _processes_on_node() -> int:
    """torchrun's processes on this node: they share its host memory."""
    return torchrun_number("LOCAL_WORLD_SIZE", 1, least=1)


def _held_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the model's parameters and buffers on `device`, one count per storage."""
    storages: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---- the plan and its notice ----------------------------------------------------------------

def _plan(mode: str, k: int, num_layers: int, need: int | None, budget: Budget, why: str,
          hints: list[str]) -> CheckpointPlan:
    layers = {"off": (), "selective": tuple(range(k))}.get(mode, tuple(range(num_layers)))
    what = {"off": "off", "full": "every layer", "selective": f"selective, {k} of {num_layers} layers",
            "offload": "every layer, inputs offloaded to host memory"}[mode]
    return CheckpointPlan(mode, layers, num_layers, need, budget, _notice(what, need, budget, why, hints))


def _notice(what: str, need: int | None, budget: Budget, why: str, hints: list[str]) -> str:
    head = f"activation checkpointing: {what}"
    if need is None or budget.bytes is None:
        return f"{head} ({why}" + (f"; estimated peak {_size(need)})" if need is not None else ")")
    if need > budget.bytes:
        return (f"{head}, but the estimated peak {_size(need)} exceeds the {_size(budget.bytes)} available "
                f"({budget.source}); try {' or '.join(hints)}")
    figures = f"estimated peak {_size(need)} of {_size(budget.bytes)} available: {budget.source}"
    return f"{head} ({figures}" + (f"; {why})" if why else ")")


def _size(nbytes: Any) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"
