"""Chunked lm_head + cross-entropy: the causal-LM loss without ever holding the full logits.

The plain path computes `logits = hidden @ W.T` for every token (N x V), upcasts it to fp32,
then `log_softmax`, and autograd keeps several N x V tensors alive until backward: about
6 bytes x N x V at peak (6 GB for 8k tokens at a 128k vocabulary).

Rows whose label is ignored (prompt tokens under loss masking, padding, each sequence's last
token) carry no loss and no gradient, so they are dropped before the head: an `index_select`
keeps the labelled rows (its backward puts zeros in the others). On instruction data, where
often most tokens are prompt, this skips most of the head's GEMMs; the plain path computes
logits for every token.

The labelled tokens are processed in chunks of `chunk_size` rows (by default as many as fit
128 MiB of fp32 logits, 256 MiB for an fp32 head on the CPU: `default_chunk_rows`). For each
chunk, in forward:

    logp   = log_softmax(h_c @ W.T (+ b)) in fp32   # (c, V)
    loss  -= sum(logp[label])
    G      = exp(logp) - onehot(label)               # (c, V), in place
    grad_hidden[c] = (G @ W) / normaliser            # (c, H)
    grad_W        += G.T @ (h_c / normaliser)        # only when the head itself is trained

so the gradient is finished during forward and only `grad_hidden` (labelled rows x H) is kept;
backward multiplies it by the incoming scalar gradient, and index_select's backward spreads it
into an N x H gradient. Peak extra memory is one chunk of fp32 logits plus two hidden-sized
tensors (forward: the selected rows and their gradient; backward: the gradient and its scaled
copy, then the scaled copy and the N x H result). On the CPU the chunk's buffers stay allocated
between calls (fp32 logits, plus the head-dtype logits for a 16-bit head: `_CpuWorkspace`), so
that each step does not fault fresh pages in; where the head's products take oneDNN
(kernels/cpu_gemm) its logits come in oneDNN's own buffer instead, still faster.
A frozen head (the LoRA case) gets no weight gradient at all.

With `triton=True` and tensors the Triton kernels can take, a frozen head's chunk skips the fp32
copy: one kernel (triton_ops.cross_entropy_rows_) reads the head-dtype logits once for each row's
max and sum of exp, then again to write softmax - onehot over them in their own dtype: 6 bytes
of traffic per bf16 logit, one launch per chunk. The PyTorch ops above (log_softmax's upcast,
gather, exp, the label subtraction, the cast back) take about 20 bytes per logit in ~6 launches:
on an H200, log_softmax 4.2 ms + exp 2.0 ms + the casts per 1b step of 4 x 2048 tokens (32
chunks at a 128k vocabulary). Same arithmetic: fp32 in registers, the gradient rounded once.

`normalizer` makes gradient accumulation exact: pass the number of label tokens in the whole
accumulated batch and each micro-batch's loss is sum(CE) / normalizer, so the summed
micro-batch gradients equal the big-batch mean gradient. Without it the loss is the mean over
this call's non-ignored tokens (0 when there are none, instead of the NaN of a 0/0 mean).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from lorakit.kernels import cpu_gemm, cuda_graph

IGNORE_INDEX = -100  # torch's cross_entropy default; the data's label masks (data/batching.py) use it
# fp32 logits held per chunk; rows = budget / (4 V), kept between the bounds below. 128 MiB is
# 640 rows at SmolLM2's 49k vocabulary (two chunks for 4 x 256 tokens) and 256 rows at Llama-3's
# 128k: about 3 GiB less than 4096-row chunks at 1b, with GEMMs of 256+ rows still efficient.
CHUNK_BUDGET_BYTES = 128 * 2**20
# An fp32 head on the CPU gets twice that: the head's GEMM against a 49k vocabulary ran at 86-92%
# of the machine's fp32 peak with 640-row chunks and 93-98% with 1024 rows (2 threads; a 16-bit
# head was as fast either way): 41 ms less per SmolLM2 step of 1020 labelled rows, for a 75 MiB
# larger logits buffer (0.13 GiB more peak RSS, measured)
CPU_FP32_CHUNK_BUDGET_BYTES = 256 * 2**20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS, ROW_MULTIPLE = 256, 4096, 64


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES, bytes_per_logit: int = 4) -> int:
    """Rows per chunk so that one chunk's fp32 logits (or logits of `bytes_per_logit`) take
    about `budget_bytes`."""
    rows = budget_bytes // (bytes_per_logit * vocab_size) // ROW_MULTIPLE * ROW_MULTIPLE
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


def chunk_budget_bytes(device_type: str, fp32_head: bool) -> int:
    """The default chunk's fp32 logits budget for a head on this device type."""
    return CPU_FP32_CHUNK_BUDGET_BYTES if device_type == "cpu" and fp32_head else CHUNK_BUDGET_BYTES


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_norm, chunk_size, triton):
        # hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) all kept, inv_norm 0-dim fp32
        grads = _GradBuffers(hidden, weight, bias, ctx.needs_input_grad)
        fused_ops = _fused_loss_ops(hidden, grads) if triton else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_size = chunk_size or _default_rows(weight, fused=fused_ops is not None)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = (hidden[rows], weight, bias, labels[rows], inv_norm, grads, rows)
            loss_sum += (_chunk_loss_and_grads(*chunk) if fused_ops is None
                         else _fused_chunk_loss_and_grads(fused_ops, *chunk))
        if fused_ops is not None and _unscaled_rows(grads, weight):
            grads.hidden.mul_(inv_norm)  # in fp32 inside, one rounding: as _accumulate scales
        ctx.save_for_backward(*grads.as_tuple())
        return loss_sum * inv_norm

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype)
                  for g in (grad_hidden, grad_weight, grad_bias)]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


