"""Predict the peak memory and the FLOPs of one LoRA training step from the model CONFIG alone.

No weights are loaded: a Llama-style decoder (Llama, Mistral, Qwen2/3, SmolLM, Gemma-like) is
described by a handful of sizes (`ModelShape`, read by plan/model_shapes.py), and the step by
`TrainShape` (plan/train_shape.py).

Peak memory (per device, allocated bytes) is the largest of four moments of the step::

    weights + adapter + max( saved activations + head and loss peak,     # head fwd / bwd
                             saved activations + final-norm backward,    # fp32 RMSNorm grads
                             activation peak + a layer's backward )      # (recompute with ckpt)

- weights: every base parameter in the compute dtype; with `quantize` the decoder's linear
  layers take NF4 (4 bits + 0.127 bits of double-quantised absmax) or int8 (+ an fp32 scale per
  row); embeddings, norms and the output head stay in the compute dtype.
- adapter: fp32 master weight, fp32 grad and AdamW's m and v = 16 B per trainable param.
- FSDP (`fsdp`, lorakit's FSDP2 layout in train/distributed.py, see `fsdp_weights`): each rank
  holds 1/W of every sharded parameter (base and adapters, so the adapter's 16 B are divided by
  W too), two decoder layers gathered whole, the backbone's own parameters whole for the step
  (FSDP2's root is not resharded after forward) and the output head (with a tied input
  embedding) never sharded. Activations are per micro-batch, as replicated.
- activations: what autograd SAVES for backward, derived tensor by tensor for transformers'
  Llama decoder layer with sdpa attention (see `layer_saved_bytes`). A frozen linear saves
  nothing (dX needs only W); a LoRA branch saves its input (lorakit: one copy per group, as
  q/k/v share x; PEFT's fp32 adapters: an fp32 copy per adapter) and its rank-r intermediate;
  RMSNorm saves an fp32 copy of its input and 1/rms; sdpa saves q, k, v, the output (which is
  also o_proj's input) and the fp32 logsumexp (with `cpu_attention`, lorakit's CPU attention: the
  fp32 probabilities of up to 256 positions instead); SwiGLU saves gate, up and silu(gate);
  down_proj's LoRA saves the product (with `fused_mlp`, lorakit's fused MLP, neither: both are
  recomputed). Adapter dropout: each adapter saves its dropped copy and mask; in lorakit's fused
  blocks (`fused_attention`, `fused_mlp`) a group saves its input once, and on the CPU a bool
  mask per adapter (CUDA draws the masks again in backward). Layer 0 saves less: the frozen
  embedding's output needs no grad.
  With activation checkpointing a layer keeps only its input, and the backward recomputes one
  layer at a time: the peak is all the checkpoints plus one layer's full saved set.
  Selective checkpointing (`checkpoint_layers` k of L, the earliest k, as lorakit's trainer
  picks them): the later L-k layers save everything, the first k their inputs. Backward runs
  the plain layers first (all saved, the resident peak), then recomputes the checkpointed ones
  after the plain layers' tensors are freed: k inputs + one recomputed layer.
  Offloaded checkpoints (`offload_checkpoints`, the trainer's `--grad-checkpointing offload`):
  the checkpointed layers' inputs wait in host memory (`offloaded_to_host`), and the device
  counts OFFLOAD_IN_FLIGHT = 2 of them instead of k. Two, because the forward holds two hidden
  states of the chain at once: the running layer's input (referenced until the layer returns,
  its host copy already made) and the output the layer writes, the next layer's input. The
  backward holds one: the input copied back for the layer being recomputed (it is freed with
  that layer's saved tensors before the next copy comes back); the gradient flowing between
  the layers is the workspace's. Counting the forward's pair at every moment over-counts by at
  most two hidden states, against k saved.
- logits: the unfused head + cross-entropy of transformers 5 (`ForCausalLMLoss`): the head
  writes logits in the compute dtype, `.float()` copies them to fp32, log_softmax saves its fp32
  output (forward: 10 B per token per vocab entry in 16-bit, 8 B in fp32); backward holds that
  output, NLL's fp32 gradient and log_softmax's fp32 gradient at once: 12 B. This assumes the
  caller drops the model outputs before backward (`loss = model(...).loss`); keeping
  `outputs.logits` alive adds the logits once more.
  `fused_loss` (lorakit.kernels.chunked_ce: no full logits) keeps about 8 B x chunk x vocab
  plus two hidden-sized tensors: the labelled rows and their gradient (computed in forward),
  then the gradient and its scaled copy.
- workspace: gradient buffers and temporaries at the backward peaks (`backward_workspace_bytes`).

FLOPs per trained token with a frozen base (docs/performance.md, "The floor"): F = 4*N_mm + 6*N_lora + 6*L*s*h_q.
Checkpointing recomputes the layers' forward: hardware FLOPs, not model FLOPs (MFU uses F).

The derivation is checked against measurement (plan/measure.py, docs/estimator-validation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lorakit.errors import ConfigError
from lorakit.plan.model_shapes import ModelShape, TargetSpec, count_lora_params, model_shape, resolve_targets
from lorakit.plan.train_shape import TrainShape  # the estimator's input; callers import it from here

GIB = 1024**3
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes + int8 absmax/64 + fp32 absmax2/256
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight, grad, AdamW m and v
LOGITS_BYTES_PEAK = 12  # fp32 log_softmax output + NLL grad + log_softmax grad, per token x vocab
CHUNKED_LOSS_BYTES = 8  # per chunk row x vocab in lorakit.kernels.chunked_ce (measured: 7.5-7.8)
DEFAULT_MFU = 0.4
OFFLOAD_IN_FLIGHT = 2  # offloaded checkpoints: layer inputs on the device at once (module docstring)
FSDP_GATHERED_LAYERS = 2  # FSDP2: decoder layers unsharded at once (the computed one + one in flight)


# ---- parameters and FLOPs -------------------------------------------------------------------

def model_flops(model_config: Any, r: int, targets: TargetSpec, context: float,
                labelled: float = 1.0) -> dict:
    """Model FLOPs per token with a frozen base, F = 4 N_mm + 6 N_lora + 6 L s h_q, and its parts.

    N_mm: every matmul's parameters (the input embedding lookup excluded), the output head's
    counted for the `labelled` fraction of tokens only (a token without a label needs no logits
    under the fused loss); N_lora: r (in + out) summed over the adapted projections; s: the
    attention context (the sequence length, or packed the token-weighted mean document length);
    h_q = heads x head_dim. The forward takes 2 N per token, the input gradient 2 N, and only
    the adapters need a weight gradient (another 2 N_lora)."""
    m = model_shape(model_config)
    n_mm = m.matmul_params() - m.vocab_size * m.hidden_size * (1 - labelled)
    n_lora = count_lora_params(m, r, targets)
    attention = 6 * m.num_layers * context * m.q_dim
    return {"per_token": 4 * n_mm + 6 * n_lora + attention, "n_mm": n_mm, "n_lora": n_lora,
            "attention": attention, "context": context}


def flops_per_token(model_config: Any, shape: TrainShape, hardware: bool = False) -> float:
    """`model_flops` for a training shape: context = seq_len, the head skipping the unlabelled
    fraction under the fused loss only.

    hardware=True adds checkpointing's recomputed forward (2*N_layers + 2*N_lora + 2*L*s*h_q),
    for the checkpointed share k/L of the layers."""
    m = model_shape(model_config)
    labelled = shape.labelled_fraction if shape.fused_loss else 1.0
    flops = model_flops(m, shape.r, shape.targets, shape.seq_len, labelled)
    total = flops["per_token"]
    if hardware and shape.grad_checkpointing:
        attention = m.num_layers * shape.seq_len * m.q_dim
        recomputed = 2 * (m.num_layers * m.layer_linear_params() + flops["n_lora"] + attention)
        total += recomputed * checkpointed_layers(m, shape) / m.num_layers
    return float(total)


def step_time(model_config: Any, shape: TrainShape, peak_tflops: float, mfu: float = 1.0) -> float:
    """Seconds per step on one device at the given MFU of `peak_tflops` (per-device tokens)."""
    if not (0 < peak_tflops < float("inf")) or not 0 < mfu <= 1:
        raise ConfigError(f"peak TFLOP/s must be > 0 and MFU in (0, 1], got {peak_tflops} and {mfu}")
    return flops_per_token(model_config, shape) * shape.tokens / (peak_tflops * 1e12 * mfu)


# ---- memory ---------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Bytes per device. `total` is the timeline peak, not always the sum of the parts.
    With FSDP, weights and adapter are one rank's share (their parts in `fsdp_weights`)."""

    weights: int
    adapter: int
    activations: int  # the activation peak: everything saved, or checkpoints + one recomputed layer
    logits: int  # the head + loss peak on top of the resident activations
    workspace: int  # gradient buffers alive inside one layer's backward
    total: int
    activations_resident: int  # saved when the loss starts: all layers, or the checkpoints only
    allocated_at_head: int  # activations allocated when the head starts: the saved ones + its input
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    trainable_params: int
    offloaded_to_host: int = 0  # offloaded checkpoints: the layer inputs held in host memory
    per_layer_saved_bytes_per_token: dict[str, float] = field(default_factory=dict)
    fsdp_weights: FsdpWeights | None = None  # FSDP only: the parts of weights and adapter

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes(m: ModelShape, shape: TrainShape) -> int:
    """Base weights: decoder linears quantised or not; embeddings, norms, head in compute dtype."""
    linear = m.num_layers * m.layer_linear_params()
    rest = m.num_params() - linear
    b = shape.compute_bytes
    if shape.quantize == "4bit":
        return int(linear * NF4_BYTES_PER_PARAM + rest * b)
    if shape.quantize == "8bit":
        rows = m.num_layers * sum(out for _, out in m.projection_shapes().values())
        return int(linear + 4 * rows + rest * b)
    return int((linear + rest) * b)


