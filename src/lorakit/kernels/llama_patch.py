"""Switch a Llama-style model with LoRA adapters onto the fused fast paths, and back.

enable_fast_paths(model) patches forwards per instance (the classes are untouched, so other
models in the process are unaffected), and only where the fused functions compute exactly what
the module would:

    mlp.forward        -> lora_mlp(x, gate_proj, up_proj, down_proj)   SwiGLU MLPs we know
    self_attn.forward  -> q, k, v = lora_qkv(hidden_states, q_proj, k_proj, v_proj), handed
                          to the unchanged attention code: q_proj(hidden_states) returns the
                          precomputed q (matched by tensor identity), so RoPE, the cache and
                          the attention kernel stay transformers' own
    o_proj.forward     -> lora_linear(x, o_proj)

RMSNorm and RoPE take the ops of native_ops (plain PyTorch with hand-written backwards) on CPU
tensors; enable_fast_paths(model, triton=True) takes the Triton kernels of triton_ops instead, on
a GPU (the trainer's default there, `--triton-kernels auto`; when Triton cannot run, one notice
says why and the rest stays):

    RMSNorm.forward    -> ops.rms_norm(x, weight, eps)                 the RMSNorms we know
    mlp.forward        -> lora_mlp(..., triton=True)                   Triton only: SwiGLU part
    self_attn.forward  -> a copy of transformers 5.17-5.25 LlamaAttention.forward (with the q/k
                          norms of Qwen3 and the sliding window of Mistral/Qwen2/Qwen3) whose only
                          change is ops.rope(q, k, cos, sin) in place of apply_rotary_pos_emb;
                          projections, cache update and attention kernel are called as there.
                          It runs also where q, k, v cannot fuse (LoRA on some of them only, or
                          on the MLP only, DoRA): it then calls each projection's own forward

With the native ops, the copied forward also hands causal attention over CPU tensors to
cpu_attention.causal_attention (block-causal GEMMs over grouped query heads; the varlen path of
packed rows does the same) in place of SDPA, where it computes what SDPA would: the sdpa
implementation, no mask, queries as long as keys (training, or a prefill into an empty cache),
no dropout, no sliding window shorter than the row, no autocast.

Every nn.Linear (exactly that class: quantized ones keep theirs) becomes a
cpu_gemm.CpuGemmLinear: while its weight is frozen, its forward and input gradient take oneDNN's
GEMMs where cpu_gemm finds them faster than torch's (fp32 on this project's AMD Zen 5), and
nn.Linear's own forward otherwise.

Where the ops cannot take a tensor (native ops on a GPU, say) the module's own code runs.

Every patched forward re-checks at call time and runs the original forward instead when an
adapter was merged or disabled since, or under autocast (the fused functions do their own
dtype handling). disable_fast_paths(model) restores the previous forwards.

The trainer's loss, causal_lm_loss, is in causal_loss.py; enable_fast_paths tells it (a flag on
the model) whether the model runs Triton kernels, so that its softmax takes Triton's kernel too.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from lorakit.errors import LorakitWarning
from lorakit.kernels import adapter_casts, cpu_attention, cpu_gemm, fused_lora, native_ops
from lorakit.kernels.causal_loss import TRITON_LOSS, chunked_loss_blocker
from lorakit.kernels.fused_lora import fuse_blocker, lora_linear, lora_mlp, lora_qkv

# the model families whose modules the fast paths know (transformers 5.17-5.25): their MLPs
# compute exactly down(act(gate(x)) * up(x)), their attentions call q,k,v_proj(hidden_states),
# their RMSNorms compute exactly LlamaRMSNorm's, and their decoder layers end in
# `residual + mlp(post_attention_layernorm(h))` with nothing saved for backward after the MLP
# (so a checkpoint recompute may skip its output)
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
SWIGLU_MLPS = {f"{family}MLP" for family in FAMILIES}
FUSED_MLP_MODEL_TYPES = tuple(family.lower() for family in FAMILIES)  # their config model_types
ATTENTIONS = {f"{family}Attention" for family in FAMILIES}
DECODER_LAYERS = {f"{family}DecoderLayer" for family in FAMILIES}
RMS_NORMS = {f"{family}RMSNorm" for family in FAMILIES}
QKV, MLP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
# what each attention passes to the attention kernel beyond LlamaAttention's arguments
_EXTRA_ATTENTION_ARGS = {
    "LlamaAttention": lambda attn: {},
    "MistralAttention": lambda attn: {"sliding_window": getattr(attn.config, "sliding_window",
                                                                None)},
    "Qwen2Attention": lambda attn: {"sliding_window": attn.sliding_window},
    "Qwen3Attention": lambda attn: {"sliding_window": attn.sliding_window},
}

# the transformers releases (major, minor) whose LlamaAttention.forward _attention_with_rope copies
COPIED_ATTENTION_RANGE = ((5, 17), (5, 25))
_COPIED_RELEASES = "-".join(".".join(map(str, release)) for release in COPIED_ATTENTION_RANGE)  # "5.17-5.25"
_SAVED_FORWARD = "_lorakit_saved_forward"  # marks a patched module; holds its previous forward
_PRECOMPUTED = "_lorakit_precomputed"  # (input, output) stashed on q/k/v_proj for one call
_TRITON = "_lorakit_triton"  # marks a module whose patched forward runs Triton kernels


def enable_fast_paths(model: nn.Module, triton: bool = False, native: bool = True,
                      stack: bool | None = None) -> list[str]:
    """Patch every fusable attention, MLP and RMSNorm in place (RMSNorm and RoPE with the
    native ops, or with triton=True the Triton kernels); returns notices for what fell back.
    native=False (without triton) leaves RMSNorm and RoPE to transformers' code (an ablation).
    stack: put the frozen gate and up weights of each fused MLP into one buffer
    (fused_lora.stack_frozen_weights: fewer, larger GEMMs); None: on a GPU, where each launch
    costs CPU time the GPU waits for (on this project's CPU it measured no faster: 2070 against
    2010 ms a SmolLM2 step, the peft rows as far apart).
    Each call starts from the unpatched model, so switching triton, native or stack takes effect."""
    notices, ops = [], native_ops if native else None
    if triton:
        triton_ops, reason = _triton_ops()
        if triton_ops is None:
            notices.append(f"Triton kernels not used ({reason}); the other fast paths stay")
        ops = triton_ops or ops
    # start from the unpatched model: a module patched with other ops (triton, native or neither)
    # would otherwise keep them, wherever the modules' state cannot tell which ops they took
    disable_fast_paths(model)
    notices += _loss_notice(model)  # its check runs a small forward: on the plain modules, before patching
    if stack is None:
        stack = any(p.is_cuda for p in model.parameters())
    fallbacks: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        reason = _patch_if_fusable(module, ops, stack)
        if reason is not None:
            fallbacks[reason].append(name)
    if not fallbacks and not fast_paths_enabled(model):
        fallbacks.setdefault("no Llama-style attention or SwiGLU MLP with LoRA was found", [])
    model.__dict__[TRITON_LOSS] = triton_kernels_enabled(model)
    if stack and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the separate weights' freed blocks: too small for the stacked ones
    return notices + [_notice(reason, names) for reason, names in fallbacks.items()]


def recompute_context_fn(layer: nn.Module) -> Callable | None:
    """torch.utils.checkpoint's context_fn for a checkpoint of this decoder layer starting now:
    its recompute leaves out the fused MLP's output, which only the residual sum reads, unless a
    forward hook could read it (on the layer, its MLP or every module; asked again when the
    recompute starts). None, torch's own contexts, for a layer the fast path does not know, an
    MLP not fused, and under torch.compile or checkpoint's debug mode, which take no others."""
    mlp = getattr(layer, "mlp", None)
    if (type(layer).__name__ not in DECODER_LAYERS or mlp is None or not hasattr(mlp, _SAVED_FORWARD)
            or cpu_gemm.traced() or getattr(torch.utils.checkpoint, "_checkpoint_debug_enabled", None)):
        return None
    return fused_lora.recompute_skipping_mlp_output(
        lambda: not (layer._forward_hooks or mlp._forward_hooks or _global_module_hooks()))


