"""Config resolution: presets, provenance, YAML and flags from the same fields, validation."""

import argparse

import pytest

from lorakit.config import add_flags, load_yaml, resolve, save_yaml
from lorakit.errors import ConfigError


def flags(*argv):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return vars(parser.parse_args(list(argv)))


@pytest.mark.parametrize("task,r,alpha", [("domain", 16, 32), ("style", 8, 16), ("classification", 8, 16),
                                          ("new-concepts", 64, 128)])
def test_task_presets(task, r, alpha):
    config = resolve(None, flags("--task", task))
    assert (config.lora.r, config.lora.alpha) == (r, alpha)
    assert config.sources["lora.r"] == f"preset --task {task}"


def test_explicit_rank_gets_alpha_two_r():
    config = resolve(None, flags("--task", "domain", "--r", "32"))
    assert (config.lora.r, config.lora.alpha) == (32, 64)
    assert config.sources["lora.r"] == "flag" and "2 * r" in config.sources["lora.alpha"]


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n  alpha: 8\ntrain:\n  lr: 0.001\nseq_len: 128\n")
    config = resolve(load_yaml(path), flags("--alpha", "12"))
    assert (config.lora.r, config.lora.alpha, config.train.lr, config.data.seq_len) == (4, 12, 0.001, 128)
    assert config.sources["lora.r"] == "config file" and config.sources["lora.alpha"] == "flag"


@pytest.mark.parametrize("text, gib", [("8GiB", 8.0), ("8GB", 8.0), ("8", 8.0), ("512MiB", 0.5), ("1.5g", 1.5),
                                       ("0.003", 0.003), ("1e2", 100.0), ("3MiB", 3 / 1024)])
def test_a_memory_budget_takes_a_size_with_its_unit_as_recommend_does(tmp_path, text, gib):
    assert resolve(None, flags("--memory-budget", text)).train.memory_budget == gib
    path = tmp_path / "c.yaml"
    path.write_text(f"memory_budget: {text}\n")
    assert resolve(load_yaml(path), flags()).train.memory_budget == gib


def test_a_memory_budget_that_is_no_size_is_named():
    with pytest.raises(ConfigError, match="--memory-budget '8x' is not a memory size; write e.g. 24GiB"):
        resolve(None, flags("--memory-budget", "8x"))
    with pytest.raises(ConfigError, match="--memory-budget '16B' reads as bytes"):
        resolve(None, flags("--memory-budget", "16B"))


@pytest.mark.parametrize("spelled, dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"),
                                            ("bfloat16", "bfloat16")])
def test_a_dtype_takes_the_short_spellings_other_tools_use(tmp_path, spelled, dtype):
    from lorakit.cli import build_parser

    assert resolve(None, flags("--dtype", spelled)).model.dtype == dtype
    path = tmp_path / "c.yaml"
    path.write_text(f"dtype: {spelled}\n")
    assert resolve(load_yaml(path), flags()).model.dtype == dtype
    for command in (["eval", "--adapter", "a", "--data", "d"], ["generate", "hi"], ["merge", "--adapter", "a",
                                                                                   "--output", "o"]):
        assert build_parser(command).parse_args([*command, "--dtype", spelled]).dtype == dtype


def test_an_eval_split_beside_eval_files_is_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match="--eval-split holds out part of the training data, and --eval-data names"):
        resolve(None, flags("--eval-data", "e.jsonl", "--eval-split", "0.5"))
    path = tmp_path / "config.yaml"  # as a run's own config.yaml holds them both
    path.write_text("data: {eval_data: [e.jsonl], eval_split: 0.05}\n")
    assert resolve(load_yaml(path), flags()).data.eval_data == ["e.jsonl"]


