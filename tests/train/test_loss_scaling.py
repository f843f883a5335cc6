"""float16 training scales its loss (train/loop.py, LOSS_SCALE_START): a step's token-mean
gradients are 1/tokens each, and float16 flushes the small ones to zero."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit.train.loop as loop
from lorakit.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import save_tiny_chat_model, write_define_data

    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_chat_model(root / "model"), write_define_data(root / "train.jsonl", count=240)


def _args(tiny, out, *extra) -> list[str]:
    model, data = tiny
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--batch-size", "60",
            "--grad-accum", "4", "--seq-len", "64", "--train-on-inputs", "--r", "4", "--eval-split", "0", "--seed", "3", *extra]


def _first_step_gradients(monkeypatch, args) -> dict[int, torch.Tensor]:
    """The adapters' gradients as clipping sees them (unscaled), at the first step."""
    real_norm, seen = loop._grad_norm, {}

    def spy(params, max_norm):
        if not seen:
            seen.update({i: p.grad.detach().float().clone() for i, p in enumerate(params) if p.grad is not None})
        return real_norm(params, max_norm)

    monkeypatch.setattr(loop, "_grad_norm", spy)
    assert main(args) == 0
    monkeypatch.setattr(loop, "_grad_norm", real_norm)
    return seen


def _relative_error(grads, reference) -> float:
    num = sum(float((grads[i] - reference[i]).norm()) ** 2 for i in reference)
    return (num / sum(float(reference[i].norm()) ** 2 for i in reference)) ** 0.5


def test_float16_gradients_keep_float32s_with_the_loss_scaled(tiny, tmp_path, monkeypatch):
    one_step = ["--max-steps", "1"]
    reference = _first_step_gradients(monkeypatch, _args(tiny, tmp_path / "fp32", *one_step, "--dtype", "float32"))
    scaled = _first_step_gradients(monkeypatch, _args(tiny, tmp_path / "fp16", *one_step, "--dtype", "float16"))
    monkeypatch.setattr(loop, "LOSS_SCALE_START", 1.0)  # as before: the plain token-mean loss in float16
    unscaled = _first_step_gradients(monkeypatch, _args(tiny, tmp_path / "plain", *one_step, "--dtype", "float16"))
    assert _relative_error(unscaled, reference) > 3e-3  # what the scale is for: 1.0e-2 at this step's 11k tokens
    assert _relative_error(scaled, reference) < 1e-3  # ~5e-4, float16's rounding alone


def test_the_scale_is_exact_where_nothing_overflows(tiny, tmp_path, monkeypatch):
    """Powers of two: a float32 run trained on the scaled loss ends bit-identical to one without."""
    from safetensors.torch import load_file

    args = ["--max-steps", "3", "--dtype", "float32"]
    assert main(_args(tiny, tmp_path / "plain", *args)) == 0
    monkeypatch.setattr(loop.Trainer, "_loss_scale", lambda trainer: 2.0 ** 16)
    assert main(_args(tiny, tmp_path / "scaled", *args)) == 0
    plain, scaled = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("plain", "scaled"))
    assert plain.keys() == scaled.keys() and all(torch.equal(plain[k], scaled[k]) for k in plain)


def test_a_bfloat16_or_float32_run_keeps_no_scale(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny, out, "--max-steps", "1", "--grad-accum", "1", "--save-every", "1",
                      "--dtype", "bfloat16")) == 0
    state = json.loads((out / "checkpoints" / "step-000001" / "trainer_state.json").read_text())["state"]
    assert state["loss_scale"] is None and state["finite_at_scale"] == 0


@pytest.mark.parametrize("change, valid", [({}, True), ({"loss_scale": None}, True), ({"loss_scale": 0.5}, False),
                                           ({"loss_scale": float("inf")}, False), ({"loss_scale": True}, False),
                                           ({"loss_scale": "big"}, False), ({"loss_scale": 0}, False),
                                           ({"finite_at_scale": -1}, False), ("before", True)])
def test_a_checkpoints_loss_scale_is_checked_and_one_made_before_it_loads(tmp_path, change, valid):
    from lorakit.train.saved_run import _trainer_state_problem

    state = loop.TrainState(step=2, loss_scale=1024.0, finite_at_scale=3).to_json()
    if change == "before":  # a checkpoint of an earlier lorakit
        del state["loss_scale"], state["finite_at_scale"]
    else:
        state.update(change)
    problem = _trainer_state_problem(tmp_path / "step-000002", {"state": state})
    assert (problem is None) == valid, problem


def test_a_float16_checkpoint_resumed_in_another_dtype_keeps_no_scale():
    import torch

    settings = loop.LoopSettings(lr=1e-3, total_steps=1, warmup_steps=0, schedule="constant", grad_accum=1,
                                 max_grad_norm=1.0, max_bad_steps=5, batch_size=1, seq_len=8, packing=False, seed=0,
                                 pad_id=0, device=torch.device("cpu"))
    state = loop.TrainState(step=3, loss_scale=1024.0, finite_at_scale=3)
    loop.Trainer(torch.nn.Linear(1, 1), None, settings, None, state)
    assert (state.loss_scale, state.finite_at_scale) == (None, 0)
