"""The training configuration: one tree of dataclasses behind the YAML file and the CLI flags.

    RunConfig
      model:  ModelConfig   --model --dtype --quantize --allow-pickle
      data:   DataConfig    --data --format --seq-len --packing --eval-data --eval-split ...
      lora:   LoraChoice    --task --r --alpha --targets --rslora --dora --dropout --init
      train:  TrainConfig   --lr --epochs --max-steps --batch-size --grad-accum --seed ...
      output: OutputConfig  --output --resume --overwrite --keep-checkpoints --dry-run

Each field carries its help text and its flag; `add_flags` builds argparse options from them,
`load_yaml` reads the same keys (nested by section, or flat), and `resolve` merges
defaults < task preset < YAML < flags, remembering where every value came from so a run can
say why it uses r=16. Validation collects every problem before raising one ConfigError.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

from lorakit import config_yaml
from lorakit.config_hints import hint
from lorakit.errors import ConfigError
from lorakit.values import first_repeated_path, is_number, parse_gib

DATA_FORMATS = ("auto", "text", "instruction", "chat")  # data/formats.py reads each
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: models.training_dtype picks for the device
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # as estimate and other tools spell them


def dtype_name(text: str) -> str:
    """torch's name for a dtype given as bf16, fp16 or fp32 (any other text as it is, for the choices to check)."""
    return DTYPE_ALIASES.get(text, text)
QUANTIZE = ("none", "4bit", "8bit")  # the base's weights (quantize.py)
# The guide's presets: rank by task, alpha = 2r, adapters on all seven projections.
TASK_PRESETS = {
    "domain": {"r": 16, "alpha": 32},
    "style": {"r": 8, "alpha": 16},
    "classification": {"r": 8, "alpha": 16},
    "new-concepts": {"r": 64, "alpha": 128},
}


