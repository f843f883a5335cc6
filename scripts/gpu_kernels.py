"""CUDA correctness of lorakit's fused paths against a plain float64 reference, on the GPU.

tests/kernels run on the CPU; this runs the same functions on CUDA, in bf16 (base weights bf16,
adapter masters fp32, as apply_lora makes them) and in fp32, on 1b-like widths:

    q,k,v        lora_qkv(x, q, k, v)          vs  q(x), k(x), v(x)
    o            lora_linear(x, o)              vs  o(x)
    mlp          lora_mlp(x, gate, up, down)    vs  down(silu(gate(x)) * up(x))
    lm_head+ce   chunked_lm_head_loss(h, W, y)  vs  cross_entropy(h W^T, y)
    triton ops   rms_norm, swiglu, rope (kernels/triton_ops.py, compiled for the GPU here)
                 vs their plain references; skipped without triton

For each: the output and the gradients of x and of every lora_A / lora_B (a random upstream
gradient), as cosine similarity and max relative error against the same computation in float64.
Prints one line per case, writes JSON with --json, exits 1 if any cosine < 0.999.

    PYTHONPATH=src python3 scripts/gpu_kernels.py [--json out.json] [--device cpu]   # cpu: dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.chunked_ce import chunked_lm_head_loss
from lorakit.kernels.fused_lora import lora_linear, lora_mlp, lora_qkv
from lorakit.lora import LoraLinear

HIDDEN, KV, INTER, VOCAB, TOKENS, RANK = 2048, 512, 8192, 32768, 1024, 16
MIN_COSINE = 0.999
DEVICE = "cuda"  # set from --device


def _lora(n_in: int, n_out: int, dtype: torch.dtype) -> LoraLinear:
    base = nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=dtype).requires_grad_(False)
    layer = LoraLinear(base, RANK, 2 * RANK, 2.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)  # B = 0 would hide half of the algebra
    return layer


def _cases(dtype: torch.dtype):
    """name -> (modules, fused fn, plain fn); fn(x, *modules) -> output tensor."""
    qkv = [_lora(HIDDEN, HIDDEN, dtype), _lora(HIDDEN, KV, dtype), _lora(HIDDEN, KV, dtype)]
    mlp = [_lora(HIDDEN, INTER, dtype), _lora(HIDDEN, INTER, dtype), _lora(INTER, HIDDEN, dtype)]
    return {
        "q,k,v": (qkv, lambda x, *m: torch.cat(lora_qkv(x, *m), -1),
                  lambda x, *m: torch.cat([layer(x) for layer in m], -1)),
        "o": ([_lora(HIDDEN, HIDDEN, dtype)], lambda x, o: lora_linear(x, o), lambda x, o: o(x)),
        "mlp": (mlp, lambda x, *m: lora_mlp(x, *m), lambda x, g, u, d: d(F.silu(g(x)) * u(x))),
    }


def _grads(fn, x, modules, upstream):
    x = x.detach().requires_grad_(True)
    out = fn(x, *modules)
    (out.to(upstream.dtype) * upstream).sum().backward()
    params = [p for m in modules for p in (m.lora_A.weight, m.lora_B.weight)]
    return [out.detach(), x.grad] + [p.grad for p in params]


def _compare(ours, reference) -> tuple[float, float]:
    """(min cosine, max relative error) over the paired tensors."""
    cosines, errors = [], []
    for a, b in zip(ours, reference):
        a, b = a.double().flatten(), b.double().flatten()
        cosines.append(float(F.cosine_similarity(a, b, dim=0)))
        errors.append(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return min(cosines), max(errors)


def check_block(name, modules, fused, plain, dtype) -> dict:
    torch.manual_seed(0)
    x = torch.randn(TOKENS, modules[0].in_features, device=DEVICE, dtype=dtype)
    upstream = torch.randn_like(fused(x, *modules).float())
    ours = _grads(fused, x, modules, upstream)
    reference_modules = [copy.deepcopy(m).double() for m in modules]
    reference = _grads(plain, x.double(), reference_modules, upstream.double())
    cosine, error = _compare(ours, reference)
    return {"case": name, "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine, "max_rel_error": error}


def check_lm_head(dtype) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, device=DEVICE, dtype=dtype) * HIDDEN**-0.5
    labels = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE)
    labels[: TOKENS // 4] = -100  # prompt tokens carry no loss
    results = []
    for fn, h, w in ((lambda h, w: chunked_lm_head_loss(h, w, labels, chunk_size=256), hidden, weight),
                     (lambda h, w: F.cross_entropy(h @ w.T, labels), hidden.double(), weight.double())):
        h = h.detach().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        results.append([loss.detach().reshape(1), h.grad])
    cosine, error = _compare(*results)
    return {"case": "lm_head+ce", "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine,
            "max_rel_error": error}


def _triton_cases(dtype):
    """name -> (inputs, triton fn, reference fn); inputs that need gradients are float tensors."""
    from lorakit.kernels import triton_ops as ops

    torch.manual_seed(0)
    x, weight = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=dtype), torch.rand(HIDDEN, device=DEVICE) + 0.5
    gate, up = (torch.randn(TOKENS, INTER, device=DEVICE, dtype=dtype) for _ in range(2))
    q, k = torch.randn(2, 32, 512, 64, device=DEVICE, dtype=dtype), torch.randn(2, 8, 512, 64, device=DEVICE, dtype=dtype)
    angles = torch.rand(2, 512, 32, device=DEVICE) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    return {
        "rms_norm": ([x], lambda x: ops.rms_norm(x, weight.to(dtype), 1e-5),
                     lambda x: ops.rms_norm_reference(x, weight.double(), 1e-5)),
        "swiglu": ([gate, up], ops.swiglu, ops.swiglu_reference),
        "rope": ([q, k], lambda q, k: torch.cat([t.flatten() for t in ops.rope(q, k, cos, sin)]),
                 lambda q, k: torch.cat([t.flatten() for t in ops.rope_reference(q, k, cos.double(), sin.double())])),
    }


def check_triton(dtype) -> list[dict]:
    from lorakit.kernels import triton_ops

    if not triton_ops.triton_available():
        print(f"triton ops skipped: {triton_ops.unavailable_reason()}")
        return []
    results = []
    for name, (inputs, fast, plain) in _triton_cases(dtype).items():
        pairs = []
        for fn, cast in ((fast, lambda t: t), (plain, lambda t: t.double())):
            leaves = [cast(t).detach().requires_grad_(True) for t in inputs]
            out = fn(*leaves)
            upstream = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
            (out.double() * upstream.double()).sum().backward()
            pairs.append([out.detach()] + [leaf.grad for leaf in leaves])
        cosine, error = _compare(*pairs)
        results.append({"case": name, "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine,
                        "max_rel_error": error})
    return results


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, (modules, fused, plain) in _cases(dtype).items():
            results.append(check_block(name, modules, fused, plain, dtype))
        results.append(check_lm_head(dtype))
        results += check_triton(dtype)
    for r in results:
        verdict = "ok" if r["min_cosine"] >= MIN_COSINE else "FAILED"
        print(f"{r['case']:<11}{r['dtype']:<10}min cosine {r['min_cosine']:.6f}  "
              f"max rel error {r['max_rel_error']:.2e}  {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["min_cosine"] >= MIN_COSINE for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
