"""Multi-process training under torchrun (gloo, 2 CPU processes, a tiny model).

The contract: N processes with --grad-accum g train the same adapter as one process with
--grad-accum N*g over the same batch plan; a run killed mid-way resumes, with N or with another
number of processes, to the adapter of an uninterrupted run.

Nothing here depends on timing, so the tests hold on a loaded machine: torchrun binds its own
rendezvous port (--standalone, port 0) instead of one chosen here and taken later; the kill is
injected at a fixed point of the run (tests/reliability/killhooks), not sent when a file shows
up; and a torchrun that outlives the generous deadline is stopped with its workers.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.data.batching import plan_batches
from lorakit.train import distributed, session
from lorakit.train.loop import LoopSettings, Trainer

from tiny_models import save_tiny_chat_model, write_define_data

SRC = Path(__file__).resolve().parents[2] / "src"
KILLHOOKS = Path(__file__).resolve().parents[1] / "reliability" / "killhooks"
# generous: on a loaded 2-core machine each worker takes long to import torch; a hang still fails
TORCHRUN_TIMEOUT = 600
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed and Linux (SIGKILL hooks)")


# ---- the data split (no processes) ------------------------------------------------------------

@pytest.mark.parametrize("count,world", [(10, 2), (11, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_is_disjoint_and_complete(count, world):
    items = list(range(count))
    shares = [distributed.shard(items, k, world) for k in range(world)]
    assert sorted(i for share in shares for i in share) == items
    for k, share in enumerate(shares):
        assert share == items[k::world]  # rank k takes k, k+N, k+2N ...


def test_shard_padded_gives_every_rank_the_same_number_of_forwards():
    items = list(range(7))
    results = [distributed.shard_padded(items, k, 3) for k in range(3)]
    assert [len(mine) + pad for mine, pad in results] == [3, 3, 3]
    assert [pad for _, pad in results] == [0, 1, 1]
    assert distributed.shard_padded([], 1, 2) == ([], 0)


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        distributed.shard([1, 2], 2, 2)


@pytest.mark.parametrize("budget_gib, need_gib, sharded", [(None, 50, False), (None, 130, True),
                                                         (40, 50, True), (40, 30, False), (200, 130, True)])
def test_auto_fsdp_shards_when_the_step_exceeds_the_gpu_or_the_memory_budget(monkeypatch, budget_gib, need_gib,
                                                                            sharded):
    from types import SimpleNamespace

    from lorakit.config import resolve

    gib = 2**30
    config = resolve(None, {"train.memory_budget": budget_gib} if budget_gib else {})
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=140 * gib))
    monkeypatch.setattr(distributed, "estimated_step_bytes",
                        lambda config, fsdp=False: (need_gib // 2 if fsdp else need_gib) * gib)
    fsdp, notices = distributed.choose_fsdp(None, config, torch.device("cuda"))
    assert fsdp is sharded  # 90% of the smaller of the GPU (140 GiB) and the budget
    where = f"--memory-budget {budget_gib:g} GiB" if budget_gib and budget_gib < 140 else "one 140 GiB GPU"
    assert len(notices) == 1 and where in notices[0] and ("FSDP" in notices[0]) == sharded


class _Lengths:
    """The part of TokenizedData the batch stream reads."""

    def __init__(self, lengths):
        self._lengths, self.dataset = lengths, [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]

    def lengths(self):
        return self._lengths


def _consumed(world: int, rank: int, grad_accum: int, steps: int):
    """(plan index, plan entry) of the micro-batches `rank` trains on in `steps` steps, and the
    data position (epoch, batch index) after them."""
    settings = LoopSettings(lr=1.0, total_steps=steps, warmup_steps=0, schedule="constant", grad_accum=grad_accum,
                            max_grad_norm=0, max_bad_steps=1, batch_size=2, seq_len=16, packing=False, seed=5,
                            pad_id=0, device=torch.device("cpu"), rank=rank, world_size=world)
    trainer = Trainer(torch.nn.Linear(1, 1), _Lengths([3, 5, 7, 2, 9, 4, 6, 8, 3, 5, 2]), settings, None)
    stream, taken = trainer._stream(), []
    for _ in range(steps):
        picks = [next(stream) for _ in range(grad_accum * world)]
        taken += [(index, iterator.plan[index]) for iterator, index in distributed.shard(picks, rank, world)]
    return taken, (trainer.state.epoch, trainer.state.batch_index)


def test_ranks_split_the_single_process_stream_across_epochs():
    """6 plan batches per epoch, 2 ranks x grad_accum 2: 5 steps cross three epoch boundaries."""
    single, position = _consumed(world=1, rank=0, grad_accum=4, steps=5)
    ranks = [_consumed(world=2, rank=k, grad_accum=2, steps=5) for k in range(2)]
    assert [r[1] for r in ranks] == [position, position]  # the same global data position everywhere
    assert len(single) == 20
    interleaved = [ranks[k][0][j] for j in range(10) for k in range(2)]
    assert interleaved == single  # rank k has micro-batches k, k+2, k+4 ... of the global stream


@pytest.mark.parametrize("grad_accum,world", [(4, 1), (2, 2), (5, 1)])
def test_epochs_count_micro_batches_not_whole_steps_per_epoch(grad_accum, world):
    """Steps run on across epochs, so 2 epochs of 6 batches at 4 a step are 3 steps ending at
    the second epoch's end (a whole 2 steps per epoch trained 2.67 epochs); at 5 a step, the
    last step spills one step's remainder into the third epoch, never a whole step more."""
    from lorakit.train.loop import total_steps_for

    steps = total_steps_for(6, grad_accum * world, 2.0, None)
    _, (epoch, batch_index) = _consumed(world=world, rank=0, grad_accum=grad_accum, steps=steps)
    assert 12 <= epoch * 6 + batch_index < 12 + grad_accum * world
    assert total_steps_for(6, 4, 2.0, max_steps=7) == 7


