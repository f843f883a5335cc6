"""`lorakit bench` on a CPU: every variant in a child process of its own, because a process's
peak RSS never goes down (and models sharing one process slow each other unequally).

    spawn(name, plan)        one child, alone: build, warm up, time the steps, report
    run_lockstep(plan)       a child per variant, all built first, then taking their steps in turn,
                             so a shared machine's bursts of load hit every variant alike

A child runs `python -m lorakit.bench_children REQUEST` and answers on stdout with lines that
start with _REPLY (anything else a library prints is skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

from lorakit.bench import (BenchSettings, Plan, SavedForBackward, gemm_backend, measure_matmul_peak, measure_variant,
                           memory_figures, new_raw, record_step, resolve, train_step)
from lorakit.bench_inputs import make_inputs
from lorakit.bench_variants import prepare_variant
from lorakit.kernels import cpu_gemm
from lorakit.host import peak_rss_bytes


def child_main(request_json: str) -> None:
    """Entry point of a CPU child: one variant. Alone: its raw measurements as the last stdout
    line. Lockstep: one step per "step" line on stdin, a reply line after each; at end of input
    the raw measurements."""
    request = json.loads(request_json)
    plan = resolve(BenchSettings(**request["settings"]))
    torch.set_num_threads(plan.settings.threads)
    if request.get("lockstep"):
        raw = _lockstep_child(request["variant"], plan, make_inputs(plan))
    else:
        raw = measure_variant(request["variant"], plan, make_inputs(plan))
    raw["matmul_tflops"] = measure_matmul_peak("cpu", plan.dtype)  # under this child's conditions
    _reply(raw)


_REPLY = "LORAKIT-BENCH "  # marks the protocol's stdout lines among anything a library prints


def _reply(message: dict) -> None:
    print(_REPLY + json.dumps(message), flush=True)


def _lockstep_child(name: str, plan: Plan, inputs: dict) -> dict:
    """A variant's steps, each when the parent asks: the variants' processes take turns."""
    rss_before = peak_rss_bytes()
    prepared = prepare_variant(name, plan)
    rss_built = peak_rss_bytes()
    s, saved, raw = plan.settings, SavedForBackward(prepared.model), new_raw(name)
    batch, products = inputs[prepared.inputs_key], cpu_gemm.onednn_products()
    _reply({"ready": True})
    for step, _ in enumerate(sys.stdin):
        hooks = saved.hooks() if step == 0 and s.warmup > 0 else None
        result = train_step(prepared, batch, plan.device, hooks)
        record_step(raw, step >= s.warmup, result)
        _reply({"wall_s": result[0], "loss": result[2]})
    raw.update(saved_bytes=saved.nbytes if s.warmup > 0 else None, notices=prepared.notices,
               memory=memory_figures(plan.device, rss_before, rss_built),
               cpu_gemm=gemm_backend(cpu_gemm.onednn_products() - products, max(len(raw["losses"]), 1),
                                         plan.device))
    return raw


def _child_command(name: str, plan: Plan, lockstep: bool) -> tuple[list[str], dict]:
    import lorakit

    src = os.path.dirname(os.path.dirname(os.path.abspath(lorakit.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    request = json.dumps({"variant": name, "settings": asdict(plan.settings), "lockstep": lockstep})
    return [sys.executable, "-m", "lorakit.bench_children", request], env


def spawn(name: str, plan: Plan) -> dict:
    command, env = _child_command(name, plan, lockstep=False)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    replies = [line[len(_REPLY):] for line in out.stdout.splitlines() if line.startswith(_REPLY)]
    if out.returncode != 0 or not replies:
        return {"variant": name, "error": "\n".join(out.stderr.strip().splitlines()[-3:]) or "no output"}
    return json.loads(replies[-1])


class _LockstepChild:
    """One variant's process, driven a step at a time; stderr goes to a temporary file (a pipe
    nobody reads would fill and block the child)."""

    def __init__(self, name: str, plan: Plan):
        import tempfile

        command, env = _child_command(name, plan, lockstep=True)
        self.name, self.stderr = name, tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env=env)
        self.error: str | None = None

    def read(self) -> dict | None:
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        self.process.wait()
        self.stderr.seek(0)
        self.error = "\n".join(self.stderr.read().strip().splitlines()[-3:]) or "the child process ended"
        return None

    def step(self) -> dict | None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        self.process.stdin.close()
        raw = self.read()
        self.process.wait()
        return raw if raw is not None else {"variant": self.name, "error": self.error}


def run_lockstep(plan: Plan, log=print) -> list[dict]:
    """CPU: a child process per variant, all built first, then taking their steps in turn: a
    shared machine's bursts of load hit every variant alike, and no variant shares a heap,
    allocator state or caches' contents with another (as models in one process would)."""
    s = plan.settings
    children = [_LockstepChild(name, plan) for name in s.variants]
    live = [child for child in children if child.read() is not None]
    for step in range(s.warmup + s.steps):
        replies = {child.name: child.step() for child in live}
        live = [child for child in live if replies[child.name] is not None]
        timed = step >= s.warmup
        log(f"    step {step + 1}/{s.warmup + s.steps}: " + ", ".join(
            f"{name} {r['loss']:.4f}" + (f" {r['wall_s']:.3g} s" if timed else "")
            for name, r in replies.items() if r is not None))
    return [child.finish() if child in live else {"variant": child.name, "error": child.error}
            for child in children]


if __name__ == "__main__":
    child_main(sys.argv[1])
