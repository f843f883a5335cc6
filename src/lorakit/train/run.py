"""Everything before the first step: a resolved RunConfig becomes a Prepared run, and the output
folder is claimed.

    RunConfig ─► load model + tokenizer (models.py)
              ─► read + tokenise data once (data/), split eval
              ─► apply LoRA (lora/), checkpointing and fast paths ─► Prepared (+ its notices)
              ─► claim and lock the output folder (nothing is written before the inputs are known good)

session.py then trains (Trainer, train/loop.py), evaluates, checkpoints and writes adapter/ and
summary.json (written last: its presence marks a finished run); cli/train.py prints the plan and
the report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit import host
from lorakit.config import RunConfig, lora_config, save_yaml
from lorakit.data.columns import rename_columns
from lorakit.data.examples import TokenizedData, split_eval
from lorakit.data.formats import pad_token_id, tokenize_records
from lorakit.data.folders import folder_notices
from lorakit.data.reading import BUILDERS, data_files, read_records
from lorakit.errors import ConfigError, OutputError
from lorakit.kernels.varlen_attention import VARLEN, use_varlen_attention
from lorakit.lora import apply_lora, lora_report
from lorakit.lora.model import describe_modules
from lorakit.lora.targets import ARCH_PROJECTIONS, GROUPS, group_layer_names
from lorakit.model_limits import (check_token_ids, first_position_id, local_attention, position_table_length,
                                  rope_scaled, token_rows, uses_alibi)
from lorakit.models import training_dtype
from lorakit.plan.model_shapes import context_length
from lorakit.train import distributed
from lorakit.train.loop import LoopSettings, epoch_plan, total_steps_for
from lorakit.train.precision import autocast_dtype_for, dtype_notice
from lorakit.train.schedule import warmup_steps_for

RUN_FILES = ("summary.json", "adapter", "checkpoints", "metrics.jsonl", "config.yaml")


@dataclass
class Prepared:
    config: RunConfig
    model: Any
    tokenizer: Any
    source: Any
    train: TokenizedData
    eval: TokenizedData | None
    settings: LoopSettings
    notices: list[str]


def load_model(config: RunConfig, on_cpu: bool = False):
    """`on_cpu`: load in the GPU's dtype but keep it on the CPU (FSDP shards it onto the GPU)."""
    from lorakit.models import load_model_and_tokenizer

    device = distributed.device_of_rank()
    if config.model.quantize != "none":
        from lorakit.quantize import load_quantized

        return load_quantized(config.model.name, config.model.quantize, config.model.allow_pickle,
                              dtype=config.model.dtype)
    dtype = training_dtype(config.model.dtype, device.type)
    return load_model_and_tokenizer(config.model.name, dtype=dtype, device="cpu" if on_cpu else device.type,
                                    allow_pickle=config.model.allow_pickle)


def context_notice(model, longest: int) -> list[str]:
    """Examples longer than the model's positions (rows, packed or not, hold no position past
    their longest example): refused where positions are a fixed table (a position past it has no
    row to look up: GPT-2's, OPT's, GPT-J's sin/cos), one line where they are rotary and unscaled
    (it runs, on positions the model never saw)."""
    table = position_table_length(model)
    if table is not None and longest > table:
        raise ConfigError(f"an example of {longest} tokens would run past the model's {table} positions (it has "
                          f"nothing for a position beyond them); use --seq-len {table} or less")
    limit = context_length(model.config)
    if table is None and limit is not None and longest > limit and not rope_scaled(model.config):
        return [f"examples of up to {longest} tokens are longer than the model's context ({limit}): they train on "
                f"positions the base model never saw; use --seq-len {limit} or less unless you are extending its "
                "context"]
    return []


def longest_example(train: TokenizedData, evaluation: TokenizedData | None) -> int:
    return max(int(data.lengths().max()) for data in (train, evaluation) if data is not None and len(data))


