"""The LoRA layer: a frozen base layer plus a trainable low-rank update.

        x ──► base_layer (W, frozen) ──────────────────────────┐
        │                                                      ▼
        └─► dropout ─► lora_A (r x in) ─► lora_B (out x r) ─► × s ─► (+) ─► y

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts like nn.Linear's default (Kaiming-uniform, a=sqrt(5), as in the LoRA paper's
reference code) and B at zero, so training starts exactly at the base model.

DoRA (weight-decomposed LoRA) learns a magnitude per output row instead of letting it drift:
    W' = m · (W + s B A) / ||W + s B A||_row,   with the norm treated as a constant in backward.
PiSSA starts A and B from the top-r singular vectors of W and keeps the residual as the base;
the initial factors are kept so the adapter can be saved as a plain LoRA for the original W.

The adapter's master weights stay in fp32 when the base is fp16/bf16 (optimizer precision);
while autograd records (training), the forward casts these small matrices to the activation
dtype, so the GEMMs run in the activation dtype and gradients still reach the fp32 masters.
Without autograd (generation, evaluation) it computes the update as PEFT does: in fp32, added
to the base output in fp32 and rounded once.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitWarning
from lorakit.kernels import cpu_gemm

try:  # GPT-2 style layers store W as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, LoraLinear):
        return "lora"
    if isinstance(module, nn.Linear):
        return "linear" if computes_a_linear_map(module) else type(module).__name__
    if is_conv1d(module):
        return "conv1d"
    return type(module).__name__


# (class, in, out, device type) -> whether such an nn.Linear subclass maps x to x Wᵀ + b (see below)
_LINEAR_SUBCLASS_VERDICTS: dict[tuple[type, int, int, str], bool] = {}


def computes_a_linear_map(module: nn.Linear) -> bool:
    """nn.Linear subclasses with their own forward: some are linear layers in another form
    (Falcon's, transformers' fp8 and bitnet layers, lorakit's CpuGemmLinear), others are not a
    layer an adapter can sit beside: MoE routers returning (scores, experts) tuples (PhiMoE,
    Llama 4) or grouped projections (DeepSeek-V4). One probe call per class and shape decides."""
    if type(module).forward is nn.Linear.forward or is_quantized_linear(module):
        return True
    key = (type(module), module.in_features, module.out_features, module.weight.device.type)  # meta may differ
    if key not in _LINEAR_SUBCLASS_VERDICTS:
        _LINEAR_SUBCLASS_VERDICTS[key] = _returns_one_output_row_per_input_row(module)
    return _LINEAR_SUBCLASS_VERDICTS[key]


def _returns_one_output_row_per_input_row(module: nn.Linear) -> bool:
    weight = module.weight
    dtype = weight.dtype if weight.is_floating_point() and weight.element_size() > 1 else torch.float32
    probe = torch.ones(2, module.in_features, dtype=dtype, device=weight.device)
    try:  # a router's jitter draws random numbers: the caller's generator must not move
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = type(module).forward(module, probe)  # the class's own, past any hook on the instance
    except Exception:  # a forward that cannot take (rows, in_features) is not a plain linear layer
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (2, module.out_features)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoraLinear(nn.Module):
    """Wraps an nn.Linear or GPT-2 Conv1D (or a bitsandbytes quantised Linear)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, scaling: float,
                 dropout: float = 0.0, use_dora: bool = False, init: str = "kaiming"):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r, self.lora_alpha, self.scaling = r, alpha, scaling
        self.use_dora, self.init = use_dora, init
        weight = base_layer.weight
        master = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype
        factory = dict(device=weight.device, dtype=master)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(init)

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "pissa":
            self._init_pissa()
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            norm = self.base_weight().float().norm(p=2, dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))

    @torch.no_grad()
    def _init_pissa(self) -> None:
        if is_quantized_linear(self.base_layer):
            from lorakit.errors import ConfigError

            raise ConfigError("init 'pissa' rewrites the base weight, which a 4-/8-bit quantised base cannot "
                              "hold; use init 'kaiming' or 'gaussian' with --quantize, or a dense base for PiSSA")
        weight = self.base_weight().float()  # (out, in)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)
        a = root[:, None] * vh[: self.r]  # (r, in)
        b = u[:, : self.r] * root[None, :]  # (out, r)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self._set_base_weight(weight - self.scaling * (b @ a))
        # the initial factors: a saved adapter must describe the change from the original W
        self.register_buffer("pissa_A0", a.clone(), persistent=False)
        self.register_buffer("pissa_B0", b.clone(), persistent=False)

    # ---- base weight access (out, in orientation) ------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """W as (out, in); a bitsandbytes 4-/8-bit base is dequantised (a temporary copy)."""
        if is_quantized_linear(self.base_layer):
            return dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    # A model that reads a layer's weight (its dtype before calling it, or, as Jamba's mamba mixer
    # with dt_proj, to multiply by it instead of calling the layer) gets the base layer's, as under
    # PEFT. An adapter the model never calls gets no gradient: the trainer says so after its first step.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _set_base_weight(self, new_weight: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if is_quantized_linear(self.base_layer) or not weight.is_floating_point():
            from lorakit.errors import MergeError

            raise MergeError("cannot write into a 4-/8-bit quantised base weight; dequantise the base first "
                             "(lorakit.quantize.dequantize_model, or `lorakit merge --quantize`)")
        value = new_weight.T if self.fan_in_fan_out else new_weight
        weight.data.copy_(value.to(weight.dtype))

    def _warn_if_training_while_merged(self) -> None:
        # the merged update is a constant in the weight: the factors get no gradient, and torch's own
        # error at backward ("does not require grad") names neither the cause nor the fix
        if self.training and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
            warnings.warn("this model's adapters are merged into the base weights (merge_lora), so training "
                          "cannot reach them: call unmerge_lora(model) before training (for inference, "
                          "model.eval() or torch.no_grad() silences this)", LorakitWarning, stacklevel=2)

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return self._original_output(x, result)
        if self.merged:
            self._warn_if_training_while_merged()
            return result
        dropped = self.lora_dropout(x)
        if not (self.use_dora or torch.is_grad_enabled()):
            return self._add_update_in_master_dtype(result, dropped)
        dtype = dropped.dtype if torch.is_floating_point(dropped) else self.lora_A.weight.dtype
        a = self.lora_A.weight.to(dtype)
        b = self.lora_B.weight.to(dtype)
        # a 16-bit dtype this CPU has no instructions for: products in fp32 (kernels/cpu_gemm.widens)
        linear = cpu_gemm.linear if cpu_gemm.widens(dropped) else F.linear
        lora = linear(linear(dropped, a), b)  # (..., out)
        if self.use_dora:
            return result + self._dora_term(dropped, result, lora)
        return result + (lora * self.scaling).to(result.dtype)

    def _add_update_in_master_dtype(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Without autograd (generation, evaluation) the update as PEFT computes it: in the masters'
        dtype (fp32), added to the base output in that dtype, rounded once; so an adapter answers
        as it does under PEFT. On a CPU, 16-bit rank-r products also cost more than fp32 ones:
        decoding with the demo adapter in bf16 took 85 ms a token against 100 (AMD Zen 3)."""
        master = self.lora_A.weight.dtype
        update = F.linear(F.linear(x.to(master), self.lora_A.weight), self.lora_B.weight)
        return (result.to(master) + update * self.scaling).to(result.dtype)

    def _original_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the layer computed before the adapter touched W, from the base layer's `result`:
        a merged update taken out again, PiSSA's principal part (moved from W into the adapter at
        init) put back. W is left as it is, so disabling never drifts the weights."""
        pissa = hasattr(self, "pissa_A0")
        if not (self.merged or pissa):
            return result
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        out = result.float()
        if self.merged:
            bias = getattr(self.base_layer, "bias", None)
            if self.use_dora:  # merged W' = f (W + sBA): W x = (y - b) / f - sBA x
                unbiased = out if bias is None else out - bias.float()
                out = unbiased / self._dora_factor + (0 if bias is None else bias.float())
            out = out - self._low_rank(x, self.lora_A.weight, self.lora_B.weight, dtype)
        if pissa:
            out = out + self._low_rank(x, self.pissa_A0, self.pissa_B0, dtype)
        return out.to(result.dtype)

    def _low_rank(self, x, a, b, dtype) -> torch.Tensor:
        """s · x Aᵀ Bᵀ in fp32."""
        return self.scaling * F.linear(F.linear(x.to(dtype), a.to(dtype)), b.to(dtype)).float()

    @torch.no_grad()
    def restore_base(self) -> None:
        """Write the original W back into the base layer: unmerge, and undo PiSSA's residual."""
        self.unmerge()
        if hasattr(self, "pissa_A0"):
            original = self.base_weight().float() + self.scaling * (self.pissa_B0.float() @ self.pissa_A0.float())
            self._set_base_weight(original)
            del self.pissa_A0, self.pissa_B0

    def _dora_term(self, dropped, result, lora) -> torch.Tensor:
        weight = self.base_weight()
        combined = weight.float() + self.delta_weight()
        # the norm is a constant in backward (DoRA paper, section 4.3): cheaper, same fixed point
        norm = combined.norm(p=2, dim=1).detach()
        scale = (self.lora_magnitude_vector.float() / norm).to(result.dtype)  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias
        else:
            base = F.linear(dropped, weight.to(dropped.dtype))
        return (scale - 1) * base + scale * (lora * self.scaling).to(result.dtype)

    # ---- merge -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (computed in fp32, cast once). Idempotent."""
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all() or (self.use_dora and not torch.isfinite(self.lora_magnitude_vector).all()):
            from lorakit.errors import MergeError

            raise MergeError("the adapter holds NaN or inf values; refusing to merge it into the base weights")
        weight = self.base_weight().float()
        if self.use_dora:
            combined = weight + delta
            self._dora_factor = self.lora_magnitude_vector.float() / combined.norm(p=2, dim=1)
            merged = self._dora_factor[:, None] * combined
        else:
            merged = weight + delta
        self._set_base_weight(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_weight().float()
        if self.use_dora:
            weight = weight / self._dora_factor[:, None]
        self._set_base_weight(weight - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        kind = "rslora" if not math.isclose(self.scaling, self.lora_alpha / self.r) else "lora"
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, {kind}, dora={self.use_dora}"


# ---- bitsandbytes quantised bases --------------------------------------------------------------
# bitsandbytes' Linear4bit (NF4/FP4 codes + blockwise absmax, optionally double-quantised) and
# Linear8bitLt (LLM.int8: int8 rows + one fp32 scale per output row) subclass nn.Linear, so the
# engine wraps them like any linear layer; only reading W needs care.

def is_quantized_linear(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # never imported here: a quantised model has loaded it
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out, in) weight a bitsandbytes layer multiplies by.

    4-bit: in the quant state's dtype (the compute dtype), exactly what the kernel uses.
    8-bit: CB * SCB / 127 in fp32 (the kernel's effective weight before any rounding).
    `dtype` asks for another dtype (computed in fp32 first, then cast once)."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        _unpack_cpu_4bit(weight)
        state = weight.quant_state
        if dtype is not None and dtype != state.dtype:
            state = copy.copy(state)  # dequantise straight into the requested dtype
            state.dtype = torch.float32
            return bnbf.dequantize_4bit(weight.data, state).to(dtype)
        return bnbf.dequantize_4bit(weight.data, state)
    cb, scb = _int8_codes_and_scales(layer)
    if hasattr(bnbf, "int8_vectorwise_dequant"):
        dense = bnbf.int8_vectorwise_dequant(cb, scb)
    else:  # bitsandbytes < 0.45
        dense = cb.float() * scb.float()[:, None] / 127
    return dense if dtype is None else dense.to(dtype)


def _unpack_cpu_4bit(weight: torch.Tensor) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512 CPU inference kernel on the first eval
    forward; undo that (as bitsandbytes does itself before saving) so dequantize_4bit reads it."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _int8_codes_and_scales(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 keeps CB/SCB on the weight until the first forward, then on layer.state."""
    weight, state = layer.weight, getattr(layer, "state", None)
    cb = weight.CB if getattr(weight, "CB", None) is not None else getattr(state, "CB", None)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
    if cb is None or scb is None:
        raise RuntimeError("this 8-bit layer holds no int8 weights and scales (CB/SCB); was it moved to a device?")
    return cb, scb