def _default_rows(weight, fused: bool) -> int:
    """Rows per chunk by default: fp32 logits within chunk_budget_bytes, or with the fused kernel,
    which holds only the head-dtype logits, those within the same budget (twice the rows in 16
    bits: half the chunks, each paying its launches)."""
    budget = chunk_budget_bytes(weight.device.type, weight.dtype == torch.float32)
    return default_chunk_rows(weight.shape[0], budget, weight.element_size() if fused else 4)


class _GradBuffers:
    """The gradients filled in chunk by chunk; None for inputs that need no gradient."""

    def __init__(self, hidden, weight, bias, needs_grad):
        self.hidden = torch.empty_like(hidden) if needs_grad[0] else None
        # the head gradient sums over all chunks: accumulate it in fp32
        self.weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if needs_grad[1] else None)
        self.bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if bias is not None and needs_grad[2] else None)
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype

    def as_tuple(self):
        weight = None if self.weight is None else self.weight.to(self.weight_dtype)
        bias = None if self.bias is None else self.bias.to(self.bias_dtype)
        return self.hidden, weight, bias


def _chunk_loss_and_grads(h, weight, bias, labels, inv_norm, grads, rows):
    """Loss sum of one chunk of labelled rows; writes its gradient slices into `grads`."""
    h_w = h.to(weight.dtype)
    log_probs, spare = _log_probs(h_w, weight, bias)  # (c, V) fp32; a 16-bit head's logits buffer
    loss_sum = -log_probs.gather(1, labels[:, None]).sum()
    if grads.hidden is None and grads.weight is None and grads.bias is None:
        return loss_sum
    # softmax - onehot, over the log-probabilities' buffer
    grad_fp32 = log_probs.exp_()
    grad_fp32[torch.arange(len(labels), device=h.device), labels] -= 1.0
    # the GEMMs run in the head's dtype: a 16-bit head's copy goes into its spent logits' buffer
    grad_head_dtype = grad_fp32 if spare is None else spare.copy_(grad_fp32)
    _accumulate(grad_head_dtype, grad_fp32, inv_norm, h_w, weight, grads, rows)
    return loss_sum


def _fused_loss_ops(hidden, grads):
    """The triton_ops module when its fused cross-entropy serves this call, else None: it covers
    a frozen head (no weight or bias gradient) on tensors the kernels can take."""
    if grads.weight is not None or grads.bias is not None:
        return None
    from lorakit.kernels import triton_ops  # decides interpreter vs GPU when first imported
    return triton_ops if triton_ops.runs_on(hidden) else None


