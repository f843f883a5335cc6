"""`lorakit estimate`: peak memory and FLOPs of a LoRA training step, from the model config alone.

    lorakit estimate --model 8b --batch-size 2 --seq-len 2048 --grad-checkpointing on
    lorakit estimate --model path/to/model_or_config.json --r 64 --quantize 4bit --json
    lorakit estimate --model 1b --grad-checkpointing on --checkpoint-layers 6    (selective)
    lorakit estimate --model 8b --seq-len 32768 --grad-checkpointing offload     (inputs in host memory)
    lorakit estimate --model 8b --world-size 8 --fsdp                           (per rank, base sharded)
    lorakit estimate --model 1b --fast-paths          (lorakit train's step: chunked loss, fused MLP)
    lorakit estimate run.yaml --batch-size 8          (a training config's model and settings; flags override)
"""

from __future__ import annotations

import argparse
import json

from lorakit.errors import ConfigError

DESCRIPTION = """\
Predict the per-device peak memory (weights, adapter state, saved activations, logits,
workspace) with and without activation checkpointing (offload: the checkpointed layers'
inputs wait in host memory), the FLOPs per token and per step, and
the step time implied at 100% and at a given MFU of the device's peak; with --world-size N
--fsdp, one rank's share of a sharded base (FSDP2). Only the model's
config is read (presets: 1b, 8b, smollm2-135m; or a config.json / model folder / hub id).
A training config (CONFIG.yaml, as `lorakit train` and `lorakit recommend` take and write) gives
the model, r, targets, batch, sequence length, dtype, quantisation, dropout and fast paths; flags
given beside it replace its values. The memory model and its validation: docs/estimator-validation.md."""

# the shape estimated where neither a flag nor a training config gives one
DEFAULTS = {"model": "smollm2-135m", "r": 16, "targets": "all-linear", "batch_size": 4, "seq_len": 2048,
            "grad_checkpointing": "off", "dtype": "bf16", "quantize": "none", "lora_dropout": 0.0,
            "fast_paths": False, "fused_loss": False}


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=DESCRIPTION)
    p.add_argument("config_file", nargs="?", metavar="CONFIG.yaml",
                   help="a training config whose model and settings to estimate (flags override it)")
    p.add_argument("--model", help="preset (1b, 8b, smollm2-135m), config.json, model folder or hub id "
                                   f"(default: {DEFAULTS['model']})")
    p.add_argument("--r", type=int, help=f"LoRA rank (default: {DEFAULTS['r']})")
    p.add_argument("--targets", help="all-linear, attention, mlp, qv, or projections such as q_proj,v_proj "
                                     f"(default: {DEFAULTS['targets']})")
    p.add_argument("--batch-size", type=int, help=f"micro-batch per device (default: {DEFAULTS['batch_size']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {DEFAULTS['seq_len']})")
    p.add_argument("--grad-checkpointing", choices=("on", "off", "offload"),
                   help="on: checkpoint the layers; offload: and hold their inputs in host memory (default: off)")
    p.add_argument("--checkpoint-layers", type=int, default=None, metavar="K",
                   help="with --grad-checkpointing on or offload: checkpoint only the first K layers (selective; "
                        "default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
                   help="weights and activations (train's spellings, bfloat16 ..., taken too; default: bf16)")
    p.add_argument("--quantize", choices=("none", "4bit", "8bit"), help="base weights (bitsandbytes; default: none)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel devices (memory is per device)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --world-size N > 1: the base and adapters sharded over the N devices (FSDP2, "
                        "lorakit train --fsdp); default: replicated (DDP)")
    p.add_argument("--fused-loss", action=argparse.BooleanOptionalAction,
                   help="chunked lm_head + cross-entropy (no full logits)")
    p.add_argument("--fast-paths", action=argparse.BooleanOptionalAction,
                   help="what `lorakit train` runs on a GPU with its fast paths (its default): the chunked loss "
                        "and the fused MLP where gate, up and down all carry plain LoRA; without it (the default "
                        "without a training config), transformers' own step with lorakit's adapters")
    p.add_argument("--engine", choices=("lorakit", "peft"), default="lorakit",
                   help="peft: PEFT's defaults (fp32 adapters, an input copy per adapter)")
    p.add_argument("--lora-dropout", "--dropout", type=float,
                   help="dropout on the adapter input (above 0 it keeps a mask); --dropout as train spells it "
                        "(default: 0)")
    p.add_argument("--labelled-fraction", type=float, default=1.0, metavar="F",
                   help="share of tokens with a label (instruction data: the responses); with --fused-loss "
                        "the head runs for those only, which lowers the FLOPs")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the device the step runs on: cuda (a GPU's step, bf16 unless --dtype) or cpu (the "
                        "dtype lorakit train picks on this CPU unless --dtype or the config's)")
    p.add_argument("--device-peak-tflops", type=float, default=None,
                   help="the device's dense matmul peak in TFLOP/s (default: 817, measured bf16 on one H200; "
                        "with --device cpu, measured on this CPU)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the second step time")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.plan.estimate import TrainShape, estimate

    _fill_settings(args)
    _check_checkpoint_layers(args.checkpoint_layers, args.grad_checkpointing)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.device_peak_tflops is None:
        args.device_peak_tflops = _this_cpus_peak(args.dtype) if args.device == "cpu" else H200_BF16_TFLOPS
    if not 0 < args.device_peak_tflops < float("inf"):
        raise ConfigError(f"--device-peak-tflops must be a positive number, got {args.device_peak_tflops}")
    shape = TrainShape(
        batch_size=args.batch_size, seq_len=args.seq_len, r=args.r, targets=args.targets,
        grad_checkpointing=args.grad_checkpointing != "off", checkpoint_layers=args.checkpoint_layers,
        offload_checkpoints=args.grad_checkpointing == "offload",
        dtype=args.dtype, quantize=args.quantize,
        world_size=args.world_size, fsdp=args.fsdp, fused_loss=args.fused_loss or args.fast_paths,
        fused_mlp=args.fast_paths, fused_attention=args.fast_paths, engine=args.engine,
        lora_dropout=args.lora_dropout, labelled_fraction=args.labelled_fraction, device=args.device,
        cpu_attention=args.device == "cpu" and args.fast_paths and args.engine == "lorakit",  # train's there
    )
    result = estimate(args.model, shape, peak_tflops=args.device_peak_tflops, mfu=args.mfu)
    if args.json:
        payload = result.to_dict()
        payload["notes"] = args.config_notes + payload["notes"]
        print(json.dumps(payload, indent=2))
    else:
        print_report(result, args.config_notes)
    return 0