def opt(default, help: str, flag: str | None = None, choices=None, switch: tuple[str, str] | None = None,
        comma_list: bool = False, gib: bool = False, spelling: Callable[[str], str] | None = None,
        metavar: str = "PATH"):
    """A field with its help and flag. `switch=(on, off)` makes a choice that also reads as a
    yes/no: YAML true/false and the bare `--flag` / `--no-flag` mean `on` / `off`. `comma_list`:
    a comma-separated string that a YAML file may also give as a list of names (as PEFT's configs do).
    `gib`: a memory size in GiB, also written with its unit (8GiB, 8GB, 512MiB) as recommend takes them.
    `spelling`: maps another spelling of a choice to the choice (bf16 -> bfloat16). `metavar`: a list's items."""
    meta = {"help": help, "flag": flag, "choices": choices, "switch": switch, "comma_list": comma_list, "gib": gib,
            "spelling": spelling, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str | None = opt(None, "model: local folder, hub id, or .gguf file (default: built-in SmolLM2-135M-Instruct)", flag="--model")
    dtype: str = opt("auto", "weights dtype; auto: bfloat16 on a GPU with bf16 or a CPU with native bf16 "
                     "(AVX512-BF16, AMX), else float16 on a GPU, float32 on a CPU; bf16, fp16, fp32 too", choices=list(DTYPES),
                     spelling=dtype_name)
    quantize: str = opt("none", "load the base in 4-bit (NF4) or 8-bit with bitsandbytes (a GPU, or a CPU with "
                        "bitsandbytes >= 0.48); computes in --dtype; auto: bf16 where the hardware has it, else "
                        "fp32 on a CPU, fp16 on a GPU", choices=list(QUANTIZE))
    allow_pickle: bool = opt(False, "allow pickle weight files (.bin), loaded with weights_only=True")


@dataclass
class DataConfig:
    data: list[str] = opt([], "training data: .jsonl .json .csv .parquet .txt files, a folder of them, or a "
                                  "`datasets` folder (default: the demo set)")
    format: str = opt("auto", "data format", choices=list(DATA_FORMATS))
    columns: list[str] = opt([], "your columns under lorakit's names, FIELD=COLUMN pairs: instruction=question "
                                 "output=answer (for columns no format recognises)", metavar="FIELD=COLUMN")
    seq_len: int = opt(512, "maximum tokens per sequence")
    packing: bool = opt(True, "pack several examples into one sequence (no cross-example attention)")
    train_on_inputs: bool = opt(False, "train on prompt tokens too, not only the responses")
    eval_data: list[str] = opt([], "evaluation data files (default: split off --eval-split of the training data)")
    eval_split: float = opt(0.05, "fraction (<1) or number (>=1) of training records held out for evaluation (a long text's pieces stay together)")


@dataclass
class LoraChoice:
    task: str = opt("domain", "the guide's preset: domain r=16, style/classification r=8, new-concepts r=64", choices=list(TASK_PRESETS))
    r: int | None = opt(None, "LoRA rank (default: from --task)")
    alpha: float | None = opt(None, "LoRA alpha (default: 2 * r, from --task)")
    targets: str = opt("all", "target modules: all (the 7 projections), attention, mlp, qv, all-linear, names, a comma list of these (attention,mlp), or a regex", comma_list=True)
    exclude: str | None = opt(None, "modules to leave out of the targets: names, a comma list or a regex, as --targets", comma_list=True)
    rslora: bool = opt(False, "scale by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r")
    dora: bool = opt(False, "weight-decomposed LoRA (DoRA)")
    dropout: float = opt(0.0, "dropout on the adapter input")
    init: str = opt("kaiming", "adapter initialisation", choices=["kaiming", "gaussian", "pissa"])


@dataclass
class TrainConfig:
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    batch_size: int = opt(4, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup_ratio: float = opt(0.05, "fraction of steps for linear warm-up (step k of w at (k+1)/w of --lr)")
    schedule: str = opt("cosine", "learning-rate decay after warm-up", choices=["cosine", "linear", "constant"])
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    grad_checkpointing: str = opt(
        "auto", "activation checkpointing (recompute activations in backward to save memory): auto (default) decides from "
        "the memory estimate (off when the step fits, else the fewest layers that make it fit, else every layer, else "
        "on a GPU every layer with its input offloaded), on checkpoints every layer, offload checkpoints every layer and "
        "holds its input in host memory until backward (GPU; a CPU run checkpoints every layer without it); a bare "
        "--grad-checkpointing means on",
        choices=["auto", "on", "off", "offload"], switch=("on", "off"))
    memory_budget: float | None = opt(None, "GiB the training step may take on its device (under torchrun: per "
                                            "process), weights included: --grad-checkpointing auto plans for 90%% "
                                            "of the smaller of this and the free memory (to leave room for other "
                                            "work; the allocator is not capped); 8, 8GiB or 512MiB", gib=True)
    seed: int = opt(42, "random seed (runs are deterministic on a CPU)")
    eval_every: int = opt(0, "evaluate every N steps (0: only before and after training)")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    log_every: int = opt(1, "log metrics every N steps")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row")
    eval_batches: int = opt(0, "limit evaluation to N batches (0: all)")
    fast_paths: bool = opt(True, "use lorakit's fused kernels where they apply")
    fsdp: str = opt("auto", "under torchrun: shard the frozen base over the processes (FSDP2, on) or keep a whole "
                            "copy per process (DDP, off); auto shards when the memory estimate does not fit one "
                            "GPU (90%% of it, or of --memory-budget when smaller). A bare --fsdp means on",
                    choices=["auto", "on", "off"], switch=("on", "off"))
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice, all cores); on a shared "
                                    "machine set it to the idle cores: a busy core stalls every parallel op")
    triton_kernels: str = opt("auto", "Triton RMSNorm, SwiGLU and RoPE kernels in the fast paths; auto: on for a model on "
                                      "a CUDA GPU Triton supports (compute capability 8.0 on; an H200 ran 1.3x faster "
                                      "with them: docs/performance.md), off on a CPU",
                              choices=["auto", "on", "off"], switch=("on", "off"))


@dataclass
class OutputConfig:
    output: str = opt("runs/lorakit", "output folder")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --output")
    overwrite: bool = opt(False, "replace a finished or partial run in --output")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints")
    dry_run: bool = opt(False, "show one rendered example, token statistics and trainable parameters, then exit")
    tensorboard: bool = opt(True, "write TensorBoard events when tensorboard is installed")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraChoice = field(default_factory=LoraChoice)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sources: dict[str, str] = field(default_factory=dict)  # "lora.r" -> "preset domain" | "config file" | "flag"

    def to_dict(self) -> dict:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in fields(self) if s.name != "sources"}


SECTIONS = [f for f in fields(RunConfig) if f.name != "sources"]