def check_vocabulary(model, tokenizer, train: TokenizedData, evaluation: TokenizedData | None = None) -> None:
    """Refuse data, or a pad token, whose ids the model has no embedding row for (before any folder
    is touched: the first forward would raise an IndexError, or a device-side assert on a GPU)."""
    rows = token_rows(model)
    largest = max(data.stats.largest_token_id for data in (train, evaluation) if data is not None)
    check_token_ids(rows, tokenizer, largest, "the tokenised data holds")
    check_token_ids(rows, tokenizer, pad_token_id(tokenizer), "the pad token is")


def load_data(config: RunConfig, tokenizer) -> tuple[TokenizedData, TokenizedData | None]:
    d = config.data
    read = [read_records(d.data)] + ([read_records(d.eval_data)] if d.eval_data else [])
    train, *evaluation = [tokenize_records(records, tokenizer, d.format, d.seq_len, d.train_on_inputs)
                          for records in rename_columns(read, d.columns, d.format)]
    if evaluation:
        return train, evaluation[0]
    if d.eval_split <= 0:
        return train, None
    split = int(d.eval_split) if d.eval_split >= 1 else d.eval_split
    if len(train) < 2:
        raise ConfigError(f"--eval-split needs at least 2 examples, the data has {len(train)}; pass --eval-data or --eval-split 0")
    return split_eval(train, split, config.train.seed)


def resolve_targets(config: RunConfig, model) -> list[str]:
    """The guide's default "all" needs the architecture table; fall back to all-linear otherwise.
    Experts fused into 3D parameters stay frozen (_fused_experts_notice)."""
    model_type = getattr(model.config, "model_type", None)
    default = config.sources.get("lora.targets", "").startswith("default")
    notices = []
    if config.lora.targets in GROUPS and model_type not in ARCH_PROJECTIONS and default:
        config.lora.targets = "all-linear"
        config.sources["lora.targets"] = f"default: all-linear ({model_type!r} has no projection table)"
        notices.append(f"model type {model_type!r} is not in the projection table: using all-linear targets")
    return notices + _fused_experts_notice(config, model, model_type, default)


def _fused_experts_notice(config: RunConfig, model, model_type: str | None, default: bool) -> list[str]:
    """Mixture-of-experts layers whose experts are 3D parameters (transformers 5's Mixtral,
    Qwen3-MoE): one line; the default group keeps the projections that are linear layers; an
    explicit group that needs the experts is refused."""
    experts = [name for name, p in model.named_parameters() if p.dim() == 3 and "expert" in name]
    if not experts:
        return []
    layers = len({name.rsplit(".", 1)[0] for name in experts})
    frozen = (f"the experts' weights are fused 3D parameters ({experts[0]} and the like, in {layers} "
              f"layer{'s' * (layers != 1)}), which LoRA on linear layers cannot adapt: they stay frozen")
    if config.lora.targets not in GROUPS or model_type not in ARCH_PROJECTIONS:
        return [frozen]
    names, missing = group_layer_names(describe_modules(model), config.lora.targets, model_type)
    if missing and not default:
        instead = f"choose among {', '.join(names)}" if names else "use --targets attention"
        raise ConfigError(f"--targets {config.lora.targets}: {', '.join(missing)} are fused expert parameters in this "
                          f"model ({experts[0]}), not linear layers; {instead}")
    if missing:
        config.lora.targets = ",".join(names)
        config.sources["lora.targets"] = "default: the seven projections that are linear layers here"
        frozen += f"; targets: {', '.join(names)}"
    return [frozen]


