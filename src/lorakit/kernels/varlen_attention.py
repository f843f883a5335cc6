"""Exact attention for packed rows without a (B, 1, T, T) mask: one causal SDPA per document.

A packed batch (``collate(..., packed_attention="varlen")``) carries its document boundaries as
``cu_seq_lens_q`` / ``cu_seq_lens_k``: cumulative lengths over the B*T tokens read as one long
sequence (the convention of flash-attention's varlen API, which transformers uses), each
padding token a segment of its own. transformers hands these kwargs, like
``position_ids``, from the model's forward down to the attention function, so::

    model.set_attn_implementation("lorakit_varlen")   # or use_varlen_attention(model)
    out = model(**batch)                                # no attention_mask, nothing B*T*T

runs ``scaled_dot_product_attention(is_causal=True)`` on each document's slice (documents of
equal length share one batched call), so no token attends across a boundary and no work is
spent on the cross-document blocks. Without ``cu_seq_lens`` the boundaries are read from
restarting ``position_ids`` (the rule transformers uses to detect packing). On the CPU, the
attention modules to which enable_fast_paths gave the native ops run lorakit's
``cpu_attention.causal_attention`` in place of those SDPA calls.

On a CUDA GPU, in bf16/fp16 without dropout, torch's own varlen kernel
(``torch.nn.attention.varlen.varlen_attn``, flash attention over the cumulative bounds) does
all documents in one call instead. Its first call in a process is checked against the
per-document SDPA path (its forward output; `scripts/gpu_kernels.py` checks its gradients on a
GPU); if it raises or disagrees, the per-document path is used from then on and one warning
says why. A model's attention modules can opt out (``per_document_only``).

The matching mask entry (``ALL_MASK_ATTENTION_FUNCTIONS["lorakit_varlen"]``) builds nothing
when there is no padding mask and no cache offset; otherwise (a padded batch, generation with
a cache) it builds what ``sdpa`` would, and the attention function hands that call to
transformers' ``sdpa_attention_forward`` unchanged. A 4D mask in the batch is passed through
to SDPA as well, so every batch layout stays exact under this implementation.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lorakit.errors import LorakitWarning, first_line
from lorakit.kernels import cpu_attention

VARLEN = "lorakit_varlen"
# plain causal self-attention, position_ids handed to the attention function: checked exact
# against the 4D-mask path in tests/kernels/test_varlen_attention.py
VERIFIED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_GQA_IN_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_PREVIOUS = "_lorakit_attn_before_varlen"  # set on a model by use_varlen_attention


@dataclass(frozen=True)
class Segments:
    """Documents of a (B, T) batch: each row's segment lengths, and the segments (numbered in
    token order) of each length."""

    width: int
    rows: tuple[tuple[int, ...], ...]  # segment lengths of each row, summing to width
    groups: dict[int, tuple[int, ...]]  # length -> segment numbers
    # the cumulative bounds as int32 on each device that asked (the varlen kernel's input)
    device_bounds: dict = field(default_factory=dict, compare=False, repr=False)

    def bounds_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.device_bounds:
            lengths = torch.tensor([0, *(n for row in self.rows for n in row)])
            self.device_bounds[device] = lengths.cumsum(0).to(torch.int32).to(device)
        return self.device_bounds[device]

    @property
    def one_per_row(self) -> bool:
        return all(len(row) == 1 for row in self.rows)


def segments_from_bounds(bounds: list[int], batch: int, width: int) -> Segments:
    """Segments from cumulative lengths over the flattened batch; each must lie inside one row."""
    total = batch * width
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seq_lens must run from 0 to batch * seq_len = {total} (every token in a segment, "
                         f"padding too), got {bounds[:3]}...{bounds[-2:]}")
    rows: list[list[int]] = [[] for _ in range(batch)]
    groups: dict[int, list[int]] = defaultdict(list)
    for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end <= start or start // width != (end - 1) // width:
            raise ValueError(f"cu_seq_lens segment [{start}, {end}) is empty or crosses a row boundary "
                             f"(rows are {width} tokens)")
        rows[start // width].append(end - start)
        groups[end - start].append(number)
    return Segments(width, tuple(map(tuple, rows)), {n: tuple(s) for n, s in groups.items()})


def bounds_from_position_ids(position_ids: torch.Tensor, batch: int) -> list[int]:
    """Cumulative segment bounds: a segment starts at each row start and wherever the position
    does not follow the previous one by 1 (transformers' own packing rule)."""
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts.flatten().nonzero().flatten().tolist() + [positions.numel()]


class _SegmentCache:
    """The last Segments, keyed by the boundary tensors' identity and version: every layer of a
    forward receives the same tensors, so boundaries are read to the host once per forward."""

    def __init__(self) -> None:
        self.source: tuple[torch.Tensor, ...] = ()  # held, so identities stay unique
        self.key: tuple | None = None
        self.value: Segments | None = None

    def get(self, source: tuple[torch.Tensor, ...], batch: int, width: int, build) -> Segments:
        key = (tuple(t._version for t in source), batch, width)
        same = len(source) == len(self.source) and all(a is b for a, b in zip(source, self.source))
        if not same or key != self.key:
            self.source, self.key, self.value = (), None, None
            self.value = build()
            self.source, self.key = source, key
        return self.value


_CACHE = _SegmentCache()


def _segments(query: torch.Tensor, kwargs: dict) -> Segments | None:
    batch, width = query.shape[0], query.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("pass both cu_seq_lens_q and cu_seq_lens_k (equal for self-attention)")

        def from_bounds() -> Segments:
            if cu_k is not cu_q and not torch.equal(cu_q.cpu(), cu_k.cpu()):
                raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ; lorakit_varlen does self-attention only")
            return segments_from_bounds(cu_q.tolist(), batch, width)
        return _CACHE.get((cu_q, cu_k), batch, width, from_bounds)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    return _CACHE.get((position_ids,), batch, width,
                      lambda: segments_from_bounds(bounds_from_position_ids(position_ids, batch), batch, width))


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> ((B, T, Hq, D), None)."""
    has_bounds = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = attention_mask is not None or query.shape[2] != key.shape[2] or not is_causal
    if plain and has_bounds:
        raise ValueError("lorakit_varlen: cu_seq_lens need causal self-attention over the whole row, "
                         "with no attention_mask and no cache offset")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"lorakit_varlen does not support {name}; use eager attention for this model")
    segments = None if plain or query.shape[2] == 1 else _segments(query, kwargs)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    window = _binding_window(segments, kwargs.get("sliding_window"))
    key, value, gqa = _match_heads(query, key, value)
    options = dict(dropout_p=dropout, scale=scaling, is_causal=True, **({"enable_gqa": True} if gqa else {}))
    native = cpu_attention.enabled_for(module)  # the fast paths' CPU kernel, where it applies
    if segments.one_per_row and window is None:  # nothing packed: one causal call
        return _causal(query, key, value, options, native).contiguous(), None
    if window is None and dropout == 0.0 and _flash_varlen_usable(module, query):
        flash = _flash_varlen_checked(query, key, value, segments, scaling, options)
        if flash is not None:
            return flash, None
    return _per_document(query, key, value, segments, options, native, window), None


def _binding_window(segments: Segments, window: int | None) -> int | None:
    """The layer's sliding window where some document is longer, else None: causal attention is
    then exact (the trainer turns packing off for such data; a caller's own rows may hold one)."""
    return window if window is not None and max(segments.groups) > window else None


def _match_heads(query, key, value):
    """k/v with as many heads as q, or SDPA's enable_gqa when torch has it (no copies)."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value, False
    if _GQA_IN_SDPA:
        return key, value, True
    return repeat_kv(key, groups), repeat_kv(value, groups), False


def _per_document(query, key, value, segments: Segments, options: dict, native: bool = False,
                  window: int | None = None) -> torch.Tensor:
    """Causal SDPA per document, documents of equal length stacked into one call; documents
    longer than ``window`` see only its last keys, as transformers' sliding-window layers do.

    Documents are cut out with unbind/split (views whose backward is one stack/cat), not by
    indexing, whose backward zero-fills a full-size gradient per slice.
    """
    pieces = [[piece for row, lengths in zip(t.unbind(0), segments.rows) for piece in row.split(lengths, dim=1)]
              for t in (query, key, value)]  # per tensor: (H, length, D) views in token order
    outputs: list[torch.Tensor | None] = [None] * len(pieces[0])
    for numbers in segments.groups.values():
        q, k, v = (torch.stack([p[i] for i in numbers]) if len(numbers) > 1 else p[numbers[0]][None]
                   for p in pieces)
        windowed = window is not None and q.shape[2] > window
        out = (_windowed(q, k, v, options, window) if windowed
               else _causal(q, k, v, options, native))  # (n, length, Hq, D)
        for number, piece in zip(numbers, out.unbind(0)):
            outputs[number] = piece  # (length, Hq, D)
    flat = torch.cat(outputs)  # (B*T, Hq, D)
    return flat.view(len(segments.rows), segments.width, *flat.shape[1:])


def _windowed(query, key, value, options: dict, window: int) -> torch.Tensor:
    """Causal attention to the last ``window`` keys (query i sees keys i - window + 1 .. i), by SDPA
    with a band mask: (B, H, T, D) -> (B, T, H, D)."""
    position = torch.arange(query.shape[2], device=query.device)
    distance = position[:, None] - position[None, :]
    band = (distance >= 0) & (distance < window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=band,
                                          **{**options, "is_causal": False}).transpose(1, 2)


def _causal(query, key, value, options: dict, native: bool) -> torch.Tensor:
    """Causal attention (B, H, T, D) -> (B, T, H, D): with `native`, cpu_attention where it
    applies; else SDPA."""
    if native and cpu_attention.attention_blocker(query, key, value, dropout=options["dropout_p"]) is None:
        scale = options["scale"] if options["scale"] is not None else query.shape[-1] ** -0.5
        return cpu_attention.causal_attention(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, **options).transpose(1, 2)


# ---- torch's varlen kernel (CUDA) ---------------------------------------------------------------

PER_DOCUMENT_ONLY = "_lorakit_per_document_only"  # on an attention module: never the varlen kernel


class _FlashVarlenState:
    """Whether torch's varlen kernel is trusted in this process: None until its first call was
    checked against the per-document path, then True, or False with the reason warned once."""

    trusted: bool | None = None
    reason: str = ""


_FLASH = _FlashVarlenState()


def varlen_kernel_status() -> str:
    """One line on torch's varlen kernel in this process (for reports)."""
    if _FLASH.trusted is None:
        return "torch's varlen kernel: not called in this process"
    if _FLASH.trusted:
        return "torch's varlen kernel: used (its first output matched per-document SDPA)"
    return f"torch's varlen kernel: not used ({_FLASH.reason})"


def per_document_only(model: nn.Module, on: bool = True) -> None:
    """Keep ``model``'s packed attention on per-document SDPA (for comparisons)."""
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "head_dim"):
            module.__dict__[PER_DOCUMENT_ONLY] = on


@functools.cache
def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_varlen_usable(module: nn.Module, query: torch.Tensor) -> bool:
    return (_FLASH.trusted is not False and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and not module.__dict__.get(PER_DOCUMENT_ONLY, False) and _torch_varlen_attn() is not None)


def _flash_varlen_checked(query, key, value, segments: Segments, scaling, options) -> torch.Tensor | None:
    """The varlen kernel's output, or None when it is not trusted here (see _FlashVarlenState)."""
    if _FLASH.trusted is None:
        _FLASH.trusted, _FLASH.reason = _flash_varlen_agrees(query, key, value, segments, scaling, options)
        if not _FLASH.trusted:
            warnings.warn(f"packed attention: torch's varlen kernel is not used ({_FLASH.reason}); each document "
                          "gets its own SDPA call instead", LorakitWarning, stacklevel=3)
            return None
    return _flash_varlen(query, key, value, segments, scaling)


def _flash_varlen_agrees(query, key, value, segments, scaling, options) -> tuple[bool, str]:
    try:
        with torch.no_grad():
            got = _flash_varlen(query, key, value, segments, scaling).float()
            want = _per_document(query, key, value, segments, options).float()
    except Exception as exc:  # noqa: BLE001 - any failure of an optional kernel means: do not use it
        return False, f"{type(exc).__name__}: {first_line(exc)}"
    error = float((got - want).abs().max())
    scale = float(want.abs().max())
    cosine = float(F.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    if cosine < 0.999 or error > 0.05 * scale + 1e-3:
        return False, f"it disagrees with per-document SDPA (cosine {cosine:.5f}, max error {error:.3g})"
    return True, ""


@functools.cache
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def _flash_varlen(query, key, value, segments: Segments, scaling) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D), all documents in one kernel call."""
    varlen_attn = _torch_varlen_attn()
    params = _parameters(varlen_attn)
    batch, heads, width, dim = query.shape
    # causal: a window of (all before, none after) since torch 2.10, is_causal in 2.9
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = key.shape[1] != heads
    if gqa and "enable_gqa" not in params:
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // key.shape[1])
    extra = {"enable_gqa": True} if gqa and "enable_gqa" in params else {}
    q, k, v = (t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    bounds = segments.bounds_on(query.device)
    longest = max(segments.groups)
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, **causal, **extra)
    return out.reshape(batch, width, heads, dim)


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask interface entry: nothing where the attention function draws the boundaries itself
    (no padding mask, no cache offset); otherwise what sdpa would get."""
    fresh = (attention_mask is None and q_length == kv_length
             and not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0)
    if fresh:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)