def section_types() -> dict[str, type]:
    hints = get_type_hints(RunConfig)
    return {s.name: hints[s.name] for s in SECTIONS}


def all_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """(section, field, type) for every option."""
    out = []
    for section, cls in section_types().items():
        hints = get_type_hints(cls)
        out += [(section, f, hints[f.name]) for f in fields(cls)]
    return out


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are None so we can tell which flags were given."""
    for section, f, typ in all_fields():
        group = _group(parser, section)
        kwargs = dict(dest=f"{section}.{f.name}", default=None, help=help_with_default(f))
        base = _base_type(typ)
        if base not in (bool, list) and not f.metadata.get("choices"):
            kwargs["metavar"] = f.name.upper()
        if f.metadata.get("switch"):
            _add_switch(group, f, kwargs)
        elif base is bool:
            group.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **kwargs)
        elif base is list:
            group.add_argument(flag_of(f), nargs="+", action="extend", metavar=f.metadata["metavar"],
                               **kwargs)  # --data a --data b: both
        else:  # a size in GiB is read by _coerce, which knows its units
            group.add_argument(flag_of(f), type=str if f.metadata.get("gib") else f.metadata.get("spelling") or base,
                               choices=f.metadata.get("choices"), **kwargs)


def default_of(key: str) -> Any:
    """The default of an option named "section.field"."""
    section, name = key.split(".")
    return field_default(next(f for s, f, _ in all_fields() if s == section and f.name == name))


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_with_default(f: dataclasses.Field) -> str:
    """The field's help with its default appended (argparse's own would show None: every flag
    defaults to None so that given flags can be told apart), unless the help already says it."""
    text = f.metadata["help"]
    default = field_default(f)
    if "default" in text or default is None or default == []:
        return text
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    return f"{text} (default: {shown})"


def _add_switch(group, f: dataclasses.Field, kwargs: dict) -> None:
    """`--flag [CHOICE]` (bare: the switch's on value) and `--no-flag` (its off value)."""
    on, off = f.metadata["switch"]
    choices = f.metadata["choices"]
    group.add_argument(flag_of(f), nargs="?", const=on, choices=choices, metavar="{" + ",".join(choices) + "}", **kwargs)
    group.add_argument("--no-" + flag_of(f)[2:], action="store_const", const=off, dest=kwargs["dest"], default=None,
                       help=f"same as {flag_of(f)} {off}")


def explicit_switches(argv: list[str]) -> list[str]:
    """`--fsdp CONFIG.yaml` would read the file name as the switch's value; write such a bare switch
    as `--fsdp=on` so the file stays the positional argument. A switch's own values (`--fsdp off`,
    even with a file named `off` here) and everything after `--` are left for argparse."""
    switches = {flag_of(f): f.metadata for _, f, _ in all_fields() if f.metadata.get("switch")}
    out = []
    for i, (arg, following) in enumerate(zip(argv, argv[1:] + [None])):
        if arg == "--":
            return out + argv[i:]
        meta = switches.get(arg)
        if meta and following is not None and following not in meta["choices"] and _names_a_file(following):
            arg = f"{arg}={meta['switch'][0]}"
        out.append(arg)
    return out


def _names_a_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) or Path(arg).is_file()


def _group(parser, section: str):
    groups = parser.__dict__.setdefault("_lorakit_groups", {})
    if section not in groups:
        groups[section] = parser.add_argument_group(section)
    return groups[section]


