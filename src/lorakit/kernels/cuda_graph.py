"""A training micro-step (forward and backward of one fixed-shape batch) captured once as a CUDA
graph and replayed: the host then issues one launch per step instead of about a thousand.

Why: on an H200 the 1b step's pace was set by its CPU, not its GPU (102 ms a step with the GPU
busy about 90: docs/performance.md); each aten call costs the host 10-50 us and each Triton
launch more. A replayed graph costs the host microseconds. Opt-in and measured by `lorakit
bench` (`lorakit-graphed`) before anything else uses it.

What capture asks of a step, and how lorakit's fast paths meet it:
- the same shapes and the same tensors every step: `CapturedStep` copies each batch into the
  tensors it captured with (a batch of another shape is refused);
- no host reads of device values: the chunked loss keeps the rows without a label, which its
  Triton kernel gives no loss and no gradient (chunked_ce._keeps_ignored_rows), instead of
  selecting the labelled rows by their count; the adapters' cast copies are written in every
  replay (adapter_casts.cast_adapters copies while capturing, whatever its stamp says);
- gradients captured from `.grad = None`: each replay writes the step's gradients into the same
  tensors (no accumulation), the optimizer steps outside the graph, and nothing may set `.grad`
  to None afterwards (the replays would write where no parameter looks);
- no dropout, checkpointing or packed rows (random state, which the fused blocks' dropout also
  reads and sets on the host, where a graph's replay would not; host-side segment lengths): the
  bench variant runs on plain rows only, with `keep_plain_rows_unmasked` (transformers would build
  a full attention mask while capturing);
- every row goes through the output head, labelled or not: with prompt tokens in the batch the
  graph computes more than the eager step, which skips them.
Memory: between replays the graph's private pool keeps what one step allocates, so the step's
peak is its reserved memory (a replay allocates nothing, and torch's allocated-memory peak does
not see it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

WARMUP_STEPS = 3  # eager steps before capture: Triton compiles, probes and caches fill there


UNMASKED_SDPA = "lorakit_sdpa_unmasked"  # transformers' SDPA, no mask built for rows without padding


def capturing(tensor: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream (for a CUDA tensor)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def keep_plain_rows_unmasked(model) -> None:
    """Give `model` transformers' SDPA under a name whose mask entry builds nothing for rows
    without padding or a cache offset. transformers takes a capture for tracing, and while
    tracing it builds the (B, 1, T, T) mask its eager path skips: SDPA would then run masked,
    without is_causal or grouped-query heads, another (slower) attention than the eager step's."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from lorakit.kernels.varlen_attention import varlen_mask  # None unless padded or offset

    AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(UNMASKED_SDPA, varlen_mask)
    model.set_attn_implementation(UNMASKED_SDPA)


class CudaGraphBackend:
    """Warm-up on a side stream, capture and replay through torch.cuda.CUDAGraph."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def warm_up(self, run: Callable[[], object], times: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(times):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph's pool is its own

    def capture(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph):
            return run()

    def replay(self) -> None:
        self.graph.replay()


class CapturedStep:
    """loss_fn(batch).backward() for batches of one shape, captured on the first call and
    replayed after: `step(batch)` returns the loss (a tensor the next call overwrites) and leaves
    the gradients in the parameters' `.grad`, as the eager step would with zeroed gradients."""

    def __init__(self, loss_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], params,
                 backend=None, warmup_steps: int = WARMUP_STEPS):
        self.loss_fn, self.params = loss_fn, list(params)
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.warmup_steps = warmup_steps
        self.inputs: dict[str, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.inputs is None:
            self._capture(batch)
        else:
            self._load(batch)
        self.backend.replay()
        return self.loss

    def _capture(self, batch) -> None:
        self.inputs = {key: value.clone() for key, value in batch.items()}
        try:
            self.backend.warm_up(self._eager_step, self.warmup_steps)
            self._drop_grads()  # captured from None: each replay writes the gradients, adds nothing
            self.loss = self.backend.capture(self._forward_backward)
        except BaseException:
            self.inputs = None  # nothing captured: the next call tries again, never replays an empty graph
            raise

    def _eager_step(self) -> None:
        self._forward_backward()
        self._drop_grads()

    def _forward_backward(self) -> torch.Tensor:
        loss = self.loss_fn(self.inputs)
        loss.backward()
        return loss.detach()

    def _drop_grads(self) -> None:
        for param in self.params:
            param.grad = None

    def _load(self, batch) -> None:
        if batch.keys() != self.inputs.keys() or any(batch[k].shape != v.shape for k, v in self.inputs.items()):
            raise ValueError("a captured step replays batches of the shape it was captured with: got "
                             f"{_shapes(batch)}, captured {_shapes(self.inputs)}")
        for key, static in self.inputs.items():
            if batch[key] is not static:
                static.copy_(batch[key])


def _shapes(batch: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{key} {tuple(value.shape)}" for key, value in batch.items())
