"""`lorakit recommend`: deterministic, runnable, explains its departures, follows the budget."""

import dataclasses
import json

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.plan.estimate import TrainShape, estimate_memory
from lorakit.plan.model_shapes import PRESETS
from lorakit.plan.recommend import (GIB, DeviceMemory, DataProfile, ModelFacts, choose_lr, choose_rank, choose_seq_len,
                                    parse_size, plan_choices)

from tiny_models import save_tiny_chat_model, write_define_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_chat_model(root / "model"), write_define_data(root / "train.jsonl", count=48)


def recommend_args(tiny, *extra):
    model, data = tiny
    return ["recommend", "--model", str(model), "--data", str(data), "--device", "cpu", "--memory", "8GiB", *extra]


def test_a_run_output_that_is_a_file_is_refused_before_any_config_is_written(tiny, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    for run_output in (taken, taken / "run"):  # the file, or a path under it
        assert main(recommend_args(tiny, "--output", str(tmp_path / "a.yaml"), "--run-output", str(run_output))) == 2
        assert f"--run-output {run_output}: {taken} is a file" in capsys.readouterr().err
    assert not (tmp_path / "a.yaml").exists() and taken.read_text() == "mine\n"


def test_same_inputs_same_config_and_it_trains(tiny, tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(recommend_args(tiny, "--output", str(first))) == 0
    assert main(recommend_args(tiny, "--output", str(second), "--run-output", "runs/a")) == 0
    assert first.read_bytes() == second.read_bytes()
    first.write_text("# my own notes\n")  # an existing file is replaced only when asked
    assert main(recommend_args(tiny, "--output", str(first))) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and first.read_text() == "# my own notes\n"
    assert main(recommend_args(tiny, "--output", str(first), "--overwrite")) == 0
    assert first.read_bytes() == second.read_bytes()
    assert main(recommend_args(tiny, "--output", str(tmp_path / "new" / "c.yaml"))) == 0  # its folder is made
    assert (tmp_path / "new" / "c.yaml").read_bytes() != b""
    capsys.readouterr()
    assert main(recommend_args(tiny, "--json")) == 0
    one = capsys.readouterr().out
    assert main(recommend_args(tiny, "--json")) == 0
    assert capsys.readouterr().out == one
    # the written YAML is a complete config that `lorakit train` accepts as is
    assert main(["train", str(first), "--dry-run"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    # alpha = 2r is left to follow r, as in a run's own config.yaml: another --r takes alpha along
    lora = yaml.safe_load(first.read_text())["lora"]
    assert "alpha" not in lora and "alpha follows from r" in first.read_text()
    assert "x 32/alpha above alpha 32; another --r moves alpha, not this" in first.read_text()  # lr stays
    assert main(["train", str(first), "--r", "32", "--dry-run"]) == 0
    assert "│ alpha     │ 64" in capsys.readouterr().out


def test_a_budget_from_the_command_line_reaches_the_trainer(tiny, tmp_path, capsys, monkeypatch):
    """--memory plans for less than this machine has: the config carries it, or `lorakit train`
    would plan its checkpointing for the whole machine."""
    from lorakit.plan import recommend
    from lorakit.train.memory_plan import SAFETY_MARGIN

    config = tmp_path / "small.yaml"
    assert main(recommend_args(tiny, "--output", str(config))) == 0
    written = yaml.safe_load(config.read_text())["train"]["memory_budget"]
    usable = recommend.make_budget("cpu", memory="8GiB").usable_bytes
    assert written == pytest.approx(usable / SAFETY_MARGIN / 2**30, abs=0.01)
    assert recommend._floor_significant(0.0834, 3) == 0.0834 and recommend._floor_significant(14.8888, 3) == 14.8
    assert recommend._floor_significant(1.15, 3) == 1.15  # 1.15 * 100 is 114.999... in floating point
    monkeypatch.setattr(recommend, "machine_memory_bytes", lambda: 8 * 2**30)
    assert main(["recommend", "--model", str(tiny[0]), "--data", str(tiny[1]), "--device", "cpu", "--output",
                 str(tmp_path / "machine.yaml")]) == 0  # this machine's memory: the trainer measures it itself
    assert yaml.safe_load((tmp_path / "machine.yaml").read_text())["train"]["memory_budget"] is None


def test_tiny_data_departs_from_the_guide_and_says_so(tiny, capsys):
    assert main(recommend_args(tiny, "--json")) == 0
    rec = json.loads(capsys.readouterr().out)
    choices = {c["key"]: c for c in rec["choices"]}
    # train holds 5% of the records out for eval (no --eval-data): the plan counts the rest
    assert rec["data"]["examples"] == 46 and rec["data"]["held_out"] == 2 and rec["data"]["trained_tokens"] > 0
    assert choices["lora.r"]["value"] == 8 and choices["lora.r"]["departs"]
    assert "instead of 16" in choices["lora.r"]["reason"]
    assert choices["lora.alpha"]["value"] == 16 and not choices["lora.alpha"]["departs"]
    assert choices["lora.targets"]["value"] == "all"
    assert choices["train.epochs"]["value"] == 3
    # seq_len: a round length at or above the longest example (tiny model context: 256)
    assert choices["data.seq_len"]["value"] >= rec["data"]["length_max"]
    assert choices["data.seq_len"]["value"] in (64, 128, 192, 256)
    for c in rec["choices"]:
        assert c["reason"], c["key"]
    config = rec["config"]
    assert config["lora"]["r"] == 8 and config["train"]["lr"] == choices["train.lr"]["value"]


def test_printed_table_flags_departures(tiny, capsys):
    assert main(recommend_args(tiny, "--task", "style")) == 0
    out = capsys.readouterr().out
    assert "r=4 instead of 8" in out and "departs from the guide: lora.r" in out
    assert "46 examples to train on (2 more held out for eval)" in out


def test_rank_and_lr_follow_data_and_alpha():
    big = choose_rank("domain", 40_000_000)
    assert big.value == 32 and big.departs and big.reason.startswith("r=32 instead of 16: 40M trained tokens")
    assert choose_rank("domain", 500_000_000).value == 64
    medium = choose_rank("domain", 2_000_000)
    assert medium.value == 16 and not medium.departs
    assert choose_rank("new-concepts", 50_000).value == 32
    assert choose_lr(135_000_000, 32).value == 1e-3
    assert choose_lr(8_000_000_000, 32).value == 2e-4
    lowered = choose_lr(8_000_000_000, 64)
    assert lowered.value == 1e-4 and "32/alpha" in lowered.reason
    assert choose_seq_len(70, 86, 8192).value == 128
    assert choose_seq_len(900, 5000, 8192).value == 1024
    capped = choose_seq_len(9000, 9000, 4096)
    assert capped.value == 4096 and "cut" in capped.reason


def profile(examples=20_000, mean=1500.0):
    return DataProfile(examples=examples, total_tokens=int(examples * mean), trained_tokens=5_000_000,
                       length_mean=mean, length_p50=1400, length_p99=1900, length_max=2600,
                       response_p50=200, response_p99=900, format="chat")


def one_b():
    shape = PRESETS["1b"]
    return ModelFacts("1b", shape.num_params(), "llama", 131072, shape)


def need(batch, checkpointing, quantize=None, r=16, seq_len=2048):
    step = TrainShape(batch_size=batch, seq_len=seq_len, r=r, targets="all-linear", grad_checkpointing=checkpointing,
                      dtype="bf16", quantize=quantize, fused_loss=True,
                      fused_mlp=quantize in (None, "none"))  # as recommend plans: a 4-bit base is not fused
    return estimate_memory(PRESETS["1b"], step).total


def budget_for(usable: float) -> DeviceMemory:
    """A GPU budget whose usable part is `usable` bytes (the inverse of DeviceMemory.usable_bytes)."""
    return DeviceMemory("cuda", int((usable + GIB // 2) / 0.9) + 1, "test")


def pick(budget):
    choices, memory = plan_choices("domain", profile(), one_b(), budget)
    values = {c.key: c.value for c in choices}
    assert values["train.grad_checkpointing"] == "auto"  # the trainer decides again where it runs
    return (values["train.batch_size"], values["train.grad_accum"], memory["expects_checkpointing"],
            values["model.quantize"], memory)


def test_budget_moves_batch_and_checkpointing():
    # 20K examples -> ~32 examples per step; 1500-token examples in 2048-token rows -> 32 rows
    roomy = pick(DeviceMemory("cuda", 140 * GIB, "test"))
    assert roomy[:4] == (32, 1, False, "none")
    assert roomy[4]["predicted_peak_bytes"] == need(32, False)
    # room for 4 rows without checkpointing: micro-batch 4, 8 accumulation steps
    middle = pick(budget_for(need(4, False)))
    assert middle[:4] == (4, 8, False, "none")
    # not even one row fits without checkpointing: turn it on
    tight_bytes = (need(1, True) + need(1, False)) / 2
    assert need(1, True) < tight_bytes < need(1, False)
    tight = pick(budget_for(tight_bytes))
    assert tight[0] * tight[1] == 32 and tight[2:4] == (True, "none")
    # the 16-bit base cannot fit at all: a 4-bit base (QLoRA) on a GPU
    qlora = pick(budget_for(need(1, True) * 0.9))
    assert qlora[3] == "4bit" and qlora[4]["predicted_peak_bytes"] <= need(1, True) * 0.9
    with pytest.raises(ConfigError, match="does not fit"):
        pick(budget_for(need(1, True, "4bit") * 0.9))
    # a CPU plan never quantises (bitsandbytes needs a GPU)
    with pytest.raises(ConfigError, match="does not fit"):
        plan_choices("domain", profile(), one_b(), DeviceMemory("cpu", int(need(1, True) * 1.0), "test"))


def test_the_batch_reason_names_what_capped_it_memory_or_the_steps_rows():
    def reason(budget):
        return next(c.reason for c in plan_choices("domain", profile(), one_b(), budget)[0] if c.key == "train.batch_size")

    assert reason(DeviceMemory("cuda", 140 * GIB, "test")).startswith("the step's 32 rows of 2048 tokens in one micro")
    assert reason(budget_for(need(4, False))).startswith("the largest micro-batch of 2048-token rows that fits")


def test_budget_changes_the_written_config(tiny, capsys):
    capsys.readouterr()
    assert main(recommend_args(tiny, "--json")) == 0
    roomy = json.loads(capsys.readouterr().out)
    assert roomy["budget"]["device"] == "cpu" and roomy["memory"]["predicted_peak_bytes"] <= roomy["budget"]["usable_bytes"]
    # a GPU plan is bf16 and reports its own budget
    assert main(recommend_args(tiny, "--json")[:-5] + ["--gpu-memory", "2GiB", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert gpu["budget"] == {"device": "cuda", "total_bytes": 2 * GIB, "usable_bytes": int(0.9 * 2 * GIB) - GIB // 2,
                             "source": "--gpu-memory 2GiB"}


def test_a_model_whose_mlp_the_trainer_does_not_fuse_gets_the_larger_estimate():
    import dataclasses

    budget = DeviceMemory("cuda", 140 * GIB, "test")
    fused = plan_choices("domain", profile(), one_b(), budget)[1]
    unfused = plan_choices("domain", profile(), dataclasses.replace(one_b(), model_type="gemma"), budget)[1]
    assert fused["predicted_peak_bytes"] == need(32, False)
    assert unfused["predicted_peak_bytes"] > fused["predicted_peak_bytes"]


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24GB") == parse_size("24g") == parse_size("24") == 24 * GIB
    assert parse_size("512MiB") == GIB // 2
    for bad in ("abc", "0", "-4GB", "12XB", "1B", "100MiB", "1K"):  # "1B" was read as 1 GiB
        with pytest.raises(ConfigError):
            parse_size(bad)
    with pytest.raises(ConfigError, match="'16B' reads as bytes; write the unit: e.g. 16GiB"):
        parse_size("16B", "--memory")
    # a typo's size, once named as --memory-budget (the budget it became), a flag not given
    with pytest.raises(ConfigError, match="--gpu-memory '100000000GiB' is more than 1 PiB"):
        parse_size("100000000GiB")
    assert parse_size("1048576GiB") == 2**50


@pytest.mark.parametrize("extra, message", [
    (["--gpu-memory", "lots"], "not a memory size"),
    (["--gpu-memory", "8GiB", "--device", "cpu"], "--gpu-memory"),
    (["--data", "/no/such/file.jsonl"], "does not exist"),
    (["--eval-data", "/no/such/eval.jsonl"], "eval.jsonl does not exist"),
    (["--model", "/no/such/model"], "no such model"),
    (["--output", "config.txt"], ".yaml"),
])
def test_bad_input_exits_2(tiny, extra, message, capsys):
    model, data = tiny
    args = ["recommend", "--model", str(model), "--data", str(data)]
    if "--gpu-memory" not in extra:
        args += ["--device", "cpu", "--memory", "8GiB"]
    for i in range(0, len(extra), 2):  # a later flag replaces an earlier one
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_the_estimator_cannot_read_still_gets_a_runnable_config(tiny, tmp_path, capsys):
    from tiny_models import tiny_gpt2, tiny_tokenizer

    folder, tokenizer = tmp_path / "gpt2", tiny_tokenizer()
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "gpt2.yaml"
    assert main(["recommend", "--model", str(folder), "--data", str(tiny[1]), "--device", "cpu", "--memory", "4GiB",
                 "--output", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["memory"] == {} and any("memory not estimated" in note for note in rec["notes"])
    assert rec["config"]["data"]["seq_len"] <= 128  # the model's context (n_positions)
    assert main(["train", str(out), "--dry-run"]) == 0


def test_long_runs_evaluate_and_checkpoint_about_ten_times():
    from lorakit.plan.recommend import choose_eval_and_save

    short = {c.key: c.value for c in choose_eval_and_save(60)}
    assert short == {"train.eval_every": 0, "train.save_every": 0}
    for steps, every in ((100, 10), (625, 50), (2000, 200), (12_345, 1000)):
        values = {c.key: c.value for c in choose_eval_and_save(steps)}
        assert values == {"train.eval_every": every, "train.save_every": every}, steps
        assert 5 <= steps // every <= 20
    # the 20K-example profile (5M trained tokens: two epochs): 20K x 2 / 32 per step = 1250 steps
    choices, _ = plan_choices("domain", profile(), one_b(), DeviceMemory("cuda", 140 * GIB, "test"))
    values = {c.key: c.value for c in choices}
    assert values["train.epochs"] == 2 and values["train.save_every"] == values["train.eval_every"] == 100


def test_packed_rows_hold_whole_examples():
    from lorakit.plan.recommend import packed_rows_per_epoch, rows_per_step

    # without the packer's count: whole examples of the mean length per row (never split), so 42-token
    # examples in 64-token rows take one row each, not 16 x 42 / 64
    assert packed_rows_per_epoch(profile(1600, 42.0), 64) == 1600
    assert packed_rows_per_epoch(profile(1600, 53.0), 128) == 800  # two per row
    assert packed_rows_per_epoch(profile(1600, 30.0), 256) == 200  # eight per row
    assert rows_per_step(16, 1600, 1600, 1.0) == (16, False)
    assert rows_per_step(16, 1600, 800, 1.0) == (8, False)
    assert rows_per_step(16, 1600, 200, 1.0) == (2, False)
    assert rows_per_step(16, 1600, 200, 0.25) == (1, True)  # 50 rows in all: one a step keeps 50 steps


def test_the_packers_own_count_sets_the_batch_and_the_steps():
    """Examples of 20-45 tokens (mean 33) in rows of 64: the packer fits ~1.45 a row where the mean
    says one, and the plan said ~50 steps of ~16 examples where training ran 36 of ~23 (a review)."""
    import numpy as np

    from lorakit.plan.recommend import packed_rows

    lengths = np.random.default_rng(0).integers(20, 46, size=270)
    rows = packed_rows(lengths, 64, seed=0)
    assert 270 / 2 <= rows < 270 / 1.3
    data = dataclasses.replace(profile(270, float(lengths.mean())), trained_tokens=20_000, length_p99=45,
                               length_max=45, packed_rows=rows, packed_seq_len=64)
    choices, _ = plan_choices("style", data, one_b(), DeviceMemory("cuda", 140 * GIB, "test"))
    values = {c.key: c for c in choices}
    step_rows = values["train.batch_size"].value * values["train.grad_accum"].value
    assert 3 * rows / step_rows >= 50  # three epochs of the packer's rows: at least 50 steps
    per_row = 270 / rows
    assert f"~{per_row:.2g} of {lengths.mean():.0f} tokens" in values["data.packing"].reason
    assert f"an effective batch of ~{step_rows * per_row:.0f} examples" in values["train.grad_accum"].reason




def test_estimate_on_the_cpu_models_the_step_recommend_planned_for_the_cpu(tiny, tmp_path, capsys):
    """estimate took a CPU plan's config for a GPU step (bf16, the CUDA context, 817 TFLOP/s): 0.34
    GiB against recommend's 0.62 in a UX hunt. --device cpu models the step recommend planned."""
    config = tmp_path / "plan.yaml"
    assert main(recommend_args(tiny, "--output", str(config), "--json")) == 0
    planned = json.loads(capsys.readouterr().out)["memory"]["predicted_peak_bytes"]
    assert main(["estimate", str(config), "--device", "cpu", "--device-peak-tflops", "0.1", "--json"]) == 0
    estimated = json.loads(capsys.readouterr().out)
    from lorakit.models import training_dtype

    assert estimated["shape"]["device"] == "cpu" and estimated["shape"]["cpu_attention"] is True
    assert estimated["shape"]["dtype"] == {"float32": "fp32", "bfloat16": "bf16"}[training_dtype("auto", "cpu")]
    assert estimated["memory"]["total"] == planned  # the config's checkpointing, as recommend chose it
    # a QLoRA step on the CPU computes in what lorakit train's QLoRA computes in here (was refused as --dtype fp32)
    import torch
    from lorakit.quantize import compute_dtype

    assert main(["estimate", "--quantize", "4bit", "--device", "cpu", "--device-peak-tflops", "0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["dtype"] == {torch.float32: "fp32",
                                                                     torch.bfloat16: "bf16"}[compute_dtype("cpu")]
