"""TensorBoard is an optional copy of metrics.jsonl: its failures turn it off with one warning."""

import errno
import threading

import pytest

pytest.importorskip("tensorboard")

from tensorboard.summary.writer import record_writer  # noqa: E402

from lorakit.train.tensorboard_log import TensorBoardLog  # noqa: E402


def test_a_folder_that_is_a_file_turns_it_off_with_one_warning(tmp_path):
    (tmp_path / "tensorboard").write_text("mine")
    said = []
    log = TensorBoardLog(tmp_path / "tensorboard", None, said.append)
    log.add({"kind": "train", "step": 1, "loss": 2.0})
    log.close()
    assert len(said) == 1 and said[0].startswith("warning: TensorBoard logging stopped (FileExistsError")
    assert (tmp_path / "tensorboard").read_text() == "mine"


def test_a_full_disk_under_its_writer_thread_is_one_warning_and_no_thread_traceback(tmp_path, monkeypatch):
    real_write, writes = record_writer.RecordWriter.write, []

    def fills_up(self, data):  # the file's header goes in, then the disk is full
        writes.append(data)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", fills_up)
    printed = []  # what Python's hook would print for a thread's uncaught exception
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(type(args.thread).__name__))
    said = []
    log = TensorBoardLog(tmp_path / "tensorboard", None, said.append)
    assert log.writer is not None
    for step in range(1, 4):  # the thread fails on its first write; a later add or the close raises it here
        log.add({"kind": "train", "step": step, "loss": 1.0})
    log.close()
    assert len(said) == 1 and "No space left on device" in said[0] and "metrics.jsonl" in said[0]
    assert printed == []  # the writer thread's own exception is left to the warning
    other = threading.Thread(target=lambda: 1 / 0)
    other.start()
    other.join()
    assert printed == ["Thread"]  # other threads' exceptions are printed as before
    from torch.utils.tensorboard import SummaryWriter

    writes.clear()
    users_own = SummaryWriter(log_dir=str(tmp_path / "users"))  # not lorakit's: its failure is the user's to see
    with pytest.raises(OSError):
        for step in range(3):
            users_own.add_scalar("x", 1.0, step)
            users_own.flush()
    assert printed == ["Thread", "_AsyncWriterThread"]
