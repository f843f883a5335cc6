"""`lorakit train [CONFIG.yaml] [flags]`: flags override the YAML; no arguments runs the demo.

Several GPUs or nodes: `torchrun --nproc_per_node N -m lorakit train ...` (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import textwrap
import traceback
from pathlib import Path

from lorakit import host
from lorakit.config import RUN_ACTIONS, add_flags, load_yaml, resolve
from lorakit.errors import ConfigError, LorakitError

# `lorakit train` with no data: the built-in SmolLM2 on the bundled WordNet set, sized to finish
# in a few minutes on 2 CPU cores. Each value applies only where the user gave none.
DEMO_DEFAULTS = {
    "data.seq_len": 256, "data.packing": True, "train.batch_size": 4, "train.max_steps": 60,
    "train.lr": 1e-3, "train.eval_batches": 0, "output.output": "runs/demo", "lora.task": "domain",
}


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__ + _demo_text())
    p.add_argument("config_file", nargs="?", metavar="CONFIG.yaml", help="a YAML config (flags override it)")
    add_flags(p)
    # torchrun's own parser reads every later "--x" too and rejects --r as ambiguous (--rdzv-*, --role ...)
    p.add_argument("--lora-r", dest="lora_r_spelling", type=int, default=None, metavar="R",
                   help="same as --r; use this spelling after `torchrun ... -m lorakit train`")
    p.set_defaults(func=run)


def _demo_text() -> str:
    """The demo's own defaults, for --help (they differ from the options' defaults listed there)."""
    from lorakit.config import default_of

    flags = []
    for key, value in DEMO_DEFAULTS.items():
        if value == default_of(key):  # the same as the option's own default: nothing to say
            continue
        flag = "--" + key.split(".")[1].replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    text = "Without --data (the demo), these replace the defaults listed below: " + ", ".join(flags) + "."
    return "\n" + textwrap.fill(text, width=78) + "\n"


def resolve_args(args: argparse.Namespace):
    flags = {k: v for k, v in vars(args).items() if "." in k}
    _take_lora_r_spelling(flags, getattr(args, "lora_r_spelling", None))
    run_file = None if args.config_file else _resumed_run_config(flags)  # the run's own config.yaml
    if run_file or (args.config_file and _is_a_runs_config(args.config_file)):
        yaml_values = _run_settings(run_file or Path(args.config_file))  # older runs saved what their command did
    else:
        yaml_values = load_yaml(args.config_file) if args.config_file else None
    demo = not flags.get("data.data") and not (yaml_values or {}).get("data", {}).get("data")
    demo_keys = _apply_demo(flags, yaml_values or {}) if demo else []
    config = resolve(yaml_values, flags)
    for key in demo_keys:  # resolve took them for flags
        config.sources[key] = "demo default"
    if run_file and config.sources.get("train.grad_accum") == "config file":
        # the run's file holds the grad_accum a resume on other processes adjusted: not a request to
        # change the global batch (Session._global_batch_change keeps the checkpoint's)
        config.sources["train.grad_accum"] = "the run's config.yaml"
    if run_file and os.environ.get("RANK", "0") == "0":
        print(f"resume: the settings of {run_file} (the run's own); flags given replace them", flush=True)
    from lorakit.train.run import resume_a_restarted_job

    if resume_a_restarted_job(config) and os.environ.get("RANK", "0") == "0":
        print(f"resume: torchrun restarted this job (restart {host.torchrun_restarts()}); it goes on from the newest "
              f"checkpoint of its run in {config.output.output}", flush=True)
    return config, demo or _is_demo_data(config)


def _take_lora_r_spelling(flags: dict, lora_r: int | None) -> None:
    """--lora-r is --r spelled for torchrun; both at once, each with its own rank, is no request."""
    if lora_r is None:
        return
    if flags.get("lora.r") not in (None, lora_r):
        raise ConfigError(f"--r {flags['lora.r']} and --lora-r {lora_r} are one setting, the rank; give one of them")
    flags["lora.r"] = lora_r


def _resumed_run_config(flags: dict) -> Path | None:
    """With --resume and no config file: the run's own OUTPUT/config.yaml, so that resuming with
    `--output DIR --resume` alone goes on with the run's data and settings, not lorakit's
    defaults (which without --data are the demo's)."""
    if not flags.get("output.resume"):
        return None
    from lorakit.config import default_of

    output = flags.get("output.output") or (default_of("output.output") if flags.get("data.data")
                                            else DEMO_DEFAULTS["output.output"])
    from lorakit.train.run import holds_a_run_config

    return Path(output) / "config.yaml" if holds_a_run_config(Path(output)) else None


def _run_settings(path: Path) -> dict:
    """A run's config.yaml less what its command did (--resume, --overwrite, --dry-run), which
    runs saved before save_yaml left them out still hold: `overwrite: true` would refuse every
    --resume."""
    values = load_yaml(path)
    for key in RUN_ACTIONS:
        values.get("output", {}).pop(key, None)
    return values


def _is_a_runs_config(path: str) -> bool:
    from lorakit.train.run import written_by_a_run

    return written_by_a_run(Path(path))


def _is_demo_data(config) -> bool:
    """The run trains on the demo's data (a resumed demo, whose saved config names it)."""
    from lorakit.demo import DEMO_TRAIN

    return [str(path) for path in config.data.data] == [str(DEMO_TRAIN)]


def _apply_demo(flags: dict, yaml_values: dict) -> list[str]:
    """Fill the demo's data and defaults into `flags` where neither flags nor YAML set them; the
    keys it filled."""
    from lorakit.demo import DEMO_EVAL, DEMO_TRAIN

    given = {f"{s}.{k}" for s, entries in yaml_values.items() for k in entries}
    flags["data.data"], demo_keys = [str(DEMO_TRAIN)], ["data.data"]
    if not flags.get("data.eval_data") and "data.eval_data" not in given:
        flags["data.eval_data"] = [str(DEMO_EVAL)]
        demo_keys.append("data.eval_data")
    for key, value in DEMO_DEFAULTS.items():
        if flags.get(key) is None and key not in given:
            flags[key] = value
            demo_keys.append(key)
    return demo_keys


def run(args: argparse.Namespace) -> int:
    from lorakit.train import distributed

    from lorakit.cli import refuse

    try:
        return _train(args)
    except LorakitError as exc:
        traceback.clear_frames(exc.__traceback__)
        # said before leaving the process group: torchrun stops the others once one has exited
        return refuse(exc, args)
    except BaseException as exc:
        # the traceback's frames hold the model: drop them, so that shutdown frees its DTensors
        # before leaving the process group (distributed.shutdown says why that order matters)
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace) -> int:
    from lorakit.train import distributed
    from lorakit.train.distributed import is_main
    from lorakit.train.loop import stop_exit_code
    from lorakit.train.report import print_plan, print_report
    from lorakit.train.run import (claim_output, prepare, refuse_config_inside_output, refuse_occupied_output,
                                   release_run_folder)
    from lorakit.train.session import Session

    config, demo = resolve_args(args)
    refuse_config_inside_output(args.config_file, config)
    if os.environ.get("RANK", "0") == "0":  # before the model loads (rank 0: the one that claims the folder)
        refuse_occupied_output(config)
    prepared = prepare(config)  # joins the torchrun job, if any
    if is_main():
        print_plan(prepared)
    if config.output.dry_run:
        from lorakit.train.report import print_dry_run

        if is_main():
            print_dry_run(prepared)
        return 0
    session = Session(prepared, Path(config.output.output))  # the optimizer too, before a folder is cleared
    distributed.main_first(lambda: claim_output(config))  # rank 0 checks, creates and locks it; then the others
    samples = []  # the demo's answer before training, where it trains: every rank (a sharded model generates together)
    try:
        result = session.run(before_training=lambda: samples.append(_sample(prepared) if demo else None))
    finally:
        release_run_folder(Path(config.output.output))
    if result.interrupted:
        return stop_exit_code(result.interrupted)
    if result.already_finished:  # said so; its files stay as they were
        return 0
    sample_after = _sample(prepared) if demo else None
    if is_main():
        print_report(prepared, result, samples[0], sample_after)
    return 0


def _sample(prepared) -> tuple[str, str] | None:
    from lorakit.demo import demo_prompt
    from lorakit.generate import generate_text

    prompt = demo_prompt()
    return prompt, generate_text(prepared.model, prepared.tokenizer, prompt, max_new_tokens=40)
