"""CUDA correctness of lorakit's fused paths against a plain float64 reference, on the GPU.

tests/kernels run on the CPU; this runs the same functions on CUDA, in bf16 (base weights bf16,
adapter masters fp32, as apply_lora makes them), in fp32 and in fp16 (--dtype auto's on a GPU
without bf16), on 1b-like widths:

    q,k,v        lora_qkv(x, q, k, v)          vs  q(x), k(x), v(x)
    o            lora_linear(x, o)              vs  o(x)
    mlp          lora_mlp(x, gate, up, down)    vs  down(silu(gate(x)) * up(x))
    ... dropout  q,k,v and the stacked MLP with adapter dropout 0.1 (torch's fused dropout kernel
                 draws the masks, and backward draws them again from the generator's saved
                 state), vs the plain modules replaying the masks drawn; the generator is left
                 as forward left it
    lm_head+ce   chunked_lm_head_loss(h, W, y)  vs  cross_entropy(h W^T, y)
    triton ops   rms_norm, swiglu, rope (kernels/triton_ops.py, compiled for the GPU here)
                 vs their plain references; skipped without triton
    ce rows      cross_entropy_rows_(logits, y) at Llama-3's vocabulary: per-row loss and the
                 softmax - onehot it writes over the logits, vs log_softmax in float64; and
                 lm_head+ce again with triton=True, the frozen head's path through it
    varlen       torch's varlen kernel as lorakit_varlen calls it for packed rows (bf16, GQA,
                 documents of mixed lengths) vs causal SDPA per document; skipped without it

For each: the output and the gradients of its inputs (x and every lora_A / lora_B; q, k, v)
under a random upstream gradient, as cosine similarity and max relative error against the same computation in float64.
Prints one line per case, writes JSON with --json, exits 1 if any case fails: a cosine below 0.999, or a max
relative error above 5e-2 in 16 bits, 1e-3 in fp32 (cosine alone would pass a result off by a constant factor).

    PYTHONPATH=src python3 scripts/gpu_kernels.py [--json out.json] [--device cpu]   # cpu: dry run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels import fused_lora
from lorakit.kernels.chunked_ce import chunked_lm_head_loss
from lorakit.kernels.fused_lora import lora_linear, lora_mlp, lora_qkv
from lorakit.lora import LoraLinear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replayed_dropout import recorded_masks, replay_masks  # noqa: E402

HIDDEN, KV, INTER, VOCAB, TOKENS, RANK = 2048, 512, 8192, 32768, 1024, 16
MIN_COSINE = 0.999
# and the largest error relative to the reference's largest value: cosine alone ignores scale (a
# loss off by a constant factor has cosine 1). Measured on a CPU at smaller sizes: bf16 4e-3 to
# 1e-2, fp32 below 1e-6; a 1% scale error lands above the fp32 bound
MAX_REL_ERROR = {"bfloat16": 5e-2, "float16": 5e-2, "float32": 1e-3}
DEVICE = "cuda"  # set from --device


def _lora(n_in: int, n_out: int, dtype: torch.dtype, dropout: float = 0.0) -> LoraLinear:
    base = nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=dtype).requires_grad_(False)
    layer = LoraLinear(base, RANK, 2 * RANK, 2.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)  # B = 0 would hide half of the algebra
    return layer


def _cases(dtype: torch.dtype):
    """name -> (modules, fused fn, plain fn); fn(x, *modules) -> output tensor."""
    def qkv(dropout=0.0):
        return [_lora(HIDDEN, out, dtype, dropout) for out in (HIDDEN, KV, KV)]

    def mlp(dropout=0.0):
        return [_lora(HIDDEN, INTER, dtype, dropout), _lora(HIDDEN, INTER, dtype, dropout),
                _lora(INTER, HIDDEN, dtype, dropout)]

    # as the trainer runs it on CUDA: gate and up stacked into one matrix, the Triton SwiGLU
    stacked, stacked_dropout = mlp(), mlp(0.1)
    is_stacked = [fused_lora.stack_frozen_weights(layers[:2]) for layers in (stacked, stacked_dropout)]

    def fused_stacked(x, *modules):
        if not all(is_stacked):  # a failed row: the case would test the unstacked path
            raise RuntimeError("gate and up were not stacked")
        return lora_mlp(x, *modules, triton=True)

    fused_qkv = lambda x, *m: torch.cat(lora_qkv(x, *m), -1)  # noqa: E731
    plain_qkv = lambda x, *m: torch.cat([layer(x) for layer in m], -1)  # noqa: E731
    plain_mlp = lambda x, g, u, d: d(F.silu(g(x)) * u(x))  # noqa: E731
    return {
        "q,k,v": (qkv(), fused_qkv, plain_qkv),
        "o": ([_lora(HIDDEN, HIDDEN, dtype)], lambda x, o: lora_linear(x, o), lambda x, o: o(x)),
        "mlp": (mlp(), lambda x, *m: lora_mlp(x, *m), plain_mlp),
        "mlp stacked": (stacked, fused_stacked, plain_mlp),
        "q,k,v dropout": (qkv(0.1), fused_qkv, plain_qkv),
        "mlp st. dropout": (stacked_dropout, fused_stacked, plain_mlp),
    }


def _grads(fn, x, modules, upstream):
    x = x.detach().requires_grad_(True)
    out = fn(x, *modules)
    after_forward = _generator_state(x)
    (out.to(upstream.dtype) * upstream).sum().backward()
    if not torch.equal(_generator_state(x), after_forward):  # masks drawn again must put it back
        raise AssertionError("backward left the random generator elsewhere than forward did")
    params = [p for m in modules for p in (m.lora_A.weight, m.lora_B.weight)]
    return [out.detach(), x.grad] + [p.grad for p in params]


def _generator_state(x: torch.Tensor) -> torch.Tensor:
    return torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()


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
    with recorded_masks() as masks:  # none without dropout
        ours = _grads(fused, x, modules, upstream)
    reference_modules = [copy.deepcopy(m).double() for m in modules]
    replay_masks(masks, reference_modules)
    reference = _grads(plain, x.double(), reference_modules, upstream.double())
    cosine, error = _compare(ours, reference)
    return {"case": name, "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine, "max_rel_error": error}


def check_lm_head(dtype, triton: bool = False) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, device=DEVICE, dtype=dtype) * HIDDEN**-0.5
    labels = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE)
    labels[: TOKENS // 4] = -100  # prompt tokens carry no loss
    results = []
    for fn, h, w in ((lambda h, w: chunked_lm_head_loss(h, w, labels, chunk_size=256, triton=triton),
                      hidden, weight),
                     (lambda h, w: F.cross_entropy(h @ w.T, labels), hidden.double(), weight.double())):
        h = h.detach().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        results.append([loss.detach().reshape(1), h.grad])
    cosine, error = _compare(*results)
    return {"case": "lm_head+ce" + (" triton" if triton else ""), "dtype": str(dtype).removeprefix("torch."),
            "min_cosine": cosine, "max_rel_error": error}


CE_VOCAB = 128256  # not a multiple of the kernel's block: the masked tail runs too


def _check_cross_entropy_rows(dtype) -> dict:
    from lorakit.kernels import triton_ops as ops

    torch.manual_seed(0)
    logits = torch.randn(256, CE_VOCAB, device=DEVICE, dtype=dtype) * 4
    labels = torch.randint(0, CE_VOCAB, (256,), device=DEVICE)
    grad = logits.clone()
    loss = ops.cross_entropy_rows_(grad, labels, grad=True)
    log_probs = torch.log_softmax(logits.double(), -1)
    reference_grad = log_probs.exp()
    reference_grad[torch.arange(256, device=DEVICE), labels] -= 1.0
    cosine, error = _compare([loss, grad], [-log_probs.gather(1, labels[:, None]).squeeze(1), reference_grad])
    return {"case": "ce rows", "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine,
            "max_rel_error": error}


# packed rows of 1024 tokens: long and short documents, equal lengths across rows, many short ones
VARLEN_ROWS = [[700, 300, 24], [600, 300, *[1] * 124], [1000, 24], [64] * 16]  # 1s: a packed row's padding tokens


def check_varlen(dtype):
    """torch's varlen kernel through lorakit_varlen's call, against per-document SDPA in float64."""
    from lorakit.kernels import varlen_attention as va

    if DEVICE != "cuda" or dtype not in (torch.bfloat16, torch.float16) or va._torch_varlen_attn() is None:
        print(f"varlen     {str(dtype).removeprefix('torch.'):<10}skipped: the kernel needs CUDA, bf16/fp16 "
              "and torch >= 2.10", flush=True)
        return
    yield _guarded("varlen", dtype, _check_varlen_case, va, dtype)


def _check_varlen_case(va, dtype) -> dict:
    torch.manual_seed(0)
    width, batch = sum(VARLEN_ROWS[0]), len(VARLEN_ROWS)
    bounds = torch.tensor([0, *(n for row in VARLEN_ROWS for n in row)]).cumsum(0).tolist()
    segments = va.segments_from_bounds(bounds, batch, width)
    q = torch.randn(batch, 32, width, 64, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, 8, width, 64, device=DEVICE, dtype=dtype) for _ in range(2))
    options = dict(dropout_p=0.0, scale=64 ** -0.5, is_causal=True, enable_gqa=True)
    fast = lambda q, k, v: va._flash_varlen(q, k, v, segments, 64 ** -0.5)
    plain = lambda q, k, v: va._per_document(q, k, v, segments, options)
    return _check_function("varlen", ([q, k, v], fast, plain), dtype)


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


def check_triton(dtype):
    """Each Triton case's result as it is done (none when Triton cannot run here)."""
    from lorakit.kernels import triton_ops

    if not triton_ops.triton_available():
        print(f"triton ops skipped: {triton_ops.unavailable_reason()}", flush=True)
        return
    try:
        cases = _triton_cases(dtype)
    except Exception as exc:  # noqa: BLE001 - the other checks still run
        yield _guarded("triton", dtype, _raise, exc)
        return
    for name, case in cases.items():
        yield _guarded(name, dtype, _check_function, name, case, dtype)
    yield _guarded("ce rows", dtype, _check_cross_entropy_rows, dtype)
    yield _guarded("lm_head+ce triton", dtype, check_lm_head, dtype, True)


