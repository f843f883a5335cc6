"""The one training loop: every entry point (CLI, sweep, torchrun) goes through Trainer.

    for step in range(start, total_steps):
        group = next grad_accum micro-batches        # (epoch, batch_index) is the data position
        n = label tokens in the whole group          # loss = sum CE / n: exact accumulation
        forward + backward each micro-batch
        (under torchrun: the group is world_size x grad_accum global micro-batches, each rank
        trains on its share, n is all-reduced and gradients summed: see train/distributed.py)
        non-finite loss or gradient -> skip the update, count it, stop after K in a row
        clip, AdamW step, lr from the schedule
        log / eval / checkpoint at step boundaries

A checkpoint at a step boundary holds the data position and every RNG, so a resumed run
consumes the same batches with the same dropout masks as an uninterrupted one. A stop asked for
between the micro-batches of a step (one process) gives the step up: its gradients dropped, the
data position and the RNGs put back to its start, and the checkpoint is that boundary's.
"""

from __future__ import annotations

import math
import signal
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from lorakit.data.batching import BatchIterator, count_label_tokens, plan_batches
from lorakit.errors import LorakitWarning, TrainingError
from lorakit.kernels.causal_loss import causal_lm_loss
from lorakit.lora.model import lora_layers
from lorakit.train import distributed
from lorakit.train.rng import capture_rng, restore_rng
from lorakit.train.schedule import lr_factor


# float16 holds about 5 decades below 1, and a step's token-mean gradients (1/tokens each) fall
# under them: 12% of a small adapter's gradient entries flushed to zero at 40k tokens a step. So
# float16 activations train on the loss times a dynamic scale, the gradients divided back before
# clipping (torch's GradScaler does the same for HF Trainer's fp16): the scale starts at 2^16,
# halves at each step whose gradients overflow (that step is skipped) and doubles after
# LOSS_SCALE_GROWTH finite steps. Powers of two: scaling and unscaling round nothing.
LOSS_SCALE_START = 2.0 ** 16
LOSS_SCALE_GROWTH = 2000


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: next micro-batch is (epoch, batch_index)
    batch_index: int = 0
    train_tokens: int = 0  # label tokens trained on
    seen_tokens: int = 0  # input tokens processed
    skipped_steps: int = 0
    bad_in_row: int = 0
    loss_ema: float | None = None
    loss_scale: float | None = None  # float16 training's dynamic loss scale (None: no scaling)
    finite_at_scale: int = 0  # finite steps since the scale last changed

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LoopSettings:
    lr: float
    total_steps: int
    warmup_steps: int
    schedule: str
    grad_accum: int
    max_grad_norm: float
    max_bad_steps: int
    batch_size: int
    seq_len: int
    packing: bool
    seed: int
    pad_id: int
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    packed_attention: str = "4d"  # how packed rows mark documents (data/batching.py): "4d" or "varlen"
    rank: int = 0  # this process's share of each step (train/distributed.py)
    world_size: int = 1
    batches_per_epoch: int = 0  # micro-batches in epoch 0's plan (packing may make others differ by a few)
    first_position: int = 0  # an example's first position id (model_limits.first_position_id)
    loss_scaling: bool = False  # float16 activations: the loss is scaled (LOSS_SCALE_START)


@dataclass
class StepResult:
    loss: float
    lr: float
    tokens: int
    skipped: bool
    grad_norm: float
    spike: bool = False
    overflowed: bool = False  # float16 gradients beyond range at this loss scale: the step skipped, the scale halved


@dataclass
class Hooks:
    """Called by the loop at step boundaries; the runner fills these in."""

    on_step: Callable[[TrainState, StepResult], None] = lambda state, result: None
    should_stop: Callable[[], bool] = lambda: False


def epoch_plan(dataset, settings: LoopSettings, epoch: int) -> list:
    """The micro-batches of one epoch of the training data, in the order the loop takes them."""
    return plan_batches(dataset.lengths(), settings.batch_size, settings.seq_len, settings.packing, shuffle=True,
                        seed=settings.seed, epoch=epoch)


