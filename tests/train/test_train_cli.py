"""End to end through the CLI on a tiny model: loss goes down, the output folder is complete."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from lorakit.cli import main

from tiny_models import save_tiny_chat_model, write_define_data

SUMMARY_KEYS = {"base_eval_loss", "final_eval_loss", "train_loss", "steps", "train_tokens", "seen_tokens",
                "tokens_per_second",
                "peak_memory_bytes", "wall_seconds", "trainable_params", "total_params", "r", "alpha", "target_modules",
                "dtype", "device"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_chat_model(root / "model")
    data = write_define_data(root / "train.jsonl", count=64)
    return model, data


def train_args(tiny, out, *extra):
    model, data = tiny
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "12",
            "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--r", "4", "--eval-split", "8", "--seed", "3",
            *extra]


def test_end_to_end_training(tiny, tmp_path, capsys, monkeypatch):
    from lorakit.kernels import chunked_ce

    # torch's GEMMs: an fp32 head under oneDNN's (kernels/cpu_gemm.py) keeps no logits workspace
    monkeypatch.setenv("LORAKIT_CPU_GEMM", "aten")
    out = tmp_path / "run"
    held = []  # the loss's CPU workspace, seen at the final eval and after the run
    real_release = chunked_ce.release_workspace
    monkeypatch.setattr("lorakit.train.session.release_workspace",
                        lambda: held.append(chunked_ce._WORKSPACE.nbytes) or real_release())
    assert main(train_args(tiny, out)) == 0
    assert held[0] > 0 and chunked_ce._WORKSPACE.nbytes == 0  # used by training, freed at its end
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["final_eval_loss"] < 0.92 * summary["base_eval_loss"]
    assert summary["steps"] == 12 and summary["r"] == 4 and summary["alpha"] == 8
    assert 12 * 4 * 64 >= summary["seen_tokens"] > summary["train_tokens"]  # rows of 64 tokens at most; labels fewer
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "loss.png", "checkpoints", "tensorboard"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG") and not list(out.glob("*tmp*"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for e in lines if e["kind"] == "train") == 12
    printed = capsys.readouterr().out
    assert "flag" in printed and "alpha = 2 * r" in printed  # provenance of r and alpha
    assert "(the process's resident memory" in " ".join(printed.split())  # not the plan's tensor estimate


def test_same_seed_same_adapter(tiny, tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(train_args(tiny, tmp_path / name, "--max-steps", "3")) == 0
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_existing_run_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    assert main(train_args(tiny, out, "--max-steps", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(train_args(tiny, out, "--max-steps", "2", "--overwrite")) == 0



def test_a_runs_config_started_with_overwrite_or_resume_replaces_no_other_run(tiny, tmp_path, capsys):
    kept, other = tmp_path / "kept", tmp_path / "other"
    assert main(train_args(tiny, kept, "--max-steps", "2")) == 0
    adapter = (kept / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(train_args(tiny, other, "--max-steps", "2", "--overwrite")) == 0
    assert main(["train", "--output", str(other), "--resume", "--max-steps", "3"]) == 0
    saved = yaml.safe_load((other / "config.yaml").read_text())
    assert not {"overwrite", "resume", "dry_run"} & set(saved["output"])
    capsys.readouterr()
    assert main(["train", str(other / "config.yaml"), "--output", str(kept)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    # a run saved by an older lorakit kept them: a run's own file, passed by name, is read without them
    saved["output"].update(overwrite=True, resume=True)
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", str(other / "config.yaml"), "--output", str(kept)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == adapter

def test_a_finished_run_continued_with_more_steps_is_unfinished_until_it_ends(tiny, tmp_path, monkeypatch):
    from lorakit.train import session

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    seen = []
    real_finish = session.Session.finish
    monkeypatch.setattr(session.Session, "finish",
                        lambda self: seen.append((out / "summary.json").exists()) or real_finish(self))
    assert main(train_args(tiny, out, "--max-steps", "3", "--resume")) == 0
    assert seen == [False]  # a crash before the end would not leave a folder that looks finished
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_step_longer_than_the_data_is_named(tiny, tmp_path, capsys):
    assert main(train_args(tiny, tmp_path / "run", "--grad-accum", "100", "--dry-run")) == 0
    assert "passes over the" in capsys.readouterr().out
    assert main(train_args(tiny, tmp_path / "run", "--dry-run")) == 0
    assert "passes over the" not in capsys.readouterr().out


def test_the_users_own_config_in_the_output_folder_is_never_replaced(tiny, tmp_path, capsys):
    own = tmp_path / "config.yaml"
    own.write_text("# my notes\ntrain:\n  max_steps: 1\n")
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # files of the user's, no checkpoint: still not a run
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", str(own), *train_args(tiny, tmp_path)[1:], *extra]) == 2
        assert "where this run writes its own config.yaml" in capsys.readouterr().err
    assert own.read_text().startswith("# my notes")
    # a run's own config.yaml (killed before its first checkpoint) is fine to pass back
    run = tmp_path / "killed"
    assert main(train_args(tiny, run, "--max-steps", "1")) == 0
    for name in ("checkpoints", "adapter", "summary.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    assert main(["train", str(run / "config.yaml"), "--output", str(run), "--resume"]) == 0


def test_a_users_config_in_the_output_folder_is_neither_taken_for_a_run_nor_replaced(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my notes\nlora:\n  r: 4\n")
    for extra in ([], ["--resume"], ["--overwrite"]):  # it was "an unfinished run"; --resume adopted it
        assert main(train_args(tiny, out, "--max-steps", "1", *extra)) == 2
        assert "holds a config.yaml that no lorakit run wrote" in capsys.readouterr().err
    assert (out / "config.yaml").read_text().startswith("# my notes") and len(list(out.iterdir())) == 1


def test_overwrite_into_a_folder_without_a_run_deletes_none_of_its_files(tiny, tmp_path):
    out = tmp_path / "shared"
    (out / "tensorboard").mkdir(parents=True)
    for name in ("report.txt", "tensorboard/my-events"):
        (out / name).write_text("the user's")
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite")) == 0
    assert (out / "report.txt").read_text() == (out / "tensorboard" / "my-events").read_text() == "the user's"
    assert (out / "summary.json").is_file()
    # a run there now: --overwrite deletes its tensorboard/ (this run writes none), the user's file beside it stays
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite", "--no-tensorboard")) == 0
    assert (out / "report.txt").is_file() and not (out / "tensorboard").exists()


def test_overwrite_beside_only_a_metrics_file_of_the_users_keeps_their_other_files(tiny, tmp_path):
    out = tmp_path / "mine"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "my-events").write_text("the user's")
    (out / "metrics.jsonl").write_text("{}\n")  # taken for an unfinished run's: --overwrite replaces it
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite", "--no-tensorboard")) == 0
    assert (out / "tensorboard" / "my-events").read_text() == "the user's"


def test_a_runs_own_config_is_recognised_whichever_of_r_and_alpha_it_leaves_out(tmp_path):
    import argparse

    from lorakit.config import add_flags, resolve, save_yaml
    from lorakit.train.run import written_by_a_run

    for argv in ((), ("--r", "8"), ("--alpha", "4"), ("--r", "8", "--alpha", "4")):
        parser = argparse.ArgumentParser()
        add_flags(parser)
        path = tmp_path / "config.yaml"
        text = save_yaml(resolve(None, vars(parser.parse_args(list(argv)))))
        path.write_text(text)
        assert written_by_a_run(path), argv
        path.write_text(text.replace("  threads: null\n", ""))  # an older lorakit's, before --threads
        assert written_by_a_run(path), argv
    path.write_text("model:\n  name: m\nlora:\n  r: 4\ntrain:\n  lr: 0.001\ndata:\n  data: [d.jsonl]\noutput:\n"
                    "  output: runs/x\n")  # by hand: every section, a few of its options
    assert not written_by_a_run(path)


def test_a_second_run_into_a_folder_in_use_is_refused(tiny, tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "1")) == 0
    other = os.open(out, os.O_RDONLY)  # another run's hold on the folder
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for flag in ("--overwrite", "--resume"):
            assert main(train_args(tiny, out, "--max-steps", "2", flag)) == 2
            assert "another lorakit run is writing to --output" in capsys.readouterr().err
    finally:
        os.close(other)
    assert main(train_args(tiny, out, "--max-steps", "2", "--resume")) == 0  # free again


def test_resume_past_max_steps_is_refused_and_new_eval_data_gets_a_new_base_loss(tiny, tmp_path, capsys, monkeypatch):
    from lorakit.train import session

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2")) == 0
    (out / "summary.json").unlink()
    assert main(train_args(tiny, out, "--max-steps", "3", "--resume", "--lr", "0.5")) == 2
    said = capsys.readouterr()
    assert "is at step 4, past this run's last step (3)" in said.err
    # what the resume found changed is said before the refusal, which it may explain (it was dropped)
    assert "train.lr 0.01 -> 0.5" in " ".join(said.out.split())
    other = write_define_data(tmp_path / "other.jsonl", count=40, seed=7)
    measured, real = [], session.Session.run_eval
    monkeypatch.setattr(session.Session, "run_eval", lambda self, label: measured.append(label) or real(self, label))
    args = train_args(tiny, out, "--max-steps", "5", "--resume", "--eval-data", str(other))
    split = args.index("--eval-split")  # with --eval-data it is refused (it was ignored)
    assert main(args[:split] + args[split + 2:]) == 0
    assert measured[0] == "base"  # the saved base loss was of the other eval set


def test_resume_with_only_the_output_goes_on_with_the_runs_own_settings(tiny, tmp_path, capsys):
    # a user's `lorakit train --output DIR --resume`: without the run's config.yaml as the base,
    # lorakit's defaults applied, and with no --data those are the demo's data and model
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2")) == 0
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"the settings of {out / 'config.yaml'} (the run's own)" in printed
    assert "uninterrupted run): train.max_steps 4 -> 6\n" in printed  # the one setting given anew
    assert "training data differs" not in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["data"] == [str(tiny[1])] and saved["model"]["name"] == str(tiny[0])
    assert saved["train"]["max_steps"] == 6 and json.loads((out / "summary.json").read_text())["steps"] == 6


def test_a_checkpoint_taken_mid_run_carries_the_training_and_eval_time_so_far(tiny, tmp_path):
    # it saved 0 s: a resume after a kill reported the time and tokens/s of its own steps alone
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2", "--eval-every", "1")) == 0
    mid_run = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < mid_run["train_seconds"] < summary["wall_seconds"]
    # the evals after steps 1-3 and the checkpoint at 2: in the training time, not in the tokens/s
    assert 0 < mid_run["paused_seconds"] < summary["eval_and_checkpoint_seconds"] < summary["wall_seconds"]
    steps_only = summary["wall_seconds"] - summary["eval_and_checkpoint_seconds"]
    assert summary["tokens_per_second"] == pytest.approx(summary["seen_tokens"] / steps_only)


def test_resume_with_only_the_output_takes_no_run_action_and_no_batch_request_from_the_runs_file(tiny, tmp_path,
                                                                                                capsys):
    from lorakit.cli import build_parser
    from lorakit.cli.train import resolve_args

    out = tmp_path / "run"  # started with --overwrite, whose saved `overwrite: true` refused every --resume
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2", "--overwrite")) == 0
    (out / "summary.json").unlink()
    assert main(["train", "--output", str(out), "--resume", "--max-steps", "5"]) == 0
    # a resume on other processes rewrites grad_accum in config.yaml: read back, it is no request
    # to change the global batch (that doubled it when the run went back to its processes)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["train"]["grad_accum"] = 2
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    config, _ = resolve_args(build_parser().parse_args(["train", "--output", str(out), "--resume"]))
    assert config.train.grad_accum == 2 and config.sources["train.grad_accum"] == "the run's config.yaml"
    config, _ = resolve_args(build_parser().parse_args(["train", "--output", str(out), "--resume", "--grad-accum", "3"]))
    assert config.sources["train.grad_accum"] == "flag" and config.output.resume and not config.output.overwrite


def test_resume_on_other_files_says_the_data_differs_not_that_the_files_are_the_same(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2")) == 0
    (out / "summary.json").unlink()
    other = write_define_data(tmp_path / "other.jsonl", count=64, seed=7)
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume", "--max-steps", "6", "--data", str(other)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the training data differs from the checkpoint's;" in printed and "same files" not in printed


def test_resume_with_a_new_grad_accum_on_the_same_processes_takes_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "4", "--save-every", "2")) == 0
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "5", "--resume", "--grad-accum", "3")) == 0
    printed = capsys.readouterr().out
    assert "train.grad_accum 1 -> 3" in printed and "instead of 3" not in printed  # it said one thing, did another
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["grad_accum"] == 3


def test_the_same_resume_command_keeps_the_global_batch_after_another_number_of_processes(tiny, tmp_path, capsys):
    """A checkpoint of two processes with --grad-accum 2 (4 micro-batches a step), resumed in one:
    grad_accum becomes 4 then, and stays 4 when the same command resumes again (it went back to 2,
    the saved config's adjusted 4 taken for the old request); --grad-accum 4, the docs' advice for
    one process, is the same global batch and no change either."""
    from lorakit.train import checkpoint as ckpt

    from tiny_models import edit_checkpoint_state

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "6", "--save-every", "2", "--grad-accum", "2")) == 0
    (out / "summary.json").unlink()
    for folder in ckpt.list_checkpoints(out / "checkpoints"):  # as two processes saved it
        edit_checkpoint_state(folder, lambda state: state.update(world_size=2, micro_batches_per_step=4))
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "7", "--resume", "--grad-accum", "2")) == 0
    printed = capsys.readouterr().out
    assert "--grad-accum 4 instead of 2" in printed and "train.grad_accum" not in printed
    (out / "summary.json").unlink()
    assert main(train_args(tiny, out, "--max-steps", "8", "--resume", "--grad-accum", "2")) == 0
    printed = capsys.readouterr().out  # it was: "train.grad_accum 4 -> 2", and 2 taken
    assert "--grad-accum 4 instead of 2" in printed and "train.grad_accum" not in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["grad_accum"] == 4
    (out / "summary.json").unlink()
    assert main(train_args(tiny, out, "--max-steps", "9", "--resume", "--grad-accum", "4")) == 0
    assert "grad_accum" not in capsys.readouterr().out


def test_a_resumed_run_keeps_the_earlier_peak_and_an_old_checkpoints_new_grad_accum_is_named(tiny, tmp_path, capsys):
    """The peak memory of the processes before a resume counts (a run stopped in its final eval
    resumes into no step, and reported only loading and eval); a checkpoint older than the
    global-batch fields takes a new --grad-accum, and the settings line says so."""
    from lorakit.train import checkpoint as ckpt

    from tiny_models import edit_checkpoint_state

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2", "--save-every", "2")) == 0
    (out / "summary.json").unlink()

    def as_an_older_lorakit_saved_it_on_a_larger_machine(state: dict) -> None:
        for key in ("micro_batches_per_step", "world_size", "requested_grad_accum"):
            state.pop(key)
        state["peak_memory_bytes"] = 10**15

    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        edit_checkpoint_state(folder, as_an_older_lorakit_saved_it_on_a_larger_machine)
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "3", "--resume", "--grad-accum", "2")) == 0
    assert "train.grad_accum 1 -> 2" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["peak_memory_bytes"] == 10**15
    (out / "summary.json").unlink()  # a peak measured otherwise (per GPU, not this host's RSS) is not carried
    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        edit_checkpoint_state(folder, lambda state: state.update(peak_memory_device="cuda"))
    assert main(train_args(tiny, out, "--max-steps", "4", "--resume", "--grad-accum", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["peak_memory_bytes"] < 10**15


def test_sigterm_outside_the_training_steps_stops_with_one_line(monkeypatch, capsys):
    """While the model loads or an evaluation runs (no StopSignals there), SIGTERM ended the
    process without a word; now: one line, exit 143, and the earlier handler back."""
    import os
    import signal
    import time

    from lorakit.cli import train as train_cli

    def evaluating(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_cli, "_train", evaluating)
    assert main(["train"]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_dry_run_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--dry-run")) == 0
    assert not out.exists()
    printed = capsys.readouterr().out
    assert "[[" in printed and "trainable parameters" in printed


def test_a_data_folder_names_the_files_it_read(tiny, tmp_path, capsys):
    model, data = tiny
    (tmp_path / "shards").mkdir()
    shutil.copy(data, tmp_path / "shards" / "part-1.jsonl")
    args = train_args((model, tmp_path / "shards"), tmp_path / "run", "--dry-run")
    assert main(args) == 0
    printed = "".join(capsys.readouterr().out.split())  # rich wraps long lines, a path longer than one alone
    assert "".join(f"data folder {tmp_path / 'shards'}/: 1 .jsonl file read in name order (part-1.jsonl)".split()) in printed


def test_r_and_its_torchrun_spelling_are_one_setting(tiny, tmp_path, capsys):
    from lorakit.cli import build_parser
    from lorakit.cli.train import resolve_args

    config, _ = resolve_args(build_parser().parse_args(train_args(tiny, tmp_path / "a", "--lora-r", "4")))
    assert config.lora.r == 4 and config.sources["lora.r"] == "flag"  # the same rank twice is no conflict
    assert main(train_args(tiny, tmp_path / "b", "--lora-r", "16")) == 2  # train_args passes --r 4
    err = capsys.readouterr().err
    assert "--r 4 and --lora-r 16 are one setting" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_resume_into_a_folder_without_a_run_says_it_starts_one_there(tiny, tmp_path, capsys):
    out = tmp_path / "typo"
    assert main(train_args(tiny, out, "--max-steps", "1", "--resume")) == 0  # a job script's first launch
    assert f"resume: {out} holds no earlier run; starting a new one there (check --output" in capsys.readouterr().out
    for name in ("checkpoints", "adapter", "summary.json"):  # as a run killed before its first checkpoint
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert main(train_args(tiny, out, "--max-steps", "2", "--resume")) == 0
    assert "resume: no complete checkpoint found; starting from the beginning" in capsys.readouterr().out


def test_resume_of_a_finished_run_without_more_steps_does_nothing_and_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    before = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "2", "--resume", "--lr", "5e-3")) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} finished at step 2, its last; nothing to train (pass a larger --max-steps " in printed
    assert "training finished" not in printed and "settings differ" not in printed  # nothing goes on with them
    assert {name: (out / name).read_bytes() for name in before} == before  # not even its final eval again
    for damage in ("adapter", "summary.json"):  # a run that lacks what a finished one has: it finishes again
        if damage == "adapter":
            shutil.rmtree(out / "adapter")
        else:
            (out / damage).write_text("{}")
        assert main(train_args(tiny, out, "--max-steps", "2", "--resume")) == 0
        assert "training finished" in capsys.readouterr().out
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_the_demos_sample_answers_are_generated_only_where_the_run_trains(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("lorakit.cli.train._is_demo_data", lambda config: True)
    monkeypatch.setattr("lorakit.cli.train._sample", lambda prepared: calls.append(1) or ("a prompt", "an answer"))
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    assert len(calls) == 2 and "an answer" in capsys.readouterr().out  # before and after
    assert main(train_args(tiny, out, "--max-steps", "2", "--resume")) == 0
    assert len(calls) == 2  # a finished run resumed without more steps: nothing trains, nothing to compare


def test_eval_data_that_is_also_training_data_is_named(tiny, tmp_path, capsys, monkeypatch):
    model, data = tiny
    monkeypatch.chdir(data.parent)
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"), "--dry-run",
            "--seq-len", "64", "--r", "4"]
    assert main(args + ["--eval-data", f"./{data.name}"]) == 0  # another spelling of the same file
    assert f"--eval-data ./{data.name} is also training data" in capsys.readouterr().out
    held_out = write_define_data(tmp_path / "held_out.jsonl", count=8)
    assert main(args + ["--eval-data", str(held_out)]) == 0
    assert "is also training data" not in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # short paths: rich folds a long one inside its words
    Path("shards").mkdir()
    shutil.copy(data, "shards/part-0.jsonl")
    folder_args = [*args[:4], "shards", *args[5:]]
    assert main(folder_args + ["--eval-data", "shards/part-0.jsonl"]) == 0  # a file of a --data folder
    assert "--eval-data shards/part-0.jsonl is also training data" in " ".join(capsys.readouterr().out.split())


def test_rows_beyond_the_models_positions_are_refused_where_they_are_a_table_and_named_where_rotary():
    import transformers

    from lorakit.errors import ConfigError
    from lorakit.train.run import context_notice

    from tiny_models import tiny_gpt2, tiny_llama

    gptj = transformers.AutoModelForCausalLM.from_config(transformers.GPTJConfig(
        vocab_size=128, n_embd=64, n_layer=1, n_head=4, rotary_dim=8, n_positions=64))  # sin/cos in a buffer
    opt = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64))  # a table of 66 rows, the first 2 an offset
    roberta = transformers.AutoModelForCausalLM.from_config(transformers.RobertaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=66, is_decoder=True))  # positions start after the padding index (1)
    mpt = transformers.AutoModelForCausalLM.from_config(transformers.MptConfig(
        vocab_size=128, d_model=64, n_heads=4, n_layers=1, max_seq_len=64))  # its ALiBi is built 64 wide
    for model, table in ((tiny_gpt2(), 128), (gptj, 64), (opt, 64), (roberta, 64), (mpt, 64)):
        with pytest.raises(ConfigError, match=f"an example of {table + 1} tokens would run past the model's {table} "
                                              f"positions.*use --seq-len {table} or less"):
            context_notice(model, longest=table + 1)
        assert context_notice(model, longest=table) == []  # rows, packed or not, hold no position past it
    llama = tiny_llama()  # rotary, 256 positions: a notice only when an example is longer
    assert context_notice(llama, longest=256) == []
    assert "examples of up to 300 tokens are longer than the model's context (256)" in \
        context_notice(llama, longest=300)[0]
    scaled = tiny_llama(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    assert context_notice(scaled, longest=300) == []  # a longer context is what the scaling is for


def test_yaml_config_and_flag_override(tiny, tmp_path, capsys):
    model, data = tiny
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {model}}}\ndata: {{data: [{data}], seq_len: 64}}\nlora: {{r: 2, alpha: 4}}\n"
                      "train: {max_steps: 1, batch_size: 2}\n")
    assert main(["train", str(config), "--alpha", "6", "--output", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["r"] == 2 and summary["alpha"] == 6


def test_checkpointing_keeps_the_fast_paths_and_the_result(tiny, tmp_path):
    from safetensors.torch import load_file

    assert main(train_args(tiny, tmp_path / "plain", "--max-steps", "3")) == 0
    assert main(train_args(tiny, tmp_path / "ckpt", "--max-steps", "3", "--grad-checkpointing")) == 0
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_packed_rows_train_the_same_with_varlen_attention_as_with_a_4d_mask(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lorakit.train import run

    chosen = []
    original = run.packed_attention_for
    monkeypatch.setattr(run, "packed_attention_for", lambda model, packing: chosen.append(original(model, packing))
                        or chosen[-1])
    exact = ("--max-steps", "3", "--dtype", "float32")  # fp32: the two paths agree to rounding
    assert main(train_args(tiny, tmp_path / "varlen", *exact)) == 0  # packing is the default
    assert main(train_args(tiny, tmp_path / "mask", *exact, "--no-fast-paths")) == 0
    assert chosen == ["varlen", "4d"]
    a = load_file(tmp_path / "varlen" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "mask" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_threads_flag_sets_torch_threads_and_zero_is_refused(tiny, tmp_path, capsys):
    import torch

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(train_args(tiny, tmp_path / "one", "--max-steps", "1", "--threads", "1")) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert main(train_args(tiny, tmp_path / "zero", "--max-steps", "1", "--threads", "0")) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()


def test_bare_switch_before_the_config_file_leaves_the_file_positional(tiny, tmp_path, capsys):
    model, data = tiny
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {model}}}\ndata: {{data: [{data}], seq_len: 64}}\ntrain: {{max_steps: 1}}\n")
    capsys.readouterr()
    assert main(["train", "--grad-checkpointing", str(config), "--dry-run", "--output", str(tmp_path / "o")]) == 0
    assert "activation checkpointing: every layer" in capsys.readouterr().out
    # a value that is neither a choice nor a file is still refused by the parser
    with pytest.raises(SystemExit):
        main(["train", str(config), "--grad-checkpointing", "sometimes"])


@pytest.mark.parametrize("native", [True, False])
def test_the_run_trains_in_the_chosen_dtype_and_says_so(tiny, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr("lorakit.models.cpu_has_native_bf16", lambda: native)
    assert main(train_args(tiny, tmp_path / "run", "--max-steps", "3")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == ("bfloat16" if native else "float32") and summary["device"] == "cpu"
    assert summary["final_eval_loss"] == summary["final_eval_loss"]  # not NaN
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("dtype: bfloat16 (auto" in printed) == native


@pytest.mark.parametrize("native", [True, False])
def test_the_auto_dtype_notice_is_not_said_of_quantizes_own_bf16(monkeypatch, native):
    """--quantize's bf16 is not auto's choice; on a CPU without bf16 instructions it computes in
    fp32, or, with --dtype bfloat16, emulates bf16 products."""
    import torch
    from lorakit.kernels import cpu_gemm
    from lorakit.train.precision import dtype_notice

    monkeypatch.setattr("lorakit.train.distributed.device_of_rank", lambda: torch.device("cpu"))
    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset() if native else frozenset({torch.bfloat16}))
    monkeypatch.setattr("lorakit.models.cpu_has_native_bf16", lambda: native)
    bf16_model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    config = _default_config()
    assert "auto" in dtype_notice(config, bf16_model)[0]  # auto chose bf16 on this CPU
    config.model.quantize = "4bit"
    notices = {}
    for dtype in ("auto", "bfloat16", "float32", "float16"):
        config.model.dtype = dtype
        notices[dtype] = dtype_notice(config, bf16_model)
    if native:
        assert notices == {"auto": [], "bfloat16": [], "float32": [], "float16": []}
        monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset({torch.float16}))  # a Zen 4
        [fp16] = dtype_notice(config, bf16_model)
        assert "multiplies its layers in float16, which torch emulates" in fp16 and "compute in bfloat16" in fp16
        return
    assert len(notices["auto"]) == 1 and "the model computes in float32" in notices["auto"][0]
    assert len(notices["bfloat16"]) == 1 and "multiplies its layers in bfloat16" in notices["bfloat16"][0]
    assert "drop --dtype to compute in float32" in notices["bfloat16"][0]
    assert notices["float32"] == notices["float16"] == []


@pytest.mark.parametrize("requested", ["bfloat16", "float16"])
@pytest.mark.parametrize("native", [True, False])
def test_a_half_dtype_asked_for_on_a_cpu_without_its_instructions_is_said_to_save_no_time(monkeypatch, requested,
                                                                                          native):
    import torch
    from lorakit.kernels import cpu_gemm
    from lorakit.train.precision import dtype_notice

    dtype = getattr(torch, requested)
    monkeypatch.setattr("lorakit.train.distributed.device_of_rank", lambda: torch.device("cpu"))
    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset() if native else frozenset({dtype}))
    config = _default_config()
    config.model.dtype = requested
    notices = dtype_notice(config, torch.nn.Linear(2, 2).to(dtype))
    if native:
        assert notices == []
    else:
        assert len(notices) == 1 and f"without {requested} instructions" in notices[0]
        assert "computed in float32" in notices[0]
        for auto in ("float32", "bfloat16"):  # fp16 on a CPU with bf16: auto's choice is bf16, not fp32
            monkeypatch.setattr("lorakit.train.precision.training_dtype", lambda name, device, _auto=auto: _auto)
            assert f"--dtype auto trains in {auto} here" in dtype_notice(config, torch.nn.Linear(2, 2).to(dtype))[0]
    config.model.dtype = "float32"
    assert dtype_notice(config, torch.nn.Linear(2, 2)) == []


def _default_config():
    import argparse

    from lorakit.config import add_flags, resolve

    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve(None, vars(parser.parse_args([])))


def test_float32_flag_overrides_auto(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.models.cpu_has_native_bf16", lambda: True)
    assert main(train_args(tiny, tmp_path / "run", "--max-steps", "3", "--dtype", "float32")) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dtype"] == "float32"
    assert "dtype: bfloat16" not in " ".join(capsys.readouterr().out.split())


def test_summary_json_holds_no_nan_for_other_tools():
    import json

    from lorakit.train.session import _strict_json

    summary = {"final_eval_loss": float("nan"), "history": [1.5, float("inf")], "steps": 3}
    assert json.loads(json.dumps(_strict_json(summary), allow_nan=False)) == {
        "final_eval_loss": None, "history": [1.5, None], "steps": 3}


def test_an_occupied_output_is_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    data = write_define_data(tmp_path / "d.jsonl", 8)
    # a model that does not exist: the folder's refusal must come first, not after loading
    assert main(["train", "--model", str(tmp_path / "no-model-here"), "--data", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run; pass --resume with a larger --max-steps" in err


def test_the_demo_labels_only_the_values_it_filled_in(tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli.train import resolve_args

    eval_file = tmp_path / "eval.jsonl"
    args = build_parser().parse_args(["train", "--eval-data", str(eval_file), "--seq-len", "128"])
    config, demo = resolve_args(args)
    assert demo and config.data.eval_data == [str(eval_file)]
    assert config.sources["data.eval_data"] == config.sources["data.seq_len"] == "flag"
    assert config.sources["data.data"] == config.sources["train.max_steps"] == "demo default"


def resumable_run(tiny, tmp_path, eval_split: str) -> tuple[list[str], object]:
    """A run's arguments (checkpoint every step) on its own data file, and a function that gives that
    file other rows."""
    import shutil

    model, _ = tiny
    data = write_define_data(tmp_path / "data.jsonl", count=48, seed=1)
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"), "--batch-size", "4",
            "--seq-len", "64", "--r", "4", "--eval-split", eval_split, "--save-every", "1"]
    return args, lambda: shutil.copy(write_define_data(tmp_path / "other.jsonl", count=48, seed=7), data)


def test_resume_on_data_with_other_contents_says_so(tiny, tmp_path, capsys):
    args, change_the_data = resumable_run(tiny, tmp_path, "0")
    assert main([*args, "--max-steps", "2"]) == 0
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert "the training data differs" not in capsys.readouterr().out  # same data: an exact continuation
    change_the_data()  # same file, other rows
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    assert "the training data differs from the checkpoint's" in capsys.readouterr().out


def test_resume_after_lorakit_changed_how_it_tokenises_says_so_and_measures_the_base_again(tiny, tmp_path, capsys,
                                                                                          monkeypatch):
    args, change_the_data = resumable_run(tiny, tmp_path, "8")
    assert main([*args, "--max-steps", "2"]) == 0
    change_the_data()  # stands in for new tokens
    monkeypatch.setattr("lorakit.train.session.TOKENIZE_REVISION", 99)  # a later lorakit
    capsys.readouterr()
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "turns the data into examples otherwise than the one that made the checkpoint" in printed
    assert "the training data differs" not in printed
    assert "base model eval loss" in printed  # measured again, not taken from the checkpoint


def test_resume_says_when_the_logged_history_is_gone(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2", "--save-every", "1")) == 0
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "3", "--resume")) == 0
    assert "metrics.jsonl holds 0 of the" in capsys.readouterr().out


def test_exclude_leaves_layers_out_and_is_kept_for_a_resume(tiny, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--exclude", "o_proj,down_proj", "--max-steps", "2")) == 0
    adapted = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert adapted and not any(name.endswith(("o_proj", "down_proj")) for name in adapted)
    assert any(name.endswith("q_proj") for name in adapted)
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["exclude"] == "o_proj,down_proj"
    assert "all except o_proj,down_proj ->" in " ".join(capsys.readouterr().out.split())
    assert main(train_args(tiny, out, "--exclude", "o_prj", "--max-steps", "2", "--overwrite")) == 2
    assert "exclude_modules: target 'o_prj' matches no linear layer" in capsys.readouterr().err


def test_a_moe_model_trains_with_all_linear_and_lorakits_warnings_print_as_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    import torch
    import transformers

    from tiny_models import tiny_tokenizer

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    tokenizer = tiny_tokenizer()
    config = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    data = write_define_data(tmp_path / "train.jsonl", count=16)
    assert main(train_args((tmp_path / "moe", data), tmp_path / "run", "--targets", "all-linear", "--dry-run")) == 0
    err = capsys.readouterr().err
    assert "warning: all-linear leaves out 2 layers narrower than the rank" in err  # the 64 -> 1 shared-expert gates
    assert "UserWarning" not in err and "model.py" not in err


def test_a_real_run_says_what_reading_the_data_skipped_and_cut(tiny, tmp_path, capsys):
    model, data = tiny
    rows = data.read_text().splitlines()
    long_prompt = json.dumps({"instruction": "Define " + "the word " * 40, "output": "no room left for this"})
    (tmp_path / "data.jsonl").write_text("\n".join(rows + [long_prompt]) + "\n")
    assert main(train_args((model, tmp_path / "data.jsonl"), tmp_path / "run", "--max-steps", "1")) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "warning: 1 record with no trained token skipped (1 cut at --seq-len 64 before the response)" in printed
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--model", str(model), "--data",
                 str(tmp_path / "data.jsonl"), "--seq-len", "64", "--json"]) == 0  # eval says it too
    assert "1 record with no trained token skipped (1 cut at --seq-len 64 before the response)" in \
        json.loads(capsys.readouterr().out)["notes"]


def test_resume_over_a_finished_run_without_checkpoints_is_refused_not_trained_again(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    shutil.rmtree(out / "checkpoints")
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "4", "--resume")) == 2
    assert "holds a finished run (summary.json and adapter) but no checkpoint" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_a_file_where_the_checkpoints_go_is_refused_before_the_model_loads(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("x")
    assert main(train_args(tiny, out, "--resume")) == 2
    assert "holds checkpoints as a file or a broken link" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number of at least 1"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "[rank 2] RANK is 2 but WORLD_SIZE is 2: ranks run from 0 to 1"),  # hung
    ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is not a whole number of at least 1"),
    # a damaged rank is this process's own: said by it, though rank 0 speaks for the others
    ({"WORLD_SIZE": "2", "RANK": "abc"}, "[rank abc] RANK='abc' is not a whole number of at least 0"),
    # WORLD_SIZE and RANK set by hand, without torchrun's meeting point: was init_process_group's traceback
    ({"WORLD_SIZE": "2", "RANK": "1"}, "[rank 1] WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not set; start "
                                       "the processes with torchrun")])
def test_bad_torchrun_variables_are_one_line_not_a_traceback(tiny, tmp_path, capsys, monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(train_args(tiny, tmp_path / "run", "--dry-run")) == 2
    assert message in capsys.readouterr().err


def test_overwrite_replaces_a_file_or_a_dangling_link_where_the_adapter_goes(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter").write_text("x")
    (out / "checkpoints").symlink_to(tmp_path / "nowhere")
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite")) == 0
    assert (out / "adapter").is_dir() and not (out / "checkpoints").is_symlink()


@pytest.mark.parametrize("busy, threads_flag, threads, notice", [(1.0, None, 2, True), (0.2, None, 2, False),
                                                                 (1.0, 2, 2, False), (None, None, 2, False),
                                                                 (1.0, None, 1, False)])  # 1 thread: nothing to give up
def test_cores_busy_elsewhere_are_named_with_the_threads_to_pass(monkeypatch, busy, threads_flag, threads, notice):
    import torch

    from lorakit import host
    from lorakit.config import resolve
    from lorakit.train import run

    monkeypatch.setattr(host, "cores_busy_elsewhere", lambda interval: busy)
    monkeypatch.setattr(host, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    lines = run._busy_cores_notice(resolve(None, {"train.threads": threads_flag}), torch.device("cpu"))
    assert bool(lines) == notice
    assert not lines or "about 1.0 of this process's 2 cores busy and torch runs 2 threads" in lines[0] \
        and "--threads 1 " in lines[0]


def test_every_core_busy_elsewhere_is_said_without_free_cores_to_use(monkeypatch):
    import torch

    from lorakit import host
    from lorakit.config import resolve
    from lorakit.train import run

    monkeypatch.setattr(host, "cores_busy_elsewhere", lambda interval: 2.0)
    monkeypatch.setattr(host, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lines = run._busy_cores_notice(resolve(None, {}), torch.device("cpu"))
    assert lines == ["other processes keep about 2.0 of this process's 2 cores busy and torch runs 2 threads: steps "
                     "will take longer than on an idle machine"]


def test_busy_cores_count_the_cores_this_process_may_use_less_its_own_time(monkeypatch):
    from types import SimpleNamespace

    from lorakit import host

    real = host._cpu_jiffies(host.usable_cores())  # this machine's /proc/stat, where there is one
    assert real is None or all(0 <= busy <= total for busy, total in real.values())
    # core 0 busy half the interval, core 1 all of it, core 2 (not ours) all of it; 0.05 s ours
    samples = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0)}, {0: (50, 100), 1: (100, 100), 2: (100, 100)}])
    times = iter([SimpleNamespace(user=1.0, system=0.0), SimpleNamespace(user=1.05, system=0.0)])
    monkeypatch.setattr(host, "_cpu_jiffies", lambda cores: next(samples))
    monkeypatch.setattr(host.os, "times", lambda: next(times))
    monkeypatch.setattr(host, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    assert host.cores_busy_elsewhere(0.1) == pytest.approx(1.5 - 0.5)


def test_a_run_of_few_steps_from_its_epochs_says_so_and_points_to_recommend(tiny, tmp_path, capsys):
    args = train_args(tiny, tmp_path / "run", "--dry-run")
    without_steps = args[:args.index("--max-steps")] + args[args.index("--max-steps") + 2:]
    assert main(without_steps) == 0
    assert "optimizer steps (1 epoch(s) of" in " ".join(capsys.readouterr().out.split())
    assert main(args) == 0  # --max-steps chosen: no notice
    assert "optimizer steps (" not in capsys.readouterr().out


def test_the_progress_lines_tokens_per_second_leave_out_evals_and_checkpoints(monkeypatch, capsys):
    from types import SimpleNamespace

    import torch

    from lorakit.train import progress

    clock = iter([0.0, 10.0, 40.0, 50.0])  # started; an eval from 10 to 40 s; the update at 50 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress(total=20, start=0, device=torch.device("cpu"))
    with bar.paused():
        pass
    bar.live = False
    bar.update(SimpleNamespace(seen_tokens=2000, step=10), SimpleNamespace(loss=1.0, lr=1e-4))
    line = capsys.readouterr().err
    assert "100 tok/s" in line and "ETA 50s" in line  # 2000 tokens in 20 s of steps; the ETA keeps the pauses


def test_the_few_steps_notice_counts_in_good_english():
    from types import SimpleNamespace

    from lorakit.train.run import _few_steps_notice

    config = SimpleNamespace(train=SimpleNamespace(max_steps=None, epochs=1.0))
    one = SimpleNamespace(total_steps=1, batches_per_epoch=1, grad_accum=1, world_size=1)
    assert _few_steps_notice(config, one)[0].startswith("only 1 optimizer step (1 epoch(s) of 1 micro-batch, 1 per")


def test_output_into_a_closed_pipe_stops_quietly_not_with_a_traceback():
    """`lorakit analyze --json | head -1`: the reader goes away before the output is written."""
    import subprocess
    import sys

    import lorakit

    source = str(Path(lorakit.__file__).parents[1])
    for printed_by in (["--json"], []):  # print, and rich's console (whose own handler exits 1)
        child = subprocess.Popen([sys.executable, "-m", "lorakit", "estimate", *printed_by], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": source})
        child.stdout.close()  # before the child has written anything (its imports take a second)
        err = child.stderr.read().decode()
        assert child.wait(timeout=120) == 141 and err == ""  # 128 + SIGPIPE, as a shell tool stopped so


def test_ctrl_c_while_the_libraries_load_is_one_line_not_a_traceback(tmp_path):
    """`import lorakit` loaded torch and transformers before the command line's handler existed."""
    import signal
    import subprocess
    import sys
    import time

    import lorakit

    source = str(Path(lorakit.__file__).parents[1])  # this lorakit, and no test folder's sitecustomize
    child = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--output", str(tmp_path / "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": source})
    maps, deadline = Path(f"/proc/{child.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # until torch's libraries load: inside the command (a loaded machine starts Python late)
    child.send_signal(signal.SIGINT)
    out = child.communicate(timeout=120)[0].decode()
    assert child.returncode == 130 and "Traceback" not in out  # "interrupted", or a stop's checkpoint if fast



def test_a_ctrl_c_during_a_held_import_reaches_the_caller_after_it(tmp_path, monkeypatch):
    """A library whose import swallows KeyboardInterrupt (a bare except) never sees the Ctrl-C.
    Sent to this thread: this test process has torch's threads, which a terminal's Ctrl-C could
    reach instead; the command line holds it before any such thread exists."""
    import signal
    import sys

    from lorakit.cli import import_holding_ctrl_c

    (tmp_path / "swallower.py").write_text(
        "import signal, threading, time\n"
        "interrupted_inside = False\n"
        "try:\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "except:\n"
        "    interrupted_inside = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            import_holding_ctrl_c(["swallower"])
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sys.modules.pop("swallower").interrupted_inside is False

def test_a_resume_with_other_columns_measures_the_base_eval_again():
    from lorakit.train.saved_run import changes_what_base_eval_measured

    saved = {"data": {"data": ["d.jsonl"], "columns": ["instruction=q", "output=a"]}}
    assert not changes_what_base_eval_measured(saved, {"data": {"data": ["d.jsonl"],
                                                                "columns": ["instruction=q", "output=a"]}})
    assert changes_what_base_eval_measured(saved, {"data": {"data": ["d.jsonl"], "columns": ["instruction=a"]}})
