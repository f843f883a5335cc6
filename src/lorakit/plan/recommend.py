"""Recommend a complete, runnable training config from the model, the data and the memory budget.

The guide gives the starting point; the data, the model's size and the budget move it:

    guide preset (--task)  r = 16 domain | 8 style, classification | 64 new-concepts,
                           alpha = 2r, adapters on all seven projections
      │
      ├─ data (tokenised with the model's own tokenizer)
      │     trained (response) tokens  ─► rank: halve below 100K, x2 above 10M, x4 above 100M
      │                                ─► epochs: 3 below 1M, 2 below 10M, else 1
      │     example lengths (p99)      ─► seq_len: the next round length
      ├─ model size                    ─► learning rate (then x 32/alpha when alpha > 32)
      └─ memory budget (plan/estimate) ─► the largest micro-batch that fits without activation
                                          checkpointing, else with it; grad_accum makes up an
                                          effective batch of ~16 examples (32 above 10K examples)

Every value carries a one-line reason, and a reason that departs from the guide says so
("r=32 instead of 16: 40M trained tokens"). The evidence behind each rule is in
docs/choosing-parameters.md. Nothing here is random: the same model, data and budget give the
same config, byte for byte.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lorakit.config import TASK_PRESETS, DataConfig, RunConfig, TrainConfig, resolve, save_yaml
from lorakit.errors import ConfigError
from lorakit.values import parse_size

GIB = 1024**3
TINY_TOKENS, LARGE_TOKENS, HUGE_TOKENS = 100_000, 10_000_000, 100_000_000
SMALL_SET_TOKENS = 1_000_000
MIN_RANK, MAX_RANK = 4, 256
ROUND_LENGTHS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
                 12288, 16384, 24576, 32768, 65536, 131072)
CAUTIOUS_BATCH = 4  # the micro-batch where the estimator cannot read the model
MIN_STEPS = 50  # shrink the effective batch rather than train for fewer optimizer steps
# (params below, lr at alpha = 32, evidence) from the smallest model up; see the docs.
LR_TIERS = ((1e9, 1e-3, "under 1B: small models take a high LR (lorakit's demo trains SmolLM2-135M at 1e-3)"),
            (5e9, 5e-4, "1B-5B: Thinking Machines calibrated 1e-3 for Llama-3.2-1B/3B at batch 128; halved for "
                        "batches of 16-32"),
            (math.inf, 2e-4, "5B and up: the QLoRA and Unsloth default (Thinking Machines: 3e-4 for Llama-3.1-8B at "
                             "batch 128)"))
GPU_HEADROOM_BYTES, CPU_HEADROOM_BYTES = GIB // 2, GIB  # CUDA context / Python + torch runtime


# ---- what the recommendation is made of ------------------------------------------------------

@dataclass
class Choice:
    """One recommended value. `guide` is the guide's value (None where the guide is silent)."""

    key: str  # "lora.r", "train.lr", ...
    value: Any
    reason: str
    guide: Any = None

    @property
    def departs(self) -> bool:
        return self.guide is not None and self.guide != self.value


@dataclass
class DataProfile:
    examples: int
    total_tokens: int
    trained_tokens: int
    length_mean: float
    length_p50: int
    length_p99: int
    length_max: int
    response_p50: int
    response_p99: int
    format: str
    held_out: int = 0  # examples train holds out for evaluation (no --eval-data); not counted above
    # the rows train's packer makes of one epoch at the seq_len the rules choose (None: not counted)
    packed_rows: int | None = None
    packed_seq_len: int | None = None


@dataclass
class ModelFacts:
    name: str
    params: int
    model_type: str | None
    max_positions: int | None
    shape: Any = None  # plan.model_shapes.ModelShape, or None when the estimator cannot read the model
    shape_note: str = ""
    token_rows: int | None = None  # token ids the model has embedding rows for (model_limits.token_rows)


@dataclass
class DeviceMemory:
    device: str  # "cuda" | "cpu"
    total_bytes: int
    source: str
    given: bool = False  # from --memory / --gpu-memory, not this machine: the config carries it

    @property
    def usable_bytes(self) -> int:
        from lorakit.train.memory_plan import SAFETY_MARGIN

        headroom = GPU_HEADROOM_BYTES if self.device == "cuda" else CPU_HEADROOM_BYTES
        return max(0, int(SAFETY_MARGIN * self.total_bytes) - headroom)


