"""A measured lead, not a fast path: the bench's CPU step with its rows split across threads.

On the Intel Xeon of 2026-11-30 (2 cores) a step of `lorakit bench --preset cpu` spent about a
quarter of its time outside the big GEMMs: element-wise work, rank-r GEMMs and the fork/join of
two OpenMP threads around each of the ~5,600 small calls. This runs the same model, batch and
optimizer two ways, taking turns so that a busy machine slows both alike:

    serial    the trainer's way: the 4 x 256 batch, torch on all --threads
    rows      two Python threads, each the forward + backward of half the rows with one torch
              thread (torch.autograd.grad, gradients summed in a fixed order: deterministic)

and prints each round's seconds and the medians. It changes nothing in lorakit. Three runs of 8
rounds on that Xeon (2026-12-01) gave rows' median at 0.85x, 1.03x and 0.96x serial's: within
the machine's noise, so the trainer does not split rows (it would also need packed rows collated
per half, the fused paths' per-call state checked for threads, and a choice per machine).

    PYTHONPATH=src python scripts/cpu_row_parallel.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextvars
import statistics
import threading
import time

import torch

from lorakit.bench_inputs import make_inputs
from lorakit.bench_settings import BenchSettings, resolve
from lorakit.bench_variants import prepare_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    plan = resolve(BenchSettings(preset="cpu", threads=args.threads))
    prepared = prepare_variant("lorakit", plan)
    batch = make_inputs(plan)[prepared.inputs_key]
    params = [p for p in prepared.model.parameters() if p.requires_grad]
    half = batch["input_ids"].shape[0] // 2
    halves = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]

    def update() -> None:
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)

    def serial() -> None:
        torch.set_num_threads(args.threads)
        prepared.loss_fn(batch).backward()
        update()

    def rows() -> None:
        torch.set_num_threads(max(1, args.threads // 2))
        grads: list = [None, None]

        def work(i: int) -> None:
            grads[i] = torch.autograd.grad(prepared.loss_fn(halves[i]), params)

        workers = [threading.Thread(target=contextvars.copy_context().run, args=(work, i)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for param, first, second in zip(params, *grads):
            param.grad = (first + second) / 2  # each half's loss is its own mean
        update()

    timings: dict[str, list[float]] = {"serial": [], "rows": []}
    for step in (serial, rows):  # warm-up
        step()
    for _ in range(args.rounds):
        for name, step in (("serial", serial), ("rows", rows)):
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    for name, seconds in timings.items():
        print(f"{name:7s} median {statistics.median(seconds):.2f} s  rounds {[round(s, 2) for s in seconds]}")


if __name__ == "__main__":
    main()