def _raise(exc: Exception):
    raise exc


def _check_function(name, case, dtype) -> dict:
    """case = (inputs, fast fn, plain fn): output and input gradients under one random upstream
    gradient, the fast fn as is against the plain one in float64."""
    inputs, fast, plain = case
    pairs = []
    for fn, cast in ((fast, lambda t: t), (plain, lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
        (out.double() * upstream.double()).sum().backward()
        pairs.append([out.detach()] + [leaf.grad for leaf in leaves])
    cosine, error = _compare(*pairs)
    return {"case": name, "dtype": str(dtype).removeprefix("torch."), "min_cosine": cosine,
            "max_rel_error": error}


def _guarded(label, dtype, check, *args) -> dict:
    """One case's result, or a failed row naming the error: the other cases still run."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to compile is a result too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"case": label, "dtype": str(dtype).removeprefix("torch."), "min_cosine": float("nan"),
                "max_rel_error": float("nan"), "error": f"{type(exc).__name__}: {first}"[:300]}


def _report(result: dict, results: list[dict], json_path: str | None) -> None:
    """Print the case at once and rewrite the JSON: a timeout keeps what was done."""
    results.append(result)
    verdict = "ok" if _passed(result) else "FAILED"
    line = (f"{result['case']:<18}{result['dtype']:<10}min cosine {result['min_cosine']:.6f}  "
            f"max rel error {result['max_rel_error']:.2e}  {verdict}")
    print(line + (f"  ({result['error']})" if "error" in result else ""), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


def _passed(result: dict) -> bool:
    """False for NaN too: a failed case."""
    bound = MAX_REL_ERROR.get(result["dtype"], MAX_REL_ERROR["bfloat16"])
    return result["min_cosine"] >= MIN_COSINE and result["max_rel_error"] <= bound


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
    results: list[dict] = []
    # the fp32 masters' gradients written in fp32 by the GEMM (fused_lora._gemm_widens), or cast
    print("adapter gradients written in fp32 by the GEMM:",
          fused_lora._gemm_widens(torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE),
                                  torch.bfloat16, torch.float32), flush=True)
    # fp16 last: what --dtype auto trains in on a GPU without bf16 (a T4), checked here on CUDA too
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for name, (modules, fused, plain) in _cases(dtype).items():
            _report(_guarded(name, dtype, check_block, name, modules, fused, plain, dtype), results, args.json)
        _report(_guarded("lm_head+ce", dtype, check_lm_head, dtype), results, args.json)
        for result in itertools.chain(check_triton(dtype), check_varlen(dtype)):
            _report(result, results, args.json)
    for result in check_triton_direct_launch():
        _report(result, results, args.json)
    return 0 if all(_passed(r) for r in results) else 1


def check_triton_direct_launch():
    """The Triton cases again with triton_launch's direct launch (opt-in until measured): a first pass
    keys the compiled kernels, the second launches them directly and is reported."""
    from lorakit.kernels import triton_launch

    previous = triton_launch.launch_mode("direct")
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for _ in check_triton(dtype):
                pass
            before = triton_launch.direct_launches()
            results = list(check_triton(dtype))
            direct = triton_launch.direct_launches() - before
            print(f"direct launches in the reported pass: {direct}", flush=True)
            for result in results:
                yield {**result, "case": result["case"] + " direct"}
            # without a direct launch the rows above tested Triton's own path (expected before Triton 3.3)
            if DEVICE == "cuda" and results and not direct and triton_launch._DIRECT_LAUNCH_SUPPORTED:
                yield {"case": "direct launch", "dtype": str(dtype).removeprefix("torch."), "min_cosine": float("nan"),
                       "max_rel_error": float("nan"), "error": "no launch took the compiled kernel directly"}
    finally:
        triton_launch.launch_mode(previous)


if __name__ == "__main__":
    sys.exit(main())