@dataclass
class Recommendation:
    config: RunConfig
    choices: list[Choice]
    data: DataProfile
    model: ModelFacts
    budget: DeviceMemory
    memory: dict = field(default_factory=dict)  # the estimate for the chosen shape
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        """The config; its lr says the alpha it was chosen for, as alpha now follows a changed r and the
        lr does not (above alpha 32 the rule lowers lr by 32/alpha)."""
        alpha, lr = self.config.lora.alpha, self.config.train.lr
        tier = float(f"{lr * max(alpha, 32) / 32:.2g}")
        return save_yaml(self.config).replace(
            f"\n  lr: {lr!r}\n", f"\n  lr: {lr!r}  # for alpha {alpha:g}: {tier:g}, x 32/alpha above alpha 32; "
                                f"another --r moves alpha, not this\n", 1)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "choices": [{**asdict(c), "departs": c.departs} for c in self.choices],
            "data": asdict(self.data),
            "model": {"name": self.model.name, "params": self.model.params, "model_type": self.model.model_type,
                      "max_positions": self.model.max_positions, "estimator": self.model.shape_note or "ok"},
            "budget": {"device": self.budget.device, "total_bytes": self.budget.total_bytes,
                       "usable_bytes": self.budget.usable_bytes, "source": self.budget.source},
            "memory": self.memory,
            "notes": self.notes,
        }


# ---- memory budgets --------------------------------------------------------------------------

def machine_memory_bytes() -> int:
    """Total RAM (not free RAM: that changes from minute to minute, the recommendation must not)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise ConfigError("cannot read this machine's memory size; pass --memory, e.g. --memory 16GiB") from None


def make_budget(device: str = "auto", gpu_memory: str | None = None, memory: str | None = None) -> DeviceMemory:
    """The memory to plan for, from the flags, the GPU, or this machine's RAM."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if gpu_memory and memory:
        raise ConfigError("--gpu-memory and --memory both given; --gpu-memory plans for a GPU, --memory for CPU RAM")
    if gpu_memory and device == "cpu":
        raise ConfigError("--gpu-memory contradicts --device cpu; use --memory for CPU RAM")
    if memory and device == "cuda":
        raise ConfigError("--memory is CPU RAM and contradicts --device cuda; use --gpu-memory")
    if gpu_memory:
        return DeviceMemory("cuda", parse_size(gpu_memory), f"--gpu-memory {gpu_memory}", given=True)
    if memory:
        return DeviceMemory("cpu", parse_size(memory, "--memory"), f"--memory {memory}", given=True)
    return _detected_budget(device)


def _detected_budget(device: str) -> DeviceMemory:
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no GPU is visible; pass --gpu-memory to plan for one elsewhere")
        props = torch.cuda.get_device_properties(0)
        return DeviceMemory("cuda", int(props.total_memory), f"GPU 0 ({props.name})")
    return DeviceMemory("cpu", machine_memory_bytes(), "this machine's RAM")


# ---- the rules -------------------------------------------------------------------------------