def loop_settings(config: RunConfig, model, tokenizer, train: TokenizedData) -> LoopSettings:
    t, d = config.train, config.data
    world = distributed.world()  # a step takes world.size x grad_accum micro-batches of the plan
    device = distributed.device_of_rank()
    settings = LoopSettings(lr=t.lr, total_steps=0, warmup_steps=0, schedule=t.schedule, grad_accum=t.grad_accum,
                            max_grad_norm=t.max_grad_norm, max_bad_steps=t.max_bad_steps, seed=t.seed,
                            rank=world.rank, world_size=world.size,
                            **forward_settings(model, tokenizer, device, t.batch_size, d.seq_len, d.packing))
    settings.loss_scaling = torch.float16 in (settings.autocast_dtype, next(model.parameters()).dtype)
    settings.batches_per_epoch = len(epoch_plan(train, settings, 0))
    settings.total_steps = total_steps_for(settings.batches_per_epoch, t.grad_accum * world.size, t.epochs, t.max_steps)
    settings.warmup_steps = warmup_steps_for(settings.total_steps, t.warmup_ratio)
    return settings


def forward_settings(model, tokenizer, device: torch.device, batch_size: int, seq_len: int, packing: bool) -> dict:
    """The LoopSettings fields a forward pass reads, as train sets them (eval takes the same, so
    that it reproduces a run's own eval loss)."""
    return dict(batch_size=batch_size, seq_len=seq_len, packing=packing, pad_id=pad_token_id(tokenizer), device=device,
                autocast_dtype=autocast_dtype_for(model, device), packed_attention=packed_attention_for(model, packing),
                first_position=first_position_id(model))


def prepare(config: RunConfig) -> Prepared:
    """Everything a run needs before its output folder is claimed; under torchrun, joins the job."""
    distributed.init_from_env()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = distributed.device_of_rank()  # under torchrun: this process's own GPU
    use_fsdp, parallel_notices = distributed.choose_fsdp(distributed.requested_fsdp(config), config, device)
    torch.manual_seed(config.train.seed)
    model, tokenizer, source = load_model(config, on_cpu=use_fsdp)
    train, evaluation = distributed.main_first(lambda: load_data(config, tokenizer), others_too=True)  # one fills the cache
    check_vocabulary(model, tokenizer, train, evaluation)
    longest = longest_example(train, evaluation)
    notices = folder_notices(config.data.data + config.data.eval_data, BUILDERS)
    notices += packing_notice(config, model, longest)  # whether rows are packed decides their length
    notices += context_notice(model, longest) + dtype_notice(config, model) + resolve_targets(config, model)
    apply_lora(model, lora_config(config))
    if lora_report(model).trainable_params == 0:
        raise ConfigError("no trainable parameters after applying LoRA; check --targets")
    if config.train.fast_paths:  # first: the memory plan counts what they keep and what they recompute
        notices += enable_fast_paths_for(model, config.train.triton_kernels, config.data.packing, device)
    notices += _checkpointing(model, config, use_fsdp)
    distributed.wrap_model(model, use_fsdp, device)
    distributed.diverge_rank_rng()  # after the shared initialisation: each rank its own dropout masks
    notices += parallel_notices + distributed.global_batch_notice(config.train)
    settings = loop_settings(config, model, tokenizer, train)
    notices += _long_step_notice(settings) + _few_steps_notice(config, settings) + _busy_cores_notice(config, device)
    notices += _eval_is_training_data_notice(config)
    return Prepared(config, model, tokenizer, source, train, evaluation, settings, notices)


def _eval_is_training_data_notice(config: RunConfig) -> list[str]:
    """One line when an --eval-data file is also a training file: its loss then says how well the
    run memorised, not how it does on text it has not seen."""
    def same_file(a: str, b: str) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:  # not a local file (read_records said so already, or a dataset name)
            return a == b

    training = data_files(config.data.data)  # a folder's files too
    named = [(raw, path) for raw in config.data.eval_data for path in data_files([raw])]
    shared = [raw if str(path) == str(Path(raw)) else path for raw, path in named  # as the user spelled a file
              if any(same_file(path, train) for train in training)]
    if not shared:
        return []
    return [f"--eval-data {', '.join(map(str, shared))} is also training data: its eval loss measures memorising, "
            "not how the adapter does on unseen text; pass a held-out file, or --eval-split to set some aside"]