def wants_triton(setting: str, device: torch.device) -> bool:
    """train.triton_kernels for a model on `device`: on, off, or auto (on a CUDA GPU Triton
    supports, where the kernels measured faster; a CPU would run them only in Triton's slow
    interpreter)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda" and triton_supports(device))


TRITON_MIN_CAPABILITY = (8, 0)  # Triton's supported NVIDIA GPUs since 3.3 (a T4 or a V100 is older)


def triton_supports(device: torch.device) -> bool:
    """Whether Triton supports this CUDA device: NVIDIA's of compute capability 8.0 on, or ROCm's
    (a GPU elsewhere, none here, is assumed one it supports)."""
    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY


def _loss_notice(model: nn.Module) -> list[str]:
    """The chunked loss's own check (a small forward, once per model), run here rather than in
    the first training step."""
    get_head = getattr(model, "get_output_embeddings", None)
    reason = chunked_loss_blocker(model) if callable(get_head) and get_head() is not None else None
    return [] if reason is None else [f"the loss computes full logits: {reason}"]


def disable_fast_paths(model: nn.Module) -> None:
    """Undo enable_fast_paths: every patched module gets its previous forward back."""
    for module in model.modules():
        if hasattr(module, _SAVED_FORWARD):
            _restore_forward(module)
        if type(module) is cpu_gemm.CpuGemmLinear:
            module.__class__ = nn.Linear
        for group in _stacked_groups(module):
            fused_lora.unstack_frozen_weights(group)
        module.__dict__.pop(_PRECOMPUTED, None)
        module.__dict__.pop(adapter_casts.CAST_ADAPTERS, None)
        module.__dict__.pop(TRITON_LOSS, None)
        cpu_attention.set_enabled(module, False)


def _stacked_groups(module: nn.Module) -> list[list[nn.Module]]:
    """The projections whose frozen weights enable_fast_paths may have stacked in this module."""
    return [[module.gate_proj, module.up_proj]] if all(hasattr(module, name) for name in MLP) else []


def fast_paths_enabled(model: nn.Module) -> bool:
    """A LoRA projection or MLP runs fused (patched norms, RoPE or attention alone do not count)."""
    return any(hasattr(m, _SAVED_FORWARD) and type(m).__name__ not in (*RMS_NORMS, *ATTENTIONS)
               for m in model.modules())


def triton_kernels_enabled(model: nn.Module) -> bool:
    """Some patched module runs the Triton kernels."""
    return any(module.__dict__.get(_TRITON) for module in model.modules())


def attentions_fused(model: nn.Module) -> bool:
    """Every attention runs its q, k, v as lora_qkv, and its o_proj as lora_linear where adapted
    (the estimator's per-layer model cannot count a mix: a mix answers False)."""
    attentions = [m for m in model.modules() if type(m).__name__ in ATTENTIONS]
    return bool(attentions) and all(hasattr(attn.q_proj, _SAVED_FORWARD) and (
        hasattr(attn.o_proj, _SAVED_FORWARD) or adapter_casts.lora_parts(attn.o_proj) is None) for attn in attentions)


def mlps_fused(model: nn.Module) -> bool:
    """Every SwiGLU MLP runs lora_mlp (which keeps neither silu(gate) nor the SwiGLU product): the
    estimator's per-layer model cannot count a mix, so a mix answers False (the larger estimate)."""
    mlps = [m for m in model.modules() if type(m).__name__ in SWIGLU_MLPS]
    return bool(mlps) and all(hasattr(m, _SAVED_FORWARD) for m in mlps)


def _is_triton(ops) -> bool:
    return ops is not None and ops is not native_ops


def _triton_ops():
    """(the triton_ops module, None) when its kernels can run here, else (None, why not)."""
    from lorakit.kernels import triton_ops  # imports without triton; decides GPU/interpreter
    reason = triton_ops.unavailable_reason()
    return (None, reason) if reason else (triton_ops, None)


def _notice(reason: str, names: list[str]) -> str:
    if not names:
        return reason
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} module(s) ({shown}): {reason}"


