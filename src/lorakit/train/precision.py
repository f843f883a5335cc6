"""What a run computes in on its device, and the one-line notices that explain a choice.

    --dtype      ─► models.training_dtype: the weights (auto: bf16 where the hardware multiplies it)
                 ─► autocast_dtype_for: fp32 weights on a GPU compute under 16-bit autocast
    --quantize   ─► quantize.compute_dtype: what bitsandbytes' layers (and the rest) compute in

Native bf16: a CPU with AVX512-BF16 or AMX (models.cpu_has_native_bf16), a GPU of compute
capability 8.0 on (models.gpu_has_native_bf16). Elsewhere torch emulates bf16 products in fp32:
on a CPU (kernels/cpu_gemm.py widens them) a step took 46x fp32's time on one such CPU; on a T4
or a V100 cuBLAS has no bf16 kernels. Those GPUs multiply fp16 natively, so there auto loads the
weights in fp16 (a quantised base computes in it), the loss scaled (train/loop.py: fp16's range
would flush small gradients to zero); --dtype float32 keeps fp32 weights under fp16 autocast,
for a model whose activations overflow fp16.
"""

from __future__ import annotations

import torch

from lorakit.config import RunConfig
from lorakit.kernels import cpu_gemm
from lorakit.models import gpu_has_native_bf16, training_dtype
from lorakit.train import distributed

HALF_INSTRUCTIONS = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AVX512-FP16 or AMX-FP16"}


def autocast_dtype_for(model, device: torch.device) -> torch.dtype | None:
    """fp32 weights on a GPU train (and evaluate) under 16-bit autocast; elsewhere none."""
    if device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
        return torch.bfloat16 if gpu_has_native_bf16() else torch.float16
    return None


def dtype_notice(config: RunConfig, model) -> list[str]:
    """At most one line on the dtype the run computes in, where it may surprise: auto's bf16 on a
    CPU (a GPU run in bf16 is what users expect), a 16-bit dtype asked for where the hardware
    only emulates it, fp16 where a GPU has no bf16, and --quantize's fp32 on a CPU without bf16."""
    device = distributed.device_of_rank()
    if device.type == "cuda":
        return _gpu_notice(config)
    if device.type != "cpu":
        return []
    if config.model.quantize != "none":  # its dtype is --quantize's own choice
        return _quantized_cpu_notice(config.model.dtype)
    return _cpu_notice(config.model.dtype, next(model.parameters()).dtype)


def _cpu_notice(requested: str, weights: torch.dtype) -> list[str]:
    if requested == "auto" and weights == torch.bfloat16:
        return ["dtype: bfloat16 (auto: this CPU multiplies bf16 natively; on one such CPU training ran 1.6x faster "
                "than fp32; adapters and optimizer state stay fp32; --dtype float32 for full precision)"]
    if weights in HALF_INSTRUCTIONS and weights in cpu_gemm.widened_dtypes():
        auto = training_dtype("auto", "cpu")
        advice = "as fast and in full precision" if auto == "float32" else "which this CPU multiplies natively"
        return [f"dtype: {requested} on a CPU without {requested} instructions ({HALF_INSTRUCTIONS[weights]}): its "
                "products are computed in float32 and rounded (on one such CPU a step took as long as in float32, "
                f"in 0.8x its memory); --dtype auto trains in {auto} here, {advice}"]
    return []


def _quantized_cpu_notice(requested: str) -> list[str]:
    from lorakit.quantize import compute_dtype

    computes = compute_dtype("cpu", requested)
    if computes not in cpu_gemm.widened_dtypes():
        if requested == "auto" and computes == torch.float32:
            return ["--quantize on a CPU without bf16 instructions (AVX512-BF16 or AMX): the model computes in "
                    "float32 (bf16 products are emulated here: 46x float32's time on one such CPU); its weights "
                    "stay in 4/8 bits"]
        return []
    name = str(computes).removeprefix("torch.")
    auto = str(compute_dtype("cpu")).removeprefix("torch.")
    return [f"--quantize with --dtype {name} on a CPU without {name} instructions ({HALF_INSTRUCTIONS[computes]}): "
            f"bitsandbytes multiplies its layers in {name}, which torch emulates here (26-46x float32's time on the "
            f"CPUs measured); drop --dtype to compute in {auto}"]


def _gpu_notice(config: RunConfig) -> list[str]:
    if gpu_has_native_bf16():
        return []
    major, minor = torch.cuda.get_device_capability()
    card = f"this GPU (compute capability {major}.{minor}) has no bf16 arithmetic (8.0 on)"
    if config.model.dtype == "bfloat16":
        return [f"--dtype bfloat16: {card}, so torch emulates its products in float32, far slower than float16; "
                "drop --dtype to train in float16 (its loss scaled)"]
    if config.model.dtype != "auto":
        return []
    what = "the quantised model computes in float16" if config.model.quantize != "none" else "float16"
    return [f"dtype: {what} (auto: {card}); the loss is scaled so that small gradients survive float16's range; "
            "--dtype float32 if the model's activations overflow float16"]