H200_BF16_TFLOPS = 817.0  # the device peak the GPU step times assume unless told another


def _this_cpus_peak(dtype: str) -> float:
    """This CPU's fp32 (or bf16) matmul TFLOP/s, as lorakit bench measures it (about a second)."""
    from lorakit.bench import measure_matmul_peak
    from lorakit.config import dtype_name

    return measure_matmul_peak("cpu", "bfloat16" if dtype_name(dtype) == "bfloat16" else "float32")


def _fill_settings(args: argparse.Namespace) -> None:
    """Each setting from its flag, else the training config, else DEFAULTS; the config's notes
    (what the estimate does not model) in args.config_notes."""
    if args.model and args.model.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"--model {args.model} is a training config, not a model; estimate its run with "
                          f"`lorakit estimate {args.model}` (its model and settings; flags override them)")
    from_config, args.config_notes = _training_config_settings(args.config_file) if args.config_file else ({}, [])
    _check_fast_path_flags(args, from_config.get("fast_paths", False))
    if args.engine == "peft":  # PEFT's step has no fast path (a config's are lorakit's default)
        from_config.update(fast_paths=False, fused_loss=False)
    if args.fast_paths is False:  # train without its fast paths has no chunked loss either
        from_config["fused_loss"] = False
    if args.device == "cpu":  # what lorakit train computes in on this CPU (a config's "auto" too), QLoRA's too
        from lorakit.models import training_dtype

        from_config.setdefault("dtype", training_dtype("auto", "cpu"))
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, from_config.get(key, default))


def _check_fast_path_flags(args: argparse.Namespace, config_fast_paths: bool) -> None:
    """Combinations no training step runs (the flags as given, before the config or a default fills them)."""
    if args.engine == "peft" and (args.fast_paths or args.fused_loss):
        raise ConfigError("--fast-paths and --fused-loss model lorakit train's step; PEFT's (--engine peft) has no "
                          "fused loss or MLP: drop one of them")
    fast_paths = config_fast_paths if args.fast_paths is None else args.fast_paths
    if args.fused_loss is False and fast_paths and args.engine != "peft":
        raise ConfigError("--no-fused-loss: lorakit train's fast paths (--fast-paths, or the training config's) "
                          "include the chunked loss; pass --no-fast-paths too")