def test_shutdown_collects_garbage_before_leaving_the_group(monkeypatch):
    """FSDP's mesh and DTensors live in reference cycles; destroyed at interpreter exit instead,
    gloo aborted a finished 2-rank run (13 of 30 runs of a DTensor gather; 0 of 30 with this)."""
    calls = []
    monkeypatch.setattr(distributed, "_we_initialised", True)
    monkeypatch.setattr(distributed, "_world", distributed.World(0, 2, 0, "gloo"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown()
    assert calls == ["collect", "destroy"]
    assert distributed.world() == distributed.World()


def test_a_failed_run_frees_its_model_before_leaving_the_group(monkeypatch):
    """An exception's traceback holds the run's frames, and they the model: cleared first, the
    garbage collection in shutdown frees the model while the process group still exists."""
    import gc
    import weakref

    from lorakit.cli import train as train_cli

    model_refs, alive_at_shutdown = [], []

    class Model:
        pass

    def failing_run(args):
        model = Model()
        model.itself = model  # a reference cycle, as FSDP's modules and hooks make
        model_refs.append(weakref.ref(model))
        raise RuntimeError("a peer stopped")

    def shutdown():
        gc.collect()
        alive_at_shutdown.append(model_refs[0]() is not None)

    monkeypatch.setattr(train_cli, "_train", failing_run)
    monkeypatch.setattr(distributed, "shutdown", shutdown)
    with pytest.raises(RuntimeError, match="a peer stopped"):
        train_cli.run(None)
    assert alive_at_shutdown == [False]


def test_rank_0_alone_speaks_and_a_lost_peer_is_one_line(monkeypatch, capsys):
    from lorakit.cli import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # every rank meets the same bad input: the others stay quiet
    assert main(["train", "--lr", "-1"]) == 2 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])
    assert capsys.readouterr().err == ""
    def on_a_node_with_2_gpus(args):  # ranks 2 and 3 of --nproc_per_node 4: their own problem, said by each
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        distributed._check_gpu(local_rank=3)

    monkeypatch.setattr(train, "run", on_a_node_with_2_gpus)
    assert main(["train"]) == 2
    assert capsys.readouterr().err.startswith("error: [rank 1] LOCAL_RANK is 3 but this node has 2 GPU(s)")
    monkeypatch.undo()
    monkeypatch.setenv("RANK", "1")  # a stray RANK outside torchrun silences nothing
    assert main(["train", "--lr", "-1"]) == 2 and "--lr" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--lr", "-1"]) == 2 and "--lr" in capsys.readouterr().err

    def peer_gone(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:5")

    monkeypatch.setattr(train, "run", peer_gone)
    assert main(["train"]) == 1
    assert capsys.readouterr().err == ("error: another process of this torchrun job stopped (its error is above); "
                                       "fix that and run again\n")


def test_a_quiet_rank_leaves_rank_0_time_to_say_the_error_they_share(monkeypatch, capsys):
    """torchrun stops every process once one fails: rank 1, quicker to fail, ended rank 0 before it
    printed a bad flag's line (seen in CI). Under torchrun a quiet rank waits for rank 0; rank 0,
    a process's own error and a run outside torchrun do not wait."""
    import lorakit.cli as cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setattr(cli.signal, "signal", lambda signum, handler: None)  # pytest's own handler stays
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--lr", "-1"]) == 2 and waits == []  # no torchrun agent: nobody stops the rest
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert main(["train", "--lr", "-1"]) == 2 and waits == [cli.RANK_0_GRACE_SECONDS]
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])
    assert waits == [cli.RANK_0_GRACE_SECONDS] * 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--lr", "-1"]) == 2 and "--lr" in capsys.readouterr().err and len(waits) == 2


