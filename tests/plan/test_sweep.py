"""`lorakit sweep`: grid parsing, one normal run per point, resume without retraining, errors."""

import fcntl
import json
import os

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.plan.sweep import (Grid, SweepPoint, alpha_for, close_call_note, find_guide, make_grid,
                                uneven_speed_note)

from tiny_models import save_tiny_chat_model, write_define_data


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_chat_model(root / "model")
    data = write_define_data(root / "train.jsonl", count=48)
    config = root / "base.yaml"
    config.write_text(f"model: {{name: {model}}}\ndata: {{data: [{data}], seq_len: 64, eval_split: 8}}\n"
                      "train: {batch_size: 4, lr: 0.01, seed: 3}\n")
    return config


def test_grid_tokens_and_points():
    assert alpha_for("2r", 8) == 16 and alpha_for("r", 8) == 8 and alpha_for("16", 8) == 16 and alpha_for("0.5r", 8) == 4
    grid = make_grid("4,16", "2r,32", "qv,q_proj+v_proj", "both")
    points = grid.points()
    # r=16: alpha 2r == 32, so that pair appears once; 2 targets x (r4: 2 alphas, r16: 1) x 2 rslora
    assert len(points) == 2 * 3 * 2
    assert points[0] == SweepPoint(4, 8.0, "qv", False)
    assert {p.targets for p in points} == {"qv", "q_proj,v_proj"}
    assert len({p.slug for p in points}) == len(points)
    assert SweepPoint(64, 64.0, "qv", True).scale == 8.0
    for bad in (("0", "2r", "all"), ("4", "2x", "all"), ("4", "-1", "all"), ("4,,8", "2r", "all"), ("4", "2r", "")):
        with pytest.raises(ConfigError):
            make_grid(*bad)
    with pytest.raises(ConfigError, match="empty entry; write a comma-separated list like --targets qv,attention,all"):
        make_grid("4", "2r", "qv,")  # each flag's example is its own (was a list of ranks for every flag)
    guide = find_guide(Grid([8, 16], ["2r"], ["qv", "all"], [False]).points(), "domain")
    assert guide == SweepPoint(16, 32.0, "all", False)
    assert find_guide(Grid([8], ["2r"], ["all"], [False]).points(), "domain") is None


def test_single_module_names_as_separate_points_are_pointed_out():
    from lorakit.plan.sweep import parse_targets, separate_names_note

    note = separate_names_note(parse_targets("q_proj,v_proj"))
    assert note.endswith("makes 2 points, one module name each; for one point that adapts them together, join "
                         "them with '+': --targets q_proj+v_proj")
    for meant in ("qv,all", "q_proj+v_proj", "q_proj", "q_proj,all-linear", "q_proj+v_proj,o_proj",
                  ".*attn.*,.*mlp.*"):  # regular expressions: one point each, on purpose
        assert separate_names_note(parse_targets(meant)) is None, meant


def sweep_args(config, out, *extra):
    return ["sweep", str(config), "--r", "2,16", "--alpha", "2r", "--targets", "all", "--max-steps", "2",
            "--output", str(out), *extra]


def test_a_point_far_slower_than_the_others_is_named():
    def report(*speeds):
        return {"points": [{"point": {"slug": f"r{i}"}, "summary": {"tokens_per_second": speed}}
                           for i, speed in enumerate(speeds)]}

    assert uneven_speed_note(report(213, 150, 120)) is None  # r and targets: under 2x apart
    note = uneven_speed_note(report(10, 213, None))  # 20x: another job on the cores while r0 trained
    assert note.startswith("tokens/s: r0 (10) against 213 for the fastest point") and "r1" not in note
    assert uneven_speed_note(report(None)) is None and uneven_speed_note(report()) is None


def test_a_best_point_within_a_percent_of_others_is_called_too_close():
    """A UX hunt's sweep named a best point 0.004 below the next on two eval records, as a verdict."""
    def report(best, **losses):
        points = [{"point": {"slug": slug}, "summary": {"final_eval_loss": loss}} for slug, loss in losses.items()]
        return {"metric": "final_eval_loss", "best": best, "points": points}

    note = close_call_note(report("r8", r8=2.000, r16=2.015, r64=2.5))
    assert note.startswith("r8 (2.0000) is within 1% of r16 (2.0150) on final_eval_loss: too close to call") \
        and "r64" not in note
    assert close_call_note(report("r8", r8=2.0, r16=2.1)) is None  # 5% apart: a difference the sweep measured
    assert close_call_note(report("r8", r8=2.0)) is None and close_call_note(report(None, r8=None)) is None


