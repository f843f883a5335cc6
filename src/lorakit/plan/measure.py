"""Measure the memory of one LoRA training step, to check the estimator (plan/estimate.py).

The step is the estimator's: a random-initialised causal LM built from its config, LoRA
(alpha = 2r, dropout as asked) on the requested projections, AdamW, random token ids with
`labels = input_ids`, the model's own loss, `loss.backward()`, `optimizer.step()`. One warm-up
step runs first (it creates the optimizer state), grads are set to None, then one step is
measured. The output head splits the step: a forward pre-hook marks "head start" and a hook on
the gradient of the head's input marks "head done" (the head and the loss are through backward).

On the CPU (`measure_step`) there is no `max_memory_allocated`, so two sources are used:

1. The allocator timeline. `torch.profiler.profile(profile_memory=True)` records every
   allocation and free made through PyTorch's CPU allocator during the step. Their running sum,
   on top of what was alive before the step (parameters, buffers, optimizer state, the batch:
   counted from the tensors, once per storage), is the CPU counterpart of CUDA's "allocated"
   curve. Reported: `activations` = allocated when the head starts; `logits` = the head and
   loss's peak above that; `backward_peak` = the peak after the head is done (the layers'
   backward); `total` = the whole step's peak.
2. The tensors autograd saves, through `torch.autograd.graph.saved_tensors_hooks`: each saved
   tensor's storage is counted once (data pointer, `untyped_storage().nbytes()`) and released
   when autograd drops it; parameters are excluded. Non-reentrant checkpointing uses its own
   hooks inside each layer, so with checkpointing this count sees only what is saved outside
   the checkpointed layers.

Quantised bases (bitsandbytes 4-bit / 8-bit) are built by saving the random model and loading
it back with a BitsAndBytesConfig; their absmax / scale tensors count as weights.

Limits: allocations outside PyTorch's allocator (oneDNN/MKL scratch) are invisible; CPU
kernels (bitsandbytes' included) may use other temporaries than CUDA ones; the CUDA caching allocator rounds sizes and
fragments (reserved > allocated) and adds its context and library workspaces, none of which
the estimator models. `measure_step_cuda` measures the same components with
`torch.cuda.memory_allocated` / `max_memory_allocated`.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.models import WITHOUT_HUB_KERNELS
from lorakit.plan.estimate import TrainShape
from lorakit.plan.model_shapes import resolve_targets

TORCH_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}
_MARK = "lorakit.measure."


@dataclass
class MeasuredMemory:
    """Bytes measured in one training step (after one warm-up step)."""

    weights: int  # frozen parameters and buffers
    adapter: int  # trainable parameters + their grads + optimizer state
    activations: int  # allocated in the step when the head starts
    logits: int  # peak of the head + loss above `activations`
    backward_peak: int  # peak allocated in the step after the head's backward
    total: int  # everything alive before the step + the step's allocation peak
    saved_peak: int  # CPU: peak of autograd-saved tensors, parameters excluded (-1 on CUDA)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the model and the step -----------------------------------------------------------------

def build_model(hf_config: Any, shape: TrainShape, engine: str = "lorakit", device: str = "cpu") -> nn.Module:
    """A random-initialised causal LM from its config, with LoRA on the requested projections."""
    from transformers import AutoModelForCausalLM

    if shape.quantize:
        model = _quantized_model(hf_config, shape, device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[shape.dtype], attn_implementation="sdpa")
        model.to(device)
    targets = list(resolve_targets(shape.targets))
    if engine == "peft":
        from lorakit.quantize import quiet_hub_kernel_advice

        quiet_hub_kernel_advice()  # PEFT imports bitsandbytes
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        config = PeftLoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules=targets, lora_dropout=shape.lora_dropout)
        model = get_peft_model(model, config)
    else:
        from lorakit.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(r=shape.r, alpha=2 * shape.r, target_modules=targets, dropout=shape.lora_dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    if shape.grad_checkpointing:
        from lorakit.train.memory_plan import checkpoint_layers

        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper
        checkpoint_layers(base, shape.checkpoint_layers, shape.offload_checkpoints)
    return model.train()


def _quantized_model(hf_config: Any, shape: TrainShape, device: str) -> nn.Module:
    """bitsandbytes quantises while loading, so save a random model and load it back."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from lorakit.quantize import bnb_config, require_bitsandbytes

    require_bitsandbytes()
    dtype = TORCH_DTYPES[shape.dtype]
    quant = bnb_config(shape.quantize, dtype)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(hf_config, dtype=dtype).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quant,
                                                    attn_implementation="sdpa", device_map={"": device},
                                                    **WITHOUT_HUB_KERNELS)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
          mark: Callable[[str], None] = lambda label: None) -> None:
    loss = model(input_ids=batch, labels=batch).loss  # the outputs (and their logits) are dropped here
    mark("forward_end")
    loss.backward()
    mark("backward_end")
    optimizer.step()