@pytest.mark.parametrize("command", [["sweep", "grid.yaml"], ["eval", "--model", "m", "--data", "d.jsonl"], ["estimate"], ["recommend"],
                                     ["merge", "--adapter", "a", "--output", "o"], ["bench"]])
def test_commands_other_than_train_refuse_torchrun_at_once(monkeypatch, capsys, command):
    """Each process ran the whole command: a sweep's ranks fought over one point's folder lock and
    left it half made, eval and estimate printed everything twice (a hunt found it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 2
    assert capsys.readouterr().err == (f"error: lorakit {command[0]} runs in one process; start it without torchrun "
                                       "(only `lorakit train` shares its work across processes)\n")
    monkeypatch.setenv("RANK", "1")
    assert main(command) == 2 and capsys.readouterr().err == ""


def test_a_warning_every_rank_meets_is_printed_by_rank_0_alone(monkeypatch, capsys):
    import warnings

    from lorakit.cli import _show_lorakit_warnings_as_one_line
    from lorakit.errors import LorakitWarning

    _show_lorakit_warnings_as_one_line()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", ""), ("0", "warning: all-linear leaves out 4 layers\n")):
        monkeypatch.setenv("RANK", rank)
        warnings.showwarning("all-linear leaves out 4 layers", LorakitWarning, "targets.py", 1)
        assert capsys.readouterr().err == printed


@pytest.mark.parametrize("world, asked, said", [
    (2, 1, None),  # the run's own request on its own world: kept, nothing to say
    (1, 1, None),  # one process: keep_global_batch makes it 2 a step, and says so itself
    (1, 2, None),  # --grad-accum 2 on one process: the same 2 micro-batches a step
    (2, 2, "train.grad_accum 1 -> 2 (2 -> 4 micro-batches per step)"),  # 2 x 1 -> 1 x 2 -> 2 x 2: named
])
def test_a_new_global_batch_is_named_even_where_the_saved_config_holds_an_adjusted_grad_accum(
        monkeypatch, world, asked, said):
    """A 2-process run with --grad-accum 1 (2 micro-batches a step), resumed on one process (its
    config then says grad_accum 2), resumed again: only a request that changes the global batch is
    a change, and it is named even where it equals the adjusted value the saved config holds."""
    from types import SimpleNamespace

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    saved = {"config": {"train": {"grad_accum": 2}}, "requested_grad_accum": 1, "micro_batches_per_step": 2}
    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(grad_accum=asked),
                                                 sources={"train.grad_accum": "flag"}), requested_grad_accum=None)
    assert session.Session._global_batch_change(run, saved) == said
    assert run.requested_grad_accum == asked


def test_plan_is_identical_for_every_rank():
    lengths = np.array([3, 5, 7, 2, 9, 4, 6])
    assert plan_batches(lengths, 2, 16, True, True, 3, 1) == plan_batches(lengths, 2, 16, True, True, 3, 1)


# ---- real runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-dist")
    return save_tiny_chat_model(root / "model"), write_define_data(root / "train.jsonl", count=64)


def train_args(tiny, out, *extra):
    model, data = tiny
    # --lora-r: torchrun's parser rejects --r as an abbreviation of its own options
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--batch-size", "2",
            "--seq-len", "64", "--lr", "1e-2", "--lora-r", "4", "--eval-split", "8", "--seed", "3", *extra]


def _env(kill_at: str | None = None) -> dict:
    """The workers' environment; `kill_at` arms a kill hook (killhooks/sitecustomize.py) in every
    process torchrun starts."""
    paths = [str(KILLHOOKS)] if kill_at else []
    paths += [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    env.pop("LORAKIT_KILL_AT", None)
    return dict(env, LORAKIT_KILL_AT=kill_at) if kill_at else env


def _torchrun_cmd(nproc: int, args: list[str], restarts: int = 0) -> list[str]:
    # --standalone: torchrun's store listens on a port the kernel assigns and the workers are told
    # which; a free port picked here could be taken (by another test's gloo sockets) before torchrun
    # binds it, and the run would fail with EADDRINUSE
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(restarts), "-m", "lorakit", *args]


def torchrun(nproc: int, args: list[str], kill_at: str | None = None, timeout: float = TORCHRUN_TIMEOUT,
             restarts: int = 0) -> subprocess.CompletedProcess:
    """Run torchrun to its end. Past `timeout` it gets SIGTERM, which it passes to its workers
    (they run in sessions of their own, so killing torchrun alone would orphan them)."""
    command = _torchrun_cmd(nproc, args, restarts)
    with subprocess.Popen(command, env=_env(kill_at), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"torchrun still running after {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def single(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers: same kernels, same floating-point order
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)  # complete, not empty shards
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if e["kind"] == "train"]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny, tmp_path):
    """2 ranks x grad_accum 2 == 1 process x grad_accum 4 (fp32), data packed, 2 epochs."""
    common = ("--max-steps", "8", "--dtype", "float32")
    two = torchrun(2, train_args(tiny, tmp_path / "two", "--grad-accum", "2", *common))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    single(train_args(tiny, tmp_path / "one", "--grad-accum", "4", *common))
    assert max_difference(adapter(tmp_path / "two"), adapter(tmp_path / "one")) < 1e-5
    assert np.allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), atol=1e-5, rtol=0)
    s2, s1 = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert abs(s2["final_eval_loss"] - s1["final_eval_loss"]) < 1e-5  # sums of losses and tokens all-reduced
    assert s2["train_tokens"] == s1["train_tokens"] and s2["world_size"] == 2
    assert len(train_losses(tmp_path / "two")) == 8  # rank 0 alone writes the metrics
    assert two.stdout.count("training finished") == 1  # and reports


def test_fsdp_equals_one_process_and_saves_the_whole_adapter(tiny, tmp_path):
    """FSDP2 (sharded base and adapters) on gloo; unpacked data with 3 eval batches for 2 ranks
    (one rank runs an uncounted dummy forward), checkpoints in the single-process format."""
    common = ("--max-steps", "4", "--no-packing", "--eval-split", "6", "--save-every", "2")
    two = torchrun(2, train_args(tiny, tmp_path / "fsdp", "--grad-accum", "1", "--fsdp", *common))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "FSDP" in two.stdout
    single(train_args(tiny, tmp_path / "one", "--grad-accum", "2", *common))
    assert max_difference(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")) < 1e-5
    assert abs(summary(tmp_path / "fsdp")["final_eval_loss"] - summary(tmp_path / "one")["final_eval_loss"]) < 1e-5
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        sharded = load_file(tmp_path / "fsdp" / "checkpoints" / "step-000004" / name)
        whole = load_file(tmp_path / "one" / "checkpoints" / "step-000004" / name)
        assert max_difference(sharded, whole) < 1e-5


def test_existing_output_fails_on_every_rank_without_hanging(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = torchrun(2, train_args(tiny, out, "--max-steps", "1", "--bogus-flag"))
    assert result.returncode != 0 and result.stderr.count("unrecognized arguments: --bogus-flag") == 1  # rank 0's
    result = torchrun(2, train_args(tiny, out, "--max-steps", "1"))
    assert result.returncode != 0
    assert "already holds a finished run" in result.stderr and "--resume" in result.stderr
    assert result.stderr.count("error:") == 1  # rank 0 speaks; rank 1 exits with the same code, silently


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_message(tiny, tmp_path):
    """A full disk as rank 0 writes the second checkpoint: its one line, no collective's traceback
    from rank 1 (it waited for the checkpoint, and was told rank 0 stopped)."""
    out = tmp_path / "run"
    result = torchrun(2, train_args(tiny, out, "--max-steps", "6", "--save-every", "2"),
                      kill_at="full:optimizer.safetensors:2@0")
    assert result.returncode != 0
    assert result.stderr.count("error:") == 1 and "disk full while writing" in result.stderr, result.stderr[-3000:]
    assert "[rank1]" not in result.stderr and "closed by peer" not in result.stderr  # was rank 1's traceback
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # the earlier one intact


# ---- kill and resume --------------------------------------------------------------------------

# Every rank enters save_checkpoint (a collective) at steps 2, 4, 6...: this SIGKILLs rank 1 alone
# as it enters the third, after step 6, while rank 0 waits for it in the gather. Rank 0 then fails
# on the lost peer and torchrun ends the job; step-000004 is the last complete checkpoint.
KILL_RANK_1_AT_THIRD_SAVE = "call:lorakit.train.session:Session.save_checkpoint:3@1"


def test_workers_stop_with_a_checkpoint_when_torchrun_is_killed(tiny, tmp_path):
    """torchrun's workers run in sessions of their own: with torchrun SIGKILLed (the OOM killer, a
    wrong pid) they trained on to the end, holding --output (and GPUs). Now its death is their
    SIGTERM: a stop at the next step boundary, with a checkpoint, and --output let go."""
    import fcntl
    import time

    out = tmp_path / "run"
    command = _torchrun_cmd(2, train_args(tiny, out, "--max-steps", "100000", "--log-every", "1"))
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TORCHRUN_TIMEOUT
    while not (out / "metrics.jsonl").is_file() or '"train"' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.5)
    proc.kill()  # torchrun alone: its workers are not in its process group
    proc.wait()
    try:
        while True:  # the workers hold --output's lock while they run
            held = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the workers still run after torchrun was killed"
                time.sleep(0.5)
            finally:
                os.close(held)
    finally:  # a failure must not leave them training on
        _kill_processes_naming(str(out))
    assert list((out / "checkpoints").glob("step-*")), "no checkpoint at the stop"


def _kill_processes_naming(text: str) -> None:
    import signal

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def test_killed_run_resumes_with_two_and_with_one_process(tiny, tmp_path, capsys):
    steps, common = 24, ("--max-steps", "24", "--save-every", "2", "--dtype", "float32")
    args = (*common, "--grad-accum", "1")
    assert callable(session.Session.save_checkpoint)  # the hook's target: without it nothing dies
    killed = tmp_path / "killed"
    run = torchrun(2, train_args(tiny, killed, *args), kill_at=KILL_RANK_1_AT_THIRD_SAVE)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode != 0 and re.search(r"rank\s*:\s*1\b.*\n\s*exitcode\s*:\s*-9\b", run.stderr), log
    assert not (killed / "summary.json").exists()
    saved = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert sorted(saved) == ["step-000002", "step-000004"], log  # the last save before the kill, complete

    copy = tmp_path / "killed-copy"
    shutil.copytree(killed, copy)
    resumed = torchrun(2, train_args(tiny, killed, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step-000004" in resumed.stdout
    # one process, same flags: it keeps the checkpoint's 2 micro-batches per step (grad_accum 2)
    capsys.readouterr()
    single(train_args(tiny, copy, *args, "--resume"))
    assert re.search(r"--grad-accum 2 instead of 1, .*\(steps: \d+ x 2 micro-batch", capsys.readouterr().out)
    reference = tmp_path / "reference"
    single(train_args(tiny, reference, *common, "--grad-accum", "2"))

    expected = adapter(reference)
    for out in (killed, copy):
        got = adapter(out)
        assert max_difference(got, expected) < 1e-5
        # 2 ranks x 1 micro-batch sum their gradients in the same order as 1 x 2: bit-identical
        assert all(torch.equal(got[k], expected[k]) for k in expected), out.name
        assert summary(out)["steps"] == steps
    assert "grad_accum: 2" in (copy / "config.yaml").read_text()


def test_only_a_restart_of_the_job_that_wrote_the_run_resumes_it(tmp_path, monkeypatch):
    from lorakit.config import RunConfig
    from lorakit.train.run import JOB_LINE, resume_a_restarted_job

    config = RunConfig()
    config.output.output, config.output.overwrite = str(tmp_path), True
    (tmp_path / "config.yaml").write_text(f"{JOB_LINE}job-a\nlora: {{r: 8}}\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first attempt: the command's own flags
    assert not resume_a_restarted_job(config) and config.output.overwrite
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # a restart of another job: its flags too
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not resume_a_restarted_job(config) and config.output.overwrite
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of 2: each node's torchrun counts its own restarts
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert not resume_a_restarted_job(config) and config.output.overwrite
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_a_restarted_job(config) and config.output.resume and not config.output.overwrite
    (tmp_path / "config.yaml").write_text(f"{JOB_LINE}none\nlora: {{r: 8}}\n")  # torchrun's id when none given:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # shared by every launch, so no job at all
    config.output.resume, config.output.overwrite = False, True
    assert not resume_a_restarted_job(config) and config.output.overwrite


def test_torchruns_restarts_resume_the_job_they_restart(tiny, tmp_path):
    """torchrun --max-restarts starts the same command again after a worker died: it refused the
    folder its first attempt had written ("already holds an unfinished run"), and the attempts met
    in a store that still held the dead processes' addresses (connection refused, or a hang). A
    restart resumes its own job's run (an --overwrite is not done again) and trains on to the
    adapter an uninterrupted run makes."""
    common = ("--max-steps", "8", "--save-every", "2", "--dtype", "float32")
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    (restarted / "summary.json").write_text("{}")  # an older run, which --overwrite replaces once
    run = torchrun(2, train_args(tiny, restarted, *common, "--grad-accum", "1", "--overwrite"),
                   kill_at=KILL_RANK_1_AT_THIRD_SAVE, restarts=2)
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    assert "torchrun restarted this job (restart 1)" in run.stdout and "resumed from step-000004" in run.stdout, log
    assert "Connection refused" not in run.stderr, log
    reference = tmp_path / "reference"
    single(train_args(tiny, reference, *common, "--grad-accum", "2"))
    got, expected = adapter(restarted), adapter(reference)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert summary(restarted)["steps"] == 8


def test_fsdp_run_resumes_into_the_right_shards(tiny, tmp_path):
    """Resuming under FSDP scatters each checkpoint tensor from rank 0; a safetensors file loads its
    keys in another order in each process, so unsorted, ranks received slices of other tensors
    (a collective mismatch, or with equal shapes a silently wrong adapter)."""
    common = ("--dtype", "float32", "--save-every", "2")
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    first = torchrun(2, train_args(tiny, sharded, "--grad-accum", "1", "--fsdp", "--max-steps", "2", *common))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = torchrun(2, train_args(tiny, sharded, "--grad-accum", "1", "--fsdp", "--max-steps", "4", "--resume",
                                     *common))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    single(train_args(tiny, one, "--grad-accum", "2", "--max-steps", "2", *common))
    single(train_args(tiny, one, "--grad-accum", "2", "--max-steps", "4", "--resume", *common))
    assert max_difference(adapter(sharded), adapter(one)) < 1e-5


def test_ranks_draw_different_dropout_masks(tiny, tmp_path):
    """Every rank starts from one seed (the adapters are initialised alike); after that each rank's
    generator must differ, or micro-batches of one shape get the same dropout masks everywhere."""
    out = tmp_path / "dropout"
    run = torchrun(2, train_args(tiny, out, "--max-steps", "1", "--dropout", "0.1", "--save-every", "1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rng = load_file(out / "checkpoints" / "step-000001" / "rng.safetensors")
    assert not torch.equal(rng["rank.0.cpu"], rng["rank.1.cpu"])


def test_the_auto_fsdp_estimate_is_the_figure_estimate_prints_for_the_same_step(monkeypatch, capsys):
    """docs/distributed.md tells users to compare `lorakit estimate --fast-paths --grad-checkpointing
    on --world-size N` with what auto mode decides on: the two must be one figure."""
    import json

    from lorakit.cli import main
    from lorakit.config import resolve

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    config = resolve(None, {"model.name": "1b", "train.batch_size": 4, "data.seq_len": 2048, "lora.r": 16})
    assert main(["estimate", "--model", "1b", "--batch-size", "4", "--seq-len", "2048", "--r", "16", "--fast-paths",
                 "--grad-checkpointing", "on", "--world-size", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["memory"]["total"]
    assert distributed.estimated_step_bytes(config) == printed
