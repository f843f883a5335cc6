"""Check `lorakit estimate` against measured training steps and print the comparison table.

    PYTHONPATH=src python scripts/validate_estimate.py                # CPU grid (~2 min of CPU time)
    PYTHONPATH=src python scripts/validate_estimate.py --update-doc docs/estimator-validation.md
    PYTHONPATH=src python scripts/validate_estimate.py --gpu          # CUDA grid (1b / SmolLM2 shapes)

CPU: lorakit.plan.measure.measure_step (allocator timeline from the profiler + saved-tensor
hooks). GPU: measure_step_cuda (torch.cuda.memory_allocated / max_memory_allocated).
Each row compares the predicted and measured components (MiB) and the total's error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.plan.estimate import TrainShape, estimate_memory
from lorakit.plan.measure import measure_step, measure_step_cuda
from lorakit.plan.model_shapes import PRESETS, ModelShape

MIB = 1024**2
DOC_START, DOC_END = "<!-- validation-table:start -->", "<!-- validation-table:end -->"

# Llama-shaped models small enough for a 2-core CPU (intermediate ~2.7 x hidden, GQA, vocab ~32 x hidden).
CPU_MODELS = {
    "tiny": ModelShape("tiny", 64, 176, 2, 4, 2, 16, 2048, True),
    "small": ModelShape("small", 128, 344, 4, 4, 2, 32, 4096, True),
    "mid": ModelShape("mid", 256, 688, 4, 8, 2, 32, 8192, False),
}


@dataclass
class Point:
    model: str
    shape: TrainShape
    engine: str = "lorakit"

    @property
    def label(self) -> str:
        s = self.shape
        targets = s.targets if isinstance(s.targets, str) else ",".join(s.targets)
        extra = f" drop {s.lora_dropout}" if s.lora_dropout else ""
        quant = f" {s.quantize}" if s.quantize else ""
        return (f"{self.model} {s.dtype}{quant} {self.engine} r{s.r} {targets}{extra} "
                f"{s.batch_size}x{s.seq_len}")


def _both(model: str, engine: str = "lorakit", **kwargs) -> list[Point]:
    return [Point(model, TrainShape(grad_checkpointing=ckpt, **kwargs), engine) for ckpt in (False, True)]


def cpu_grid() -> list[Point]:
    return [
        *_both("tiny", dtype="fp32", r=8, batch_size=2, seq_len=64),
        *_both("tiny", dtype="bf16", r=8, batch_size=2, seq_len=128),
        *_both("small", dtype="fp32", r=32, batch_size=4, seq_len=256),
        *_both("small", dtype="fp32", r=16, batch_size=2, seq_len=128, lora_dropout=0.1),
        *_both("small", dtype="bf16", r=16, batch_size=2, seq_len=256),
        *_both("small", "peft", dtype="bf16", r=16, batch_size=2, seq_len=256),
        *_both("mid", dtype="fp32", r=16, batch_size=2, seq_len=256),
        *_both("mid", dtype="fp32", r=8, batch_size=2, seq_len=128, targets="qv"),
        *_both("mid", dtype="bf16", r=16, batch_size=4, seq_len=256),
        *_both("mid", dtype="bf16", r=16, batch_size=2, seq_len=128, quantize="4bit"),  # bitsandbytes, CPU path
        *_both("mid", dtype="bf16", r=16, batch_size=2, seq_len=128, quantize="8bit"),
    ]


def gpu_grid() -> list[Point]:
    return [
        *_both("smollm2-135m", dtype="bf16", r=16, batch_size=4, seq_len=512),
        *_both("1b", dtype="bf16", r=16, batch_size=2, seq_len=1024),
        *_both("1b", dtype="bf16", r=16, batch_size=4, seq_len=2048),  # the PERF.md anchors
        *_both("1b", "peft", dtype="bf16", r=16, batch_size=4, seq_len=2048),
        *_both("1b", dtype="bf16", r=16, batch_size=2, seq_len=1024, quantize="4bit"),
    ]


def hf_config(m: ModelShape):
    """A transformers LlamaConfig with the shape's sizes (random weights are built from it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
        vocab_size=m.vocab_size, tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=4096,
    )


def run_point(point: Point, gpu: bool) -> dict:
    m = CPU_MODELS.get(point.model) or PRESETS[point.model]
    shape = replace(point.shape, engine=point.engine, device="cuda" if gpu else "cpu")
    predicted = estimate_memory(m, shape)
    measure = measure_step_cuda if gpu else measure_step
    measured = measure(hf_config(m), shape, engine=point.engine)
    if gpu:
        torch.cuda.empty_cache()
    head_pred = predicted.activations_resident + predicted.logits - predicted.allocated_at_head
    row = {
        "point": point.label, "checkpointing": shape.grad_checkpointing,
        "weights": (predicted.weights, measured.weights), "adapter": (predicted.adapter, measured.adapter),
        "activations at head": (predicted.allocated_at_head, measured.activations),
        "head + loss peak": (head_pred, measured.logits),
        "backward peak": (predicted.activations + predicted.workspace, measured.backward_peak),
        "total": (predicted.total, measured.total), "seconds": round(measured.seconds, 2),
    }
    row["error %"] = 100 * (predicted.total / measured.total - 1)
    return row


def markdown(rows: list[dict], command: str) -> str:
    parts = ["weights", "adapter", "activations at head", "head + loss peak", "backward peak", "total"]
    head = "| point | ckpt | " + " | ".join(parts) + " | error on total |"
    lines = [f"Produced by `{command}` (torch {torch.__version__}). MiB, predicted / measured.", "",
             head, "|" + "---|" * (len(parts) + 3)]
    for row in rows:
        cells = [f"{row[p][0] / MIB:.2f} / {row[p][1] / MIB:.2f}" for p in parts]
        lines.append(f"| {row['point']} | {'on' if row['checkpointing'] else 'off'} | "
                     + " | ".join(cells) + f" | {row['error %']:+.1f}% |")
    errors = [abs(r["error %"]) for r in rows]
    lines += ["", f"{len(rows)} points: |error| on the total at most {max(errors):.1f}%, "
                  f"mean {sum(errors) / len(errors):.1f}%."]
    return "\n".join(lines)


def update_doc(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(DOC_START) + ".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {DOC_START} ... {DOC_END} block to replace")
    path.write_text(pattern.sub(lambda _: f"{DOC_START}\n{table}\n{DOC_END}", text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA with max_memory_allocated")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--update-doc", type=Path, help="replace the table block in this markdown file")
    parser.add_argument("--limit", type=int, help="run only the first N points")
    args = parser.parse_args(argv)
    grid = gpu_grid() if args.gpu else cpu_grid()
    rows, start = [], time.perf_counter()
    for point in grid[: args.limit]:
        rows.append(run_point(point, args.gpu))
        print(f"{rows[-1]['point']} ckpt={rows[-1]['checkpointing']}: {rows[-1]['error %']:+.1f}%", file=sys.stderr)
    print(f"{len(rows)} points in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    command = "PYTHONPATH=src python scripts/validate_estimate.py" + (" --gpu" if args.gpu else "")
    table = markdown(rows, command)
    print(json.dumps(rows, indent=1) if args.json else table)
    if args.update_doc:
        update_doc(args.update_doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