def adapter_bytes(trainable: int, shape: TrainShape) -> int:
    """16 B per trainable parameter; DDP's gradient buckets add a copy of the fp32 grads (a
    replicated run; FSDP's share is `fsdp_weights`)."""
    extra = 4 if shape.world_size > 1 else 0
    return trainable * (ADAPTER_BYTES_PER_PARAM + extra)


@dataclass(frozen=True)
class FsdpWeights:
    """Parameter bytes on one rank of an FSDP2 run (see `fsdp_weights`)."""

    base_shard: int  # this rank's 1/W of the sharded base parameters
    adapter_shard: int  # this rank's 1/W of the adapters' fp32 weights, grads and AdamW m and v
    gathered_layers: int  # FSDP_GATHERED_LAYERS decoder layers unsharded: base + fp32 adapter weights
    root_whole: int  # the backbone's own parameters (final norm, an untied input embedding), whole for the step
    head: int  # the output head (= a tied input embedding), never sharded

    @property
    def weights(self) -> int:
        """Everything but the adapter state: shards, gathered layers, the root and the head."""
        return self.base_shard + self.gathered_layers + self.root_whole + self.head


def fsdp_weights(m: ModelShape, shape: TrainShape, trainable: int) -> FsdpWeights:
    """Per-rank parameter bytes under lorakit's FSDP2 layout (train/distributed.py `wrap_model`).

    `fully_shard` runs on every decoder layer and on the backbone, with the output head's weight
    ignored (the fused loss reads it outside any forward): so every base parameter but the head
    (a tied input embedding is the head) is sharded, and so are the LoRA A and B inside the
    layers, whatever their requires_grad. Their grads are reduce-scattered and AdamW's states
    follow the sharded parameters: the adapter's 16 B per parameter are divided by W, and no
    all-reduce buffer is needed (that is the replicated run's).

    Unsharded at once: FSDP_GATHERED_LAYERS decoder layers. In forward, FSDP2 keeps the layer
    being computed and the all-gather buffer it was copied out of until the next layer's copy-out
    (torch's implicit forward prefetch, `FSDPParamGroup.wait_for_unshard`); in backward, the layer
    being differentiated and the previous layer, prefetched by default (`_backward_prefetch`, one
    layer ahead). The backbone is FSDP2's root, which is not resharded after forward
    (reshard_after_forward=None means False for the root): its own parameters (the final norm and
    an untied input embedding) are whole from the forward to the end of the backward, on top of
    their shard. Left out: FSDP2's padding of each parameter's first dimension to a multiple of W
    and one layer's unsharded adapter grads before their reduce-scatter (both < 1% of a layer)."""
    w, b = shape.world_size, shape.compute_bytes
    head = m.vocab_size * m.hidden_size
    root = m.hidden_size + (0 if m.tie_word_embeddings else head)
    layer = (m.layer_linear_params() + 2 * m.hidden_size) * b + 4 * trainable // m.num_layers
    return FsdpWeights(
        base_shard=-(-(m.num_params() - head) * b // w), adapter_shard=-(-trainable * ADAPTER_BYTES_PER_PARAM // w),
        gathered_layers=FSDP_GATHERED_LAYERS * layer, root_whole=root * b, head=head * b,
    )


def parameter_bytes(m: ModelShape, shape: TrainShape, trainable: int) -> tuple[int, int]:
    """(base weights, adapter state) on one device: replicated, or this rank's under FSDP."""
    if shape.fsdp:
        sharded = fsdp_weights(m, shape, trainable)
        return sharded.weights, sharded.adapter_shard
    return weight_bytes(m, shape), adapter_bytes(trainable, shape)


def _kept_attention_probability_bytes(m: ModelShape, shape: TrainShape) -> float:
    """Per token and layer, the probabilities lorakit's CPU attention keeps (0: none kept).

    It keeps them for rows of up to 256 positions. Longer rows keep them too when they are packed
    documents (each handed over alone) or batches padded to less than seq_len, so they count as
    256-position rows: an upper bound, since shorter rows keep fewer bytes per token."""
    if not shape.cpu_attention or shape.device != "cpu" or shape.engine != "lorakit":
        return 0.0
    from lorakit.kernels.cpu_attention import KEEP_PROBS_MAX_LEN, kept_probability_bytes

    return kept_probability_bytes(min(shape.seq_len, KEEP_PROBS_MAX_LEN), m.num_heads)


def layer_saved_bytes(m: ModelShape, shape: TrainShape, stream_grad: bool = True) -> dict[str, float]:
    """Bytes per token that autograd saves in one decoder layer, by tensor.

    stream_grad: whether the layer's input requires grad (False only for layer 0, whose input is
    the frozen embedding's output)."""
    h, i, b = m.hidden_size, m.intermediate_size, shape.compute_bytes
    adapted = set(resolve_targets(shape.targets))
    saved: dict[str, float] = {}
    if stream_grad:
        saved["norm1 input (fp32) + 1/rms"] = 4 * h + 4
    attn_grad = stream_grad or bool(adapted & {"q_proj", "k_proj", "v_proj"})
    if attn_grad:
        saved["q, k, v (post-RoPE)"] = b * (m.q_dim + 2 * m.kv_dim)
        saved["attention output"] = b * m.q_dim
        probabilities = _kept_attention_probability_bytes(m, shape)
        if probabilities:
            saved["attention probabilities (fp32, CPU attention)"] = probabilities
        else:
            saved["attention logsumexp (fp32)"] = 4 * m.num_heads
    mid_grad = attn_grad or "o_proj" in adapted
    if mid_grad:
        saved["norm2 input (fp32) + 1/rms"] = 4 * h + 4
    gate_grad, up_grad = mid_grad or "gate_proj" in adapted, mid_grad or "up_proj" in adapted
    if gate_grad:
        saved["gate output (silu input)"] = b * i
        saved["up output"] = b * i
    if up_grad:
        saved["silu(gate)"] = b * i
    saved.update(_lora_saved_bytes(m, shape, adapted, attn_grad, stream_grad))
    if _mlp_is_fused(shape, adapted):
        saved.pop("silu(gate)", None)
        saved.pop("down_proj input (SwiGLU product)", None)
    return saved


def mlp_runs_fused(shape: TrainShape) -> bool:
    """Whether the estimate counts lorakit's fused MLP for this step."""
    return _mlp_is_fused(shape, set(resolve_targets(shape.targets)))


def _mlp_is_fused(shape: TrainShape, adapted: set[str]) -> bool:
    """Whether lorakit's fused MLP runs: plain LoRA (no quantised base) on all three."""
    return shape.fused_mlp and _fusable_engine(shape) and {"gate_proj", "up_proj", "down_proj"} <= adapted


def _fusable_engine(shape: TrainShape) -> bool:
    """lorakit's engine on a dense base: where its fused blocks can run."""
    return shape.engine == "lorakit" and shape.quantize is None


def _lora_saved_bytes(m: ModelShape, shape: TrainShape, adapted: set[str], attn_grad: bool,
                      stream_grad: bool) -> dict[str, float]:
    """What the LoRA branches add: their inputs (shared per group, or a copy per adapter) and
    the rank-r intermediates. With dropout each adapter saves its dropped copy, and its mask
    where the input needs a grad (CUDA's fused dropout keeps a bool mask, the CPU a float one);
    in lorakit's fused blocks a group saves its input once, and on the CPU a bool mask per adapter
    (`fused_attention` for q/k/v and o, `fused_mlp` for the MLP)."""
    b = shape.compute_bytes
    cast = shape.engine == "peft" and b < 4  # PEFT keeps adapters in fp32 and casts x per adapter
    branch_bytes = 4 if cast else b  # per element of what the adapter branch computes
    shapes = m.projection_shapes()
    saved: dict[str, float] = {}
    groups = {"attention input": ("q_proj", "k_proj", "v_proj"), "o_proj input": ("o_proj",),
              "MLP input": ("gate_proj", "up_proj"), "down_proj input (SwiGLU product)": ("down_proj",)}
    for label, members in groups.items():
        users = [p for p in members if p in adapted]
        if not users:
            continue
        width = shapes[users[0]][0]
        fused = _group_fused(shape, adapted, members)
        if shape.lora_dropout > 0 and not fused:
            saved[f"{label}: dropped copy (+ mask) per adapter"] = len(users) * width * (
                branch_bytes + _dropout_mask_bytes(shape, branch_bytes, needs_grad=stream_grad or label != "attention input"))
            continue
        if shape.lora_dropout > 0 and shape.device == "cpu":  # CUDA draws them again (kernels/adapter_dropout)
            saved[f"{label}: dropout mask (bool) per adapter"] = len(users) * width
        if cast:
            saved[f"{label}: fp32 copy per adapter"] = len(users) * width * 4
        elif not (label == "o_proj input" and attn_grad):  # sdpa's output is o_proj's input
            saved[label] = width * b
    saved["LoRA intermediates (x @ A)"] = len(adapted) * shape.r * branch_bytes
    return saved


def _group_fused(shape: TrainShape, adapted: set[str], members: tuple[str, ...]) -> bool:
    """Whether the projections reading one input run as one fused group (every one adapted)."""
    if set(members) <= {"gate_proj", "up_proj", "down_proj"}:
        return _mlp_is_fused(shape, adapted)
    return set(members) <= adapted and shape.fused_attention and _fusable_engine(shape)


def _dropout_mask_bytes(shape: TrainShape, branch_bytes: int, needs_grad: bool) -> int:
    """Bytes per element of the mask dropout keeps for backward: none where its input needs no
    gradient (the first layer's attention input, without a streamed gradient), a bool on CUDA,
    a float like the input on the CPU."""
    if not needs_grad:
        return 0
    return branch_bytes if shape.device == "cpu" else 1


def _per_step_saved_bytes(m: ModelShape, shape: TrainShape) -> int:
    """Saved once per step, outside the layers: RoPE cos/sin (shared by the batch and all
    layers) and the final norm's fp32 input."""
    rope = 2 * shape.seq_len * m.head_dim * shape.compute_bytes
    return rope + shape.tokens * (4 * m.hidden_size + 4)


def _adapter_weight_copies(m: ModelShape, shape: TrainShape) -> int:
    """lorakit keeps fp32 masters and casts A and B to a 16-bit compute dtype in forward; the
    matmuls save those copies (all layers' without checkpointing, one layer's with it)."""
    if shape.engine != "lorakit" or shape.compute_bytes == 4:
        return 0
    return count_lora_params(m, shape.r, shape.targets) * shape.compute_bytes


def int8_kept_inputs(m: ModelShape, shape: TrainShape, checkpointing: bool) -> int:
    """Bytes per token per layer that bitsandbytes' int8 matmul keeps alive on its own.

    It stores each linear layer's input as a context attribute, outside autograd's saved
    tensors, so checkpointing cannot drop it: the attention input, o_proj's input, the MLP input
    and the SwiGLU product stay alive in every layer. Without checkpointing most of them are
    the very tensors the LoRA branches and sdpa save already."""
    if shape.quantize != "8bit":
        return 0
    b, h = shape.compute_bytes, m.hidden_size
    widths = {"attention input": h, "o_proj input": m.q_dim, "MLP input": h,
              "down_proj input (SwiGLU product)": m.intermediate_size}
    if checkpointing:
        return sum(widths.values()) * b
    saved = layer_saved_bytes(m, shape)
    shared = set(saved) | ({"o_proj input"} if "attention output" in saved else set())
    return sum(w for label, w in widths.items() if label not in shared) * b


def device_checkpoints(shape: TrainShape, k: int) -> int:
    """How many of the k checkpointed layers' inputs are on the device at once."""
    return min(k, OFFLOAD_IN_FLIGHT) if shape.offload_checkpoints else k


def offloaded_bytes(m: ModelShape, shape: TrainShape) -> int:
    """Host memory for the offloaded checkpoints: every checkpointed layer's input (0 unless
    offloaded)."""
    if not shape.offload_checkpoints:
        return 0
    return checkpointed_layers(m, shape) * shape.tokens * m.hidden_size * shape.compute_bytes


def checkpointed_layers(m: ModelShape, shape: TrainShape) -> int:
    """How many layers (the earliest) are checkpointed: 0 off, all when on, or the shape's k."""
    if not shape.grad_checkpointing:
        return 0
    k = m.num_layers if shape.checkpoint_layers is None else shape.checkpoint_layers
    if k > m.num_layers:
        raise ConfigError(f"checkpoint_layers={k} exceeds the model's {m.num_layers} layers")
    return k


@dataclass(frozen=True)
class ActivationLevels:
    """Activation bytes of the whole step at its moments (see `activation_levels`)."""

    resident: int  # saved when the loss starts
    recompute: int  # while a checkpointed layer is recomputed in backward (0: none is)

    @property
    def peak(self) -> int:
        return max(self.resident, self.recompute)


def activation_levels(m: ModelShape, shape: TrainShape, k: int) -> ActivationLevels:
    """Saved bytes with the earliest k of L layers checkpointed (0: none, L: all).

    The plain layers save their full set (layer 0's smaller one when it is plain) and the
    adapters' cast weight copies; a checkpointed layer keeps its input. Backward reaches the
    checkpointed layers last, when the plain layers' tensors are gone: then the k inputs, the
    per-step tensors and one recomputed layer are alive. Offloaded, `device_checkpoints` of the
    k inputs are on the device."""
    tokens, layers = shape.tokens, m.num_layers
    first = sum(layer_saved_bytes(m, shape, stream_grad=False).values())
    other = sum(layer_saved_bytes(m, shape, stream_grad=True).values())
    fixed = _per_step_saved_bytes(m, shape)
    copies = _adapter_weight_copies(m, shape)
    kept = tokens * (k * int8_kept_inputs(m, shape, True) + (layers - k) * int8_kept_inputs(m, shape, False))
    checkpoints = device_checkpoints(shape, k) * tokens * m.hidden_size * shape.compute_bytes
    plain = tokens * (first + (layers - 1) * other) if k == 0 else tokens * (layers - k) * other
    resident = int(plain) + checkpoints + fixed + copies * (layers - k) // layers + kept
    if k == 0:
        return ActivationLevels(resident, 0)
    recompute = shape.tokens * other + copies // layers
    if shape.compute_bytes == 4:  # fp32: norm1's "copy" is the checkpointed input itself
        recompute -= shape.tokens * 4 * m.hidden_size
    return ActivationLevels(resident, int(checkpoints + fixed + kept + recompute))


def saved_activation_bytes(m: ModelShape, shape: TrainShape, checkpointing: bool) -> tuple[int, int]:
    """(saved when the loss starts, saved at the activation peak) with no layer or every layer
    checkpointed."""
    levels = activation_levels(m, shape, m.num_layers if checkpointing else 0)
    return levels.resident, levels.peak


def _alive_unsaved_at_head(m: ModelShape, shape: TrainShape) -> int:
    """Alive but not saved when the head starts: its input, the final norm's output."""
    return shape.tokens * m.hidden_size * shape.compute_bytes


def head_peak_bytes(m: ModelShape, shape: TrainShape) -> int:
    """Peak of the output head + cross-entropy above the saved activations.

    Forward: logits (compute dtype) + their fp32 copy + log_softmax's fp32 output (fp32 models:
    the copy is the logits themselves). Backward (outputs already dropped by the caller):
    log_softmax's output + NLL's grad + log_softmax's grad, all fp32 (12 B per token x vocab)."""
    tokens, vocab, b = shape.tokens, m.vocab_size, shape.compute_bytes
    labels = 8 * tokens  # int64 targets saved by the NLL loss
    # one chunk's fp32 logits + a temporary; two hidden-sized tensors (chunked_ce.py). The Triton
    # kernel's path on a GPU holds only 16-bit logits in chunks twice as long: about half of
    # this (0.12 GiB at 1b), counted as the torch path's: on the safe side
    if shape.fused_loss:
        from lorakit.kernels.chunked_ce import chunk_budget_bytes, default_chunk_rows  # torch: only when asked

        budget = chunk_budget_bytes(shape.device, shape.dtype == "fp32")
        chunk = min(shape.loss_chunk_tokens or default_chunk_rows(vocab, budget), tokens)
        return int(CHUNKED_LOSS_BYTES * chunk * vocab + 2 * tokens * m.hidden_size * b + labels)
    forward = _alive_unsaved_at_head(m, shape) + (b + 4 + (4 if b < 4 else 0)) * tokens * vocab
    backward = LOGITS_BYTES_PEAK * tokens * vocab
    return int(max(forward, backward) + labels)


def backward_workspace_bytes(m: ModelShape, shape: TrainShape) -> tuple[int, int, int]:
    """Temporaries at the backward peaks, measured on top of the saved activations:
    (final norm, a plain layer, a recomputed layer).

    - the final RMSNorm's backward runs in fp32: about five fp32 hidden-sized buffers;
    - a layer: without checkpointing, the MLP's backward holds the product's grad and the grads
      of silu(gate) and up while the product itself (and the final norm's saved input) are
      already freed: 2 x intermediate + hidden, in the compute dtype. With checkpointing the
      recomputed forward adds the LoRA branches' out-of-place temporaries on top of the full
      recomputed layer; PEFT's fp32 adapters double them (fp32 branch output, scaled, sum).
      lorakit's fused MLP recomputes silu(gate) and the product in its backward, and holds both
      with the product's grad: one intermediate-sized tensor more (counted, not yet measured);
      with dropout on CUDA also the down adapter's mask, drawn again there (a byte an element)."""
    h, i, b, tokens = m.hidden_size, m.intermediate_size, shape.compute_bytes, shape.tokens
    norm = 20 * h
    fused = i * b if _mlp_is_fused(shape, set(resolve_targets(shape.targets))) else 0
    if fused and shape.lora_dropout > 0 and shape.device != "cpu":
        fused += i
    plain = 2 * i * b + h * b - (4 * h + 4) + fused
    recomputed = 4 * i * b + 4 * h * b if shape.engine == "peft" and b < 4 else 2 * i * b + h * b + fused
    return int(tokens * norm), int(tokens * plain), int(tokens * recomputed)


def estimate_memory(model_config: Any, shape: TrainShape) -> MemoryEstimate:
    """Peak memory of one training step on one device: the largest of four moments
    (head forward, head backward, final-norm backward, a layer's backward)."""
    m = model_shape(model_config)
    trainable = count_lora_params(m, shape.r, shape.targets)
    weights, adapter = parameter_bytes(m, shape, trainable)
    k = checkpointed_layers(m, shape)
    levels = activation_levels(m, shape, k)
    resident, peak = levels.resident, levels.peak
    head = head_peak_bytes(m, shape)
    norm_ws, plain_ws, recompute_ws = backward_workspace_bytes(m, shape)
    moments = [resident + norm_ws]
    if k < m.num_layers:  # the last plain layer's backward, with everything still saved
        moments.append(resident + plain_ws)
    if k > 0:
        moments.append(levels.recompute + recompute_ws)
    workspace = max(moments) - peak
    if shape.quantize:  # the backward dequantises one weight at a time
        workspace += max(i * o for i, o in m.projection_shapes().values()) * shape.compute_bytes
    total = weights + adapter + max(resident + head, peak + workspace)
    return MemoryEstimate(
        weights=weights, adapter=adapter, activations=peak, logits=head, workspace=workspace, total=int(total),
        activations_resident=resident, allocated_at_head=resident + _alive_unsaved_at_head(m, shape),
        activations_with_checkpointing=saved_activation_bytes(m, shape, True)[1],
        activations_without_checkpointing=saved_activation_bytes(m, shape, False)[1],
        trainable_params=trainable, offloaded_to_host=offloaded_bytes(m, shape),
        per_layer_saved_bytes_per_token=layer_saved_bytes(m, shape),
        fsdp_weights=fsdp_weights(m, shape, trainable) if shape.fsdp else None,
    )


@dataclass
class Estimate:
    """Everything `lorakit estimate` reports."""

    model: ModelShape
    shape: TrainShape
    memory: MemoryEstimate
    memory_other_checkpointing: MemoryEstimate
    flops_per_token: float
    hardware_flops_per_token: float
    flops_per_step: float
    peak_tflops: float
    step_seconds_at_100: float
    step_seconds_at_mfu: float
    mfu: float

    def notes(self) -> list[str]:
        context = self.model.context
        if context is None or self.shape.seq_len <= context:
            return []
        return [f"--seq-len {self.shape.seq_len} is beyond the model's context ({context}): lorakit train names "
                "examples longer than that, and refuses them where positions are a fixed table"]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"]["num_params"] = self.model.num_params()
        out["tokens_per_step"] = self.shape.tokens * self.shape.world_size
        out["notes"] = self.notes()
        return out


def estimate(model_config: Any, shape: TrainShape, peak_tflops: float = 817.0, mfu: float = DEFAULT_MFU) -> Estimate:
    """Memory (with the requested checkpointing and the other setting), FLOPs and step times.
    The other setting of a selective or offloaded shape is no checkpointing."""
    m = model_shape(model_config)
    _check_rank_fits(m, shape)
    other = replace(shape, grad_checkpointing=not shape.grad_checkpointing, checkpoint_layers=None,
                    offload_checkpoints=False)
    per_token = flops_per_token(m, shape)
    return Estimate(
        model=m, shape=shape, memory=estimate_memory(m, shape), memory_other_checkpointing=estimate_memory(m, other),
        flops_per_token=per_token, hardware_flops_per_token=flops_per_token(m, shape, hardware=True),
        flops_per_step=per_token * shape.tokens * shape.world_size, peak_tflops=peak_tflops,
        step_seconds_at_100=step_time(m, shape, peak_tflops), step_seconds_at_mfu=step_time(m, shape, peak_tflops, mfu),
        mfu=mfu,
    )


def _check_rank_fits(m: ModelShape, shape: TrainShape) -> None:
    """The trainer refuses a rank above a layer's smaller side; so does the estimate."""
    sides = {name: min(dims) for name, dims in m.projection_shapes().items() if name in resolve_targets(shape.targets)}
    too_small = {name: side for name, side in sides.items() if shape.r > side}
    if too_small:
        name, side = min(too_small.items(), key=lambda item: item[1])  # the bound for every target
        raise ConfigError(f"r={shape.r} is above {name}'s smaller side ({side}) in {m.name}; lower r to {side} or "
                          "less, or leave that projection out of the targets")


def gib(nbytes: float) -> float:
    return nbytes / GIB