FEW_STEPS = 20  # fewer optimizer steps than this from --epochs alone: a run too short to learn much


def _few_steps_notice(config: RunConfig, settings: LoopSettings) -> list[str]:
    """One line when the epochs of a small data set make only a few optimizer steps (50 records
    at the defaults: 2 steps), unless the user chose the step count."""
    if config.train.max_steps is not None or settings.total_steps >= FEW_STEPS:
        return []
    steps, batches = settings.total_steps, settings.batches_per_epoch
    return [f"only {steps} optimizer step{'s' * (steps != 1)} ({config.train.epochs:g} epoch(s) of "
            f"{batches} micro-batch{'es' * (batches != 1)}, {settings.grad_accum * settings.world_size} per step): too "
            "few to learn much; `lorakit recommend --data ...` suggests epochs and batch for this data, or pass "
            "--epochs or --max-steps"]


def _busy_cores_notice(config: RunConfig, device: torch.device) -> list[str]:
    """One line when other processes keep busy the cores torch's threads would share: each step
    then waits for its slowest thread (the demo's steps, 2 threads on 2 cores with one kept busy
    elsewhere, took 3.2x as long as on idle cores, and 2x as long as with --threads 1)."""
    if device.type != "cpu" or config.train.threads or distributed.world_size() > 1:  # chosen, or ranks share cores
        return []
    busy, threads, cores = host.cores_busy_elsewhere(0.1), torch.get_num_threads(), len(host.usable_cores())
    free = round(cores - busy) if busy is not None else threads
    if busy is None or busy < 0.5 or free >= threads:
        return []
    said = (f"other processes keep about {busy:.1f} of this process's {cores} cores busy and torch runs "
            f"{threads} threads")
    if free < 1:  # no core to move to: nothing to suggest, but the steps will be slow
        return [f"{said}: steps will take longer than on an idle machine"]
    return [f"{said}: each step waits for the busy cores (on 2 cores with one busy, steps took twice as long as "
            f"with one thread); pass --threads {free} to use the free ones"]


def _long_step_notice(settings: LoopSettings) -> list[str]:
    """One line when a step takes more than one pass over the data: each step then repeats every
    example, and a stop signal waits for the end of the step."""
    per_step, batches = settings.grad_accum * settings.world_size, settings.batches_per_epoch
    if per_step <= batches:
        return []
    return [f"one step takes {per_step} micro-batches, {per_step / batches:.1f} passes over the {batches} of this data "
            "(--grad-accum x processes): each step sees every example more than once; lower --grad-accum or "
            "--batch-size"]


def keep_global_batch(prepared: Prepared, micro_batches_per_step: int) -> str | None:
    """On resume with another number of processes, set grad_accum so that one step still takes
    `micro_batches_per_step` micro-batches of the plan (the checkpoint's global batch)."""
    world, train = distributed.world_size(), prepared.config.train
    if train.grad_accum * world == micro_batches_per_step:
        return None
    if micro_batches_per_step % world:
        raise ConfigError(f"the checkpoint's steps hold {micro_batches_per_step} micro-batches, which {world} "
                          f"processes cannot share evenly; resume with a number of processes that divides "
                          f"{micro_batches_per_step}, or start a new --output")
    given = train.grad_accum
    train.grad_accum = micro_batches_per_step // world
    prepared.config.sources["train.grad_accum"] = "checkpoint (global batch kept)"
    prepared.settings = loop_settings(prepared.config, prepared.model, prepared.tokenizer, prepared.train)
    s = prepared.settings  # the plan printed above had the old grad_accum: restate the steps line
    return (f"resume: --grad-accum {train.grad_accum} instead of {given}, so {world} process(es) keep the "
            f"checkpoint's {micro_batches_per_step} micro-batches per step (steps: {s.total_steps} x "
            f"{s.grad_accum} micro-batch(es) of {s.batch_size} x {s.seq_len} tokens per process)")