# ---- switching a model -------------------------------------------------------------------------

def use_varlen_attention(model: nn.Module) -> list[str]:
    """Switch ``model`` to lorakit_varlen; returns notices (empty when switched) saying why not."""
    reason = varlen_blocker(model)
    if reason is not None:
        return [f"packed attention keeps {getattr(getattr(model, 'config', None), '_attn_implementation', '?')}: "
                f"{reason}"]
    if model.config._attn_implementation == VARLEN or _is_flash(model.config._attn_implementation):
        return []  # flash-attention reads the same cu_seq_lens with its own varlen kernel: keep it
    previous = model.config._attn_implementation
    model.set_attn_implementation(VARLEN)
    if model.config._attn_implementation != VARLEN:  # transformers only warns when it refuses
        return [f"packed attention keeps {previous}: transformers did not accept {VARLEN} for "
                f"{type(model).__name__}"]
    model.__dict__[_PREVIOUS] = previous
    return []


def restore_attention(model: nn.Module) -> None:
    """Undo use_varlen_attention: the implementation the model had before."""
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)


def _is_flash(implementation: str | None) -> bool:
    return bool(implementation) and "flash" in implementation  # transformers' own test for any flash kernel


def varlen_blocker(model: nn.Module) -> str | None:
    """Why lorakit_varlen would not be exact for ``model``, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return f"{type(model).__name__} is not a transformers model (unwrap a PEFT model first)"
    if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
        return f"{type(model).__name__} does not route its attention through transformers' AttentionInterface"
    if getattr(config, "model_type", None) not in VERIFIED_MODEL_TYPES:
        return (f"model type {getattr(config, 'model_type', None)!r} is not one lorakit_varlen is verified "
                f"for ({', '.join(VERIFIED_MODEL_TYPES)})")
    if not getattr(config, "is_causal", True):
        return "the model's attention is not causal"
    return None