def _fused_chunk_loss_and_grads(triton_ops, h, weight, bias, labels, inv_norm, grads, rows):
    """_chunk_loss_and_grads for a frozen head, through one kernel over the head-dtype logits,
    which it overwrites with their gradient when hidden needs one. The hidden gradient's rows
    are written unscaled, straight from the GEMM where the dtypes allow: the caller scales all
    rows by 1/normaliser at once (on a GPU, whose CPU sets a 1b step's pace, 3 launches per
    chunk instead of 7)."""
    h_w = h.to(weight.dtype)
    logits = cpu_gemm.linear(h_w, weight, bias)
    loss_rows = triton_ops.cross_entropy_rows_(logits, labels, grad=grads.hidden is not None)
    if _unscaled_rows(grads, weight):
        torch.mm(logits, weight, out=grads.hidden[rows])
    elif grads.hidden is not None:  # another dtype: scaled in fp32 and rounded once, here
        _accumulate(logits, None, inv_norm, h_w, weight, grads, rows)
    return loss_rows.sum()


def _unscaled_rows(grads, weight) -> bool:
    """The fused path writes the hidden gradient's rows straight from the GEMM, to be scaled
    once after the last chunk: where the hidden gradient has the head's dtype."""
    return grads.hidden is not None and grads.hidden.dtype == weight.dtype


def _log_probs(h_w, weight, bias):
    """(fp32 log-probabilities, the spent logits of a 16-bit head or None for an fp32 one).

    On the CPU both live in the reused workspace and log_softmax writes in place; elsewhere
    each chunk allocates (CUDA's caching allocator already reuses the memory)."""
    rows, vocab = h_w.shape[0], weight.shape[0]
    workspace = _workspace_for(h_w.device)
    if workspace is None:  # one fused pass for max, sum-exp and the upcast
        logits = cpu_gemm.linear(h_w, weight, bias)
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        return log_probs, (None if logits.dtype == torch.float32 else logits)
    logits = _head_logits(h_w, weight, bias, workspace)
    if logits.dtype == torch.float32:
        return torch.log_softmax(logits, -1, out=logits), None  # in place, one pass
    # an fp32 copy in its own buffer (log_softmax's dtype= would allocate one), then in place
    log_probs = workspace.get("log_probs", rows, vocab, torch.float32).copy_(logits)
    return torch.log_softmax(log_probs, -1, out=log_probs), logits


def _head_logits(h_w, weight, bias, workspace):
    """h_w @ weight.T (+ bias), in the workspace's buffer where torch's mm computes it. oneDNN
    returns a buffer of its own, whose pages are faulted in anew each chunk: it still took
    about 0.6x MKL's time on a machine where MKL runs at half speed (cpu_gemm). So does a
    product cpu_gemm widens to fp32 (a 16-bit dtype this CPU cannot multiply)."""
    if cpu_gemm.backend_for(h_w) == cpu_gemm.ONEDNN or cpu_gemm.widens(h_w):
        return cpu_gemm.linear(h_w, weight, bias)
    out = workspace.get("logits", h_w.shape[0], weight.shape[0], weight.dtype)
    if bias is None:
        return torch.mm(h_w, weight.T, out=out)
    return torch.addmm(bias, h_w, weight.T, out=out)


def _accumulate(grad_head_dtype, grad_fp32, inv_norm, h_w, weight, grads, rows):
    # 1/normaliser goes on the small (c, H) side of each GEMM, not on the (c, V) gradient: the
    # same products, one pass over c x V fewer
    if grads.hidden is not None:
        grad_hidden = cpu_gemm.matmul(grad_head_dtype, weight)  # (c, H)
        grads.hidden[rows] = grad_hidden.float().mul_(inv_norm).to(grads.hidden.dtype)
    if grads.weight is not None:
        grads.weight.addmm_(grad_fp32.T, h_w.float() * inv_norm)
    if grads.bias is not None:
        grads.bias += grad_fp32.sum(0) * inv_norm


