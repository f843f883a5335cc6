"""QLoRA: LoRA adapters on a base model whose linear layers are stored in 4 or 8 bits.

    model folder ─► transformers + bitsandbytes ─► decoder linears quantised, the rest in the
                                                   compute dtype (embeddings, norms, output head)
                 ─► apply_lora: each Linear4bit / Linear8bitLt is wrapped like any nn.Linear

    y = dequant(W_q) x + s · B A x        W_q frozen in 4/8 bits; A, B trained in fp32 masters

4bit is QLoRA's NF4 (4-bit NormalFloat codes, one absmax per 64 weights; "double quantisation"
stores those absmax values in 8 bits with one fp32 scale per 256 of them: ~4.13 bits a weight)
computing in bf16 (below); 8bit is LLM.int8 (int8 rows, one fp32 scale per output row, outlier input
features kept in 16 bits).

The compute dtype (the unquantised layers' too) is --dtype auto's, as for a dense model: bf16,
except on a CPU without bf16 instructions (AVX512-BF16 or AMX), where torch emulates bf16
products (a bf16 step's products took 46x fp32's time on one such CPU: kernels/cpu_gemm.py) and
bitsandbytes multiplies its dequantised weights with torch's own: there it is fp32; and on a GPU
without bf16 arithmetic (a T4, a V100), fp16, the loss scaled (train/precision.py). Any --dtype
asks for that dtype instead. The 4/8-bit weights are the same either way.

Preparing for k-bit training, the lean way: PEFT's prepare_model_for_kbit_training casts every
unquantised parameter to fp32 (for Llama-8B the embeddings and head alone: +2 GB, and fp32
activations after every norm). lorakit keeps them in the compute dtype: they are frozen, and
the RMSNorm / LayerNorm statistics are computed in fp32 inside the norms anyway. It only makes
sure the embeddings' output requires grad while activation checkpointing is on (reentrant
checkpoints need a grad-requiring input to backpropagate through a layer).

Merging (merge.py, `lorakit merge --quantize`): `dequantize_model` replaces each quantised linear
by a dense nn.Linear holding exactly the weight the kernel multiplies by, checked against the
kernel itself with one-hot inputs (x = e_j reads column j of W: exact in NF4, and in LLM.int8,
whose int8 rounding of the input is exact for a one-hot row); the adapters are then merged into
those fp32 weights like into any dense base, and the result is cast once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from lorakit.config import QUANTIZE
from lorakit.errors import ConfigError, MergeError, first_line

QUANTIZE_CHOICES = tuple(q for q in QUANTIZE if q != "none")
COMPUTE_DTYPE = torch.bfloat16
INSTALL_HINT = "pip install bitsandbytes (or pip install 'lorakit[qlora]')"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
# The one-hot check reads PROBE_COLUMNS columns of W back through the kernel. The kernel's output
# is W rounded to bf16 (< 2^-9 relative); skipping the dequantisation would leave the int8 error
# (> 0.4% of a row's RMS even for uniform weights) or NF4's (~10%): far above this tolerance.
PROBE_COLUMNS = 8
DEQUANT_RTOL = 2e-3


# ---- loading ---------------------------------------------------------------------------------

def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or explain how to get it."""
    quiet_hub_kernel_advice()
    try:
        import bitsandbytes
    except Exception as exc:  # not installed, or its native library cannot load here
        raise ConfigError(f"--quantize needs the bitsandbytes package, which is not installed or cannot load "
                          f"({type(exc).__name__}: {exc}); {INSTALL_HINT}, or drop --quantize") from None
    return bitsandbytes


def quiet_hub_kernel_advice() -> None:
    """Before bitsandbytes is imported (by lorakit, or by PEFT's import): on a CPU with AVX512-BF16
    it fetches a 4-bit GEMM from the Hugging Face Hub through the `kernels` package and, without
    it, warns on every run; lorakit fetches no Hub kernels (models.WITHOUT_HUB_KERNELS), and
    bitsandbytes' own CPU kernel is what runs. That one warning is left out."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_without_hub_kernel_advice)


def _without_hub_kernel_advice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def compute_dtype(device: str | torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype a quantised model computes in on `device` for --dtype `dtype`: auto is what
    `lorakit train` loads a dense model in there (models.training_dtype): bf16 where the hardware
    multiplies it, else fp32 on a CPU and fp16 on a GPU (a T4, a V100: train/precision.py)."""
    from lorakit.models import training_dtype

    return getattr(torch, training_dtype(dtype, torch.device(device).type))


def bnb_config(quantize: str, dtype: torch.dtype = COMPUTE_DTYPE) -> Any:
    """BitsAndBytesConfig for QLoRA's NF4 (double quantisation, computing in `dtype`) or LLM.int8."""
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or none), got {quantize!r}")


