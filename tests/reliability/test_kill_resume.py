"""Exact resume, proven by killing real `python -m lorakit train` processes.

One run of 12 steps (dropout 0.1, grad-accum 2, eval every 4, checkpoint every 2, keep 2) is
killed again and again, each time at another point, and resumed with --resume each time:

    S1  SIGKILL after step 5 (entering step 6)          resume from step 4
    S2  SIGKILL while writing the adapter file of a checkpoint (torn temp file)
    S3  SIGKILL after the manifest, before the rename of the temp folder
    S4  SIGTERM during training: checkpoint, message, exit 130
    S5  SIGKILL half way through deleting the oldest checkpoint (pruning)
    S6  SIGINT during training: checkpoint, message, exit 130
    S7  SIGKILL while metrics.jsonl is rewritten at resume
    S8  SIGKILL while writing the final adapter (after the final checkpoint, before summary.json)
    S9  resume to the end

The end result must be bit-identical to an uninterrupted run with the same seed: adapter file
bytes, tensors, every logged loss / lr / grad norm, the final checkpoint. The kill points are
injected by tests/reliability/killhooks/sitecustomize.py (PYTHONPATH of the child only).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import checkpoint as ckpt
from reliability_kit import LORAKIT, child_env

pytestmark = pytest.mark.xdist_group("kill-chain")  # one worker runs the chain, once (`--dist loadgroup`)

TIMEOUT = 240
ARGS = ["--max-steps", "12", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "64", "--lr", "1e-2",
        "--r", "4", "--dropout", "0.1", "--eval-split", "8", "--seed", "3", "--save-every", "2",
        "--keep-checkpoints", "2", "--eval-every", "4"]


@dataclass
class Stage:
    name: str
    rc: int | None = None
    out: str = ""
    err: str = ""
    valid: list[int] = field(default_factory=list)  # steps of complete checkpoints, newest first
    leftovers: list[str] = field(default_factory=list)  # .tmp-* entries in checkpoints/
    metrics_before: bytes = b""
    metrics_after: bytes = b""
    extra: dict = field(default_factory=dict)


def command(tiny, out: Path, resume: bool) -> list[str]:
    return [*LORAKIT, "train", "--model", str(tiny.model), "--data", str(tiny.data), "--output", str(out),
            *ARGS, *(["--resume"] if resume else [])]


def observe(stage: Stage, out: Path) -> Stage:
    root = out / "checkpoints"
    stage.valid = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(root) if ckpt.verify_checkpoint(p) is None]
    stage.leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-")) if root.is_dir() else []
    metrics = out / "metrics.jsonl"
    stage.metrics_after = metrics.read_bytes() if metrics.exists() else b""
    stage.extra["finished"] = (out / "summary.json").exists()
    return stage


def run_stage(name: str, tiny, out: Path, log_dir: Path, kill_at: str | None = None, resume: bool = True) -> Stage:
    stage = Stage(name)
    metrics = out / "metrics.jsonl"
    stage.metrics_before = metrics.read_bytes() if metrics.exists() else b""
    done = subprocess.run(command(tiny, out, resume), env=child_env(kill_at), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=log_dir)
    stage.rc, stage.out, stage.err = done.returncode, done.stdout, done.stderr
    return observe(stage, out)


def signal_stage(name: str, tiny, out: Path, log_dir: Path, sig: signal.Signals, after_step: int) -> Stage:
    """Start a resume, send `sig` once it reports step `after_step` (or later), wait for the exit."""
    stage = Stage(name)
    stdout_path = log_dir / f"{name}.out"
    with open(stdout_path, "w") as stdout:
        child = subprocess.Popen(command(tiny, out, True), env=child_env(), stdout=stdout, stderr=subprocess.PIPE,
                                 text=True, cwd=log_dir)
        lines = []
        deadline = time.monotonic() + TIMEOUT
        for line in child.stderr:
            lines.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= after_step:
                child.send_signal(sig)
                stage.extra["signalled_at"] = int(line.split()[1].split("/")[0])
                break
            if time.monotonic() > deadline:
                break
        rest = child.communicate(timeout=TIMEOUT)[1]
    stage.rc, stage.err = child.returncode, "".join(lines) + (rest or "")
    stage.out = stdout_path.read_text()
    return observe(stage, out)


@pytest.fixture(scope="module")
def chain(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("killchain")
    ref_out, out = base / "reference", base / "killed"
    reference = subprocess.Popen(command(tiny, ref_out, False), env=child_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=base)  # runs alongside S1
    stages = {}
    stages["S1"] = run_stage("S1", tiny, out, base, "call:lorakit.train.loop:Trainer.train_step:6", resume=False)
    ref_stdout, ref_stderr = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, ref_stderr[-3000:]
    stages["S2"] = run_stage("S2", tiny, out, base, "write:/adapter_model.safetensors:1")
    stages["S3"] = run_stage("S3", tiny, out, base, "call:lorakit.train.checkpoint:_publish:1")
    stages["S4"] = signal_stage("S4", tiny, out, base, signal.SIGTERM, after_step=6)
    stages["S5"] = run_stage("S5", tiny, out, base, "rmtree:.tmp-delete:1")
    stages["S6"] = signal_stage("S6", tiny, out, base, signal.SIGINT, after_step=stages["S5"].valid[0] + 1)
    stages["S7"] = run_stage("S7", tiny, out, base, "write:metrics.jsonl:1")
    stages["S8"] = run_stage("S8", tiny, out, base, "write:/adapter/adapter_model.safetensors:1")
    stages["S9"] = run_stage("S9", tiny, out, base)
    return {"stages": stages, "reference": ref_out, "killed": out}


def killed(stage: Stage) -> bool:
    return stage.rc == -signal.SIGKILL


def no_traceback(stage: Stage) -> bool:
    return "Traceback" not in stage.err and "Traceback" not in stage.out


def test_kill_after_a_step_resumes_from_the_last_checkpoint(chain):
    s1, s2 = chain["stages"]["S1"], chain["stages"]["S2"]
    assert killed(s1), s1.err[-2000:]
    assert s1.valid == [4, 2]
    assert "resumed from step-000004 (step 4" in s2.out


def test_kill_during_the_adapter_write_leaves_a_temp_folder_only(chain):
    s2, s3 = chain["stages"]["S2"], chain["stages"]["S3"]
    assert killed(s2), s2.err[-2000:]
    assert s2.valid == [4, 2] and any(name.startswith(".tmp-step-000006") for name in s2.leftovers)
    assert "resumed from step-000004" in s3.out  # the torn step-6 temp folder is never read


def test_kill_between_manifest_and_rename(chain):
    s3, s4 = chain["stages"]["S3"], chain["stages"]["S4"]
    assert killed(s3), s3.err[-2000:]
    assert s3.valid == [4, 2]
    temp = [name for name in s3.leftovers if name.startswith(".tmp-step-000006")]
    assert temp, s3.leftovers
    assert "resumed from step-000004" in s4.out
    assert not any(name.startswith(".tmp-step") for name in s4.leftovers)  # cleaned on resume


@pytest.mark.parametrize("name, signal_name", [("S4", "SIGTERM"), ("S6", "SIGINT")])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(chain, name, signal_name):
    stage = chain["stages"][name]
    assert stage.rc == 130, stage.err[-2000:]
    assert no_traceback(stage)
    assert f"stopped by {signal_name} at step" in stage.out and "--resume" in stage.out
    step = int(stage.out.split(f"stopped by {signal_name} at step ")[1].split(";")[0])
    assert step >= stage.extra["signalled_at"] and stage.valid[0] == step


def test_kill_while_pruning_keeps_the_newest_checkpoints(chain):
    s5, s6 = chain["stages"]["S5"], chain["stages"]["S6"]
    assert killed(s5), s5.err[-2000:]
    assert len(s5.valid) == 2 and s5.valid[0] > chain["stages"]["S4"].valid[0]
    assert any(name.startswith(".tmp-delete-step") for name in s5.leftovers)
    assert f"resumed from step-{s5.valid[0]:06d}" in s6.out


def test_kill_while_rewriting_metrics_keeps_the_history(chain):
    s7 = chain["stages"]["S7"]
    assert killed(s7), s7.err[-2000:]
    assert s7.metrics_after == s7.metrics_before and s7.metrics_after


def test_kill_while_writing_the_final_adapter(chain):
    s8, s9 = chain["stages"]["S8"], chain["stages"]["S9"]
    assert killed(s8), s8.err[-2000:]
    assert not s8.extra["finished"]
    assert s8.valid[0] == 12
    assert "resumed from step-000012 (step 12" in s9.out


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(chain):
    s9 = chain["stages"]["S9"]
    assert s9.rc == 0, s9.err[-3000:]
    ref, run = chain["reference"], chain["killed"]
    assert (ref / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter" / "adapter_model.safetensors").read_bytes()
    a, b = load_file(ref / "adapter" / "adapter_model.safetensors"), load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = ckpt.step_dir_name(12)
    for name in (ckpt.ADAPTER_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.RNG_FILE):
        assert (ref / "checkpoints" / final / name).read_bytes() == (run / "checkpoints" / final / name).read_bytes(), name


def test_resumed_run_logged_the_same_history(chain):
    def entries(out: Path):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    ref, run = entries(chain["reference"]), entries(chain["killed"])
    assert [e["step"] for e in run if e["kind"] == "train"] == list(range(1, 13))
    assert run == ref  # losses, lr, grad norms, tokens, evals at 4 and 8 and the end: all equal
    summary_ref = json.loads((chain["reference"] / "summary.json").read_text())
    summary_run = json.loads((chain["killed"] / "summary.json").read_text())
    timing = {"tokens_per_second", "peak_memory_bytes", "wall_seconds", "eval_and_checkpoint_seconds", "adapter"}
    assert {k: v for k, v in summary_run.items() if k not in timing} == \
        {k: v for k, v in summary_ref.items() if k not in timing}


def test_resumed_run_shows_the_same_curves_in_tensorboard(chain):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curves(out: Path) -> dict:
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()  # honours the purge_step a resumed writer sets: events after the checkpoint vanish
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    ref, run = curves(chain["reference"]), curves(chain["killed"])
    assert ref and "train/loss" in ref
    assert run == ref


def test_every_stage_left_no_traceback(chain):
    for name, stage in chain["stages"].items():
        assert no_traceback(stage), (name, stage.err[-2000:])
