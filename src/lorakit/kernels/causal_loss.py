"""The trainer's loss: next-token cross-entropy of a causal LM without its full logits.

causal_lm_loss(model, batch, normalizer) runs the decoder stack for the final hidden states and
applies chunked_ce.chunked_lm_head_loss with the labels shifted by one, so full logits never
exist, wherever the model's logits are exactly its output head applied to the last hidden state
(chunked_loss_blocker says why not otherwise: a head that rescales or caps its logits, a head
that is not a linear layer; such models get transformers' full logits and torch's
cross-entropy).

A mixture-of-experts model whose config asks for its router's load-balancing loss
(output_router_logits) trains on it too, as transformers' own loss adds it (`router_aux=True`, the
trainer's steps; an eval scores the cross-entropy alone).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels import cpu_gemm
from lorakit.kernels.chunked_ce import IGNORE_INDEX, chunked_lm_head_loss

# on a model whose modules run Triton kernels (set by llama_patch.enable_fast_paths): the loss
# takes its Triton kernel too (read on every step: no walk over the modules there)
TRITON_LOSS = "_lorakit_triton_loss"


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                   normalizer: float | int | torch.Tensor | None = None, *,
                   chunk_size: int | None = None, router_aux: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: sum over label tokens / normalizer.

    batch: model inputs plus optional "labels" (default: input_ids), -100 where no loss.
    Labels are shifted here, as transformers does. normalizer None = mean over label tokens.
    Heads that rescale logits (softcapping, logit scale) fall back to full logits.
    chunk_size: rows per lm_head + loss chunk (None: chunked_ce's budget, 128 MiB of fp32 logits,
    256 MiB for an fp32 head on the CPU).
    router_aux: add the router's load-balancing loss where the model's config asks for it, weighted
    by this batch's share of the normalizer's tokens (over a step's micro-batches: their mean).
    """
    triton = model.__dict__.get(TRITON_LOSS, False)  # as enable_fast_paths found it
    if hasattr(model, "get_base_model"):  # a PEFT model: its base_model_prefix names the wrapper's model
        model = model.get_base_model()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.setdefault("use_cache", False)
    labels = batch["labels"] if "labels" in batch else batch["input_ids"]
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T)
    head = model.get_output_embeddings()
    if chunked_loss_blocker(model) is not None:
        return _full_logits_loss(model, inputs, shifted, normalizer, router_aux)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state  # (B, T, H)
    return chunked_lm_head_loss(hidden, head.weight, shifted, normalizer=normalizer,
                                chunk_size=chunk_size, bias=head.bias, triton=triton)


# config fields of heads that transform the logits after the output projection
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "lm_head_multiplier", "logit_softcapping")
_HEAD_CHECKED = "_lorakit_head_check"  # model.__dict__: why its logits are not head(last hidden), or None


# causal LMs whose logits are exactly lm_head(last hidden state) (transformers 5.17-5.25): no check
HEAD_IS_A_PROJECTION = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                        "GPT2LMHeadModel"}


def chunked_loss_blocker(model: nn.Module) -> str | None:
    """Why causal_lm_loss must compute full logits for this model, or None (it chunks)."""
    if hasattr(model, "get_base_model"):  # a PEFT model: the checks are about the model it wraps
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, cpu_gemm.CpuGemmLinear):
        return f"output head is {type(head).__name__}, not a plain nn.Linear"
    config = getattr(model, "config", None)
    for field in LOGIT_TRANSFORMS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            return f"the model rescales its logits ({field})"
    if getattr(config, "output_router_logits", False):  # the model's own forward computes that loss
        return "the model adds its router's load-balancing loss (output_router_logits)"
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not hasattr(model, prefix):
        return "the model has no decoder backbone attribute to call"
    if type(model).__name__ in HEAD_IS_A_PROJECTION:
        return None
    if _HEAD_CHECKED not in model.__dict__:
        reason, lasting = _head_mismatch(model, getattr(model, prefix), head)
        if not lasting:
            return reason
        model.__dict__[_HEAD_CHECKED] = reason
    return model.__dict__[_HEAD_CHECKED]


def _head_mismatch(model: nn.Module, backbone: nn.Module, head: nn.Module) -> tuple[str | None, bool]:
    """(why the model's logits are not the projection of its backbone's last hidden state, or None;
    whether that answer lasts). The chunked loss computes that projection; a model whose logits are
    something else (RoBERTa's dense layer and norm first, a multiplier, a cap) keeps its own. The
    model and the backbone (called as the chunked loss calls it: OPT's own forward skips it for its
    decoder) each run two tokens in eval mode without gradients."""
    ids = torch.tensor([[0, 1]], device=head.weight.device)
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
            mine = F.linear(hidden, head.weight, head.bias).float()  # as the chunked loss
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return "its logits could not be checked against the output head (out of memory)", False
    except RuntimeError as exc:  # the CPU allocator's out of memory is a RuntimeError ("can't allocate memory")
        lasting = "allocate" not in str(exc).lower() and "out of memory" not in str(exc).lower()
        return f"its logits could not be checked against the output head ({type(exc).__name__})", lasting
    except Exception as exc:  # noqa: BLE001 - a model that cannot run this check keeps its own logits
        return f"its logits could not be checked against the output head ({type(exc).__name__})", True
    finally:
        for module, training in modes.items():
            module.training = training
    scale = float(logits.abs().max().clamp_min(1e-6))
    if mine.shape != logits.shape or float((mine - logits).abs().max()) > 1e-3 * scale:
        return "its logits are not the output head applied to the last hidden state", True
    return None, True


def _full_logits_loss(model, inputs, shifted, normalizer, router_aux: bool):
    if not router_aux and getattr(model.config, "output_router_logits", False):  # an eval: no router loss at all
        inputs = {**inputs, "output_router_logits": False}
    outputs = model(**inputs)
    logits = outputs.logits.float()  # (B, T, V)
    total = F.cross_entropy(logits.flatten(0, -2), shifted.flatten().to(logits.device),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (shifted != IGNORE_INDEX).sum()
    loss = total / (labelled.clamp_min(1) if normalizer is None else normalizer)
    aux = getattr(outputs, "aux_loss", None) if router_aux else None
    if aux is None:
        return loss
    coefficient = getattr(model.config, "router_aux_loss_coef", 0.0)
    share = 1.0 if normalizer is None else labelled / normalizer  # the step's sum: the token-weighted mean
    return loss + coefficient * share * aux.to(loss.device)
