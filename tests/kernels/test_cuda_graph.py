"""kernels/cuda_graph.CapturedStep on the CPU. A stand-in for the CUDA graph replays by running
the captured step again and writing its results into the tensors the capture left (the loss it
returned, each parameter's .grad): what a replay does to memory. cuda_graph.capturing() answers
True while the stand-in captures or replays, so the fast paths take their capture-safe branches
(every row through the loss kernel, the adapters' casts copied in every step), with the Triton
kernels in Triton's interpreter. What this cannot check, CUDA's own rules for capture, the GPU
check's `lorakit-graphed` row does (scripts/gpu_check.sh)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_ops builds its kernels

import contextlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from tiny_models import randomize_lora, tiny_llama  # noqa: E402

from lorakit.kernels import adapter_casts, cuda_graph, triton_ops  # noqa: E402
from lorakit.kernels.causal_loss import causal_lm_loss  # noqa: E402
from lorakit.kernels.cuda_graph import CapturedStep, keep_plain_rows_unmasked  # noqa: E402
from lorakit.kernels.llama_patch import enable_fast_paths  # noqa: E402
from lorakit.lora import LoraConfig, apply_lora  # noqa: E402

if not triton_ops.triton_available():  # triton_ops was imported earlier without the interpreter
    pytest.skip(f"Triton kernels cannot run: {triton_ops.unavailable_reason()}", allow_module_level=True)

VOCAB = 96


class RerunGraph:
    """The CUDA graph's stand-in: capture runs the step once, replay runs it again and writes the
    results into the captured tensors, a gradient added to where the capture found one (a
    recorded accumulation) and written where it found none. Python state read on the way is
    held as the capture saw it (the optimizer-step count that decides whether the adapters'
    casts are copied): a replay runs only what was recorded."""

    def __init__(self, params, monkeypatch):
        self.params, self.active, self.replays = list(params), False, 0
        monkeypatch.setattr(cuda_graph, "capturing", lambda tensor: self.active)
        # transformers asks torch whether a capture is on (it then takes the step for traced)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.active)

    @contextlib.contextmanager
    def _capturing(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def warm_up(self, run, times):
        for _ in range(times):
            run()

    def capture(self, run):
        self.run, self.steps_at_capture = run, adapter_casts._optimizer_steps
        self.accumulates = [p.grad is not None for p in self.params]
        with self._capturing():
            self.loss = run()
        self.grads = [p.grad for p in self.params]
        return self.loss

    def replay(self):
        self.replays += 1
        for param in self.params:
            param.grad = None
        steps_now, adapter_casts._optimizer_steps = adapter_casts._optimizer_steps, self.steps_at_capture
        try:
            with self._capturing():
                loss = self.run()
        finally:
            adapter_casts._optimizer_steps = steps_now
        self.loss.copy_(loss)
        for param, static, adds in zip(self.params, self.grads, self.accumulates):
            static.add_(param.grad) if adds else static.copy_(param.grad)
            param.grad = static


def _trained_model(graphed=False):
    model = tiny_llama(vocab_size=VOCAB).train()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    enable_fast_paths(model, triton=True)
    if graphed:
        keep_plain_rows_unmasked(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as the bench's: it leaves the parameters' versions alone, so only the optimizer-step
    # count tells the adapters' casts to copy again
    return model, params, torch.optim.AdamW(params, lr=1e-2, fused=True)


def _batches(steps):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt: rows the loss kernel sees without a label while capturing
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_a_replayed_step_trains_as_the_eager_step(monkeypatch):
    batches = _batches(3)
    eager, eager_params, eager_opt = _trained_model()
    eager_losses = []
    for batch in batches:
        loss = causal_lm_loss(eager, batch)
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        eager_losses.append(loss.item())

    graphed, params, opt = _trained_model(graphed=True)
    graph = RerunGraph(params, monkeypatch)
    step = CapturedStep(lambda batch: causal_lm_loss(graphed, batch), params, backend=graph, warmup_steps=1)
    losses = []
    for batch in batches:
        losses.append(step(batch).item())
        opt.step()  # no zero_grad: the next replay writes the gradients where they are
    assert graph.replays == len(batches)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for mine, theirs in zip(params, eager_params):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_the_warm_up_leaves_the_weights_and_no_gradients(monkeypatch):
    model, params, _ = _trained_model(graphed=True)
    before = [p.detach().clone() for p in params]
    step = CapturedStep(lambda batch: causal_lm_loss(model, batch), params, backend=RerunGraph(params, monkeypatch),
                        warmup_steps=1)
    step(_batches(1)[0])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is not None for p in params)  # the replay's, in the captured tensors


def test_a_batch_of_another_shape_is_refused(monkeypatch):
    model, params, _ = _trained_model(graphed=True)
    step = CapturedStep(lambda batch: causal_lm_loss(model, batch), params, backend=RerunGraph(params, monkeypatch),
                        warmup_steps=1)
    step(_batches(1)[0])
    longer = {"input_ids": torch.zeros(2, 10, dtype=torch.long), "labels": torch.zeros(2, 10, dtype=torch.long)}
    with pytest.raises(ValueError, match="the shape it was captured with"):
        step(longer)


def test_the_adapters_cast_copies_are_written_in_every_captured_step(monkeypatch):
    # a graph replays only what its capture recorded: a copy skipped at capture (its stamp said
    # up to date) would leave every replay on the adapters of that moment
    layer = tiny_llama().model.layers[0].self_attn
    apply_lora(layer, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    q = layer.q_proj
    refreshes = []
    monkeypatch.setattr(adapter_casts.CastAdapters, "refresh", lambda self, stamp, _real=adapter_casts.CastAdapters.refresh:
                        refreshes.append(stamp) or _real(self, stamp))
    adapter_casts.cast_adapters([q], torch.bfloat16)
    adapter_casts.cast_adapters([q], torch.bfloat16)
    assert len(refreshes) == 1  # eager: copied once, then reused
    monkeypatch.setattr(cuda_graph, "capturing", lambda tensor: True)
    adapter_casts.cast_adapters([q], torch.bfloat16)
    assert len(refreshes) == 2


def _attention_masks_seen(model, monkeypatch, capturing):
    """The attention_mask each decoder layer's attention got in one forward."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    seen = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                                  with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.zeros(2, 9, dtype=torch.long), use_cache=False)  # as causal_lm_loss calls it
    return seen


