"""Packed-row attention on CPU: the 4D block-causal mask vs lorakit_varlen, one training step each.

Two identical seeded models (SmolLM2-135M shape, LoRA r=16 on all projections, lorakit's fast
paths, causal_lm_loss, AdamW: bench.py's "lorakit" variant) train on the same packed rows, one
collated with packed_attention="4d", the other with "varlen" under lorakit_varlen attention.
Steps alternate A, B, A, B so load bursts on a shared machine hit both alike; the losses of
every step must agree (same math). Saved-for-backward bytes are counted on the first step.

    python3 scripts/bench_varlen.py --seq-len 256 --threads 2
    python3 scripts/bench_varlen.py --seq-len 1024 --max-doc 256 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lorakit.bench import BenchSettings, SavedForBackward, resolve, train_step
from lorakit.bench_variants import prepare_variant
from lorakit.data.batching import collate, plan_batches
from lorakit.kernels.varlen_attention import use_varlen_attention

MODES = ("4d", "varlen")


def packed_rows(batch: int, seq_len: int, max_doc: int, vocab: int, seed: int) -> list[list[dict]]:
    """The first `batch` packed rows of random examples max_doc/8 to max_doc tokens long."""
    gen = torch.Generator().manual_seed(seed)
    examples, total = [], 0
    while total < 2 * batch * seq_len:
        n = int(torch.randint(max(1, max_doc // 8), max_doc + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": ids})
        total += n
    first = plan_batches([len(e["input_ids"]) for e in examples], batch, seq_len, True,
                         shuffle=False, seed=seed, epoch=0)[0]
    return [[examples[i] for i in row] for row in first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-doc", type=int, default=None, help="longest example (default: seq-len)")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's 30")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = resolve(BenchSettings(preset="cpu", batch=args.batch, seq_len=args.seq_len, layers=args.layers,
                                 packing=True, threads=args.threads, seed=args.seed, isolate=False,
                                 variants=["lorakit"]))
    rows = packed_rows(args.batch, args.seq_len, args.max_doc or args.seq_len, plan.shape["vocab_size"], args.seed)
    batches = {mode: collate(rows, True, args.seq_len, 0, packed_attention=mode) for mode in MODES}
    prepared = {mode: prepare_variant("lorakit", plan) for mode in MODES}
    notices = use_varlen_attention(prepared["varlen"].model)
    assert not notices, notices
    raw = {mode: {"wall_s": [], "losses": [], "saved_bytes": None} for mode in MODES}
    for step in range(args.warmup + args.steps):
        for mode in (MODES if step % 2 == 0 else MODES[::-1]):  # alternate who goes first
            saved = SavedForBackward(prepared[mode].model) if step == 0 else None
            wall, _, loss = train_step(prepared[mode], batches[mode], "cpu", saved.hooks() if saved else None)
            raw[mode]["losses"].append(loss)
            if saved:
                raw[mode]["saved_bytes"] = saved.nbytes
            if step >= args.warmup:
                raw[mode]["wall_s"].append(wall)
        timed = {m: f" {raw[m]['wall_s'][-1]:.3f} s" if step >= args.warmup else "" for m in MODES}
        print(f"step {step + 1}: " + ", ".join(f"{m} loss {raw[m]['losses'][-1]:.6f}{timed[m]}" for m in MODES),
              flush=True)
    width, layers = batches["4d"]["input_ids"].shape[1], plan.shape["num_hidden_layers"]
    summary = {
        "shape": f"{args.batch} x {width} packed, {layers} layers",
        "documents_per_row": [len(row) for row in rows], "threads": args.threads,
        "max_loss_diff": max(abs(a - b) for a, b in zip(raw["4d"]["losses"], raw["varlen"]["losses"])),
        "mask_bytes": batches["4d"]["attention_mask"].numel() * batches["4d"]["attention_mask"].element_size(),
    }
    for mode in MODES:
        times = raw[mode]["wall_s"]
        summary[mode] = {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                         "saved_MiB": round(raw[mode]["saved_bytes"] / 2**20, 2)}
    summary["speedup_median"] = round(summary["4d"]["median_s"] / summary["varlen"]["median_s"], 3)
    summary["speedup_min"] = round(summary["4d"]["min_s"] / summary["varlen"]["min_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