def test_a_repeated_file_flag_takes_every_file(tmp_path):
    """`--data a --data b` read only b (argparse's store: the last wins), silently."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: [yaml.jsonl]}\n")
    config = resolve(load_yaml(path), flags("--data", "a.jsonl", "--data", "b.jsonl", "c.jsonl", "--eval-data", "e.jsonl",
                                            "--eval-data", "f.jsonl"))
    assert config.data.data == ["a.jsonl", "b.jsonl", "c.jsonl"] and config.data.eval_data == ["e.jsonl", "f.jsonl"]
    assert resolve(load_yaml(path), flags()).data.data == ["yaml.jsonl"]  # no flag: the file's
    from lorakit.cli import build_parser

    for command in (["eval", "--adapter", "x"], ["recommend"]):  # the other commands that read data files
        assert build_parser(command).parse_args([*command, "--data", "a", "--data", "b"]).data == ["a", "b"]


@pytest.mark.parametrize("text,message", [
    ("lora: {r: 4\n", "not valid YAML"),
    ("lora: {rank: 4}\n", "unknown key"),
    ("colour: red\n", "unknown key"),
    ("lora: {r: four}\n", "must be an integer"),
    ("train: {lr: fast}\n", "must be a number"),
    ("data: {packing: maybe}\n", "true or false"),
    ("- just\n- a list\n", "mapping"),
    ("!!python/object/apply:os.system [echo hacked]\n", "not valid YAML"),
    # one option under two spellings: an error, as a key given twice is (not the last one winning)
    ("seq-len: 64\nseq_len: 128\n", r"sets data.seq_len twice \(seq-len and seq_len\); keep one"),
    ("lora: {r: 8}\nr: 16\n", r"sets lora.r twice \(lora.r and r\); keep one"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(load_yaml(path), flags())


@pytest.mark.parametrize("text,named", [
    ("learning_rate: 0.001\n", "learning_rate (lorakit's name: lr)"),  # transformers' / Axolotl's name
    ("lora: {lora_alpha: 32}\n", "lora.lora_alpha (lorakit's name: alpha)"),
    ("data: {field_instruction: question}\n", "data.field_instruction (lorakit's name: columns)"),  # Axolotl's
    ("train: {gradient_acumulation_steps: 2}\n", "train.gradient_acumulation_steps (lorakit's name: grad_accum)"),
    ("train: {bach_size: 2}\n", "train.bach_size (did you mean batch_size?)"),
    ("train: {r: 8}\n", "train.r (lorakit's r goes under lora: or at the top level)"),
    ("lora: {learning_rate: 1}\n", "lora.learning_rate (lorakit's lr goes under train: or at the top level)"),
    ("colour: red\n", "colour; see"),  # nothing near: the key alone
    ("1: x\n", "1; see"),  # a number as a key (it was a TypeError's traceback)
    ("train: {lora: {r: 8}}\n", "train.lora (lora: is a section of its own, at the top level)"),
])
def test_an_unknown_key_is_told_lorakits_spelling_of_what_it_probably_meant(tmp_path, text, named):
    """A config carried over from PEFT, Axolotl or transformers names its options their way: each
    unknown key is told lorakit's name for it, a typo its nearest option (nothing is read in place)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        resolve(load_yaml(path), flags())
    assert f"unknown key(s) in {path}: {named}" in str(error.value)


def test_yaml_floats_without_a_dot_and_target_lists_read_as_meant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 1.0e2\nlora:\n  dropout: 5E-2\n"
                    "  targets: [q_proj, v_proj]\n  exclude:\n    - v_proj\n")
    config = resolve(load_yaml(path), flags())
    assert (config.train.lr, config.train.weight_decay, config.lora.dropout) == (1e-4, 100.0, 0.05)
    assert (config.lora.targets, config.lora.exclude) == ("q_proj,v_proj", "v_proj")
    path.write_text('train:\n  lr: "1e-4"\n')  # quoted: text, as before
    with pytest.raises(ConfigError, match="train.lr .config file. must be a number, got '1e-4'"):
        resolve(load_yaml(path), flags())
    for bad in ("[q_proj, 3]", "['layers\\.0\\..*q_proj', v_proj]", "[]"):  # a regex stays one string
        path.write_text(f"lora:\n  targets: {bad}\n")
        with pytest.raises(ConfigError, match="lora.targets .config file. as a list takes module names or groups"):
            resolve(load_yaml(path), flags())