ACCELERATE_HOOKED = "accelerate hooks (device_map offload) are attached"


def _accelerate_hooked(module: nn.Module) -> bool:
    """accelerate wraps the module's forward (device_map offload): a patched forward would skip it."""
    return "_hf_hook" in module.__dict__  # not hasattr: a miss goes through nn.Module.__getattr__, 20x slower


def _patch_if_fusable(module: nn.Module, ops, stack: bool) -> str | None:
    """Patch an attention, MLP or RMSNorm module; the reason it was left alone, or None. A plain
    nn.Linear (a frozen layer outside LoRA) becomes a CpuGemmLinear, whose GEMM may run through
    oneDNN on a CPU (kernels/cpu_gemm.py)."""
    if hasattr(module, _SAVED_FORWARD):
        return None
    if type(module) is nn.Linear:  # exactly: quantized subclasses keep their own forward
        if not _accelerate_hooked(module) and "forward" not in module.__dict__:
            module.__class__ = cpu_gemm.CpuGemmLinear
        return None
    if type(module).__name__ in RMS_NORMS:
        return _patch_norm(module, ops) if ops is not None else None
    if all(hasattr(module, p) for p in MLP):
        reason = _mlp_blocker(module)
        if reason is not None:
            return f"the MLP runs unfused ({reason})"
        _set_forward(module, _fused_mlp_forward(_is_triton(ops)), triton=_is_triton(ops))
        if stack:
            fused_lora.stack_frozen_weights([module.gate_proj, module.up_proj])
        return None
    if all(hasattr(module, p) for p in (*QKV, "o_proj")):
        return _patch_attention(module, ops)
    return None