def _training_config_settings(path: str) -> tuple[dict, list[str]]:
    """A training config's values in estimate's terms, and notes on what it sets that the estimate
    leaves out. Its dtype and checkpointing "auto" take estimate's defaults (a GPU's bf16 step;
    the report shows the step with and without checkpointing); the built-in model, its preset."""
    from lorakit.models import names_the_builtin

    config = _training_config(path)
    model, lora, train = config.model.name, config.lora, config.train
    targets, notes = _targets_less_excluded(path, lora.targets, lora.exclude)
    settings = {"model": DEFAULTS["model"] if model is None or names_the_builtin(model) else model, "r": lora.r,
                "targets": targets, "batch_size": train.batch_size, "seq_len": config.data.seq_len,
                "quantize": config.model.quantize, "lora_dropout": lora.dropout,
                "fast_paths": train.fast_paths and not lora.dora, "fused_loss": train.fast_paths}
    settings.update({k: v for k, v in (("dtype", config.model.dtype), ("grad_checkpointing", train.grad_checkpointing))
                     if v != "auto"})
    if lora.dora:
        notes.append("lora.dora: estimated as plain LoRA, unfused (DoRA's magnitude vectors and the activations "
                     "of its norm come on top)")
    if train.memory_budget is not None:
        notes.append(f"train.memory_budget {train.memory_budget:g} GiB: the trainer checkpoints the fewest layers "
                     "that fit it; compare it with the totals below")
    return settings, notes


def _training_config(path: str):
    """The training config at `path`, resolved as train resolves it; a model or preset given
    there instead is named."""
    from lorakit.config import load_yaml, resolve

    if not path.lower().endswith((".yaml", ".yml")):  # a preset, a folder, a config.json, a .gguf, a hub id
        raise ConfigError(f"{path} is not a training config (a .yaml file); to estimate a model, pass it as "
                          f"--model {path}")
    return resolve(load_yaml(path), {})


def _targets_less_excluded(path: str, targets, exclude) -> tuple[str, list[str]]:
    """The config's targets as the estimator names projections, less the ones it excludes."""
    from lorakit.plan.model_shapes import resolve_targets

    try:
        chosen = list(resolve_targets(targets))
    except ConfigError:
        raise ConfigError(f"{path}: lora.targets {targets!r} is not one the estimator reads; pass --targets with "
                          "a group (all-linear, attention, mlp, qv) or projection names") from None
    left, others = set(chosen), []
    for name in (n.strip() for n in exclude.split(",")) if isinstance(exclude, str) else ():
        try:
            left -= set(resolve_targets(name))  # a projection, or a group of them (mlp, attention, qv)
        except ConfigError:
            others.append(name)
    notes = [f"lora.exclude {', '.join(others)}: the estimate leaves out projections and their groups only"] \
        if others else []
    kept = [p for p in chosen if p in left]
    return (targets if kept == chosen else ",".join(kept)), notes


def _check_checkpoint_layers(k: int | None, grad_checkpointing: str) -> None:
    """The flags' own words for what TrainShape would refuse in its field names."""
    if k is None or (k == 0 and grad_checkpointing == "off"):
        return
    if k < 1:
        raise ConfigError(f"--checkpoint-layers must be at least 1, got {k} (for no checkpointing: "
                          "--grad-checkpointing off)")
    if grad_checkpointing == "off":
        raise ConfigError(f"--checkpoint-layers {k} needs --grad-checkpointing on or offload")


def print_report(result, config_notes: list[str] = ()) -> None:
    from lorakit.terminal import Console

    console = Console()
    m, s = result.model, result.shape
    suffix = f", {s.quantize} base" if s.quantize else ""
    if s.world_size > 1:
        layout = "FSDP (base and adapters sharded)" if s.fsdp else "DDP (replicated)"
        suffix += f"; per rank of {s.world_size}, {layout}"
    console.print(f"[bold]{m.name}[/]: {m.num_params() / 1e6:,.1f}M params, {m.num_layers} layers, hidden {m.hidden_size}, "
                  f"vocab {m.vocab_size:,}; LoRA r={s.r} on {s.targets} = {result.memory.trainable_params / 1e6:,.2f}M "
                  f"trainable; {s.batch_size} x {s.seq_len} tokens, {s.dtype}{suffix}; {_step_kind(result)}")
    for note in [*config_notes, *result.notes()]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(_memory_table(result))
    console.print(_speed_table(result))


