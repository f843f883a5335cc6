"""Config resolution: presets, provenance, YAML and flags from the same fields, validation."""

import argparse

import pytest

from lorakit.config import add_flags, load_yaml, resolve
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


@pytest.mark.parametrize("text,message", [
    ("lora: {r: 4\n", "not valid YAML"),
    ("lora: {rank: 4}\n", "unknown key"),
    ("colour: red\n", "unknown key"),
    ("lora: {r: four}\n", "must be an integer"),
    ("train: {lr: fast}\n", "must be a number"),
    ("data: {packing: maybe}\n", "true or false"),
    ("- just\n- a list\n", "mapping"),
    ("!!python/object/apply:os.system [echo hacked]\n", "not valid YAML"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(load_yaml(path), flags())


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve(None, flags("--r", "0", "--lr", "-1", "--batch-size", "0", "--dropout", "1.5"))
    text = str(err.value)
    for fragment in ("r must be", "--lr", "--batch-size", "dropout"):
        assert fragment in text


def test_resume_and_overwrite_conflict():
    with pytest.raises(ConfigError, match="contradict"):
        resolve(None, flags("--resume", "--overwrite"))