def _prepare(hf_config: Any, shape: TrainShape, engine: str, device: str, seed: int):
    """Model, optimizer (with state, after one warm-up step, grads set to None) and batch."""
    torch.manual_seed(seed)
    model = build_model(hf_config, shape, engine, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, hf_config.vocab_size, (shape.batch_size, shape.seq_len), device=device)
    _step(model, optimizer, batch)
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, batch


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's absmax (and its own quantisation) outside the parameter."""
    tensors = []
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own: a LoRA layer's is its base layer's, visited too
        state = getattr(weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, getattr(state, "code", None), getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
        scales = getattr(weight, "SCB", None)  # int8: one scale per row
        if torch.is_tensor(scales):
            tensors.append(scales)
    return tensors


def _alive_before(model, optimizer) -> tuple[int, int]:
    """(frozen weights and buffers, trainable params + optimizer state) alive before the step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()) + _quant_state_tensors(model)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return storage_bytes(frozen), storage_bytes(trainable) + storage_bytes(state)


def _grad_bytes(model) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.requires_grad)


def _output_head(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ConfigError(f"{type(base).__name__} has no output head to measure the loss at")
    return head


@contextmanager
def _head_markers(model: nn.Module, mark: Callable[[str], None]) -> Iterator[None]:
    """Call mark("head_start") before the output head runs and mark("head_done") when the
    gradient of its input arrives (the head and the loss are done in backward)."""
    def hook(module, args):
        mark("head_start")
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: mark("head_done"))

    handle = _output_head(model).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---- CPU: allocator timeline + saved tensors ------------------------------------------------

class SavedTensorTracker:
    """Live bytes of autograd-saved tensors, one count per storage, parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.refs = exclude, {}
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return tensor
        count, size = self.refs.get(ptr, (0, storage.nbytes()))
        if count == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = (count + 1, size)
        return _Packed(self, ptr, tensor)

    def release(self, ptr: int) -> None:
        count, size = self.refs[ptr]
        if count == 1:
            del self.refs[ptr]
            self.live -= size
        else:
            self.refs[ptr] = (count - 1, size)

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed


class _Packed:
    """A saved tensor; autograd drops it once the backward node that needed it has run."""

    __slots__ = ("tracker", "ptr", "tensor")

    def __init__(self, tracker: SavedTensorTracker, ptr: int, tensor: torch.Tensor):
        self.tracker, self.ptr, self.tensor = tracker, ptr, tensor

    def __del__(self):
        self.tracker.release(self.ptr)


def _profiler_mark(label: str) -> None:
    with torch.profiler.record_function(_MARK + label):
        pass


@contextmanager
def _no_garbage_collection():
    """The timeline counts every free: a collection mid-step that frees an earlier test's or
    step's tensors would lower the measured levels (seen as a flaky 5% miss)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_step(hf_config: Any, shape: TrainShape, engine: str = "lorakit", seed: int = 0) -> MeasuredMemory:
    """Measure one CPU training step from the allocator timeline (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, batch = _prepare(hf_config, shape, engine, "cpu", seed)
    weights, adapter_before = _alive_before(model, optimizer)
    tracker = SavedTensorTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    hooks = torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack)
    start = time.perf_counter()
    with _no_garbage_collection(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with _head_markers(model, _profiler_mark), hooks:
            _step(model, optimizer, batch, _profiler_mark)
    seconds = time.perf_counter() - start
    line = AllocationTimeline.from_profile(prof)
    head_start, head_done = line.mark("head_start"), line.mark("head_done")
    activations = line.level_at(head_start)
    return MeasuredMemory(
        weights=weights, adapter=adapter_before + _grad_bytes(model), activations=activations,
        logits=line.peak_between(head_start, head_done) - activations,
        backward_peak=line.peak_between(head_done, line.mark("backward_end")),
        total=weights + adapter_before + storage_bytes([batch]) + line.peak_between(None, None),
        saved_peak=tracker.peak, seconds=seconds,
    )


@dataclass
class AllocationTimeline:
    """Allocation deltas (time ns, bytes) in time order, and the marker times."""

    events: list[tuple[int, int]]
    marks: dict[str, int]

    @classmethod
    def from_profile(cls, prof) -> "AllocationTimeline":
        from torch._C._profiler import _EventType

        events, marks = [], {}
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            elif node.name.startswith(_MARK):
                marks.setdefault(node.name[len(_MARK):], node.start_time_ns)
            stack.extend(node.children)
        events.sort()
        return cls(events, marks)

    def mark(self, label: str) -> int:
        if label not in self.marks:
            raise RuntimeError(f"the profile has no {label!r} marker")
        return self.marks[label]

    def level_at(self, when: int) -> int:
        return sum(size for t, size in self.events if t < when)

    def peak_between(self, start: int | None, end: int | None) -> int:
        level = 0
        peak = self.level_at(start) if start is not None else 0
        for t, size in self.events:
            level += size
            if (start is None or t >= start) and (end is None or t <= end):
                peak = max(peak, level)
        return peak


# ---- CUDA: the caching allocator's counters -------------------------------------------------

class _CudaMarks:
    """At each marker: the bytes allocated then, and the peak since the previous marker."""

    def __init__(self):
        self.allocated: dict[str, int] = {}
        self.peak_before: dict[str, int] = {}

    def __call__(self, label: str) -> None:
        torch.cuda.synchronize()
        self.allocated[label] = torch.cuda.memory_allocated()
        self.peak_before[label] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()


def measure_step_cuda(hf_config: Any, shape: TrainShape, engine: str = "lorakit", seed: int = 0) -> MeasuredMemory:
    """Measure one training step on the current CUDA device with the allocator's counters.

    Absolute numbers: `total` is max_memory_allocated over the step (weights and optimizer state
    included); the components are taken at the same markers as on the CPU."""
    if not torch.cuda.is_available():
        raise ConfigError("--gpu needs a CUDA device; run the CPU validation instead")
    model, optimizer, batch = _prepare(hf_config, shape, engine, "cuda", seed)
    weights, adapter_before = _alive_before(model, optimizer)
    marks = _CudaMarks()
    start = time.perf_counter()
    marks("step_start")
    with _head_markers(model, marks):
        _step(model, optimizer, batch, marks)
    marks("step_end")
    seconds = time.perf_counter() - start
    base = marks.allocated["step_start"]
    phases = ("head_start", "head_done", "forward_end", "backward_end", "step_end")
    return MeasuredMemory(
        weights=weights, adapter=adapter_before + _grad_bytes(model),
        activations=marks.allocated["head_start"] - base,
        logits=max(marks.peak_before["head_done"], marks.peak_before["forward_end"]) - marks.allocated["head_start"],
        backward_peak=marks.peak_before["backward_end"] - base,
        total=max(marks.peak_before[p] for p in phases), saved_peak=-1, seconds=seconds,
    )