def _step_kind(result) -> str:
    from lorakit.plan.estimate import mlp_runs_fused

    s = result.shape
    if s.engine == "peft":
        return "PEFT's defaults" + (" with the fused loss" if s.fused_loss else "")
    if s.fused_mlp:
        if mlp_runs_fused(s):
            return "lorakit train's fast paths (fused loss and MLP)"
        return "lorakit train's fast paths (fused loss; the MLP unfused: it needs plain LoRA on gate, up and down)"
    if s.fused_loss:
        return "transformers' step with the fused loss"
    return "transformers' own step (--fast-paths: what lorakit train runs)"


def _memory_table(result):
    from rich.table import Table

    from lorakit.plan.estimate import gib

    on, off = (result.memory, result.memory_other_checkpointing)
    if not result.shape.grad_checkpointing:
        on, off = off, on
    mark = lambda flag: " (chosen)" if flag == result.shape.grad_checkpointing else ""  # noqa: E731
    s = result.shape
    title = f"peak memory per rank, FSDP over {s.world_size}, GiB" if s.fsdp else "peak memory per device, GiB"
    table = Table(title=title)
    table.add_column("")
    table.add_column("checkpointing off" + mark(False), justify="right")
    table.add_column(_checkpointing_label(result) + mark(True), justify="right")
    rows = [("base weights", "weights"), ("adapter: weight, grad, AdamW", "adapter"),
            ("activations (saved, peak)", "activations"), ("logits: head + loss peak", "logits"),
            ("backward workspace", "workspace")]
    for label, name in rows:
        table.add_row(label, f"{gib(getattr(off, name)):.2f}", f"{gib(getattr(on, name)):.2f}")
        if name == "weights" and on.fsdp_weights is not None:
            _add_fsdp_rows(table, off.fsdp_weights, on.fsdp_weights)
    table.add_row("[bold]total (timeline peak)[/]", f"[bold]{gib(off.total):.2f}[/]", f"[bold]{gib(on.total):.2f}[/]")
    if on.offloaded_to_host:
        table.add_row("in host memory: offloaded layer inputs", "0.00", f"{gib(on.offloaded_to_host):.2f}")
    cpu = "allocated bytes; the process's resident memory adds Python, torch and the data"
    gpu = "allocated bytes; the CUDA context (~0.5 GiB), library workspaces and allocator fragmentation come on top"
    table.caption = cpu if s.device == "cpu" else gpu
    return table


def _add_fsdp_rows(table, off, on) -> None:
    """What the FSDP base weights are made of (the same with and without checkpointing)."""
    from lorakit.plan.estimate import FSDP_GATHERED_LAYERS, gib

    parts = [("1/N shard of the base", "base_shard"), (f"{FSDP_GATHERED_LAYERS} layers gathered", "gathered_layers"),
             ("root: norm, untied embed", "root_whole"), ("head (not sharded)", "head")]
    for label, name in parts:
        table.add_row(f"  {label}", f"{gib(getattr(off, name)):.2f}", f"{gib(getattr(on, name)):.2f}")


def _checkpointing_label(result) -> str:
    s, layers = result.shape, result.model.num_layers
    k = s.checkpoint_layers
    selective = s.grad_checkpointing and k is not None and k < layers  # else the column is every layer's
    label = f"checkpointing {k} of {layers} layers" if selective else "checkpointing on"
    return label + (", inputs offloaded" if s.offload_checkpoints else "")


def _speed_table(result):
    from rich.table import Table

    s = result.shape
    tokens = s.tokens
    table = Table(title=f"FLOPs and time at {result.peak_tflops:.3g} TFLOP/s peak",
                  caption="model FLOPs per token: 4 N_mm + 6 N_lora + 6 L s h_q (docs/performance.md)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("tokens/s per device", justify="right")
    table.add_row("model FLOPs per token", f"{result.flops_per_token / 1e9:,.3f} G", "")
    if s.grad_checkpointing:
        table.add_row("hardware FLOPs per token (recompute)", f"{result.hardware_flops_per_token / 1e9:,.3f} G", "")
    table.add_row(f"FLOPs per step ({tokens * s.world_size:,} tokens)", f"{result.flops_per_step / 1e12:,.2f} T", "")
    for label, seconds in (("100% MFU", result.step_seconds_at_100), (f"{result.mfu * 100:g}% MFU", result.step_seconds_at_mfu)):
        table.add_row(f"step time at {label}", f"{seconds * 1e3:,.1f} ms", f"{tokens / seconds:,.0f}")
    return table
