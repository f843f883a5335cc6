"""What a benchmark runs: the presets (the shapes of docs/performance.md),
`BenchSettings` as the command line gives them, and `resolve`, which fills the preset's
defaults in, refuses what cannot run, drops the variants that do not apply here (saying why
when they were asked for) and plans --memory-budget's checkpointing as the trainer would."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field

from lorakit.bench_table import TARGETS, VARIANTS, fast_paths
from lorakit.errors import ConfigError

DEFAULT_VARIANTS = ("lorakit", "peft", "peft-bf16", "lorakit-native", "lorakit-offload", "peft-liger")
GIB = 2**30
DTYPES = ("float32", "bfloat16")

_SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
_LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
_LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
# preset -> (model shape, batch, sequence length, device)
PRESETS = {"cpu": (_SMOLLM2_135M, 4, 256, "cpu"), "gpu-1b": (_LLAMA_1B, 4, 2048, "cuda"),
           "gpu-8b": (_LLAMA_8B, 2, 2048, "cuda"), "tiny": (_TINY, 2, 32, "cpu")}


@dataclass
class BenchSettings:
    """What to run; None fields come from the preset (see `resolve`)."""

    preset: str = "cpu"
    r: int = 16
    dropout: float = 0.0  # on every adapter's input, each variant's (PEFT's lora_dropout)
    batch: int | None = None
    seq_len: int | None = None
    layers: int | None = None
    grad_checkpointing: bool = False
    packing: bool = False
    steps: int = 10
    warmup: int = 3
    variants: list[str] | None = None
    check: bool = False
    check_steps: int = 5
    peak_tflops: float | None = None
    threads: int | None = None
    isolate: bool = True  # CPU: a child process per variant (False: in this process, for tests)
    # CPU: speed from one process, variants' steps in turn; memory from children. None: on for
    # CPU runs in child processes (a shared machine's load bursts would decide a sequential run)
    interleave: bool | None = None
    device: str | None = None
    chunk_size: int | None = None  # lm_head + loss rows per chunk; None: by a byte budget
    prompt_fraction: float = 0.0  # the first part of each example is prompt: no loss there
    max_doc_len: int | None = None  # packed examples: max_doc_len/8 to max_doc_len tokens; None: seq_len
    # lorakit variants checkpoint the fewest earliest layers that the memory estimate says fit
    # this many GiB, as `lorakit train --memory-budget` plans it
    memory_budget_gib: float | None = None
    dtype: str | None = None  # weights dtype; None: the preset's (bf16 on CUDA, fp32 on the CPU)
    seed: int = 0


@dataclass
class Plan:
    """Settings with every field filled in, the model shape, and why variants were dropped."""

    settings: BenchSettings
    shape: dict
    dtype: str
    notices: list[str] = field(default_factory=list)
    # with --memory-budget: how many of the earliest layers each lorakit variant checkpoints
    checkpoint_layers: dict[str, int] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.settings.device


# ---- settings ----------------------------------------------------------------------------------

def resolve(settings: BenchSettings) -> Plan:
    """Fill the preset's defaults in, validate, and choose the variants that apply here."""
    if settings.preset not in PRESETS:
        raise ConfigError(f"--preset {settings.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    shape, batch, seq_len, device = PRESETS[settings.preset]
    _validate_counts(settings)  # before the preset's defaults fill in what is None (a 0 is no default)
    s = dataclasses.replace(settings, batch=settings.batch or batch, seq_len=settings.seq_len or seq_len,
                            layers=settings.layers or shape["num_hidden_layers"],
                            device=settings.device or device, threads=settings.threads or os.cpu_count() or 1)
    if s.interleave is None:
        s.interleave = s.device == "cpu" and s.isolate
    _validate(s)
    from lorakit.plan.model_shapes import model_shape  # here: it loads torch, which `bench --help` need not

    shape = {**shape, "num_hidden_layers": s.layers, "max_position_embeddings": max(s.seq_len, 2048)}
    smallest = min(min(dims) for dims in model_shape(shape).projection_shapes().values())
    if s.r > smallest:
        raise ConfigError(f"--r {s.r} is above the smallest projection side ({smallest}) of --preset {s.preset}; "
                          f"choose --r {smallest} or less")
    plan = Plan(s, shape, s.dtype or ("bfloat16" if s.device == "cuda" else "float32"))
    s.variants = _choose_variants(settings.variants, plan)
    if s.memory_budget_gib is not None:
        plan.notices.append(_plan_memory_budget(plan))
    return plan


def _plan_memory_budget(plan: Plan) -> str:
    """Fill plan.checkpoint_layers for each lorakit variant; the notice that says so."""
    from lorakit.train.memory_plan import SAFETY_MARGIN

    parts = []
    for name in (v for v in plan.settings.variants if not VARIANTS[v].peft):
        plan.checkpoint_layers[name], part = budget_checkpoint_layers(plan, name)
        parts.append(part)
    return (f"--memory-budget {plan.settings.memory_budget_gib:g} GiB, planned as `lorakit train` does "
            f"({SAFETY_MARGIN:.0%} of it for the step): " + "; ".join(parts + ["PEFT variants run as they are"]))


def budget_checkpoint_layers(plan: Plan, variant: str = "lorakit") -> tuple[int, str]:
    """The fewest earliest layers whose checkpointing brings `variant`'s estimated step peak (with
    the fast paths it runs) within --memory-budget as `lorakit train --memory-budget` plans it
    (all of them when even that does not fit; the trainer would offload then), and a phrase
    saying so."""
    from lorakit.plan.estimate import TrainShape, estimate_memory
    from lorakit.train.memory_plan import SAFETY_MARGIN

    s = plan.settings
    fused, chunked, native = fast_paths(variant)
    step = dict(batch_size=s.batch, seq_len=s.seq_len, r=s.r, targets=list(TARGETS), fused_loss=chunked,
                dtype=plan.dtype, device=s.device,
                loss_chunk_tokens=s.chunk_size, cpu_attention=s.device == "cpu" and fused and native,
                fused_mlp=fused, fused_attention=fused, lora_dropout=s.dropout)
    peaks = [estimate_memory(plan.shape, TrainShape(**step, grad_checkpointing=k > 0, checkpoint_layers=k or None)).total
             for k in range(s.layers + 1)]
    budget = s.memory_budget_gib * GIB * SAFETY_MARGIN  # the trainer's margin: fragmentation, workspaces
    k = next((k for k, peak in enumerate(peaks) if peak <= budget), s.layers)
    over = "" if peaks[k] <= budget else ", over even so"
    return k, (f"{variant} checkpoints the first {k} of {s.layers} layers (estimated peak "
               f"{peaks[k] / GIB:.3g} GiB{over}; with none {peaks[0] / GIB:.3g})")


def _validate_counts(s: BenchSettings) -> None:
    for name in ("r", "batch", "seq_len", "layers", "steps", "check_steps", "chunk_size", "threads", "max_doc_len"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.seq_len is not None and s.seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2 (a token and the next one it predicts), got {s.seq_len}")
    if s.variants is not None and not s.variants:
        raise ConfigError("--variants is empty; name at least one, e.g. lorakit,peft")


def _validate(s: BenchSettings) -> None:
    _validate_counts(s)
    if s.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {s.warmup}")
    if s.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {s.device!r}")
    import torch  # here: `bench --help` lists the presets without it

    if s.device == "cuda" and not torch.cuda.is_available():
        chosen = f"--preset {s.preset}" if PRESETS[s.preset][3] == "cuda" else "--device cuda"
        raise ConfigError(f"{chosen} runs on a CUDA GPU and none is visible; use --preset cpu or --device cpu")
    if s.interleave and s.device != "cpu":
        raise ConfigError("--interleave is for CPU runs; on a GPU the variants already share one quiet process")
    if s.max_doc_len is not None and (not s.packing or s.max_doc_len > s.seq_len):
        raise ConfigError(f"--max-doc-len {s.max_doc_len} needs --packing and at most --seq-len ({s.seq_len})")
    if not 0 <= s.prompt_fraction < 1:
        raise ConfigError(f"--prompt-fraction must be at least 0 and below 1, got {s.prompt_fraction}")
    if s.peak_tflops is not None and not 0 < s.peak_tflops < math.inf:
        raise ConfigError(f"--peak-tflops must be a positive number, got {s.peak_tflops}")
    if s.memory_budget_gib is not None and not (0 < s.memory_budget_gib < float("inf")):
        raise ConfigError(f"--memory-budget must be a positive number of GiB, got {s.memory_budget_gib:g}")
    if s.dtype not in (None, *DTYPES):
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if not 0 <= s.dropout < 1:
        raise ConfigError(f"--dropout must be at least 0 and below 1, got {s.dropout}")
    if s.dropout and s.check:
        raise ConfigError("--check compares the variants' gradients of one function, and each draws its own "
                          "dropout masks: drop --dropout, or --check")
    if s.memory_budget_gib is not None and s.grad_checkpointing:
        raise ConfigError("--memory-budget chooses the checkpointed layers itself: drop --grad-checkpointing")


def _choose_variants(asked: list[str] | None, plan: Plan) -> list[str]:
    unknown = [v for v in asked or [] if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    chosen = []
    for name in asked or DEFAULT_VARIANTS:
        reason = _skip_reason(name, plan)
        if reason is None:
            chosen.append(name)
        elif asked:  # dropping a default quietly is fine; dropping what was asked for is news
            plan.notices.append(f"{name} skipped: {reason}")
    if asked and not chosen:
        raise ConfigError("none of the asked variants runs here: " + "; ".join(plan.notices[-len(asked):]))
    if any(VARIANTS[v].peft for v in chosen) and importlib.util.find_spec("peft") is None:
        raise ConfigError("the PEFT variants need peft: pip install peft, or run --variants lorakit")
    # Liger patches transformers classes for the whole process: it runs last
    return sorted(dict.fromkeys(chosen), key=lambda v: VARIANTS[v].liger)


def _skip_reason(name: str, plan: Plan) -> str | None:
    """Why `name` measures nothing of its own here (bench_table.RunsWhere), or None."""
    needs = VARIANTS[name].runs_where
    if needs is None:
        return None
    s = plan.settings
    unmet = ((needs.device is not None and plan.device != needs.device) or (needs.packing and not s.packing)
             or (needs.checkpointing and not s.grad_checkpointing)
             or (needs.half_precision and plan.dtype == "float32")
             or (needs.plain_rows and (s.packing or s.grad_checkpointing or s.memory_budget_gib is not None
                                       or s.dropout)))
    if unmet:
        return needs.why
    if needs.package is not None and importlib.util.find_spec(needs.package) is None:
        return f"{needs.package.replace('_', '-')} is not installed"
    return None
