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


@pytest.mark.parametrize("name", ["SIGHUP", "SIGINT"])
def test_a_signal_the_process_ignores_stays_ignored(name):
    """`nohup lorakit train` ignores SIGHUP and a shell's background job ignores Ctrl-C: the run must
    not stop for what its user set it to outlive."""
    sig = getattr(signal, name)
    before = signal.signal(sig, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), sig)
            assert signals.received is None and signal.getsignal(sig) == signal.SIG_IGN
    finally:
        signal.signal(sig, before)


def test_a_closed_terminal_stops_as_sigterm_does():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGHUP)
        assert signals.received == "SIGHUP"


def test_a_stream_whose_reader_went_away_goes_to_devnull_and_says_so():
    from lorakit.terminal import _SurvivingStream

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader exited (`| head`)
    stream, gone = os.fdopen(write_end, "w"), []
    surviving = _SurvivingStream(stream, "stdout", gone.append)
    surviving.write("step 1\n")
    surviving.flush()  # the buffered write fails here: EPIPE
    assert gone == ["stdout"]
    assert os.path.samestat(os.fstat(write_end), os.stat(os.devnull))
    surviving.write("step 2\n" * 10_000)
    surviving.flush()  # into /dev/null, no error
    assert gone == ["stdout"]
    stream.close()


def test_a_closed_output_mid_run_stops_with_a_checkpoint_and_the_resume_finishes(tiny, tmp_path, capsys):
    """`lorakit train 2>&1 | tee log` with tee killed: the next progress line found no reader, and
    the process ended with a BrokenPipeError mid-run, the steps since the last checkpoint lost.
    Now the run stops at the step boundary with a checkpoint and exits 141."""
    import subprocess
    import sys
    from pathlib import Path

    import lorakit
    from lorakit.cli import main

    model, data = tiny
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data),
            "--max-steps", "40", "--batch-size", "2", "--seq-len", "32", "--r", "2", "--eval-split", "0",
            "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    for line in child.stderr:  # the progress, one line per tenth of the steps on a pipe
        if line.startswith(b"step "):
            break
    child.stderr.close()  # the reader goes away after the first progress line
    assert child.wait(timeout=300) == 141
    assert b"stopped by a closed output at step " in child.stdout.read()  # on the output still open
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and "step-000004" <= checkpoints[0] < "step-000040"
    assert not (out / "summary.json").exists()
    assert main([*args[3:], "--resume"]) == 0
    assert "resumed from " + checkpoints[0] in capsys.readouterr().out
    assert (out / "summary.json").exists()


def test_a_terminal_that_hangs_up_under_the_live_progress_bar_stops_the_run(tiny, tmp_path):
    """rich asks the terminal again before each redraw, and a hung-up one says "no terminal": the
    bar stopped writing, nothing failed, and the run trained on to its last step (a review)."""
    import pty
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    import lorakit

    model, data = tiny
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data),
            "--max-steps", "100000", "--batch-size", "2", "--seq-len", "32", "--r", "2", "--eval-split", "0",
            "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1]), "COLUMNS": "100"}
    terminal, its_end = pty.openpty()
    child = subprocess.Popen(args, stdin=its_end, stdout=its_end, stderr=its_end, env=env, start_new_session=True)
    os.close(its_end)
    shown, deadline = b"", time.monotonic() + 120
    while b"/100000" not in shown and time.monotonic() < deadline:  # the live bar is drawn
        if select.select([terminal], [], [], 1)[0]:
            shown += os.read(terminal, 65536)
    os.close(terminal)  # the terminal goes away (a session of its own: no SIGHUP, only failing writes)
    try:
        assert child.wait(timeout=300) == 141
    finally:
        child.kill()  # not left training its 100,000 steps where the stop failed
    assert len(list((out / "checkpoints").iterdir())) == 1 and not (out / "summary.json").exists()