def load_quantized(spec: str | os.PathLike | None, quantize: str, allow_pickle: bool = False,
                   device: str | None = None, dtype: str = "auto") -> tuple[Any, Any, Any]:
    """Load a model with its linear layers in 4 or 8 bits: (model, tokenizer, ModelSource).

    device: this process's GPU when there is one (under torchrun, the local rank's: init_from_env
    set it), else "cpu" (bitsandbytes >= 0.48 runs both on CPU). dtype: --dtype (auto:
    `compute_dtype` decides)."""
    from lorakit import models

    check_quantize(quantize)
    require_bitsandbytes()
    source = models.resolve_model(spec)
    if source.kind in ("gguf", "builtin"):
        raise ConfigError(_gguf_message(source))
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")

    def from_pretrained(target: str, kwargs: dict) -> Any:
        return _from_pretrained(source, target, kwargs, quantize, device, compute_dtype(device, dtype))

    model, tokenizer = models.load_pretrained(source, from_pretrained, allow_pickle)
    prepare_for_kbit_training(model)
    return model, tokenizer, source


def trained_quantize(adapter: str | os.PathLike) -> str | None:
    """"4bit" or "8bit" where the run the adapter comes from trained on a quantised base (its
    config.yaml beside the adapter folder), else None."""
    from lorakit.config import load_yaml
    from lorakit.errors import LorakitError
    from lorakit.lora.adapter_folder import run_of

    run = run_of(adapter)
    try:
        trained = load_yaml(run / "config.yaml").get("model", {}).get("quantize") if run else None
    except LorakitError:  # a config edited since: nothing known
        return None
    return trained if trained in QUANTIZE_CHOICES else None


def inference_quantize(quantize: str | None, adapter) -> tuple[str, list[str]]:
    """(the bits eval and generate load the base in, notes): --quantize where given, else those
    the adapter's run trained on (its eval loss was the quantised model's), else none."""
    trained = trained_quantize(adapter) if adapter else None
    chosen = quantize or trained or "none"
    if quantize is None and trained:
        return chosen, [f"base in {trained}, as the run trained (its config.yaml); --quantize none for the "
                        "full-precision base"]
    if trained and chosen != trained:
        return chosen, [f"--quantize {chosen}, where the run trained on the {trained} base: another model than "
                        "training's"]
    return chosen, []


def load_for_inference(spec, quantize: str, device: str, dtype: str, allow_pickle: bool = False,
                       chosen_by_run: bool = False):
    """(model, tokenizer, dtype name) for eval and generate: the base dense in `dtype` on `device`
    (see models.inference_placement), or in 4/8 bits computing in `compute_dtype`. `chosen_by_run`:
    the bits are the adapter's run's, not a --quantize the user gave (a refusal says how to leave them)."""
    from lorakit import models

    if quantize == "none":
        placement, dtype = models.inference_placement(device, dtype)
        model, tokenizer, _ = models.load_model_and_tokenizer(spec, dtype=dtype, device=placement,
                                                              allow_pickle=allow_pickle)
        return model, tokenizer, dtype
    placement, _ = models.inference_placement(device, "bfloat16")
    try:
        model, tokenizer, _ = load_quantized(spec, quantize, allow_pickle, device=placement, dtype=dtype)
    except ConfigError as exc:
        if not chosen_by_run:
            raise
        raise ConfigError(f"{exc}. The {quantize} base is the one the adapter's run trained on (its config.yaml): "
                          "--quantize none loads the full-precision base instead") from None
    return model, tokenizer, str(compute_dtype(placement, dtype)).removeprefix("torch.")


def _from_pretrained(source, target: str, kwargs: dict, quantize: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map={"": device},
                                                           quantization_config=bnb_config(quantize, dtype), **kwargs)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as exc:
        if "bitsandbytes" in str(exc) or "GPU" in str(exc):  # transformers' quantizer refused this machine
            raise ConfigError(f"--quantize {quantize} cannot run here ({type(exc).__name__}: "
                              f"{first_line(exc)}); it needs a CUDA GPU, or bitsandbytes >= 0.48 "
                              "on CPU (pip install -U bitsandbytes); or drop --quantize") from exc
        raise  # models.load_pretrained names the model in a ModelLoadError
    if not any(_quantized_linears(model)):
        raise ConfigError(f"loading {source.location} with --quantize {quantize} quantised no linear layer; "
                          "this architecture has no nn.Linear layers bitsandbytes can replace: drop --quantize")
    return model, info