def test_plain_rows_keep_no_attention_mask_while_a_graph_is_captured(monkeypatch):
    # transformers takes a capture for tracing and then builds the (B, 1, T, T) mask its eager
    # path skips: SDPA would run masked, another attention than the eager step's
    model = tiny_llama(vocab_size=VOCAB)
    assert all(mask is None for mask in _attention_masks_seen(model, monkeypatch, capturing=False))
    assert all(mask is not None for mask in _attention_masks_seen(tiny_llama(vocab_size=VOCAB), monkeypatch,
                                                                  capturing=True))
    keep_plain_rows_unmasked(model)
    assert all(mask is None for mask in _attention_masks_seen(model, monkeypatch, capturing=True))


def test_gradients_captured_on_top_of_old_ones_would_accumulate(monkeypatch):
    # the reason the capture starts from .grad = None: the stand-in, like a graph, adds where a
    # gradient was there at capture. Left in place, the first replay's gradient is twice the step's
    model, params, _ = _trained_model(graphed=True)
    batch = _batches(1)[0]
    causal_lm_loss(model, batch).backward()
    want = [p.grad.clone() for p in params]
    graph = RerunGraph(params, monkeypatch)
    graph.capture(lambda: causal_lm_loss(model, batch).detach())  # no backward: the old gradients stay
    graph.run = lambda: (lambda loss: loss.backward() or loss.detach())(causal_lm_loss(model, batch))
    graph.replay()
    torch.testing.assert_close(params[0].grad, 2 * want[0])
    model.zero_grad(set_to_none=True)
    step = CapturedStep(lambda b: causal_lm_loss(model, b), params, backend=RerunGraph(params, monkeypatch),
                        warmup_steps=1)
    step(batch)
    for got, expected in zip(params, want):
        torch.testing.assert_close(got.grad, expected, rtol=1e-5, atol=1e-7)