def _patch_norm(norm: nn.Module, ops) -> str | None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or not hasattr(norm, "variance_epsilon"):
        return f"{type(norm).__name__} has no weight / variance_epsilon"
    if _accelerate_hooked(norm):
        return ACCELERATE_HOOKED
    _set_forward(norm, _norm_forward(ops), triton=_is_triton(ops))
    return None


def _mlp_blocker(mlp: nn.Module) -> str | None:
    if type(mlp).__name__ not in SWIGLU_MLPS:
        return f"{type(mlp).__name__} is not an MLP class the fast path knows (it fuses only the ones it has checked)"
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        return f"activation {type(act).__name__} is not SiLU"
    return _group_blocker(mlp, MLP)


def _group_blocker(parent: nn.Module, names: tuple[str, ...]) -> str | None:
    if _accelerate_hooked(parent):
        return ACCELERATE_HOOKED
    for name in names:
        child = getattr(parent, name)
        reason = fuse_blocker(child) or (ACCELERATE_HOOKED if _accelerate_hooked(child) else None)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def _patch_attention(attn: nn.Module, ops) -> str | None:
    if type(attn).__name__ not in ATTENTIONS:
        return f"{type(attn).__name__} is not an attention the fast path knows"
    o_reason = _group_blocker(attn, ("o_proj",))
    if o_reason is None:
        _set_forward(attn.o_proj, _fused_linear_forward)
    qkv_reason = _group_blocker(attn, QKV)
    projections = [getattr(attn, name) for name in QKV] if qkv_reason is None else []
    for proj in projections:
        _set_forward(proj, _precomputed_forward)
    rope_reason = _rope_swap_blocker(attn) if ops is not None else None
    rope_ops = ops if ops is not None and rope_reason is None else None
    cpu_attention.set_enabled(attn, ops is native_ops)  # read by the copy and by varlen_attention
    # without fused q, k, v (LoRA on some of them only, DoRA, none) the copied forward
    # still pays for its RoPE and, on the CPU, its attention: it calls the projections as they are
    if projections or rope_ops is not None:
        _set_forward(attn, _fused_attention_forward(bool(projections), rope_ops),
                     triton=rope_ops is not None and _is_triton(rope_ops))
    if qkv_reason is not None:
        still_fast = "; the fast RoPE (and on a CPU attention) still apply" if rope_ops is not None else ""
        return f"q, k, v run unfused ({qkv_reason}){still_fast}"
    if o_reason is not None:
        return f"o_proj runs unfused ({o_reason})"
    return rope_reason


