"""What one training step costs the host, measured on the CPU at negligible compute.

On the H200 the 1b step waited for its CPU (docs/performance.md): the GPU was busy about 90 of
102 ms. The host's share is Python, autograd and dispatch per call, which a CPU shows too when
the tensors are too small for arithmetic to count: a Llama of hidden 64 and 16 layers (the 1b
depth), batch 1 x 16, fp32 base and adapters (a bf16 base would add the CPU's slow small bf16
GEMMs, which a GPU does not have), torch's own GEMMs on one thread, and the GPU's code paths
forced where they differ from the CPU's (as scripts/count_dispatches.py forces them, and no
oneDNN decision; no Triton: its interpreter is no launch). Each variant's forward + backward
(and the gradients' reset) is timed, median of `--steps` after warm-up, the variants taking
turns so that a busy machine slows all of them alike. The CPU's tiny kernels still cost a few
us each, about what a GPU launch costs its host; a Triton launch costs more (not measured here).

    python scripts/host_time.py [--steps 60] [--profile lorakit]   # ms per step, per layer

    plain       lorakit's LoRA layers module by module (no fast paths)
    lorakit     the fused paths as the GPU runs them (gate and up stacked), with RMSNorm, RoPE
                and attention in their CPU versions (on a GPU: Triton kernels and SDPA)
    fused-lora  the fused LoRA blocks alone: RMSNorm, RoPE and attention as transformers runs them
    peft        PEFT's LoRA on the same model
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from count_dispatches import _force_gpu_paths  # noqa: E402

LAYERS, HIDDEN, TOKENS = 16, 64, 16
DTYPE = torch.float32


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(DTYPE).train()


def _lorakit(fused: bool, native: bool = True):
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.lora import LoraConfig, apply_lora

    model = _base()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    if fused:
        enable_fast_paths(model, triton=False, native=native, stack=True)
    return model


def _peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return model


VARIANTS = {"plain": lambda: _lorakit(False), "lorakit": lambda: _lorakit(True),
            "fused-lora": lambda: _lorakit(True, native=False), "peft": _peft}


def _step(model, batch):
    from lorakit.kernels.causal_loss import causal_lm_loss

    causal_lm_loss(model, batch).backward()
    if "_trained" not in model.__dict__:
        model.__dict__["_trained"] = [p for p in model.parameters() if p.requires_grad]
    for param in model.__dict__["_trained"]:
        param.grad = None  # as the optimizer's zero_grad does: no walk over the modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default="plain,lorakit,fused-lora,peft")
    parser.add_argument("--profile", choices=list(VARIANTS), help="print this variant's top cProfile entries")
    args = parser.parse_args()
    from lorakit.kernels import cpu_gemm

    torch.set_num_threads(1)
    _force_gpu_paths()
    cpu_gemm._route = lambda *tensors: cpu_gemm.ATEN  # as on a GPU, whose first check says torch's
    names = args.variants.split(",")
    models = {name: VARIANTS[name]() for name in names}
    batch = {"input_ids": torch.randint(0, 256, (1, TOKENS), generator=torch.Generator().manual_seed(0))}
    times = {name: [] for name in names}
    with cpu_gemm.use_backend(cpu_gemm.ATEN), torch.inference_mode(False):
        for name in names:  # warm-up
            for _ in range(5):
                _step(models[name], batch)
        for _ in range(args.steps):
            for name in names:
                start = time.perf_counter()
                _step(models[name], batch)
                times[name].append(time.perf_counter() - start)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [_step(models[args.profile], batch) for _ in range(20)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    print(f"host time of a forward + backward, {LAYERS} layers, median of {args.steps} steps:")
    for name in names:
        median = statistics.median(times[name]) * 1e3
        print(f"  {name:10s} {median:7.2f} ms   {median / LAYERS:6.3f} ms per layer")


if __name__ == "__main__":
    main()