def _gguf_message(source) -> str:
    from lorakit.gguf_convert import converted_gguf_dir

    folder = converted_gguf_dir(source.location)
    state = "already converted to" if folder.is_dir() else "converted on first use, without --quantize, to"
    return (f"--quantize cannot load {source.location} directly: a .gguf file is already quantised by "
            "llama.cpp, and lorakit reads it by dequantising it to a dense transformers folder; quantising that "
            "again to 4/8 bits stacks a second rounding on the first. Best: pass the original transformers model "
            f"(hub id or folder) with --quantize. Otherwise quantise the dense folder it is {state} "
            f"{folder}: --model {folder}")


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze the base and keep it lean (see the module docstring); idempotent."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in _quantized_linears(model):
        # bitsandbytes repacks 4-bit weights for its AVX512 CPU inference kernel on the first eval
        # forward, with bf16 absmax: keep one layout (and one set of numerics) for train and eval
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and not getattr(model, "_lorakit_input_grad_hook", False):
        embeddings.register_forward_hook(_make_output_require_grad(model))
        model._lorakit_input_grad_hook = True
    # LLM.int8 casts bf16 inputs to fp16 for its int8 quantisation and logs it at every call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return model


def _make_output_require_grad(model: nn.Module):
    def hook(module, inputs, output):
        # cheapest tests first: generation (eval, no grad) never walks the modules
        if model.training and torch.is_grad_enabled() and output.is_floating_point() and _checkpointing_on(model):
            output.requires_grad_(True)
    return hook


def _checkpointing_on(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.x; the old name warns
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _quantized_linears(model: nn.Module):
    from lorakit.lora.layer import is_quantized_linear

    return (module for module in model.modules() if is_quantized_linear(module))


# ---- dequantising (for merging) --------------------------------------------------------------

@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = COMPUTE_DTYPE, device: str | torch.device | None = None,
                     verify: bool = True) -> int:
    """Replace every bitsandbytes linear (adapted or not) by a dense nn.Linear; returns how many.

    Each dense weight is the one the kernel multiplies by (4-bit: dequantised to the compute
    dtype, as the kernel does; 8-bit: int8 x row scale in fp32), cast to `dtype` and moved to
    `device` (default: where it is), one layer at a time. verify=True first reads PROBE_COLUMNS columns back through
    the layer's own kernel and raises MergeError if the dense weight differs."""
    from lorakit.lora.layer import dequantize_weight, is_quantized_linear
    from lorakit.lora.model import parent_and_child

    names = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in names:
        parent, child = parent_and_child(model, name)
        quantized = getattr(parent, child)
        weight = dequantize_weight(quantized).float()  # 4-bit: the kernel's values (its compute dtype's), exactly
        if verify:
            check_dequantized(quantized, weight, name)
        setattr(parent, child, _dense_linear(quantized, weight).to(device=device, dtype=dtype))
        del quantized, weight
    _forget_quantization(model)
    return len(names)


def _dense_linear(quantized: nn.Module, weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    bias = getattr(quantized, "bias", None)
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=torch.float32)
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias.float())
    dense.requires_grad_(False)
    return dense


def check_dequantized(quantized: nn.Module, weight: torch.Tensor, name: str = "layer") -> float:
    """Relative error between columns of `weight` and the same columns read through the layer's
    own kernel (one-hot inputs: exact in NF4 and in LLM.int8's int8 input quantisation)."""
    columns = torch.linspace(0, weight.shape[1] - 1, min(PROBE_COLUMNS, weight.shape[1])).long()
    probe = torch.zeros(len(columns), weight.shape[1], dtype=_kernel_dtype(quantized), device=weight.device)
    probe[torch.arange(len(columns)), columns] = 1.0
    if hasattr(quantized, "support_avx512bf16_for_cpu"):
        quantized.support_avx512bf16_for_cpu = False  # its repacking would change the weights read
    was_training = quantized.training
    quantized.eval()
    read = quantized(probe)  # (k, out), W[:, columns].T rounded to the output dtype
    quantized.train(was_training)
    if getattr(quantized, "bias", None) is not None:
        read = read - quantized.bias.to(read.dtype)
    expected = weight[:, columns].T.to(read.dtype).float()
    read = read.float()
    error = float((read - expected).norm() / expected.norm().clamp_min(1e-30))
    if not error <= DEQUANT_RTOL:
        raise MergeError(f"dequantising {name} gives a weight that differs from what its 4/8-bit kernel computes "
                         f"(relative error {error:.2g} > {DEQUANT_RTOL:g}); this bitsandbytes version stores "
                         "weights in a layout lorakit does not know: please report it, with `pip show bitsandbytes`")
    return error


def _kernel_dtype(quantized: nn.Module) -> torch.dtype:
    compute = getattr(quantized, "compute_dtype", None)
    return compute if compute in (torch.float16, torch.bfloat16, torch.float32) else COMPUTE_DTYPE


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' quantisation records so .to(dtype) and save_pretrained treat the model
    as the plain dense model it now is."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr in ("hf_quantizer", "quantization_method") else False)
    for module in model.modules():
        sub_config = getattr(module, "config", None)
        if getattr(sub_config, "_is_quantized", False):
            sub_config._is_quantized = False
