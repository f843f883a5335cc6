"""NaN / inf through the CLI: checked every step, skipped and counted, K in a row stop the run.

The training loss is made non-finite at chosen steps by wrapping `lorakit.train.loop.causal_lm_loss`
(the loop's only loss call); evaluation calls (model in eval mode) are left alone.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import lorakit.train.loop as loop
from lorakit.cli import main
from lorakit.train import checkpoint as ckpt
from reliability_kit import train_args


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, bad: dict[int, str]) -> list[int]:
    """Make the training loss of the given steps (1-based; grad-accum 1) nan / inf / spike / nan-grad."""
    original, steps = loop.causal_lm_loss, []

    def loss(model, batch, normalizer, **options):
        value = original(model, batch, normalizer, **options)
        if not model.training:
            return value
        steps.append(len(steps) + 1)
        kind = bad.get(steps[-1])
        if kind == "nan":
            return value * float("nan")
        if kind == "inf":
            return value * float("inf")
        if kind == "spike":
            return value * 20
        if kind == "nan-grad":
            return _NanGradient.apply(value)
        return value

    monkeypatch.setattr(loop, "causal_lm_loss", loss)
    return steps


def adapter_at(out, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / ckpt.step_dir_name(step) / ckpt.ADAPTER_FILE)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_steps_are_skipped_counted_and_reported(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, {2: "nan", 4: "inf", 6: "nan-grad"})
    assert main(train_args(tiny, out, "--max-steps", "7", "--eval-split", "0", "--keep-checkpoints", "8")) == 0
    printed = capsys.readouterr().out
    for step in (2, 4, 6):
        assert f"step {step}: non-finite loss or gradient, update skipped (1 in a row)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["steps"] == 7
    for step in (2, 4, 6):  # a skipped step changes nothing; the next good one does
        assert equal(adapter_at(out, step - 1), adapter_at(out, step))
        assert not equal(adapter_at(out, step), adapter_at(out, step + 1))
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_a_float16_overflow_skips_the_step_halves_the_loss_scale_and_is_no_bad_step(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """A finite loss with non-finite gradients, in float16 (whose loss is scaled): the scale's doing."""
    poison(monkeypatch, {2: "nan-grad"})
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--eval-split", "0", "--dtype", "float16")) == 0
    assert "step 2: float16 gradients overflowed; update skipped, loss scale lowered to 32768" in capsys.readouterr().out
    states = [json.loads((out / "checkpoints" / ckpt.step_dir_name(k) / ckpt.TRAINER_STATE).read_text())["state"]
              for k in (1, 2, 3)]
    assert [s["loss_scale"] for s in states] == [65536.0, 32768.0, 32768.0]
    assert [(s["skipped_steps"], s["bad_in_row"], s["finite_at_scale"]) for s in states] == [(0, 0, 1), (1, 0, 0),
                                                                                           (1, 0, 1)]
    assert equal(adapter_at(out, 1), adapter_at(out, 2))


def test_a_loss_spike_is_reported(tiny, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {4: "spike"})
    assert main(train_args(tiny, tmp_path / "run", "--max-steps", "4", "--eval-split", "0")) == 0
    assert "step 4: loss spike" in capsys.readouterr().out


def test_k_bad_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    steps = poison(monkeypatch, {3: "nan", 4: "inf", 5: "nan", 6: "nan"})
    rc = main(train_args(tiny, out, "--max-steps", "8", "--max-bad-steps", "3", "--eval-split", "0"))
    captured = capsys.readouterr()
    assert rc == 2 and "Traceback" not in captured.err
    assert "error: 3 steps in a row had a non-finite loss or gradient (last at step 5)" in captured.err
    assert "lower --lr" in captured.err and "--resume" in captured.err
    assert steps[-1] == 5  # stopped at once, not at the end of the run
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    newest = ckpt.find_latest_valid(out / "checkpoints")
    assert newest.name == ckpt.step_dir_name(4) and ckpt.verify_checkpoint(newest) is None
    assert equal(adapter_at(out, 2), adapter_at(out, 4))  # the bad steps changed nothing
    assert all(torch.isfinite(t).all() for t in adapter_at(out, 4).values())

    # the advice works: resume (here with the loss healthy again and a lower --lr) and finish
    monkeypatch.undo()
    rc = main(train_args(tiny, out, "--max-steps", "8", "--max-bad-steps", "3", "--eval-split", "0",
                         "--lr", "5e-3", "--resume"))
    printed = capsys.readouterr().out
    assert rc == 0 and "resumed from step-000004" in printed
    assert "train.lr 0.01 -> 0.005" in printed  # the changed setting is named
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2  # steps 3 and 4, from the checkpoint


def test_a_run_whose_final_eval_is_not_finite_writes_no_adapter_and_says_why(tiny, tmp_path, capsys):
    """A learning rate this large leaves finite adapter weights whose outputs are not: the run must
    not look finished (no adapter, no summary.json), exit 2 and name --lr."""
    out = tmp_path / "run"
    rc = main(train_args(tiny, out, "--max-steps", "3", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: the final eval loss is nan: training diverged" in err and "lower --lr (it is 1e+30)" in err
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