def test_a_saved_config_keeps_names_that_look_like_numbers_as_text(tmp_path):
    config = resolve(None, flags("--output", "1e3", "--data", "2e5", "--lr", "1e-4"))
    path = tmp_path / "c.yaml"
    path.write_text(save_yaml(config))
    again = resolve(load_yaml(path), flags())
    assert (again.output.output, again.data.data, again.train.lr) == ("1e3", ["2e5"], 1e-4)


def test_a_flat_config_names_model_data_and_output_as_their_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: some/model\ndata: d.jsonl\noutput: runs/x\nseq_len: 128\n")
    config = resolve(load_yaml(path), flags())
    assert (config.model.name, config.data.data, config.output.output) == ("some/model", ["d.jsonl"], "runs/x")
    path.write_text("model: m\nseq-len: 96\nbatch-size: 3\n")  # spelled as the flags, as inside a section
    config = resolve(load_yaml(path), flags())
    assert (config.data.seq_len, config.train.batch_size) == (96, 3)
    path.write_text("train: 5\n")  # a section that is no flag must be a mapping
    with pytest.raises(ConfigError, match="train in .* must be a mapping of options"):
        resolve(load_yaml(path), flags())


@pytest.mark.parametrize("argv, message", [(["--model", " "], "--model is empty; name a model folder"),
                                           (["--data", ""], "--data names an empty path"),
                                           (["--eval-data", ""], "--eval-data names an empty path")])
def test_an_empty_model_or_data_path_is_named_not_taken_for_the_current_folder(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, flags(*argv))


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve(None, flags("--r", "0", "--lr", "-1", "--batch-size", "0", "--dropout", "1.5"))
    text = str(err.value)
    for fragment in ("r must be", "--lr", "--batch-size", "dropout"):
        assert fragment in text


@pytest.mark.parametrize("value", ["1.5", "nan", "inf", "-0.1"])
def test_eval_split_is_a_fraction_or_a_whole_count(value):
    with pytest.raises(ConfigError, match="--eval-split must be a fraction below 1 or a whole number"):
        resolve(None, flags("--eval-split", value))
    for fine in ("0", "0.1", "3"):
        assert resolve(None, flags("--eval-split", fine)).data.eval_split == float(fine)


@pytest.mark.parametrize("argv,message", [
    (("--weight-decay", "-1"), "--weight-decay must be >= 0"), (("--weight-decay", "nan"), "--weight-decay must be >= 0"),
    (("--log-every", "0"), "--log-every must be at least 1"), (("--eval-batches", "-1"), "--eval-batches must be >= 0"),
    (("--epochs", "inf"), "--epochs must be a positive number"), (("--seed", "-1"), "--seed must be in"),
    (("--seed", str(2**64)), "--seed must be in"), (("--threads", "100000"), "--threads must be at most"),
    (("--output", " "), "--output is empty"), (("--epochs", "1e30"), "up to 1,000,000"),
    (("--max-steps", str(10**26)), "at most 1,000,000,000"),
    # found by a hostile-input hunt: RAM filled before the first step, NaN after the base eval, an overflow
    (("--grad-accum", str(10**12)), "--grad-accum must be from 1 to 4,096"),
    (("--alpha", "1e39"), "--alpha must be at most 100,000"), (("--memory-budget", "1e300"), "up to 1,048,576"),
    (("--memory-budget", "2000000"), "up to 1,048,576")])
def test_values_that_crashed_a_run_after_its_folder_was_cleared(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, flags(*argv))


@pytest.mark.parametrize("text,message", [
    ("train: {lr: null}\n", "train.lr .* is empty"), ("data: {data: null}\n", "data.data .* is empty"),
    ("output: null\n", "output.output .* is empty"), ("? [a, b]\n: 1\n", "a key is a list, not a plain name")])
def test_empty_values_and_odd_keys_in_yaml_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(load_yaml(path), flags())
    path.write_text("train: {max_steps: null}\n")  # an optional value may be null
    assert resolve(load_yaml(path), flags()).train.max_steps is None


def test_resume_and_overwrite_conflict():
    with pytest.raises(ConfigError, match="contradict"):
        resolve(None, flags("--resume", "--overwrite"))