def choose_rank(task: str, trained_tokens: int) -> Choice:
    """The preset's rank, moved by the amount of data the adapter has to absorb."""
    preset = TASK_PRESETS[task]["r"]
    amount = f"{_count(trained_tokens)} trained tokens"
    if trained_tokens < TINY_TOKENS:
        r = max(MIN_RANK, preset // 2)
        why = f"r={r} instead of {preset}: only {amount}; a smaller adapter holds them and overfits less"
    elif trained_tokens > LARGE_TOKENS:
        r = min(MAX_RANK, preset * (4 if trained_tokens > HUGE_TOKENS else 2))
        why = f"r={r} instead of {preset}: {amount}; the rank needed grows with the data (Biderman et al. 2024, Thinking Machines 2025)"
    else:
        r = preset
        why = f"the guide's --task {task} preset; {amount} is a medium-sized set"
    return Choice("lora.r", r, why, guide=preset)


def choose_epochs(trained_tokens: int) -> Choice:
    amount = _count(trained_tokens)
    if trained_tokens < SMALL_SET_TOKENS:
        return Choice("train.epochs", 3.0, f"small set ({amount} trained tokens): three passes")
    if trained_tokens < LARGE_TOKENS:
        return Choice("train.epochs", 2.0, f"medium set ({amount} trained tokens): two passes")
    return Choice("train.epochs", 1.0, f"large set ({amount} trained tokens): one pass is enough and repeats overfit")


def choose_seq_len(length_p99: int, length_max: int, max_positions: int | None) -> Choice:
    """The next round length that holds 99% of the examples whole (packing fills the rest)."""
    limit = max_positions or ROUND_LENGTHS[-1]
    fitting = [n for n in ROUND_LENGTHS if n >= length_p99 and n <= limit]
    if not fitting:
        return Choice("data.seq_len", limit, f"the model's context ({limit}); 1% of examples are longer than "
                                               f"{length_p99} tokens and will be cut")
    seq_len = fitting[0]
    covered = "every example" if seq_len >= length_max else f"99% of examples (longest: {length_max}, cut)"
    return Choice("data.seq_len", seq_len, f"covers {covered}; p99 length {length_p99} tokens, rounded up")


def choose_lr(params: int, alpha: float) -> Choice:
    """A tier by model size (at alpha = 32), lowered in proportion when alpha is larger."""
    base, why = next((lr, why) for limit, lr, why in LR_TIERS if params < limit)
    if alpha <= 32:
        return Choice("train.lr", base, f"{_count(params)} parameters, {why}")
    lr = float(f"{base * 32 / alpha:.2g}")
    return Choice("train.lr", lr, f"{base:g} x 32/alpha: alpha={alpha:g} with alpha=2r makes each step's update "
                                  f"{alpha / 32:g}x larger than at r=16 (Hu et al.: the update grows with r)")


def target_examples(examples: int, epochs: float) -> tuple[int, bool]:
    """(examples per optimizer step, whether fewer than usual): 16, or 32 for large sets; fewer
    when steps would be too few."""
    target = _usual_examples_per_step(examples)
    passes = int(examples * epochs)
    if passes // target >= MIN_STEPS:
        return target, False
    return max(1, 2 ** int(math.log2(max(1, passes // MIN_STEPS)))), True


def _usual_examples_per_step(examples: int) -> int:
    return 32 if examples >= 10_000 else 16


def choose_eval_and_save(total_steps: int) -> list[Choice]:
    """Evaluate and checkpoint about ten times in a run long enough to need it."""
    if total_steps < 2 * MIN_STEPS:
        why = f"a short run (~{total_steps} steps): evaluated before and after, checkpointed at the end"
        return [Choice("train.eval_every", 0, why), Choice("train.save_every", 0, why)]
    every = _round_down_nicely(total_steps // 10)
    return [Choice("train.eval_every", every, f"~{total_steps} steps: about ten points on the eval curve show where "
                                              "it stops falling (more epochs would overfit)"),
            Choice("train.save_every", every, "a checkpoint at each evaluation: --resume after a crash loses at "
                                              "most a tenth of the run")]


def _round_down_nicely(n: int) -> int:
    """n rounded down to 1, 2 or 5 times a power of ten (at least 1)."""
    scale = 10 ** int(math.log10(max(n, 1)))
    return max(1, max(m * scale for m in (1, 2, 5) if m * scale <= max(n, 1)))


def packed_rows_per_epoch(profile: DataProfile, seq_len: int) -> float:
    """The rows one epoch packs into, as `lorakit train` packs by default: the packer's own count
    where profile_data ran it at this seq_len, else whole examples of the mean length in each row
    (the packer never splits one across rows)."""
    if profile.packed_rows and profile.packed_seq_len == seq_len:
        return profile.packed_rows
    return profile.examples / max(1, int(seq_len // max(profile.length_mean, 1.0)))


def rows_per_step(examples_per_step: int, examples: int, rows_per_epoch: float, epochs: float) -> tuple[int, bool]:
    """(rows per optimizer step, a power of two holding about `examples_per_step` examples; whether
    it was lowered to keep MIN_STEPS optimizer steps)."""
    rows = 2 ** round(math.log2(max(examples_per_step * rows_per_epoch / max(examples, 1), 1.0)))
    fewer = False
    while rows > 1 and epochs * rows_per_epoch / rows < MIN_STEPS:
        rows, fewer = rows // 2, True
    return rows, fewer


def fit_batch(rows: int, memory_of: Callable[[int, bool], int], usable: int) -> tuple[int, bool, int]:
    """(micro-batch, checkpointing, predicted bytes): the largest power-of-two micro-batch up to
    `rows` that fits without activation checkpointing (faster), else the largest with it."""
    for checkpointing in (False, True):
        batch = rows
        while batch >= 1:
            need = memory_of(batch, checkpointing)
            if need <= usable:
                return batch, checkpointing, need
            batch //= 2
    raise ConfigError(f"the model does not fit: one sequence with activation checkpointing needs "
                      f"{memory_of(1, True) / GIB:.2f} GiB but the budget leaves {usable / GIB:.2f} GiB; "
                      "plan for more memory or a smaller model")


def _count(n: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(int(n))


# ---- reading the model and the data ----------------------------------------------------------

def model_facts(spec: str | None) -> ModelFacts:
    """Size, context and estimator shape from the model's config alone (no weights loaded)."""
    from lorakit.model_limits import token_rows
    from lorakit.models import meta_model_from_config, read_model_config, resolve_model
    from lorakit.plan.model_shapes import context_length, shape_from_dict

    source = resolve_model(spec)
    config = read_model_config(source)
    try:
        shape, note = shape_from_dict(config.to_dict(), source.name), ""
    except ConfigError as exc:
        shape, note = None, f"memory not estimated: {exc}"
    meta = meta_model_from_config(config)  # on the meta device: exact counts, no memory allocated
    return ModelFacts(source.name, sum(p.numel() for p in meta.parameters()), getattr(config, "model_type", None),
                      context_length(config), shape, note, token_rows(meta))


def profile_data(paths: list[str], tokenizer: Any, fmt: str, max_positions: int | None,
                 train_on_inputs: bool = False, token_rows: int | None = None,
                 eval_split: float = 0.0, seed: int = 0, columns: Sequence[str] = ()) -> DataProfile:
    """Token counts with the real tokenizer and chat template, examples uncut (up to the context),
    of the part that trains: with `eval_split` > 0, what is left after train's own split (same
    seed, same records held out). Refused where a token id has no row of the model's `token_rows`
    (training would fail)."""
    from lorakit.data.columns import rename_columns
    from lorakit.data.examples import split_eval
    from lorakit.data.formats import tokenize_records
    from lorakit.data.reading import read_records
    from lorakit.model_limits import check_token_ids

    [records] = rename_columns([read_records(paths)], columns, fmt)
    data = tokenize_records(records, tokenizer, fmt, max_positions or ROUND_LENGTHS[-1], train_on_inputs)
    check_token_ids(token_rows, tokenizer, data.stats.largest_token_id, "the tokenised data holds")
    held_out = 0
    if eval_split > 0:
        data, held = split_eval(data, eval_split, seed)
        held_out = len(held)
    lengths = data.lengths()
    trained = np.asarray(data.dataset.select_columns(["num_labels"]).with_format("numpy")[:]["num_labels"])
    pct = lambda values, q: int(np.percentile(values, q, method="higher"))  # noqa: E731
    seq_len = choose_seq_len(pct(lengths, 99), int(lengths.max()), max_positions).value
    return DataProfile(
        examples=len(data), total_tokens=int(lengths.sum()), trained_tokens=int(trained.sum()),
        length_mean=round(float(lengths.mean()), 2), length_p50=pct(lengths, 50), length_p99=pct(lengths, 99),
        length_max=int(lengths.max()), response_p50=pct(trained, 50), response_p99=pct(trained, 99), format=data.format,
        held_out=held_out, packed_rows=packed_rows(lengths, seq_len, seed), packed_seq_len=seq_len,
    )


def packed_rows(lengths: np.ndarray, seq_len: int, seed: int) -> int:
    """The rows `lorakit train`'s packer makes of one epoch (longer examples cut to seq_len)."""
    from lorakit.data.batching import plan_batches

    return len(plan_batches(np.minimum(lengths, seq_len), 1, seq_len, packing=True, shuffle=True, seed=seed, epoch=0))


# ---- putting it together ---------------------------------------------------------------------

def recommend(model: str | None = None, data: list[str] | None = None, task: str = "domain",
              budget: DeviceMemory | None = None, fmt: str = "auto", eval_data: list[str] | None = None,
              run_output: str = "runs/lorakit", columns: Sequence[str] = ()) -> Recommendation:
    """The whole recommendation. data None: the built-in demo set (as `lorakit train`)."""
    if task not in TASK_PRESETS:
        raise ConfigError(f"--task must be one of {', '.join(TASK_PRESETS)}, got {task!r}")
    data, eval_data = _data_paths(data, eval_data)
    budget = budget or make_budget()
    facts = model_facts(model)
    from lorakit.models import load_tokenizer

    profile = profile_data(data, load_tokenizer(model), fmt, facts.max_positions, token_rows=facts.token_rows,
                           eval_split=0.0 if eval_data else DataConfig().eval_split, seed=TrainConfig().seed,
                           columns=columns)
    if eval_data:  # read now: a config naming an unreadable file would fail only when train starts
        from lorakit.data.reading import read_records

        read_records(eval_data)
    choices, memory = plan_choices(task, profile, facts, budget)
    notes = [facts.shape_note] if facts.shape_note else []
    config = build_config(_model_spec(model), data, eval_data, fmt, task, choices, run_output, columns)
    return Recommendation(config, choices, profile, facts, budget, memory, notes)


def plan_choices(task: str, profile: DataProfile, facts: ModelFacts, budget: DeviceMemory) -> tuple[list[Choice], dict]:
    """Every choice from the profile, the model facts and the budget (no I/O: testable alone)."""
    r = choose_rank(task, profile.trained_tokens)
    alpha = 2.0 * r.value
    alpha_why = "alpha = 2r (the guide): scale alpha/r = 2 at any rank"
    if r.value >= 64:
        alpha_why += "; at this rank also try --rslora (alpha/sqrt(r)), which keeps high ranks learning"
    targets = _targets_choice(facts.model_type)
    epochs = choose_epochs(profile.trained_tokens)
    seq_len = choose_seq_len(profile.length_p99, profile.length_max, facts.max_positions)
    per_step, fewer = target_examples(profile.examples, epochs.value)
    rows_per_epoch = packed_rows_per_epoch(profile, seq_len.value)
    rows, fewer_rows = rows_per_step(per_step, profile.examples, rows_per_epoch, epochs.value)
    (quantize, batch, checkpointing), accum, memory = _fit(facts, budget, rows, seq_len.value, r.value)
    per_row = profile.examples / rows_per_epoch
    batch_why = _batch_size_why(rows * per_row, profile.examples, fewer or fewer_rows)
    return [
        r, Choice("lora.alpha", alpha, alpha_why, guide=alpha), targets,
        Choice("lora.rslora", False, "standard scaling alpha/r, as the guide assumes", guide=False),
        choose_lr(facts.params, alpha), epochs, seq_len,
        _packing_choice(per_row, profile.length_mean, seq_len.value),
        batch, Choice("train.grad_accum", accum, f"{batch.value} x {accum} = {rows} rows of {seq_len.value} tokens "
                                                 f"per step: {batch_why}"),
        checkpointing, *(_budget_choice(budget) if memory else []), quantize,
        *choose_eval_and_save(math.ceil(epochs.value * rows_per_epoch / rows)),
    ], memory


def _batch_size_why(examples_per_step: float, examples: int, fewer: bool) -> str:
    why = f"an effective batch of ~{examples_per_step:.0f} examples"
    if fewer:
        why += f" (not {_usual_examples_per_step(examples)}: keeps >= {MIN_STEPS} optimizer steps)"
    return why


def _packing_choice(per_row: float, mean_length: float, seq_len: int) -> Choice:
    if per_row >= 1.1:
        share = f"{per_row:.2g}" if per_row < 10 else f"{per_row:.0f}"
        return Choice("data.packing", True, f"short examples share a row (~{share} of {mean_length:.0f} tokens "
                                            "in each; no attention across them): little compute on padding")
    return Choice("data.packing", True, f"on, though a row of {seq_len} tokens holds one example of {mean_length:.0f} "
                                        "on average (packing never splits one): the padding is computed")


def _targets_choice(model_type: str | None) -> Choice:
    from lorakit.lora.targets import ARCH_PROJECTIONS

    if model_type in ARCH_PROJECTIONS:
        return Choice("lora.targets", "all", "all seven projections (the guide); attention-only LoRA trails all-layer "
                                             "LoRA in QLoRA, Biderman et al. and Thinking Machines' runs", guide="all")
    return Choice("lora.targets", "all-linear", f"all-linear instead of all: {model_type!r} has no projection table; "
                                                "every linear layer except the output head", guide="all")


def _fit(facts: ModelFacts, budget: DeviceMemory, rows: int, seq_len: int, r: int) -> tuple[list[Choice], int, dict]:
    """([quantize, batch, checkpointing] choices, grad_accum, memory estimate) for the budget."""
    if facts.shape is None:
        batch = min(rows, CAUTIOUS_BATCH)
        return _unestimated_choices(batch), rows // batch, {}
    fit = _first_fitting_base(facts, budget, rows, seq_len, r)
    usable = budget.usable_bytes
    where = f"{_gib(usable)} GiB usable of {_gib(budget.total_bytes)} GiB ({budget.source})"
    quantize_why = ("the unquantised base fits: no quantisation" if fit.quantize == "none" else
                    f"QLoRA (4-bit NF4 base): the 16-bit base needs {_gib(fit.plain_need)} GiB even at 1 row with "
                    "checkpointing")
    # auto, not on/off: the trainer re-estimates on the card it runs on, and checkpoints only the layers it must
    gc_why = (f"auto (expected on): without it even 1 row needs {_gib(fit.memory_of(1, False))} GiB; the trainer "
              "checkpoints the fewest layers that fit" if fit.checkpointing else
              "auto (expected off): the batch fits without it; recomputing activations costs about a third more compute")
    memory = {"predicted_peak_bytes": fit.need, "usable_bytes": usable, "quantize": fit.quantize,
              "expects_checkpointing": fit.checkpointing, "without_checkpointing_bytes": fit.memory_of(fit.batch, False),
              "with_checkpointing_bytes": fit.memory_of(fit.batch, True)}
    return [Choice("model.quantize", fit.quantize, quantize_why),
            Choice("train.batch_size", fit.batch, _batch_why(fit, rows, seq_len, where)),
            Choice("train.grad_checkpointing", "auto", gc_why)], rows // fit.batch, memory


def _batch_why(fit: "_BaseFit", rows: int, seq_len: int, where: str) -> str:
    """Memory caps the micro-batch, or the step's rows do (a small effective batch fits whole)."""
    if fit.batch == rows:
        return (f"the step's {rows} row{'s' * (rows != 1)} of {seq_len} tokens in one micro-batch (the effective "
                f"batch); it fits {where}: {_gib(fit.need)} GiB predicted")
    return f"the largest micro-batch of {seq_len}-token rows that fits {where}: {_gib(fit.need)} GiB predicted"


def _unestimated_choices(batch: int) -> list[Choice]:
    return [Choice("model.quantize", "none", "no quantisation: memory could not be estimated"),
            Choice("train.batch_size", batch, "a cautious micro-batch: the estimator cannot read this model"),
            Choice("train.grad_checkpointing", "auto", "auto: memory could not be estimated here; the trainer keeps it "
                                                       "off for models its estimator cannot describe")]


@dataclass
class _BaseFit:
    quantize: str
    batch: int
    checkpointing: bool
    need: int  # predicted peak bytes of that batch
    memory_of: Callable[[int, bool], int]  # (rows, checkpointing) -> predicted peak bytes with this base
    plain_need: int | None = None  # the 16-bit base's need at 1 row with checkpointing, when it did not fit


def _first_fitting_base(facts: ModelFacts, budget: DeviceMemory, rows: int, seq_len: int, r: int) -> _BaseFit:
    """The 16-bit base's largest fitting batch; on a GPU where it cannot fit at all, a 4-bit base's
    (QLoRA; bitsandbytes runs on GPUs only). ConfigError where none fits."""
    from lorakit.kernels.llama_patch import FUSED_MLP_MODEL_TYPES

    plain = _memory_function(facts.shape, seq_len, r, budget.device, "none",
                             fused_mlp=facts.model_type in FUSED_MLP_MODEL_TYPES)
    try:
        return _BaseFit("none", *fit_batch(rows, plain, budget.usable_bytes), plain)
    except ConfigError:
        if budget.device != "cuda":
            raise
    quantized = _memory_function(facts.shape, seq_len, r, budget.device, "4bit", fused_mlp=False)
    return _BaseFit("4bit", *fit_batch(rows, quantized, budget.usable_bytes), quantized, plain_need=plain(1, True))


def _floor_significant(value: float, digits: int) -> float:
    """`value` rounded down to `digits` significant digits (never above what was planned for)."""
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale + 1e-9) / scale  # the epsilon: 1.15 * 100 is 114.999...


def _budget_choice(budget: DeviceMemory) -> list[Choice]:
    """A budget given on the command line goes into the config, so that the trainer plans for it
    rather than for the machine it runs on: the usable part, as the trainer takes 90% of it."""
    if not budget.given:
        return []
    from lorakit.train.memory_plan import SAFETY_MARGIN

    gib = _floor_significant(budget.usable_bytes / SAFETY_MARGIN / GIB, 3)
    if gib <= 0:
        return []
    return [Choice("train.memory_budget", gib, f"{budget.source} less room for the runtime; lorakit train plans its "
                                               f"checkpointing for {SAFETY_MARGIN:.0%} of it, as here")]


def _memory_function(shape: Any, seq_len: int, r: int, device: str, quantize: str = "none",
                     fused_mlp: bool = False) -> Callable[[int, bool], int]:
    """Bytes for (batch, checkpointing) under the trainer's fast paths on `device`; fused_mlp: its
    MLPs run lorakit's fused SwiGLU (plain-LoRA SwiGLU models the fast paths know, no quantised base)."""
    from lorakit.plan.estimate import TrainShape, estimate_memory

    from lorakit.models import training_dtype

    dtype = training_dtype("auto", device)  # what `--dtype auto` loads

    def memory_of(batch: int, checkpointing: bool) -> int:
        step = TrainShape(batch_size=batch, seq_len=seq_len, r=r, targets="all-linear", grad_checkpointing=checkpointing,
                          dtype=dtype, quantize=quantize, fused_loss=True, device=device,
                          cpu_attention=device == "cpu", fused_mlp=fused_mlp)  # the trainer's fast paths there
        return estimate_memory(shape, step).total

    return memory_of


def build_config(model: str | None, data: list[str], eval_data: list[str], fmt: str, task: str,
                 choices: list[Choice], run_output: str, columns: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from the choices, through the same resolve() that `lorakit train` uses."""
    values: dict[str, dict] = {"model": {"name": model},
                               "data": {"data": data, "format": fmt, "eval_data": eval_data, "columns": list(columns)},
                               "lora": {"task": task}, "train": {"max_steps": None}, "output": {"output": run_output}}
    for choice in choices:
        section, name = choice.key.split(".")
        values[section][name] = choice.value
    if values["lora"].get("alpha") == 2 * values["lora"]["r"]:  # the guide's rule: left to follow r, as
        del values["lora"]["alpha"]  # train's own config.yaml does, so that `--r 32` takes alpha along
    return resolve(values, {})


def _data_paths(data: list[str] | None, eval_data: list[str] | None) -> tuple[list[str], list[str]]:
    from lorakit.demo import DEMO_EVAL, DEMO_TRAIN

    if not data:
        return [str(DEMO_TRAIN)], [str(DEMO_EVAL)] if eval_data is None else _absolute(eval_data)
    return _absolute(data), _absolute(eval_data or [])


def _absolute(paths: list[str]) -> list[str]:
    """Absolute paths, so the YAML runs from any folder; a missing file fails here, not at train time."""
    from lorakit.errors import DataError

    out = []
    for path in paths:
        resolved = Path(path).expanduser()
        if not resolved.exists():
            raise DataError(f"data file {path} does not exist; pass existing files to --data / --eval-data")
        out.append(str(resolved.resolve()))
    return out


def _model_spec(model: str | None) -> str | None:
    if model is not None and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"