def _checkpointing(model, config: RunConfig, fsdp: bool) -> list[str]:
    from lorakit.train.memory_plan import apply_checkpointing, choose_checkpointing

    # --grad-checkpointing auto/on/off/offload; a sharded base is estimated at one rank's share
    plan = choose_checkpointing(model, config, distributed.device_of_rank(), fsdp=fsdp)
    apply_checkpointing(model, plan)
    return [plan.notice]


def packing_notice(config: RunConfig, model, longest: int) -> list[str]:
    """Packing off, with one line, where packing_blocker says a packed row cannot carry the model's
    attention; padded rows get transformers' own masks, windows included."""
    reason = packing_blocker(model, longest, config.data.seq_len) if config.data.packing else None
    if reason is None:
        return []
    config.data.packing = False
    return [f"packing: off, {reason}; each row holds one example (padded)"]


def packing_blocker(model, longest: int, row_tokens: int) -> str | None:
    """Why a packed row (of up to `row_tokens`) cannot carry the model's own attention rule, or
    None: a sliding window or attention chunk some example is longer than (a block-causal mask,
    which transformers hands to every layer unchanged, would let it see past the window), ALiBi
    biases (transformers builds them from a 2D mask), or MPT's ALiBi table, which spans the whole
    row (not each document) and is only max_seq_len wide."""
    if getattr(model.config, "model_type", None) == "mpt" and row_tokens > (position_table_length(model) or row_tokens):
        return (f"a packed row of up to {row_tokens} tokens (--seq-len) is longer than the {model.config.max_seq_len} "
                "positions of MPT's ALiBi table")
    local = local_attention(model.config)
    if local is not None and longest > local[0]:
        return (f"the model's {local[1]} ({local[0]} tokens) is shorter than the longest example ({longest}), "
                "and a packed row's mask cannot apply it")
    if uses_alibi(model.config):
        return f"{model.config.model_type} positions tokens with ALiBi, which a packed row's mask cannot carry"
    if getattr(model.config, "output_router_logits", False):  # transformers' router loss reads a 2D padding mask
        return "the model's router load-balancing loss (output_router_logits) needs each row's own padding mask"
    return None


def packed_attention_for(model, packing: bool) -> str:
    """Packed rows carry document boundaries (cu_seq_lens, no B*T*T mask) when the model runs
    lorakit_varlen attention; else a block-causal 4D mask. (flash-attention reads the same
    boundaries in transformers, but that path has not run here: it keeps the old layout.)"""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "varlen" if packing and implementation == VARLEN else "4d"