@pytest.mark.parametrize("argv,value", [
    ((), "auto"), (("--grad-checkpointing",), "on"), (("--grad-checkpointing", "off"), "off"),
    (("--no-grad-checkpointing",), "off"), (("--grad-checkpointing", "auto"), "auto"),
])
def test_grad_checkpointing_flags(argv, value):
    config = resolve(None, flags(*argv))
    assert config.train.grad_checkpointing == value
    assert config.sources.get("train.grad_checkpointing") == ("flag" if argv else None)


@pytest.mark.parametrize("text,value", [("true", "on"), ("false", "off"), ("on", "on"), ("off", "off"),
                                        ("auto", "auto"), ("'on'", "on")])
def test_grad_checkpointing_in_yaml_takes_booleans_too(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  grad_checkpointing: {text}\n")
    assert resolve(load_yaml(path), flags()).train.grad_checkpointing == value


@pytest.mark.parametrize("text,message", [("maybe", "must be one of auto, on, off, offload, got 'maybe'"),
                                          ("3", "must be one of auto, on, off, offload \\(or true/false\\), got 3")])
def test_bad_grad_checkpointing_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"grad_checkpointing: {text}\n")
    with pytest.raises(ConfigError, match=message):
        resolve(load_yaml(path), flags())


def test_bad_grad_checkpointing_flag_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        flags("--grad-checkpointing", "sometimes")


def test_saved_config_round_trips_the_checkpointing_choice(tmp_path):
    from lorakit.config import save_yaml

    path = tmp_path / "c.yaml"
    path.write_text(save_yaml(resolve(None, flags("--grad-checkpointing", "on"))))
    assert resolve(load_yaml(path), flags()).train.grad_checkpointing == "on"


@pytest.mark.parametrize("argv, saved_keys", [
    ((), set()), (("--r", "8"), {"r"}), (("--alpha", "4"), {"alpha"}), (("--r", "8", "--alpha", "4"), {"r", "alpha"}),
    (("--task", "style"), set()),
])
def test_a_saved_config_repeats_the_run_and_keeps_r_and_alpha_following_the_guide(tmp_path, argv, saved_keys):
    from lorakit.config import save_yaml

    original = resolve(None, flags(*argv))
    path = tmp_path / "c.yaml"
    path.write_text(save_yaml(original))
    assert {"r", "alpha"} & set(load_yaml(path)["lora"]) == saved_keys
    again = resolve(load_yaml(path), flags())
    assert (again.lora.task, again.lora.r, again.lora.alpha) == (original.lora.task, original.lora.r, original.lora.alpha)
    # the README's `lorakit train config.yaml --r 32`: alpha follows unless it was given
    bigger = resolve(load_yaml(path), flags("--r", "32"))
    assert bigger.lora.alpha == (original.lora.alpha if "alpha" in saved_keys else 64.0)


