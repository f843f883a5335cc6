"""StopSignals: a signal asks the loop to stop at the next step boundary, and a checkpoint follows."""

import os
import signal

import pytest

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