def _base_type(typ) -> type:
    if get_origin(typ) in (list,):
        return list
    args = [a for a in get_args(typ) if a is not type(None)]
    if args:
        return _base_type(args[0])
    return typ


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {field: value}}; flat keys are placed in their section."""
    return _place_keys(config_yaml.read_mapping(Path(path)), Path(path))


def _place_keys(raw: dict, path: Path) -> dict[str, dict[str, Any]]:
    owners = {f.name: s for s, f, _ in all_fields()}
    for section, option, _ in all_fields():  # the flag's own spelling and with `_`: `seq-len`, `seq_len`
        flag = flag_of(option).lstrip("-")
        owners.update({flag: section, flag.replace("-", "_"): section})
    placed: dict[str, dict[str, Any]] = {s.name: {} for s in SECTIONS}
    spelled: dict[tuple[str, str], str] = {}  # (section, option) -> the key that set it
    unknown = []

    def place(section: str, name: str, value, key: str) -> None:
        if (section, name) in spelled:  # `seq-len` and `seq_len`, or `r` and `lora: {r: ...}`
            raise ConfigError(f"{path} sets {section}.{name} twice ({spelled[section, name]} and {key}); keep one")
        spelled[section, name] = key
        placed[section][name] = value

    for key, value in raw.items():
        if key in placed and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                name = _field_name(key, sub_key)
                if name:
                    place(key, name, sub_value, f"{key}.{sub_key}")
                else:
                    unknown.append(hint(sub_key, key, _keys_of(key), owners, tuple(placed)))
        elif key in owners:  # a flat key, named as the option or its flag: `seq_len: 128`, `model: PATH`
            section = owners[key]
            place(section, _field_name(section, key), value, str(key))
        elif key in placed and value is None:
            # `lora:` with its options commented out: a section that sets nothing (`data:` and `output:`
            # are flat keys too, whose null the owners' branch names as an empty value)
            continue
        elif key in placed:
            raise ConfigError(f"{key} in {path} must be a mapping of options (e.g. `{key}: {{...}}`), "
                              f"not {type(value).__name__}")
        else:
            unknown.append(hint(key, None, [*owners, *placed], owners))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}; see `lorakit train --help` for the options")
    return placed


def _field_name(section: str, key: str) -> str | None:
    return next((f.name for f in fields(section_types()[section]) if key in _spellings(f)), None)


def _spellings(f: dataclasses.Field) -> tuple[str, str, str]:
    return f.name, flag_of(f).lstrip("-").replace("-", "_"), flag_of(f).lstrip("-")


def _keys_of(section: str) -> list[str]:
    return [key for f in fields(section_types()[section]) for key in _spellings(f)]


def resolve(yaml_values: dict[str, dict] | None, flag_values: dict[str, Any]) -> RunConfig:
    """defaults < task preset < YAML < flags, with provenance; then validate."""
    config, sources = RunConfig(), {}
    layers = [(yaml_values or {}, "config file"), (_nest(flag_values), "flag")]
    for values, origin in layers:
        for section, entries in values.items():
            for name, value in entries.items():
                setattr(getattr(config, section), name, _coerce(section, name, value, origin))
                sources[f"{section}.{name}"] = origin
    _apply_task_preset(config, sources)
    config.sources = sources
    validate(config)
    return config


def _nest(flag_values: dict[str, Any]) -> dict[str, dict]:
    nested: dict[str, dict] = {}
    for dotted, value in flag_values.items():
        if value is not None and "." in dotted:
            section, name = dotted.split(".", 1)
            nested.setdefault(section, {})[name] = value
    return nested


def _coerce(section: str, name: str, value, origin: str):
    typ = get_type_hints(section_types()[section])[name]
    base = _base_type(typ)
    where = f"{section}.{name} ({origin})"
    if value is None:  # an empty list stays a value: lorakit's own config.yaml of a demo run holds data: []
        if base is not list and type(None) in get_args(typ):
            return None
        raise ConfigError(f"{where} is empty; give it a value, or leave the key out for the default")
    if base is list:
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if _field(section, name).metadata.get("comma_list") and isinstance(value, (list, tuple)):
        value = _comma_list(value, where)
    spelling = _field(section, name).metadata.get("spelling")
    if spelling and isinstance(value, str):
        value = spelling(value)
    if _field(section, name).metadata.get("gib") and isinstance(value, str):
        value = parse_gib(value, flag_of(_field(section, name)) if origin == "flag" else where)
    switch = _field(section, name).metadata.get("switch")
    if switch and isinstance(value, bool):  # YAML reads on/off/yes/no/true/false as booleans
        return switch[0] if value else switch[1]
    if switch and not isinstance(value, str):
        choices = ", ".join(_field(section, name).metadata["choices"])
        raise ConfigError(f"{where} must be one of {choices} (or true/false), got {value!r}")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return float(value) if base is float else value


def _comma_list(names: list | tuple, where: str) -> str:
    """A YAML list of module names or groups as the flag's comma list; a regex must stay one string
    (joined with commas, it would be another regex)."""
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[\w.\-]+", n.strip()) for n in names):
        raise ConfigError(f"{where} as a list takes module names or groups (e.g. [q_proj, v_proj]), got {names!r}; "
                          "give a regex as one string")
    return ",".join(n.strip() for n in names)


def _field(section: str, name: str) -> dataclasses.Field:
    return next(f for f in fields(section_types()[section]) if f.name == name)


ALPHA_RULE = "alpha = 2 * r (the guide)"
DERIVED_SOURCES = ("preset --task", ALPHA_RULE)  # values that follow from others, not given
DERIVABLE = {"lora": ("r", "alpha")}  # the options a saved config leaves out when they followed from others


def _apply_task_preset(config: RunConfig, sources: dict[str, str]) -> None:
    lora = config.lora
    preset = TASK_PRESETS.get(lora.task)
    if preset is None:
        return
    if lora.r is None:
        lora.r = preset["r"]
        sources["lora.r"] = f"preset --task {lora.task}"
    if lora.alpha is None:
        explicit_r = sources.get("lora.r") in ("flag", "config file")
        lora.alpha = float(2 * lora.r) if explicit_r else float(preset["alpha"])
        sources["lora.alpha"] = ALPHA_RULE if explicit_r else f"preset --task {lora.task}"
    sources.setdefault("lora.targets", "default: all seven projections (the guide)")


MAX_THREADS = 1024  # far above any CPU's cores; 100000 threads exhaust memory before they run
MAX_STEPS, MAX_EPOCHS = 10**9, 10**6  # far beyond any run: a larger value is a typo (1e26), not a plan
# as far beyond: a step holds its micro-batches in memory (exact token normalisation), 1e12 of them filled
# the RAM before the first step; an alpha of 1e30 trains to NaN; a budget of 1e300 GiB overflows the plan
MAX_GRAD_ACCUM, MAX_ALPHA, MAX_MEMORY_BUDGET_GIB = 4096, 100_000, 2**20


def validate(config: RunConfig) -> None:
    problems = []
    for section, f, typ in all_fields():
        value = getattr(getattr(config, section), f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{flag_of(f)} must be one of {', '.join(choices)}, got {value!r}")
    t, d, o = config.train, config.data, config.output
    twice = first_repeated_path(d.data)
    checks = [
        (t.lr > 0 and math.isfinite(t.lr), f"--lr must be positive, got {t.lr}"),
        (0 < t.epochs <= MAX_EPOCHS, f"--epochs must be a positive number up to {MAX_EPOCHS:,}, got {t.epochs}"),
        (t.weight_decay >= 0 and math.isfinite(t.weight_decay), f"--weight-decay must be >= 0, got {t.weight_decay}"),
        (t.log_every >= 1, f"--log-every must be at least 1, got {t.log_every}"),
        (t.eval_batches >= 0, f"--eval-batches must be >= 0 (0: all), got {t.eval_batches}"),
        (0 <= t.seed < 2**32, f"--seed must be in [0, 2**32), got {t.seed}"),
        (t.threads is None or t.threads <= MAX_THREADS,
         f"--threads must be at most {MAX_THREADS}, got {t.threads}; use about as many as the free cores"),
        (t.max_steps is None or 0 < t.max_steps <= MAX_STEPS,
         f"--max-steps must be positive and at most {MAX_STEPS:,}, got {t.max_steps}"),
        (t.batch_size >= 1, f"--batch-size must be at least 1, got {t.batch_size}"),
        (1 <= t.grad_accum <= MAX_GRAD_ACCUM,
         f"--grad-accum must be from 1 to {MAX_GRAD_ACCUM:,}, got {t.grad_accum}"),
        (not is_number(config.lora.alpha) or config.lora.alpha <= MAX_ALPHA,  # the engine names other alphas
         f"--alpha must be at most {MAX_ALPHA:,} (the guide: alpha = 2 * r), got {config.lora.alpha!r}"),
        (0 <= t.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {t.max_grad_norm}"),
        (t.eval_every >= 0 and t.save_every >= 0, "--eval-every and --save-every must be >= 0"),
        (t.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, got {t.max_bad_steps}"),
        (t.threads is None or t.threads >= 1, f"--threads must be at least 1, got {t.threads}"),
        (t.memory_budget is None or 0 < t.memory_budget <= MAX_MEMORY_BUDGET_GIB,
         f"--memory-budget must be a positive number of GiB up to {MAX_MEMORY_BUDGET_GIB:,}, got {t.memory_budget}"),
        (d.seq_len >= 8, f"--seq-len must be at least 8, got {d.seq_len}"),
        (d.eval_split >= 0 and math.isfinite(d.eval_split) and (d.eval_split < 1 or d.eval_split == int(d.eval_split)),
         f"--eval-split must be a fraction below 1 or a whole number of records, got {d.eval_split}"),
        (o.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {o.keep_checkpoints}"),
        (bool(o.output.strip()), "--output is empty; name the run's folder (e.g. runs/mine)"),
        (config.model.name is None or bool(config.model.name.strip()),
         "--model is empty; name a model folder, a .gguf file or a hub id, or leave it out for the built-in model"),
        (all(str(path).strip() for path in d.data), "--data names an empty path; name the data files"),
        (twice is None, f"--data names {twice} more than once (its records would train twice "
                              "and leak into the --eval-split held out); name each file once, and use --epochs to "
                              "train on the data more than once"),
        (all(str(path).strip() for path in d.eval_data or []), "--eval-data names an empty path; name the files"),
        (not (o.resume and o.overwrite), "--resume and --overwrite contradict each other; choose one"),
        (not (d.eval_data and d.eval_split and config.sources.get("data.eval_split") == "flag"),  # a run's config.yaml holds both
         "--eval-split holds out part of the training data, and --eval-data names separate eval files: use one"),
    ]
    from lorakit.data.columns import column_map_problems  # with the data code: not loaded for --help

    problems += [message for ok, message in checks if not ok] + column_map_problems(d.columns)
    try:
        lora_config(config)
    except ConfigError as exc:
        lora_problems = [line.strip()[2:] for line in str(exc).splitlines()[1:]] or [str(exc)]
        problems += [_engine_names_as_flags(p) for p in lora_problems if not _follows_from_another(p, config)]
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _engine_names_as_flags(problem: str) -> str:
    """The engine's LoraConfig names its fields; the user gave the flags (or their YAML keys)."""
    for field_name, flag in (("target_modules", "--targets"), ("exclude_modules", "--exclude")):
        if problem.startswith(field_name):
            return flag + problem[len(field_name):]
    return problem


