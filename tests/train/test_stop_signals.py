"""StopSignals: a signal asks the loop to stop at the next step boundary (in one process, at the next
micro-batch), and a checkpoint follows."""

import os
import signal

import pytest
import torch

from lorakit.train.loop import StopSignals


def test_a_repeated_sigterm_still_lets_the_checkpoint_be_written():
    """A scheduler that signals every process of a torchrun job reaches each worker twice (directly
    and through torchrun): the second SIGTERM must not turn the orderly stop into an interrupt."""
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"


def test_a_sigint_after_any_signal_stops_at_once():
    """Ctrl-C again means now; a SIGTERM after Ctrl-C (torchrun passing on its own stop) does not."""
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGINT"
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append(signals.received)
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the second signal")
    assert reached == ["SIGTERM"]


def test_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import save_tiny_chat_model, write_define_data

    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_chat_model(root / "model"), write_define_data(root / "train.jsonl", count=64)


def test_a_stop_between_micro_batches_gives_the_step_up_and_the_resume_is_exact(tiny, tmp_path, monkeypatch):
    """With a long --grad-accum a stop must not wait for the rest of the step: the loop gives the
    step up after the micro-batch in flight, and the checkpoint is the step's start, dropout's
    RNG included (dropout 0.1), so the resumed run ends bit-identical to an uninterrupted one."""
    from safetensors.torch import load_file

    from lorakit.cli import main
    from lorakit.train.loop import Trainer

    model, data = tiny
    args = ["train", "--model", str(model), "--data", str(data), "--max-steps", "4", "--grad-accum", "4",
            "--batch-size", "2", "--seq-len", "64", "--lr", "1e-2", "--r", "4", "--dropout", "0.1",
            "--eval-split", "8", "--seed", "3"]
    assert main([*args, "--output", str(tmp_path / "reference")]) == 0

    real_loss, calls = Trainer._loss, []

    def loss_then_sigterm(trainer, batch, normalizer):
        calls.append(trainer.state.step)
        if len(calls) == 10:  # the second micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(trainer, batch, normalizer)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(Trainer, "_loss", loss_then_sigterm)
    assert main([*args, "--output", str(stopped)]) == 130
    assert len(calls) == 10  # not 12: the step's last two micro-batches never ran
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.setattr(Trainer, "_loss", real_loss)
    assert main([*args, "--output", str(stopped), "--resume"]) == 0
    name = "adapter/adapter_model.safetensors"
    assert (stopped / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    reference, resumed = load_file(tmp_path / "reference" / name), load_file(stopped / name)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
