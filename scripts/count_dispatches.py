"""Count what one training step of a Llama decoder layer asks of the CPU, the way a GPU step runs.

On the H200 a 1b step waited for its CPU (docs/performance.md): each aten call costs the host
10-50 us, each Triton launch more. This counts, for one decoder layer's forward and backward
through lorakit's fast paths, the aten calls (all of them, and those that launch a kernel on a
GPU: views, empties and metadata ops excluded) and the Triton launches, on the CPU: a tiny Llama
(2 and 1 layers: the difference is one layer) with the GPU's code paths forced where they differ
from the CPU's (fused_lora's GEMM epilogues and fp32-writing gradient GEMMs, the latter by a CPU
stand-in; gate and up stacked, enable_fast_paths(stack=True)) and the Triton kernels in Triton's
interpreter. The counts, not times: nothing here runs at a GPU's speed.

    python scripts/count_dispatches.py            # per layer: aten calls, kernel-launching ones, Triton launches
"""

from __future__ import annotations

import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before lorakit's Triton kernels are built

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

NO_LAUNCH = {"view", "slice", "permute", "t", "transpose", "alias", "unsqueeze", "squeeze", "select", "detach",
             "_unsafe_view", "promote_types", "split", "split_with_sizes", "expand", "as_strided", "reshape",
             "empty", "empty_like", "new_empty", "empty_strided", "is_same_size", "_reshape_alias"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_ACTIVE: list[_Count] = []  # the counter of the step being counted


def _widening_stand_in(a, b, scale, dtype):
    """The CUDA GEMM that writes fp32 from bf16 operands: one aten call there, counted as one."""
    counter = _ACTIVE[0] if _ACTIVE else None
    if counter is not None:
        counter.calls["addmm"] += 1
        counter.paused = True
    try:
        return (scale * (a.to(dtype) @ b.to(dtype)))
    finally:
        if counter is not None:
            counter.paused = False


def _force_gpu_paths():
    from lorakit.kernels import cpu_gemm, fused_lora

    fused_lora._cublas_writes_in_place = lambda t: True
    cpu_gemm.widened_dtypes = lambda: frozenset()  # a GPU widens nothing: only a CPU without bf16 does
    if hasattr(fused_lora, "_gemm_widens"):  # the fp32-writing GEMM (CUDA only): its stand-in
        fused_lora._gemm_widens = lambda device, operand, output: output == torch.float32
        fused_lora._widening_addmm = _widening_stand_in


def _model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.lora import LoraConfig, apply_lora

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    try:
        enable_fast_paths(model, triton=True, stack=True)
    except TypeError:  # a lorakit before stacking
        enable_fast_paths(model, triton=True)
    return model


def count_step(layers: int) -> tuple[collections.Counter, int]:
    """(aten calls by name, Triton launches) of one forward + backward after a warm-up step."""
    from lorakit.kernels import cpu_gemm, triton_launch
    from lorakit.kernels.causal_loss import causal_lm_loss

    model = _model(layers)
    batch = {"input_ids": torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))}
    counter, launches = _Count(), [0]
    real_launch = triton_launch.launch

    def launch(*args, **kwargs):  # a Triton launch: counted once, its interpreter's tensor ops not at all
        launches[0] += 1
        counter.paused = True
        try:
            return real_launch(*args, **kwargs)
        finally:
            counter.paused = False

    triton_launch.launch = launch
    try:
        with cpu_gemm.use_backend(cpu_gemm.ATEN):
            causal_lm_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
            launches[0] = 0
            _ACTIVE.append(counter)
            with counter:
                causal_lm_loss(model, batch).backward()
    finally:
        triton_launch.launch = real_launch
        _ACTIVE.clear()
    return counter.calls, launches[0]


def main() -> None:
    _force_gpu_paths()
    (two, two_triton), (one, one_triton) = count_step(2), count_step(1)
    layer = two - one
    launching = sum(n for name, n in layer.items() if name not in NO_LAUNCH)
    print(f"per decoder layer, forward + backward: {sum(layer.values())} aten calls, {launching} of them "
          f"launching a kernel on a GPU, and {two_triton - one_triton} Triton launches")
    print("  " + ", ".join(f"{name} {n}" for name, n in layer.most_common()))


if __name__ == "__main__":
    main()
