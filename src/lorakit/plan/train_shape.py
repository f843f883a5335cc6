"""One training step as the estimator sees it (`TrainShape`): the per-device micro-batch, the
sequence, the LoRA rank and targets, the precision and the memory-saving choices, each checked
when the shape is made so that a bad one is one message that lists every problem."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import ConfigError
from lorakit.plan.model_shapes import TargetSpec, resolve_targets
from lorakit.values import is_positive_int

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # torch's names, also taken
QUANTIZE = (None, "4bit", "8bit")
ENGINES = ("lorakit", "peft")


@dataclass
class TrainShape:
    """One training step: per-device micro-batch, sequence, LoRA rank and targets, precision."""

    batch_size: int = 4
    seq_len: int = 2048
    r: int = 16
    targets: TargetSpec = "all-linear"
    grad_checkpointing: bool = False
    dtype: str = "bf16"  # bf16, fp16 or fp32 (torch's bfloat16, float16, float32 taken too)
    quantize: str | None = None
    world_size: int = 1
    fused_loss: bool = False  # chunked lm_head + cross-entropy: no full logits
    engine: str = "lorakit"  # "peft": PEFT defaults (fp32 adapters, an fp32 input copy per adapter)
    lora_dropout: float = 0.0
    loss_chunk_tokens: int | None = None  # None: lorakit.kernels.chunked_ce's default (by bytes)
    device: str = "cuda"  # "cpu": dropout keeps a float mask instead of a bool one
    checkpoint_layers: int | None = None  # with grad_checkpointing: how many (the earliest); None = all
    offload_checkpoints: bool = False  # with grad_checkpointing: the checkpointed inputs wait in host memory
    fsdp: bool = False  # with world_size > 1: the base and adapters sharded (FSDP2), else replicated (DDP)
    # the share of tokens with a label (instruction data: the responses); the fused loss runs the
    # head for those rows only, the plain loss for every token
    labelled_fraction: float = 1.0
    # lorakit's CPU attention (kernels/cpu_attention.py, on with the fast paths on a CPU): it keeps
    # the fp32 probabilities for backward, rows up to 256 positions, instead of the logsumexp
    cpu_attention: bool = False
    # lorakit's fused LoRA MLP (kernels/fused_lora.lora_mlp, a fast path on every device when gate,
    # up and down all carry plain LoRA): it recomputes silu(gate) and the SwiGLU product in backward
    fused_mlp: bool = False
    # lorakit's fused q/k/v and o_proj (lora_qkv, lora_linear). Without dropout they save what the
    # plain layers save; with dropout each fused group, the MLP's too, keeps its input once (and
    # on the CPU a bool mask per adapter; CUDA draws them again) instead of each adapter's dropped copy
    fused_attention: bool = False

    def __post_init__(self) -> None:
        if self.quantize in ("none", ""):
            self.quantize = None
        self.dtype = SHORT_DTYPE.get(self.dtype, self.dtype)  # one spelling for the estimator's checks
        problems = _shape_problems(self)
        if problems:
            raise ConfigError("invalid training shape:\n  - " + "\n  - ".join(problems))

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def _shape_problems(shape: TrainShape) -> list[str]:
    out = []
    for name in ("batch_size", "seq_len", "r", "world_size", "loss_chunk_tokens"):
        value = getattr(shape, name)
        if name == "loss_chunk_tokens" and value is None:
            continue
        if not is_positive_int(value):
            out.append(f"{name} must be a positive integer, got {value!r}")
    if shape.dtype not in DTYPE_BYTES:
        out.append(f"dtype must be one of bf16, fp16, fp32, got {shape.dtype!r}")
    if shape.quantize not in QUANTIZE:
        out.append(f"quantize must be none, 4bit or 8bit, got {shape.quantize!r}")
    if shape.engine not in ENGINES:
        out.append(f"engine must be one of {', '.join(ENGINES)}, got {shape.engine!r}")
    if shape.device not in ("cuda", "cpu"):
        out.append(f"device must be cuda or cpu, got {shape.device!r}")
    if not isinstance(shape.labelled_fraction, (int, float)) or not 0.0 < shape.labelled_fraction <= 1.0:
        out.append(f"labelled_fraction must be in (0, 1], got {shape.labelled_fraction!r}")
    if not 0.0 <= shape.lora_dropout < 1.0:
        out.append(f"lora_dropout must be in [0, 1), got {shape.lora_dropout!r}")
    if not isinstance(shape.grad_checkpointing, bool):
        out.append(f"grad_checkpointing must be True or False, got {shape.grad_checkpointing!r}")
    if not isinstance(shape.offload_checkpoints, bool):
        out.append(f"offload_checkpoints must be True or False, got {shape.offload_checkpoints!r}")
    elif shape.offload_checkpoints and not shape.grad_checkpointing:
        out.append("offload_checkpoints=True needs grad_checkpointing=True")
    out += _fsdp_problems(shape)
    k = shape.checkpoint_layers
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
        out.append(f"checkpoint_layers must be None or an integer >= 0, got {k!r}")
    elif k and not shape.grad_checkpointing:
        out.append(f"checkpoint_layers={k} needs grad_checkpointing=True")
    try:
        resolve_targets(shape.targets)
    except ConfigError as exc:
        out.append(str(exc))
    return out


def _fsdp_problems(shape: TrainShape) -> list[str]:
    if not isinstance(shape.fsdp, bool):
        return [f"fsdp must be True or False, got {shape.fsdp!r}"]
    if shape.fsdp and isinstance(shape.world_size, int) and shape.world_size < 2:
        return [f"fsdp=True shards over several devices but world_size is {shape.world_size}; "
                "pass world_size >= 2 (--world-size N) or drop fsdp"]
    if shape.fsdp and shape.quantize:
        return [f"fsdp=True cannot shard a {shape.quantize} base (lorakit replicates a quantised base); "
                "drop fsdp or quantize"]
    return []