@pytest.mark.parametrize("argv,yaml_text,value", [
    ((), None, "auto"), (("--fsdp",), None, "on"), (("--no-fsdp",), None, "off"), ((), "true", "on"),
    (("--fsdp", "auto"), "false", "auto"),  # the flag wins over the file
])
def test_fsdp_is_a_switch_from_flags_and_yaml(tmp_path, argv, yaml_text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  fsdp: {yaml_text}\n" if yaml_text else "{}\n")
    assert resolve(load_yaml(path), flags(*argv)).train.fsdp == value


def test_explicit_switches_rewrite_only_a_bare_switch_before_a_file(tmp_path, monkeypatch):
    from lorakit.config import explicit_switches

    monkeypatch.chdir(tmp_path)
    (tmp_path / "off").write_text("")  # a file that shares its name with a switch's value
    (tmp_path / "run.cfg").write_text("")
    assert explicit_switches(["train", "--fsdp", "c.yaml"]) == ["train", "--fsdp=on", "c.yaml"]
    assert explicit_switches(["train", "--grad-checkpointing", "run.cfg"]) == ["train", "--grad-checkpointing=on",
                                                                            "run.cfg"]
    for untouched in (["train", "--grad-checkpointing", "off"], ["train", "--fsdp=off", "c.yaml"],
                      ["train", "--", "--fsdp", "c.yaml"], ["train", "--fsdp"], ["train", "--lr", "c.yaml"]):
        assert explicit_switches(untouched) == untouched


def test_help_shows_each_options_real_default(capsys):
    """Every flag's argparse default is None (to tell given flags apart), so --help must take the
    default from the config's fields; the demo's own defaults are listed above them."""
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    for shown in ("maximum tokens per sequence (default: 512)", "peak learning rate (AdamW) (default: 0.0002)",
                  "output folder (default: runs/lorakit)", "(default: on)",
                  "these replace the defaults listed below: --seq-len 256, --max-steps 60, --lr 0.001, --output runs/demo."):
        assert shown in text


@pytest.mark.parametrize("command, shown", [("estimate", "LoRA rank (default: 16)"),
                                            ("analyze", "(default: 0.9,0.99)"),
                                            ("bench", "timed steps per variant (default: 10)")])
def test_other_commands_help_shows_defaults(capsys, command, shown):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert shown in " ".join(capsys.readouterr().out.split())


def test_help_loads_no_torch():
    """`lorakit --help` and each command's --help print without importing torch (seconds): the commands
    are listed without being built, --adapter's check is imported when used, bench's variants and
    presets are tables apart from the code that builds them."""
    import subprocess
    import sys

    script = ("import sys\nfrom lorakit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    for argv in ([], ["--help"], ["trian"], ["train", "--help"], ["merge", "--help"], ["analyze", "--help"],
                 ["generate", "--help"], ["eval", "--help"], ["export", "--help"], ["sweep", "--help"],
                 ["bench", "--help"], ["estimate", "--help"], ["recommend", "--help"]):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
        assert result.stderr.strip().endswith("no torch"), (argv, result.stderr[-300:])


@pytest.mark.parametrize("yaml_values, argv, shown, hidden", [
    (None, ("--r", "0"), "r must be a positive integer, got 0", "alpha must"),  # alpha = 2r follows from r
    ({"lora": {"task": "poetry"}}, (), "--task must be one of", "got None"),  # no preset: no r, no alpha
])
def test_a_problem_that_follows_from_another_is_not_listed(yaml_values, argv, shown, hidden):
    with pytest.raises(ConfigError) as err:
        resolve(yaml_values, flags(*argv))
    assert shown in str(err.value) and hidden not in str(err.value)


def test_a_refused_path_in_the_cache_points_to_lorakit_cache(tmp_path, monkeypatch):
    import errno

    from lorakit.cli import _path_fix

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    inside = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "cache" / "models"))
    assert "set LORAKIT_CACHE" in _path_fix(inside, "choose another path")
    elsewhere = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "out"))
    assert _path_fix(elsewhere, "choose another path") == "choose another path"


def test_version_prints_the_packages_version(capsys):
    import lorakit
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def test_the_package_exports_load_on_first_use_and_stay_reachable():
    import subprocess
    import sys

    code = ("import sys, lorakit.cli; assert 'torch' not in sys.modules, 'the command line loaded torch'; "
            "import lorakit; assert lorakit.lora.LoraConfig is lorakit.LoraConfig; "
            "assert 'apply_lora' in dir(lorakit); "
            "import pytest; pytest.raises(AttributeError, getattr, lorakit, 'nothing_here')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_data_file_named_twice_is_refused(tmp_path, monkeypatch):
    """Its records trained twice, and the --eval-split held out copies of training records."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--data names ./d.jsonl more than once .* name each file once"):
        resolve(None, flags("--data", "d.jsonl", "--data", "./d.jsonl"))
    assert resolve(None, flags("--data", "d.jsonl", "--data", "e.jsonl")).data.data == ["d.jsonl", "e.jsonl"]


def test_a_section_whose_options_are_all_commented_out_sets_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  # r: 8\ntrain:\n  lr: 0.001\n")  # was "unknown key(s) in c.yaml: lora"
    config = resolve(load_yaml(path), flags())
    assert config.train.lr == 0.001 and config.lora.r == resolve(None, flags()).lora.r


def test_a_data_path_holding_a_nul_byte_is_named_by_its_own_check_not_a_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('data:\n  data: ["a\\0b.jsonl", "c.jsonl"]\n')
    assert resolve(load_yaml(path), flags()).data.data[1] == "c.jsonl"