def _rope_swap_blocker(attn: nn.Module) -> str | None:
    """Why the copied attention forward may not match this attention's, or None. A release
    outside the copied range is refused even when its names still fit: a forward can change
    behind the same signature, and the copy runs by default on CPU."""
    if _accelerate_hooked(attn):
        return ACCELERATE_HOOKED
    version = _transformers_version()
    if not COPIED_ATTENTION_RANGE[0] <= version[:2] <= COPIED_ATTENTION_RANGE[1]:
        return (f"fused RoPE not used: transformers {'.'.join(map(str, version))} is outside "
                f"{_COPIED_RELEASES}, whose attention forward the fast path copies")
    modeling = sys.modules.get(type(attn).__module__)
    interfaces = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    params = inspect.signature(type(attn).forward).parameters
    # transformers 5.24 names the cache `cache`; 5.17 (and other 5.x) `past_key_values`
    if (not hasattr(interfaces, "get_interface") or not hasattr(modeling, "eager_attention_forward")
            or "position_embeddings" not in params
            or not {"cache", "past_key_values"} & params.keys()):
        return ("fused RoPE not used: this transformers version's attention forward differs "
                f"from the {_COPIED_RELEASES} one the fast path copies")
    return None


def _transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:3])


@functools.cache
def _forward_takes_cache_kwarg(attention_class: type) -> bool:
    """True from transformers 5.24, whose attention passes its kwargs on to cache.update."""
    return "cache" in inspect.signature(attention_class.forward).parameters


def _set_forward(module: nn.Module, forward: Callable, triton: bool = False) -> None:
    """Bind forward(module, ...) to the module, once (a projection two attentions share is
    patched by the first)."""
    if _SAVED_FORWARD in module.__dict__:
        return
    # an instance-level forward set by someone else (e.g. accelerate) is kept to restore
    setattr(module, _SAVED_FORWARD, module.__dict__.get("forward"))
    module.forward = _BoundForward(forward, module)
    if triton:
        module.__dict__[_TRITON] = True


class _BoundForward:
    """forward(module, ...) bound to its module, not a closure over it: a deep copy of the model
    binds the copy's to the copy, which then computes with its own weights. Pickling refuses,
    since the forward would not come back: save the adapter, or disable the fast paths first."""

    def __init__(self, function: Callable, module: nn.Module) -> None:
        self.function, self.module = function, module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        return _BoundForward(self.function, copy.deepcopy(self.module, memo))

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self.module).__name__} runs lorakit's fast paths and cannot be pickled; "
                        "call lorakit.kernels.llama_patch.disable_fast_paths(model) first, or save the adapter")


def _restore_forward(module: nn.Module) -> None:
    saved = module.__dict__.pop(_SAVED_FORWARD)
    module.__dict__.pop(_TRITON, None)
    if saved is None:
        del module.forward
    else:
        module.forward = saved


def _runtime_ok(x: torch.Tensor, layers) -> bool:
    """The fused path still applies now: nothing merged or disabled since patching, no autocast,
    no torch.func transform (the fused autograd functions have no setup_context), and no hook on
    a projection or its parts (the fused path reads their weights and would skip the hooks)."""
    if torch.is_autocast_enabled(x.device.type) or cpu_gemm.traced() or _global_module_hooks():
        return False
    return all(fuse_blocker(layer) is None and not _hooked(layer) for layer in layers)


def _hooked(layer: nn.Module) -> bool:
    """A hook on the LoRA layer, its base layer or its factors (accelerate's _hf_hook included).
    Walks the children's dicts itself: asked for every projection on every call, where
    layer.modules() and getattr cost about 4 us a layer."""
    pending = [layer]
    while pending:
        module = pending.pop()
        if module is None:  # a child slot set to None
            continue
        attributes = module.__dict__
        if ("_hf_hook" in attributes or attributes.get("_forward_hooks") or attributes.get("_forward_pre_hooks")
                or attributes.get("_backward_hooks") or attributes.get("_backward_pre_hooks")):
            return True
        pending.extend(attributes.get("_modules", {}).values())
    return False


def _global_module_hooks() -> bool:
    module = torch.nn.modules.module
    hooked = any(getattr(module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                           "_global_backward_hooks", "_global_backward_pre_hooks"))
    if hooked:
        _say_once_global_hooks()
    return hooked


@functools.cache
def _say_once_global_hooks() -> None:
    # a profiler or FLOP counter registers these; a run that suddenly slows should say why
    warnings.warn("a global module hook is registered (torch.nn.modules.module.register_module_forward_hook "
                  "or similar): lorakit's fused paths step aside while it is, so steps run slower",
                  LorakitWarning, stacklevel=2)


def _original(module: nn.Module) -> Callable:
    """The forward the module had before it was patched."""
    saved = module.__dict__.get(_SAVED_FORWARD)
    return saved if saved is not None else type(module).forward.__get__(module)