def total_steps_for(num_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps for `epochs` passes over `num_batches` micro-batches, `grad_accum` of them a
    step. A step's micro-batches run on into the next epoch (`Trainer._stream`), so this is the
    epochs' micro-batches over grad_accum, not a whole number of steps per epoch: that would
    train up to twice the epochs asked for."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * num_batches / grad_accum))


class Trainer:
    def __init__(self, model: nn.Module, train_dataset, settings: LoopSettings, optimizer: torch.optim.Optimizer,
                 state: TrainState | None = None):
        self.model, self.dataset, self.settings, self.optimizer = model, train_dataset, settings, optimizer
        self.state = state or TrainState()
        if not settings.loss_scaling:  # a float16 run's checkpoint resumed in bf16 or fp32: no scale to keep
            self.state.loss_scale, self.state.finite_at_scale = None, 0
        self.gradients_checked = False  # which adapters got a gradient: looked at after this process's first step

    # ---- data position ---------------------------------------------------------------------

    def _stream(self) -> Iterator[tuple[BatchIterator, int]]:
        """(iterator, plan index) of every global micro-batch from the current data position on,
        across epochs, forever. Batches are collated only by the rank that trains on them."""
        s = self.settings
        while True:
            plan = epoch_plan(self.dataset, self.settings, self.state.epoch)
            iterator = BatchIterator(self.dataset.dataset, plan, packing=s.packing, seq_len=s.seq_len,
                                     pad_id=s.pad_id, start_index=self.state.batch_index,
                                     packed_attention=s.packed_attention,
                                     mask_dtype=s.autocast_dtype or next(self.model.parameters()).dtype,
                                     device=s.device, first_position=s.first_position)
            for index in range(self.state.batch_index, len(plan)):
                self.state.batch_index = index + 1
                yield iterator, index
            self.state.epoch += 1
            self.state.batch_index = 0

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self, stream: Iterator[tuple[BatchIterator, int]],
                   stop_asked: Callable[[], bool] = lambda: False) -> StepResult | None:
        """One optimizer step, or None where a stop was asked for between its micro-batches: the
        step is given up (`_give_up_step`). Only in one process, where no other rank waits in the
        step's collectives; under torchrun the ranks agree at step boundaries."""
        s = self.settings
        start = self._step_start() if s.world_size == 1 and s.grad_accum > 1 else None
        picks = [next(stream) for _ in range(s.grad_accum * s.world_size)]  # the global step
        micro_batches = [iterator.batch(index) for iterator, index in distributed.shard(picks, s.rank, s.world_size)]
        tokens = distributed.all_reduce_sum(sum(count_label_tokens(b) for b in micro_batches))  # global normaliser
        lr = s.lr * lr_factor(self.state.step, s.total_steps, s.warmup_steps, s.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        scale = self._loss_scale()
        normalizer = max(tokens, 1) if scale == 1 else max(tokens, 1) / scale  # sum(CE) / normalizer: scaled
        loss_sum = 0.0
        for number, batch in enumerate(micro_batches):
            if number and start is not None and stop_asked():
                return self._give_up_step(start)
            loss = self._loss(batch, normalizer=normalizer)
            loss.backward()
            loss_sum += loss.item()
        self._check_gradients_once()  # before the sync, which gives a missing gradient zeros on every rank
        distributed.sync_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        loss_sum, seen = distributed.all_reduce_sum([loss_sum, sum(int(b["input_ids"].numel()) for b in micro_batches)])
        return self._apply_update(loss_sum / scale, lr, tokens, seen)

    def _loss_scale(self) -> float:
        if not self.settings.loss_scaling:
            return 1.0
        if self.state.loss_scale is None:
            self.state.loss_scale = LOSS_SCALE_START
        return self.state.loss_scale

    def _step_start(self) -> tuple:
        return self.state.epoch, self.state.batch_index, capture_rng()

    def _give_up_step(self, start: tuple) -> None:
        """Drop the step's gradients and put the data position and every random generator back
        to its start: a checkpoint now resumes as if the step had never begun (a stop need not
        wait for the rest of a long --grad-accum)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.epoch, self.state.batch_index, rng = start
        restore_rng(*rng)

    def _check_gradients_once(self) -> None:
        if not self.gradients_checked and distributed.is_main():
            _say_which_adapters_got_no_gradient(self.model)
        self.gradients_checked = True

    def _loss(self, batch: dict, normalizer) -> torch.Tensor:
        batch = {k: v.to(self.settings.device) for k, v in batch.items()}
        dtype = self.settings.autocast_dtype
        with torch.autocast(self.settings.device.type, dtype=dtype, enabled=dtype is not None):
            return causal_lm_loss(self.model, batch, normalizer, router_aux=True)

    def _apply_update(self, loss: float, lr: float, tokens: int, seen: int) -> StepResult:
        s, state = self.settings, self.state
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        scale = self._loss_scale()
        if scale != 1:
            _unscale_gradients(params, scale)
        norm = _grad_norm(params, s.max_grad_norm)
        finite = math.isfinite(loss) and math.isfinite(norm)
        overflowed = not finite and scale > 1 and math.isfinite(loss)  # the scale's doing, not the model's
        if finite:
            self.optimizer.step()
            state.bad_in_row = 0
        else:
            state.skipped_steps += 1
            if not overflowed:
                state.bad_in_row += 1
        self._adjust_loss_scale(finite)
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.train_tokens += tokens
        state.seen_tokens += seen
        spike = finite and state.loss_ema is not None and loss > 3 * state.loss_ema and loss > state.loss_ema + 1
        if finite:
            state.loss_ema = loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss
        if state.bad_in_row >= s.max_bad_steps:
            raise TrainingError(
                f"{state.bad_in_row} steps in a row had a non-finite loss or gradient (last at step {state.step}); "
                "the run stopped (any checkpoint saved before is intact): lower --lr, check the data, or use "
                "--dtype float32, then run again (--resume continues from the newest checkpoint, if there is one)"
            )
        return StepResult(loss, lr, tokens, not finite, norm, spike, overflowed)

    def _adjust_loss_scale(self, finite: bool) -> None:
        state = self.state
        if state.loss_scale is None:
            return
        if not finite:
            state.loss_scale, state.finite_at_scale = max(state.loss_scale / 2, 1.0), 0
            return
        state.finite_at_scale += 1
        if state.finite_at_scale >= LOSS_SCALE_GROWTH:
            state.loss_scale, state.finite_at_scale = state.loss_scale * 2, 0

    def run(self, hooks: Hooks) -> TrainState:
        stream = self._stream()
        while self.state.step < self.settings.total_steps and not hooks.should_stop():
            result = self.train_step(stream, hooks.should_stop)
            if result is None:  # stopped part way through the step
                break
            hooks.on_step(self.state, result)
        return self.state


def _say_which_adapters_got_no_gradient(model: nn.Module) -> None:
    """Adapters on layers the model never calls: some models read a layer's weight instead (Jamba's
    mamba mixer multiplies by dt_proj.weight), and an adapter there would train for nothing."""
    idle = [name for name, layer in lora_layers(model) if layer.lora_A.weight.grad is None]
    if idle:
        these = "these layers" if len(idle) > 1 else "this layer"
        warnings.warn(f"{len(idle)} adapted layer{'s' * (len(idle) != 1)} got no gradient in the first step "
                      f"({idle[0]}{', ...' * (len(idle) > 1)}): the model did not call {these} (it may read the "
                      f"weights directly), so an adapter there learns nothing; leave {these} out with --exclude",
                      LorakitWarning, stacklevel=2)


def _unscale_gradients(params, scale: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(1 / scale)


def _grad_norm(params, max_norm: float) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.norm(torch.stack([g.grad.detach().float().norm() for g in grads])))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, settings: LoopSettings, max_batches: int = 0) -> dict:
    """Token-level mean cross-entropy and perplexity over an evaluation set."""
    model.eval()
    plan = plan_batches(dataset.lengths(), settings.batch_size, settings.seq_len, settings.packing,
                        shuffle=False, seed=0, epoch=0)
    if max_batches:
        plan = plan[:max_batches]
    # each rank takes its share; a sharded model needs as many forwards on every rank, so the
    # ranks one batch short run a dummy one that is not counted
    mine, padding = distributed.shard_padded(plan, settings.rank, settings.world_size)
    iterator = BatchIterator(dataset.dataset, mine + plan[:1] * padding, packing=settings.packing,
                             seq_len=settings.seq_len, pad_id=settings.pad_id, device=settings.device,
                             packed_attention=settings.packed_attention, first_position=settings.first_position,
                             mask_dtype=settings.autocast_dtype or next(model.parameters()).dtype)
    total, tokens = 0.0, 0
    dtype = settings.autocast_dtype
    for position, batch in enumerate(iterator):
        batch = {k: v.to(settings.device) for k, v in batch.items()}
        with torch.autocast(settings.device.type, dtype=dtype, enabled=dtype is not None):
            loss_sum = float(causal_lm_loss(model, batch, normalizer=1))
        if position < len(mine):
            total += loss_sum
            tokens += count_label_tokens(batch)
    total, tokens = distributed.all_reduce_sum([total, tokens])
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens}


# what StopSignals.received says when the run stops because its output's reader went away
CLOSED_OUTPUT = "a closed output"


def stop_exit_code(reason: str) -> int:
    """A stopped run's exit code: 141 (128 + SIGPIPE) where its output closed, as a shell tool
    stopped so; 130 for a signal."""
    return 128 + signal.SIGPIPE if reason == CLOSED_OUTPUT else 130


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal) ask the loop to stop at the next step boundary
    (a checkpoint follows); in one process with --grad-accum above 1, at the next micro-batch (the
    step is given up). So does an output whose reader went away (`output_closed`).

    A second SIGINT (Ctrl-C again) stops at once. A second SIGTERM does not: a scheduler that
    signals every process of a torchrun job (SLURM's scancel, its time limit) reaches each worker
    twice, directly and through torchrun, and the checkpoint must still be written. A signal the
    process was started ignoring stays ignored (`nohup`; a shell's background job ignores Ctrl-C)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.received: str | None = None
        self.closed_streams: set[str] = set()  # "stdout", "stderr": where the stop's own line cannot go
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                if signal.getsignal(sig) != signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests in threads)
                pass
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def output_closed(self, stream: str) -> None:
        self.closed_streams.add(stream)
        self.received = self.received or CLOSED_OUTPUT

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