class _CpuWorkspace(threading.local):
    """(rows, vocab) buffers for the chunks' logits, kept between chunks and steps on the CPU.

    The C allocator hands a tensor over 32 MiB out as a fresh mapping that the kernel faults in
    page by page on first write, and unmaps it on free: every chunk of every step paid about
    31k page faults per 120 MiB buffer (SmolLM2's 640 x 49152 fp32 chunk), more time than the
    log_softmax over it (docs/performance.md). Reused buffers are faulted in once. Each thread
    has its own buffers, one per role and dtype, sized for the largest chunk seen; `clear()`
    frees them (the trainer does when a run ends).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < rows * cols:
            self._buffers.pop((role, dtype), None)  # free the old one before the bigger one
            # a normal tensor even when first asked for under inference_mode: later training
            # calls write into it in place, which an inference tensor refuses
            with torch.inference_mode(False):
                buffer = self._buffers[(role, dtype)] = torch.empty(rows * cols, dtype=dtype)
        return buffer[: rows * cols].view(rows, cols)

    def clear(self) -> None:
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


_WORKSPACE = _CpuWorkspace()


def _workspace_for(device: torch.device) -> _CpuWorkspace | None:
    return _WORKSPACE if device.type == "cpu" else None


def release_workspace() -> None:
    """Free this thread's CPU buffers the loss keeps between calls (a process done training)."""
    _WORKSPACE.clear()


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         normalizer: float | int | torch.Tensor | None = None,
                         chunk_size: int | None = None,
                         bias: torch.Tensor | None = None,
                         triton: bool = False) -> torch.Tensor:
    """sum over tokens of CE(hidden @ weight.T + bias, labels) / normalizer, a 0-dim fp32 tensor.

    hidden: (..., H) final hidden states; weight: (V, H) lm_head weight; labels: (...) with
    -100 for tokens that carry no loss (already shifted for causal LM). normalizer: the divisor,
    e.g. the label-token count of a whole accumulated batch; None means this call's count of
    non-ignored labels (the mean). The weight gets a gradient only if it requires grad.
    chunk_size: rows per chunk; None sizes chunks by CHUNK_BUDGET_BYTES, CPU_FP32_CHUNK_BUDGET_BYTES
    for an fp32 head on the CPU (`default_chunk_rows`), counting only head-dtype logits on the
    fused kernel's path. triton: a frozen head's softmax and
    its gradient run in one Triton kernel per chunk where the kernels can take hidden (the
    trainer's choice of Triton kernels); otherwise, and for a trained head, PyTorch ops.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels_1d = labels.reshape(-1).to(hidden.device)
    if labels_1d.shape[0] != hidden_2d.shape[0]:
        raise ValueError(f"labels hold {labels_1d.shape[0]} tokens but hidden holds "
                         f"{hidden_2d.shape[0]}")
    inv_norm = _inverse_normalizer(normalizer, labels_1d)
    if not _keeps_ignored_rows(hidden_2d, weight, bias, triton):
        kept = (labels_1d != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync
        if kept.numel() < labels_1d.numel():  # ignored rows: no loss, no gradient, no head GEMMs
            hidden_2d, labels_1d = hidden_2d.index_select(0, kept), labels_1d.index_select(0, kept)
    return _ChunkedLMHeadLoss.apply(hidden_2d, weight, bias, labels_1d, inv_norm, chunk_size,
                                    triton)


def _keeps_ignored_rows(hidden, weight, bias, triton: bool) -> bool:
    """True while a CUDA graph is captured (cuda_graph.CapturedStep): choosing the labelled rows
    needs the host to read their count, which capture forbids, so every row stays and the Triton
    kernel gives the ignored ones no loss and no gradient. The PyTorch ops cannot: refused."""
    if not cuda_graph.capturing(hidden):
        return False
    from lorakit.kernels import triton_ops  # decides interpreter vs GPU when first imported

    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not (triton and frozen_head and triton_ops.runs_on(hidden)):
        raise ValueError("the chunked loss runs inside a CUDA graph only through its Triton kernel, for a "
                         "frozen head (triton=True)")
    return True


def _inverse_normalizer(normalizer, labels):
    if normalizer is None:
        # the count stays on the device: no host sync
        count = (labels != IGNORE_INDEX).sum().float()
        return torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))
    norm = torch.as_tensor(normalizer, dtype=torch.float32, device=labels.device)
    return 1.0 / norm