def enable_fast_paths_for(model, triton_kernels: str, packing: bool, device: torch.device) -> list[str]:
    """train's fast paths (eval's too); the notices saying which."""
    from lorakit.kernels.llama_patch import enable_fast_paths, triton_kernels_enabled, triton_supports, wants_triton

    # safe under non-reentrant checkpointing: the recomputed forward takes the same fused functions
    notices = enable_fast_paths(model, triton=wants_triton(triton_kernels, device))
    if triton_kernels == "auto" and device.type == "cuda" and not triton_supports(device):
        notices.append("no Triton kernels: Triton supports GPUs of compute capability 8.0 on, and this one's is "
                       "%d.%d (--triton-kernels on to try them)" % torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        host.keep_freed_memory()
    if triton_kernels_enabled(model):
        notices.append("Triton kernels for RMSNorm, SwiGLU, RoPE and the loss (--no-triton-kernels for torch's ops)")
    if packing:  # packed rows without a B*T*T mask, no work across documents
        notices += use_varlen_attention(model)
    return [f"fast paths: {n}" for n in notices + _gemm_notice(model)]


def _gemm_notice(model) -> list[str]:
    """One line when the frozen weights' GEMMs take oneDNN (kernels/cpu_gemm.py chose it by timing)."""
    from lorakit.kernels import cpu_gemm

    weight = next(model.parameters())
    if cpu_gemm.backend_for(weight) != cpu_gemm.ONEDNN:
        return []
    return [f"{str(weight.dtype).removeprefix('torch.')} GEMMs through oneDNN, faster than torch's own on this "
            f"CPU ({cpu_gemm.ENV_VAR}=aten for torch's)"]


# ---- the output folder --------------------------------------------------------------------------

def claim_output(config: RunConfig) -> Path:
    """Check the output folder can hold this run; only then create or clear it."""
    out = Path(config.output.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file; choose a folder path")
    held_before = out.is_dir() and out.resolve() in _held_locks
    if out.is_dir():
        _lock_run_folder(out)
    try:
        return _claim_locked(config, out)
    except BaseException:
        if not held_before:  # a lock this process held already (an earlier claim) stays held
            release_run_folder(out)
        raise


def refuse_occupied_output(config: RunConfig) -> list[str]:
    """The run files already in --output (read only); an error when neither --resume nor
    --overwrite says what to do with them. Checked again, under the folder's lock, when claimed;
    first before the model loads, so that a refusal is immediate."""
    out = Path(config.output.output)
    out.resolve()  # a symbolic-link loop raises here, before the model loads (the CLI names it)
    if not config.output.overwrite:  # --overwrite removes them with the rest
        _refuse_files_where_folders_go(out)
    # a dangling link counts too: --overwrite removes it
    existing = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()] \
        if out.is_dir() else []
    if "config.yaml" in existing and not holds_a_run_config(out):  # any run would replace it, --overwrite delete it
        raise OutputError(f"--output {out} holds a config.yaml that no lorakit run wrote, where a run writes its "
                          "own; move your file elsewhere (and pass it as CONFIG.yaml), or choose another --output")
    if existing and not (config.output.resume or config.output.overwrite or config.output.dry_run):
        if "summary.json" in existing:
            state, go_on = "a finished run", "pass --resume with a larger --max-steps to train it further"
        else:
            state, go_on = "an unfinished run", "pass --resume to continue it"
        raise OutputError(f"--output {out} already holds {state}; {go_on}, --overwrite to replace it, "
                          "or choose another --output")
    return existing


def _refuse_files_where_folders_go(out: Path) -> None:
    """A file or a dangling link where the run writes a folder would be found only when the first
    checkpoint or the adapter is saved, after the training steps."""
    for name in ("checkpoints", "adapter"):
        path = out / name
        if (path.is_symlink() or path.exists()) and not path.is_dir():
            raise OutputError(f"--output {out} holds {name} as a file or a broken link, where the run writes its "
                              f"{name} folder; remove it, pass --overwrite, or choose another --output")


def refuse_config_inside_output(config_file: str | None, config) -> None:
    """A run writes OUTPUT/config.yaml: the user's own file there, in a folder that holds no run,
    would be replaced (or taken for an unfinished run). A run's own config.yaml passed back with
    --resume or --overwrite is fine."""
    out = Path(config.output.output)
    written = out / "config.yaml"
    if not (config_file and written.exists() and written.resolve() == Path(config_file).resolve()):
        return
    if not holds_a_run_config(out):
        raise OutputError(f"{config_file} is where this run writes its own config.yaml (--output "
                          f"{config.output.output}); keep your file elsewhere or choose another --output")


def holds_a_run_config(out: Path) -> bool:
    """OUTPUT/config.yaml is a run's own, not a file of the user's: beside a run's other files (a
    metrics.jsonl of the user's does not make one), or, where a run was killed before its first
    checkpoint, by what it holds."""
    return (out / "config.yaml").is_file() and (_holds_run_files(out) or written_by_a_run(out / "config.yaml"))


def _holds_run_files(out: Path) -> bool:
    return any((out / name).exists() for name in ("summary.json", "adapter", "checkpoints"))


def written_by_a_run(path: Path) -> bool:
    """A run's own config.yaml holds every section, each with most of its options (all but those
    that followed from others and what its command did; a lorakit older than an option lacks that
    one); a hand-written file names a few."""
    import dataclasses

    import yaml

    from lorakit.config import DERIVABLE, RUN_ACTIONS, SECTIONS, section_types

    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return False
    if not isinstance(saved, dict):
        return False
    left_out = {**DERIVABLE, "output": RUN_ACTIONS}
    for section in SECTIONS:
        options = {f.name for f in dataclasses.fields(section_types()[section.name])}
        written = options - set(left_out.get(section.name, ()))
        held = saved.get(section.name)
        if not isinstance(held, dict) or len(written & set(held)) < len(written) / 2:
            return False
    return True


def _claim_locked(config: RunConfig, out: Path) -> Path:
    existing = refuse_occupied_output(config)
    _check_writable(out)  # before --overwrite deletes anything: a read-only folder keeps its run
    if config.output.overwrite:
        # the run's other files, only where there was a run: a folder without one may hold the user's
        ran_here = _holds_run_files(out) or written_by_a_run(out / "config.yaml")
        for name in existing + (["loss.png", "tensorboard"] if ran_here else []):
            try:
                _remove(out / name)
            except OSError as exc:
                raise OutputError(f"--overwrite could not delete {exc.filename or out / name} ({exc.strerror}); "
                                  f"the old run in {out} is partly deleted: fix its permissions, then run again "
                                  "with --overwrite, or choose another --output") from None
    _lock_run_folder(out)
    return out


def _check_writable(out: Path) -> None:
    probe = out / ".lorakit-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as exc:
        raise OutputError(f"cannot write to --output {out} ({exc.strerror}); choose a writable folder") from None
    finally:
        with contextlib.suppress(OSError):  # on a full disk the file is made and its bytes refused
            probe.unlink()


_held_locks: dict[Path, int] = {}  # run folder -> the open descriptor whose lock lasts the process


def _lock_run_folder(out: Path) -> None:
    """Hold an exclusive lock on the run folder itself (flock on its descriptor: no file is
    created) until this process ends: a second run into the same folder, with --resume or
    --overwrite too, would mix its files with this one's. The kernel drops the lock when the
    process dies, so a killed run leaves nothing stale."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    key = out.resolve()
    if key in _held_locks:
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError as exc:
        raise OutputError(f"cannot open --output {out} ({exc.strerror}); choose a folder you can read and write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"another lorakit run is writing to --output {out} right now; wait for it to end, "
                          "stop it, or choose another --output") from None
    _held_locks[key] = fd


def release_run_folder(out: Path) -> None:
    """Let another run into `out` (the end of this run in a process that goes on, e.g. tests)."""
    fd = _held_locks.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


JOB_LINE = "# torchrun job: "  # config.yaml's first line under torchrun: the job that runs in the folder


def write_config(out: Path, config: RunConfig) -> None:
    from lorakit.safe_io import atomic_write_text

    job = host.torchrun_job()
    atomic_write_text(out / "config.yaml", (f"{JOB_LINE}{job}\n" if job else "") + save_yaml(config))


def resume_a_restarted_job(config: RunConfig) -> bool:
    """torchrun --max-restarts restarts the same command after a worker died: where this job's
    earlier attempt wrote --output's run (config.yaml names the job), the restart resumes it (and
    an --overwrite is not done twice). A folder another job wrote keeps the command's own flags, as
    do jobs over several nodes (each node's torchrun counts its own restarts: ranks would differ)."""
    if host.torchrun_restarts() < 1 or host.torchrun_job() is None or not host.one_node():
        return False
    try:
        with open(Path(config.output.output) / "config.yaml", encoding="utf-8") as saved:
            first_line = saved.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return False
    if first_line != JOB_LINE + host.torchrun_job():
        return False
    config.output.resume, config.output.overwrite = True, False
    return True

