"""Tests for crash-safe checkpoints (lorakit.train.checkpoint) and RNG capture (lorakit.train.rng).

The kill tests SIGKILL a process in the middle of a save: a forked child that kills itself at
each file-system call of a save in turn, and real subprocesses killed after fixed delays.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit.safe_io as safe_io
from lorakit.errors import AdapterFileError, AdapterMismatchError, OutputError
from lorakit.train.checkpoint import (
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    verify_checkpoint,
)
from lorakit.train.rng import capture_rng, restore_rng

SRC = Path(safe_io.__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# A tiny model whose training draws from torch, numpy and python RNGs (dropout, data, noise).


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _make_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # a frozen "base" weight, as with LoRA
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.3 * s))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        x = torch.randn(6, 8) * (1.0 + random.random()) + float(np.random.rand())
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_run(root, step, model, optimizer, scheduler, keep=3, extra=None):
    return save_checkpoint(
        root,
        step,
        model_tensors=_trainable(model),
        optimizer=optimizer,
        scheduler_state=scheduler.state_dict(),
        trainer_state={"epoch": 1, "batch_index": step % 4, **(extra or {})},
        keep=keep,
    )


def _resume(path, restore_rng_state=True, restore_optimizer=True, seed=0):
    model, optimizer, scheduler = _make_run(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()  # so that only loading can bring the trained values back
    ckpt = load_checkpoint(path)
    missing, unexpected = model.load_state_dict(ckpt.model_tensors, strict=False)
    assert unexpected == [] and set(missing) == {"0.weight"}
    if restore_optimizer:
        load_optimizer_state(optimizer, ckpt)
    scheduler.load_state_dict(ckpt.scheduler_state)
    if restore_rng_state:
        ckpt.restore_rng()
    return model, optimizer, scheduler


def _uninterrupted(total):
    _seed_all(1)
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, total)
    return model


@pytest.mark.parametrize("variant", ["full", "no_rng", "no_optimizer"])
def test_resume_continues_bit_identically(tmp_path, variant):
    reference = _uninterrupted(8)
    _seed_all(1)
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, 4)
    path = _save_run(tmp_path, 4, model, optimizer, scheduler)
    _seed_all(999)  # a "new process": every generator somewhere else
    model, optimizer, scheduler = _resume(
        path, restore_rng_state=variant != "no_rng", restore_optimizer=variant != "no_optimizer"
    )
    _train(model, optimizer, scheduler, 4)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    # The negative controls prove the test can see a missing piece of state.
    assert same is (variant == "full")


def test_trainer_state_round_trip(tmp_path):
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, 2)
    extra = {"counters": {"nonfinite": 1}, "config": {"lora": {"r": 8, "targets": ("q", "v")}},
             "base_model_fingerprint": "llama-64:abc123"}
    ckpt = load_checkpoint(_save_run(tmp_path, 2, model, optimizer, scheduler, extra=extra))
    state = ckpt.trainer_state
    assert ckpt.step == state["step"] == 2
    assert state["epoch"] == 1 and state["batch_index"] == 2
    assert state["config"] == {"lora": {"r": 8, "targets": ("q", "v")}}
    assert state["counters"] == {"nonfinite": 1}
    assert state["base_model_fingerprint"] == "llama-64:abc123"
    assert {"torch", "transformers", "lorakit", "python"} <= set(state["versions"])
    assert ckpt.scheduler_state == scheduler.state_dict()
    saved = optimizer.state_dict()
    assert ckpt.optimizer_state_dict["param_groups"] == saved["param_groups"]
    assert set(ckpt.optimizer_state_dict["state"]) == set(saved["state"]) == {0, 1, 2}
    opt_names = set(load_file(ckpt.path / "optimizer.safetensors"))
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= opt_names


def test_rng_capture_restore_draws_identically():
    generator = torch.Generator().manual_seed(5)
    _seed_all(3)
    random.gauss(0, 1)  # leaves a cached gauss_next in python's state
    np.random.standard_normal()  # and a cached gaussian in numpy's
    tensors, meta = capture_rng(generators={"sampler": generator})
    json.dumps(meta)  # metadata must be plain JSON

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.standard_normal(), torch.rand(4).tolist(),
                torch.randperm(10, generator=generator).tolist())

    first = draw()
    _seed_all(123)
    generator.manual_seed(77)
    assert draw() != first
    restore_rng(tensors, meta, generators={"sampler": generator})
    assert draw() == first


def test_rng_warns_about_missing_generator(caplog):
    tensors, meta = capture_rng(generators={"sampler": torch.Generator()})
    with caplog.at_level(logging.WARNING):
        restore_rng(tensors, meta)
    assert "sampler" in caplog.text


def test_rng_cuda_states_saved_per_device_and_restored(monkeypatch, caplog):
    """Wiring check without a GPU: fake two CUDA devices at save, one at restore."""
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    tensors, meta = capture_rng()
    assert meta["cuda_devices"] == 2 and torch.equal(tensors["torch.cuda.1"], saved[1])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device: restored.update({device: t}))
    with caplog.at_level(logging.WARNING):
        restore_rng(tensors, meta)
    assert list(restored) == [0] and torch.equal(restored[0], saved[0])
    assert "2 CUDA device(s) but 1 are visible" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_cuda_restore_on_a_real_gpu():
    torch.cuda.manual_seed_all(4)
    tensors, meta = capture_rng()
    first = torch.rand(8, device="cuda").cpu()
    torch.cuda.manual_seed_all(5)
    restore_rng(tensors, meta)
    assert torch.equal(torch.rand(8, device="cuda").cpu(), first)


def test_no_pickle_in_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, 1)
    path = _save_run(tmp_path, 1, model, optimizer, scheduler)
    for file in path.iterdir():
        assert file.suffix in {".json", ".safetensors"}, file
        head = file.read_bytes()[:4]
        assert not head.startswith(b"PK") and head[:1] != b"\x80", file

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    assert load_checkpoint(path).step == 1


def test_keep_only_newest(tmp_path):
    model, optimizer, scheduler = _make_run()
    for step in (1, 2, 3, 10, 1000000):
        _save_run(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000", "step-000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010", "step-1000000"]


def test_same_step_saved_twice_keeps_the_second(tmp_path):
    model, optimizer, scheduler = _make_run()
    _save_run(tmp_path, 5, model, optimizer, scheduler, extra={"marker": "first"})
    _save_run(tmp_path, 5, model, optimizer, scheduler, extra={"marker": "second"})
    assert load_checkpoint(find_latest_valid(tmp_path)).trainer_state["marker"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: _truncate(p / "optimizer.safetensors"),
        lambda p: _flip_byte(p / "adapter_model.safetensors"),
        lambda p: _flip_byte(p / "trainer_state.json"),
        lambda p: (p / "rng.safetensors").unlink(),
        lambda p: (p / "manifest.json").unlink(),
        lambda p: (p / "manifest.json").write_text("{not json"),
    ],
    ids=["truncate", "flip-adapter", "flip-state", "missing-file", "no-manifest", "bad-manifest"],
)
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    model, optimizer, scheduler = _make_run()
    _save_run(tmp_path, 1, model, optimizer, scheduler)
    _train(model, optimizer, scheduler, 1)
    newest = _save_run(tmp_path, 2, model, optimizer, scheduler)
    damage(newest)
    assert verify_checkpoint(newest) is not None
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(tmp_path) == tmp_path / "step-000001"
    assert "step-000002" in caplog.text
    with pytest.raises(AdapterFileError, match="damaged"):
        load_checkpoint(newest)
    assert load_checkpoint(tmp_path / "step-000001").step == 1


def test_a_resumed_run_never_prunes_its_new_checkpoint_for_a_damaged_later_one(tmp_path):
    model, optimizer, scheduler = _make_run()
    _save_run(tmp_path, 1, model, optimizer, scheduler, keep=2)
    damaged = _save_run(tmp_path, 4, model, optimizer, scheduler, keep=2)
    (damaged / "adapter_model.safetensors").write_bytes(b"torn")
    assert find_latest_valid(tmp_path) == tmp_path / "step-000001"  # the resume point
    _save_run(tmp_path, 2, model, optimizer, scheduler, keep=1)  # counting step 4 deleted this one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004"]
    assert find_latest_valid(tmp_path) == tmp_path / "step-000002"
    _save_run(tmp_path, 4, model, optimizer, scheduler, keep=1)  # reaching step 4 replaces the damaged one
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"] and verify_checkpoint(damaged) is None


def test_a_checkpoint_moved_aside_by_an_interrupted_re_save_is_put_back(tmp_path):
    # _publish renames the old step-N aside, then the new copy into place: a kill between the two
    model, optimizer, scheduler = _make_run()
    _save_run(tmp_path, 1, model, optimizer, scheduler)
    done = _save_run(tmp_path, 2, model, optimizer, scheduler)
    done.rename(tmp_path / ".tmp-replaced-step-000002-4242")
    (tmp_path / ".tmp-step-000002-4243").mkdir()  # the new copy, never renamed
    assert find_latest_valid(tmp_path) == done and verify_checkpoint(done) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_stale_temp_folders_are_ignored_and_removed(tmp_path):
    model, optimizer, scheduler = _make_run()
    good = _save_run(tmp_path, 1, model, optimizer, scheduler)
    # A complete-looking copy under a temp name must still never be used.
    shutil.copytree(good, tmp_path / ".tmp-step-000099-4242")
    (tmp_path / ".tmp-step-000050-1").mkdir()
    (tmp_path / ".tmp-step-000050-1" / "adapter_model.safetensors").write_bytes(b"partial")
    assert find_latest_valid(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    (tmp_path / ".tmp-step-000007-1").mkdir()
    _save_run(tmp_path, 2, model, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_find_latest_valid_without_checkpoints(tmp_path):
    assert find_latest_valid(tmp_path / "absent") is None
    assert find_latest_valid(tmp_path) is None


def _fail_nth(n, real):
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return wrapper, calls


@pytest.mark.parametrize("function", ["fsync", "save_file", "rename"])
def test_disk_full_during_save_keeps_earlier_checkpoints(tmp_path, monkeypatch, function):
    model, optimizer, scheduler = _make_run()
    for step in (1, 2):
        _save_run(tmp_path, step, model, optimizer, scheduler, keep=2)
    before = {p.name: (p / "manifest.json").read_text() for p in list_checkpoints(tmp_path)}
    failures = 0
    for n in range(1, 100):  # fail the n-th call of this function during the save, for every n
        if function == "save_file":
            wrapper, calls = _fail_nth(n, safe_io._safetensors_save_file)
            monkeypatch.setattr(safe_io, "_safetensors_save_file", wrapper)
        else:
            wrapper, calls = _fail_nth(n, getattr(os, function))
            monkeypatch.setattr(os, function, wrapper)
        try:
            _save_run(tmp_path, 3, model, optimizer, scheduler, keep=2)
        except OutputError as exc:
            assert "disk full" in str(exc) and "--output" in str(exc)
            failures += 1
        finally:
            monkeypatch.undo()
        if calls["count"] < n:
            break
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        after = {p.name: (p / "manifest.json").read_text() for p in list_checkpoints(tmp_path)}
        assert {name: after.get(name) for name in before} == before
        # Only a failure after the final rename (fsync of the parent) may leave step 3 behind,
        # and then it is complete.
        assert set(after) - set(before) <= {"step-000003"}
        assert all(verify_checkpoint(p) is None for p in list_checkpoints(tmp_path))
        shutil.rmtree(tmp_path / "step-000003", ignore_errors=True)
    assert failures >= 3 if function != "rename" else failures >= 1


def test_resume_keeps_this_runs_hyperparameters_and_the_saved_moments(tmp_path):
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, 2)
    ckpt = load_checkpoint(_save_run(tmp_path, 2, model, optimizer, scheduler))
    trainable = [p for p in model.parameters() if p.requires_grad]
    resumed = torch.optim.AdamW(trainable, lr=5e-3, betas=(0.9, 0.99), weight_decay=0.0)  # new flags
    load_optimizer_state(resumed, ckpt)
    group = resumed.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.0, (0.9, 0.99))
    assert group["lr"] == optimizer.param_groups[0]["lr"]  # the schedule's, as saved
    assert all(torch.equal(resumed.state[p]["exp_avg"], optimizer.state[p]["exp_avg"]) for p in trainable)


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = _make_run()
    _train(model, optimizer, scheduler, 1)
    ckpt = load_checkpoint(_save_run(tmp_path, 1, model, optimizer, scheduler))
    bigger = nn.Linear(16, 5)  # same number of tensors, different shapes
    other = torch.optim.AdamW([model[0].bias, bigger.weight, bigger.bias])
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_optimizer_state(other, ckpt)
    fewer = torch.optim.AdamW([model[0].bias])
    with pytest.raises(AdapterMismatchError, match="3 trainable tensors saved, 1 now"):
        load_optimizer_state(fewer, ckpt)


# ---------------------------------------------------------------------------------------------
# Kill tests


def _simple_state(step):
    tensors = {"w": torch.full((64, 64), float(step))}
    optimizer = {
        "state": {0: {"step": torch.tensor(float(step)),
                      "exp_avg": torch.full((64, 64), step + 0.5)}},
        "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.99)}],
    }
    return tensors, optimizer


def _save_simple(root, step, rng):
    tensors, optimizer = _simple_state(step)
    save_checkpoint(root, step, model_tensors=tensors, optimizer=optimizer,
                    scheduler_state={"last_epoch": step}, trainer_state={"marker": step},
                    keep=2, rng=rng)


def _assert_consistent(path):
    ckpt = load_checkpoint(path)
    step = ckpt.step
    assert path.name == f"step-{step:06d}" and ckpt.trainer_state["marker"] == step
    assert torch.equal(ckpt.model_tensors["w"], _simple_state(step)[0]["w"])
    exp_avg = ckpt.optimizer_state_dict["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, torch.full((64, 64), step + 0.5))
    return step


def _install_tripwire(n):
    """In a child process: SIGKILL ourselves at the n-th file-system call of interest."""
    calls = {"count": 0}

    def wrap(real, partial_write=False):
        def wrapper(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == n:
                if partial_write:  # die half way through writing a tensor file
                    real(*args, **kwargs)
                    with open(args[1], "r+b") as fh:
                        fh.truncate(os.path.getsize(args[1]) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return wrapper

    for name in ("fsync", "replace", "rename", "mkdir", "unlink"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)
    safe_io._safetensors_save_file = wrap(safe_io._safetensors_save_file, partial_write=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_every_point_of_a_save(tmp_path, caplog):
    rng = capture_rng()
    template = tmp_path / "template"
    for step in (1, 2):
        _save_simple(template, step, rng)
    outcomes = []
    for n in range(1, 200):
        root = tmp_path / f"kill-{n}"
        shutil.copytree(template, root)
        pid = os.fork()
        if pid == 0:  # child: save step 3 and die at call n
            try:
                _install_tripwire(n)
                _save_simple(root, 3, rng)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            break  # the save now finishes before the n-th call: every point was covered
        assert os.WTERMSIG(status) == signal.SIGKILL
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            latest = find_latest_valid(root)
        assert caplog.records == []  # a killed save leaves nothing that looks damaged
        assert latest is not None and _assert_consistent(latest) in (2, 3)
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        outcomes.append(latest.name)
        _save_simple(root, 4, rng)  # the next save works and cleans up
        assert find_latest_valid(root).name == "step-000004"
    assert len(outcomes) >= 20
    assert {"step-000002", "step-000003"} <= set(outcomes)


_CHILD = """
import sys, torch
from lorakit.train.checkpoint import save_checkpoint
root = sys.argv[1]
w = torch.zeros(512, 512)
print("ready", flush=True)
sys.stdin.readline()  # start the clock only once every child has imported torch
step = 0
while True:
    step += 1
    w.fill_(step)
    optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": w + 0.5}},
                 "param_groups": [{"params": [0], "lr": 0.1}]}
    save_checkpoint(root, step, model_tensors={"w": w}, optimizer=optimizer,
                    scheduler_state=None, trainer_state={"marker": step}, keep=2)
    print(step, flush=True)
"""


def _check_killed_run(root, printed):
    latest = find_latest_valid(root)
    if latest is None:
        assert printed == []
        return None
    ckpt = load_checkpoint(latest)
    assert torch.equal(ckpt.model_tensors["w"], torch.full((512, 512), float(ckpt.step)))
    assert ckpt.trainer_state["marker"] == ckpt.step
    assert ckpt.optimizer_state_dict["state"][0]["step"].item() == ckpt.step
    # Every save that returned is found; at most one more finished unreported.
    last = printed[-1] if printed else 0
    assert last <= ckpt.step <= last + 1
    return ckpt.step


def test_sigkill_subprocess_after_fixed_delays(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    delays = (0.02, 0.15, 0.5)
    children = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / f"run-{i}")], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(len(delays))
    ]  # started together so their torch imports overlap
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    found = []
    for i, (child, delay) in enumerate(zip(children, delays)):
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        printed = [int(line) for line in child.stdout.read().split()]
        child.wait()
        found.append(_check_killed_run(tmp_path / f"run-{i}", printed))
    assert any(step is not None for step in found), "no run lived long enough to save"
