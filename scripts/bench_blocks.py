"""Per-block CPU timing of lorakit's fused paths against the plain module-by-module path.

One process, SmolLM2-135M widths (hidden 576, KV 192, intermediate 1536, vocab 49152),
`--tokens` rows, LoRA r=16 with a non-zero B. Each block's forward + backward runs plain and
fused alternately `--repeats` times; the minimum of each resists a busy machine better than the
mean. Process CPU time is reported too. The end-to-end comparison is `lorakit bench`.
The fused side takes kernels/cpu_gemm's choice of GEMMs (oneDNN on a CPU where it is faster);
LORAKIT_CPU_GEMM=aten compares the two on torch's GEMMs alone.

    q,k,v        q(x), k(x), v(x)              vs lora_qkv (one adapter-A GEMM, x saved once)
    o            o(x)                          vs lora_linear (update added in place)
    mlp          down(silu(gate(x)) * up(x))   vs lora_mlp (silu(e) * g recomputed in backward)
    lm_head+ce   cross_entropy(x W^T)          vs chunked_lm_head_loss (no full logits)

    PYTHONPATH=src python scripts/bench_blocks.py [--tokens 1024] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.chunked_ce import chunked_lm_head_loss
from lorakit.kernels.fused_lora import lora_linear, lora_mlp, lora_qkv
from lorakit.lora import LoraLinear

HIDDEN, KV, INTER, VOCAB, RANK = 576, 192, 1536, 49152, 16


def _lora(n_in: int, n_out: int) -> LoraLinear:
    layer = LoraLinear(nn.Linear(n_in, n_out, bias=False).requires_grad_(False), RANK, 2 * RANK, 2.0)
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    return layer


def cases(tokens: int, chunk_size: int) -> dict:
    """block -> (plain fn, fused fn), each returning the scalar to backpropagate."""
    torch.manual_seed(0)
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    head = torch.randn(VOCAB, HIDDEN) * HIDDEN**-0.5
    labels = torch.randint(0, VOCAB, (tokens,))
    qkv, o = [_lora(HIDDEN, HIDDEN), _lora(HIDDEN, KV), _lora(HIDDEN, KV)], _lora(HIDDEN, HIDDEN)
    gate, up, down = _lora(HIDDEN, INTER), _lora(HIDDEN, INTER), _lora(INTER, HIDDEN)
    return {
        "q,k,v": (lambda: sum(m(x).sum() for m in qkv), lambda: sum(t.sum() for t in lora_qkv(x, *qkv))),
        "o": (lambda: o(x).sum(), lambda: lora_linear(x, o).sum()),
        "mlp": (lambda: down(F.silu(gate(x)) * up(x)).sum(), lambda: lora_mlp(x, gate, up, down).sum()),
        "lm_head+ce": (lambda: F.cross_entropy(F.linear(x, head), labels),
                       lambda: chunked_lm_head_loss(x, head, labels, chunk_size=chunk_size)),
    }


def time_blocks(tokens: int, repeats: int, chunk_size: int) -> list[dict]:
    results = []
    for name, fns in cases(tokens, chunk_size).items():
        best, cpu = [float("inf")] * 2, [float("inf")] * 2
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start, cpu_start = time.perf_counter(), time.process_time()
                fn().backward()
                best[i] = min(best[i], time.perf_counter() - start)
                cpu[i] = min(cpu[i], time.process_time() - cpu_start)
        results.append({"block": name, "plain_ms": 1e3 * best[0], "fused_ms": 1e3 * best[1],
                        "speedup": best[0] / best[1], "cpu_speedup": cpu[0] / cpu[1]})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = time_blocks(args.tokens, args.repeats, args.chunk_size)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'block':<12}{'plain ms':>10}{'fused ms':>10}{'speed-up':>10}{'cpu speed-up':>14}")
    for r in results:
        print(f"{r['block']:<12}{r['plain_ms']:>10.1f}{r['fused_ms']:>10.1f}{r['speedup']:>10.2f}"
              f"{r['cpu_speedup']:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