def test_sweep_resumes_without_retraining(base_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(base_config, out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "sweep.json").read_text())
    slugs = [p["point"]["slug"] for p in report["points"]]
    assert slugs == ["r2-a4-all", "r16-a32-all"] and report["pending"] == []
    for entry in report["points"]:
        s = entry["summary"]
        assert entry["status"] == "trained" and s["steps"] == 2 and s["r"] == entry["point"]["r"]
        assert s["final_eval_loss"] < s["base_eval_loss"]
        assert (out / "points" / entry["point"]["slug"] / "adapter" / "adapter_model.safetensors").is_file()
        held = os.open(out / "points" / entry["point"]["slug"], os.O_RDONLY)  # the point's run let go of it
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(held)
    # the guide's --task domain point (r16, alpha 32, all) is in the grid and marked
    assert report["guide"]["slug"] == "r16-a32-all" and report["guide"]["in_grid"]
    assert report["best"] in slugs and (out / "sweep.png").stat().st_size > 0
    assert "guide" in printed and "r16-a32-all" in printed
    kept, redone = out / "points" / "r2-a4-all", out / "points" / "r16-a32-all"
    before = {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()}
    (redone / "summary.json").unlink()  # as if killed before the end
    assert main(sweep_args(base_config, out, "--json")) == 0
    report = json.loads(capsys.readouterr().out)  # --json: stdout is sweep.json alone
    assert {p: p.stat().st_mtime_ns for p in kept.rglob("*") if p.is_file()} == before
    assert (redone / "summary.json").is_file()
    assert [e["status"] for e in report["points"]] == ["reused", "trained"]
    assert report == json.loads((out / "sweep.json").read_text())


def test_changed_settings_need_overwrite(base_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(base_config), "--r", "2", "--targets", "qv", "--max-steps", "1", "--output", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args[:-4] + ["--max-steps", "2", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:-4] + ["--max-steps", "2", "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "points" / "r2-a4-qv" / "summary.json").read_text())["steps"] == 2


@pytest.fixture
def torch_threads_restored():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_reach_every_point_and_do_not_count_as_another_setting(base_config, tmp_path, capsys,
                                                                      torch_threads_restored):
    import torch

    out = tmp_path / "sweep"
    args = ["sweep", str(base_config), "--r", "2", "--targets", "qv", "--max-steps", "1", "--output", str(out)]
    assert main(args + ["--threads", "1"]) == 0 and torch.get_num_threads() == 1
    marker = out / "points" / "r2-a4-qv" / "point.json"
    settings = json.loads(marker.read_text())
    assert "threads" not in settings["train"]
    settings["train"]["threads"] = 1  # as an older lorakit wrote it
    marker.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(args + ["--threads", "2"]) == 0
    assert "reusing finished point r2-a4-qv" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args + ["--threads", "0"])
    assert "is not a thread count" in capsys.readouterr().err


@pytest.mark.parametrize("damaged, edit", [("point.json", None), ("summary.json", None),
                                           ("summary.json", {"final_eval_loss": "x"}),
                                           ("summary.json", {"wall_seconds": None})])
def test_a_damaged_point_file_retrains_that_point(base_config, tmp_path, capsys, damaged, edit):
    out = tmp_path / "sweep"
    args = ["sweep", str(base_config), "--r", "2", "--targets", "qv", "--max-steps", "1", "--output", str(out)]
    assert main(args) == 0
    path = out / "points" / "r2-a4-qv" / damaged
    # a kill or a full disk mid-write, or a hand edit the table could not show
    path.write_text("{bad" if edit is None else json.dumps({**json.loads(path.read_text()), **edit}))
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in report["points"]] == ["trained"]


@pytest.mark.parametrize("args, message", [
    (["--alpha", "2x"], "'2x' is not an alpha"),
    (["--r", "four"], "not a positive integer"),
    (["--targets", "q_prj"], "q_prj"),
    (["--targets", "all+"], "has an empty name around '+'"),
    (["--max-steps", "0"], "--max-steps"),
    (["--r", "2,1000"], "--r 1000 is above the smallest targeted layer side"),  # was found after point 1 trained
    (["--r", "1000", "--targets", "all-linear"], "--r 1000 is above every targeted layer's smaller side (at most 64)"),
])
def test_bad_grid_exits_2_before_training(base_config, tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    full = ["sweep", str(base_config), "--r", "2", "--alpha", "2r", "--targets", "all", "--max-steps", "1",
            "--output", str(out)]
    for i in range(0, len(args), 2):
        full[full.index(args[i]) + 1] = args[i + 1]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "points").exists()


def test_all_linear_takes_a_rank_above_some_layers_by_leaving_them_out(base_config, tmp_path, capsys):
    # k_proj and v_proj are 64 -> 32 here: at r=48 training leaves them out of all-linear, so the grid may ask
    out = tmp_path / "sweep"
    assert main(["sweep", str(base_config), "--r", "48", "--alpha", "2r", "--targets", "all-linear",
                 "--max-steps", "1", "--output", str(out), "--json"]) == 0
    assert [p["status"] for p in json.loads(capsys.readouterr().out)["points"]] == ["trained"]