def _fused_mlp_forward(triton: bool) -> Callable:
    options = {"triton": triton, "checked": True}

    def forward(mlp, x):
        layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return lora_mlp(x, *layers, **options) if _runtime_ok(x, layers) else _original(mlp)(x)
    return forward


def _norm_forward(ops) -> Callable:
    def forward(norm, hidden_states):
        if (torch.is_autocast_enabled(hidden_states.device.type) or cpu_gemm.traced()
                or not ops.runs_on(hidden_states)):
            return _original(norm)(hidden_states)
        return ops.rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    return forward


def _fused_linear_forward(layer, x):
    return lora_linear(x, layer, checked=True) if _runtime_ok(x, (layer,)) else _original(layer)(x)


def _precomputed_forward(proj, x):
    stash = proj.__dict__.pop(_PRECOMPUTED, None)
    if stash is not None and stash[0] is x:
        return stash[1]
    return _original(proj)(x)


def _fused_attention_forward(fused_qkv: bool, rope_ops=None) -> Callable:
    """q, k, v from lora_qkv (with `fused_qkv`; without, each projection's own forward), then
    transformers' forward, or with rope_ops the copy of it that applies RoPE with rope_ops.rope
    (where rope_ops can take the tensors)."""
    def forward(attn, *args, **kwargs):
        projections = [getattr(attn, name) for name in QKV] if fused_qkv else []
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not _runtime_ok(hidden, projections):
            return _original(attn)(*args, **kwargs)
        for proj, out in zip(projections, lora_qkv(hidden, *projections, checked=True) if projections else ()):
            proj.__dict__[_PRECOMPUTED] = (hidden, out)
        try:
            if rope_ops is not None and rope_ops.runs_on(hidden):
                return _attention_with_rope(attn, rope_ops.rope, *args, **kwargs)
            return _original(attn)(*args, **kwargs)
        finally:  # never leave a stale output behind
            for proj in projections:
                proj.__dict__.pop(_PRECOMPUTED, None)
    return forward


def _attention_with_rope(attn, rope, hidden_states, position_embeddings=None,
                         attention_mask=None, cache=None, **kwargs):
    """transformers 5.17-5.25 LlamaAttention.forward (plus Qwen3's q/k norms and the sliding window
    of Mistral/Qwen2/Qwen3), with rope(q, k, cos, sin) for apply_rotary_pos_emb."""
    if "past_key_values" in kwargs:  # the name before 5.24, still accepted since
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    query_states = attn.q_proj(hidden_states).view(hidden_shape)
    key_states = attn.k_proj(hidden_states).view(hidden_shape)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
        query_states, key_states = attn.q_norm(query_states), attn.k_norm(key_states)
    query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
    value_states = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = rope(query_states, key_states, cos, sin)
    if cache is not None:
        extra = {"kwargs": kwargs} if _forward_takes_cache_kwarg(type(attn)) else {}
        key_states, value_states = cache.update(key_states, value_states, attn.layer_idx,
                                                **extra)

    options = dict(dropout=0.0 if not attn.training else attn.attention_dropout,
                   scaling=attn.scaling, **_EXTRA_ATTENTION_ARGS[type(attn).__name__](attn))
    if _cpu_attention_applies(attn, query_states, key_states, value_states, attention_mask,
                              options, kwargs):
        attn_output, attn_weights = cpu_attention.causal_attention(
            query_states, key_states, value_states, attn.scaling), None
    else:
        modeling = sys.modules[type(attn).__module__]
        attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, modeling.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            attn, query_states, key_states, value_states, attention_mask, **options, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return attn.o_proj(attn_output), attn_weights


def _cpu_attention_applies(attn, query, key, value, attention_mask, options, kwargs) -> bool:
    """cpu_attention computes what the model's SDPA call would compute here."""
    return (cpu_attention.enabled_for(attn) and attn.config._attn_implementation == "sdpa"
            and kwargs.get("is_causal", getattr(attn, "is_causal", True))
            and not any(kwargs.get(name) is not None for name in ("softcap", "s_aux"))
            and cpu_attention.attention_blocker(query, key, value, attention_mask, options["dropout"],
                                                options.get("sliding_window")) is None)