def _follows_from_another(problem: str, config: RunConfig) -> bool:
    """An r or alpha problem that only repeats another one: no r because the --task is unknown, or
    an alpha of 2 * r from a bad r."""
    lora = config.lora
    unknown_task = lora.task not in TASK_PRESETS and "got None" in problem
    alpha_from_bad_r = (problem.startswith("alpha ") and config.sources.get("lora.alpha") == ALPHA_RULE
                        and not (isinstance(lora.r, int) and lora.r > 0))
    return unknown_task or alpha_from_bad_r


def lora_config(config: RunConfig):
    """The engine's LoraConfig for this run."""
    from lorakit.lora.config import LoraConfig

    lora = config.lora
    return LoraConfig(r=lora.r, alpha=lora.alpha, target_modules=lora.targets, exclude_modules=lora.exclude,
                      dropout=lora.dropout, scaling="rslora" if lora.rslora else "standard", use_dora=lora.dora,
                      init=lora.init)


def effective_scale(config: RunConfig) -> float:
    """The factor the update B @ A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_config(config).scale_for(config.lora.r, config.lora.alpha)


# output options that say what one command did, not the run: a config.yaml that kept them would
# replace a finished run when used to start another (`train run/config.yaml --output other`)
RUN_ACTIONS = ("resume", "overwrite", "dry_run")


def save_yaml(config: RunConfig) -> str:
    """The config as YAML that repeats the run, less RUN_ACTIONS. r and alpha that followed from
    --task or from alpha = 2r are left out, so they follow again: `train config.yaml --r 32` then
    gets alpha 64."""
    values = config.to_dict()
    for key in RUN_ACTIONS:
        del values["output"][key]
    derived = [key for key in DERIVABLE["lora"] if config.sources.get(f"lora.{key}", "").startswith(DERIVED_SOURCES)]
    for key in derived:
        del values["lora"][key]
    text = config_yaml.dump(values)
    if not derived:
        return text
    lora = config.lora
    note = {("r",): f"r follows from task {lora.task} (r {lora.r}); give it here to fix it",
            ("alpha",): f"alpha follows from r (alpha = 2r = {lora.alpha:g}); give it here to fix it",
            ("r", "alpha"): f"r and alpha follow from task {lora.task} (r {lora.r}, alpha {lora.alpha:g}); "
                            "give them here to fix them"}[tuple(derived)]
    return text.replace("lora:\n", f"lora:\n  # {note}\n", 1)