def test_an_output_that_is_a_file_is_refused_before_any_point_trains(base_config, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["sweep", str(base_config), "--r", "2", "--max-steps", "1", "--output", str(tmp_path / "taken")]) == 2
    captured = capsys.readouterr()
    assert "is a file; choose a folder path for the sweep" in captured.err and "training point" not in captured.out
    assert (tmp_path / "taken").read_text() == "a file"
    (tmp_path / "model").mkdir()  # a folder of other things (found by a hunt: points/ went into a model's folder)
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(["sweep", str(base_config), "--r", "2", "--max-steps", "1", "--output", str(tmp_path / "model")]) == 2
    assert "holds files that are not a sweep's" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]


def test_missing_or_dataless_config_exits_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--max-steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("lora: {r: 4}\n")
    assert main(["sweep", str(empty), "--max-steps", "1", "--output", str(tmp_path / "o")]) == 2
    assert "names no training data" in capsys.readouterr().err


def test_killed_sweep_retrains_only_the_unfinished_point(base_config, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    args = ["sweep", str(base_config), "--r", "2,4", "--targets", "qv", "--max-steps", "8", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "points" / "r4-a8-qv"
    deadline = time.time() + 300
    while not (second / "point.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: as if the machine went down
    proc.wait()
    assert not (second / "summary.json").exists(), "the second point finished before the kill"
    first = out / "points" / "r2-a4-qv"
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert (first / "summary.json").is_file()
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in report["points"]] == ["reused", "trained"]
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == before
    assert json.loads((second / "summary.json").read_text())["steps"] == 8


def test_a_stopped_sweep_says_how_to_go_on_and_keeps_no_stale_plot(base_config, tmp_path, capsys, monkeypatch):
    import signal

    from lorakit.train.loop import Trainer

    out = tmp_path / "sweep"
    assert main(["sweep", str(base_config), "--r", "2", "--alpha", "2r", "--targets", "qv", "--max-steps", "2",
                 "--output", str(out)]) == 0
    assert (out / "sweep.png").is_file()
    real_loss, calls = Trainer._loss, []

    def loss_then_sigint(trainer, batch, normalizer):
        calls.append(1)
        if len(calls) == 1:  # the new point's first step
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(trainer, batch, normalizer)

    monkeypatch.setattr(Trainer, "_loss", loss_then_sigint)
    capsys.readouterr()
    assert main(["sweep", str(base_config), "--r", "2,4", "--alpha", "2r", "--targets", "qv", "--max-steps", "2",
                 "--output", str(out)]) == 130  # the grid grew: its new point is stopped part way
    captured = capsys.readouterr()
    assert "rerun the same sweep command to go on" in captured.out and "--resume" not in captured.out
    assert not (out / "sweep.png").exists() and "plot:" not in captured.out  # the old plot showed the old grid
    assert "best so far: r2-a4-qv" in captured.out and "stopped: r4-a8-qv (goes on from its last checkpoint" \
        in captured.out and "not run yet" not in captured.out
    assert "peak GiB on a CPU: the process's resident set" in captured.out
    # the rerun goes on from the stop's checkpoint (it trained the point again from its start), exactly
    monkeypatch.setattr(Trainer, "_loss", real_loss)
    grid = ["--r", "2,4", "--alpha", "2r", "--targets", "qv", "--max-steps", "2"]
    assert main(["sweep", str(base_config), *grid, "--output", str(out)]) == 0
    assert "resumed from step-000001" in capsys.readouterr().out
    assert main(["sweep", str(base_config), *grid, "--output", str(tmp_path / "whole")]) == 0
    point = "points/r4-a8-qv/adapter/adapter_model.safetensors"
    assert (out / point).read_bytes() == (tmp_path / "whole" / point).read_bytes()
    # with --overwrite a stopped point trains again from its start (to the same adapter)
    monkeypatch.setattr(Trainer, "_loss", loss_then_sigint)
    calls.clear()
    one = ["sweep", str(base_config), "--r", "4", *grid[2:], "--output", str(tmp_path / "again")]
    assert main([*one, "--overwrite"]) == 130  # with it, the stop's advice is to rerun without it
    assert "rerun it without --overwrite" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_loss", real_loss)
    assert main([*one, "--overwrite"]) == 0 and "resumed from" not in capsys.readouterr().out
    assert (tmp_path / "again" / point).read_bytes() == (tmp_path / "whole" / point).read_bytes()


def test_two_alphas_that_print_alike_are_two_points():
    assert SweepPoint(4, 16.0, "qv", False).slug == "r4-a16-qv"
    assert SweepPoint(4, 16.0000001, "qv", False).slug == "r4-a16.0000001-qv"
