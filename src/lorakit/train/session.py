"""Running a prepared training job: resume, hooks (log, eval, checkpoint), signals, final files.

The output folder during and after a run:

    OUTPUT/config.yaml      resolved config (written at start)
    OUTPUT/metrics.jsonl    one JSON object per logged step (train) or evaluation (eval)
    OUTPUT/checkpoints/     crash-safe step checkpoints (train/checkpoint.py)
    OUTPUT/adapter/         the final adapter, PEFT format
    OUTPUT/loss.png         train and eval curves
    OUTPUT/tensorboard/     the same metrics for TensorBoard (unless output.tensorboard is off)
    OUTPUT/summary.json     written LAST: a folder without it (or without a whole one and the
                            adapter) is an unfinished run, which --resume finishes
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.config import effective_scale
from lorakit.data.formats import TOKENIZE_REVISION
from lorakit.errors import (AdapterFileError, AdapterMismatchError, ConfigError, DataError, LorakitError, OutputError,
                            TrainingError)
from lorakit.kernels.chunked_ce import release_workspace
from lorakit.lora import base_fingerprint, disable_adapters, lora_report, save_adapter, trainable_parameters
from lorakit.safe_io import atomic_write_json, atomic_write_text, save_figure, translate_os_errors
from lorakit.terminal import surviving_closed_output
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.loop import CLOSED_OUTPUT, Hooks, StepResult, StopSignals, Trainer, TrainState, epoch_plan, evaluate
from lorakit.train.progress import Progress, SilentProgress, peak_memory_bytes
from lorakit.train.rng import capture_rng
from lorakit.train.run import RUN_FILES, Prepared, keep_global_batch, write_config
from lorakit.train.saved_run import (changes_what_base_eval_measured, check_tensors_fit, config_changes,
                                     finished_summary, read_history, train_state_from)
from lorakit.train.tensorboard_log import TensorBoardLog

# what rank 0 tells the others when --resume finds no checkpoint to load (else the step it loads)
_NO_CHECKPOINT, _ALL_DAMAGED, _FINISHED_RUN = -1, -2, -3


@dataclass
class RunResult:
    summary: dict
    output: Path
    interrupted: str | None = None
    history: list[dict] = field(default_factory=list)
    already_finished: bool = False  # --resume of a finished run at its last step: nothing was done


def make_optimizer(prepared: Prepared) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(prepared.model)]
    t = prepared.config.train
    # one kernel for all adapter tensors; on the CPU too (torch >= 2.4): 4.6 against 16.3 ms a
    # step for SmolLM2's 420 adapter tensors
    fused = prepared.settings.device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {}))


class Session:
    def __init__(self, prepared: Prepared, out: Path, log=print,
                 resume_hint: str = "continue with the same command plus --resume"):
        self.prepared, self.out, self.resume_hint = prepared, out, resume_hint
        self.log = log if distributed.is_main() else _quiet  # under torchrun rank 0 speaks and writes
        self.config = prepared.config
        self.optimizer = make_optimizer(prepared)
        self.state = TrainState()
        self.history: list[dict] = []
        self.metrics = None
        self.tensorboard = None
        self.base_eval: dict | None = None
        self.train_seconds = 0.0  # of the steps run before this process's current stretch of them
        self._steps_started: float | None = None  # when that stretch began, while it runs
        self.paused_seconds = 0.0  # of the training time: mid-run evals and checkpoints, not in the tokens/s
        self.fingerprint = base_fingerprint(prepared.model)
        self.data_fingerprint = prepared.train.fingerprint()
        # the grad_accum the user last asked for: a resume may adjust the config's (keep_global_batch)
        self.requested_grad_accum = self.config.train.grad_accum
        self.earlier_peak_bytes = 0  # the peak memory of the processes before a resume (their checkpoint's)
        self.finished_summary: dict | None = None  # a finished run's, when --resume finds nothing to train

    # ---- resume --------------------------------------------------------------------------
    def resume_if_asked(self) -> None:
        if not self.config.output.resume:
            return
        for name in RESUME_FILES:  # read or replaced below: a folder of that name would stop the resume mid-way
            if (self.out / name).exists() and not (self.out / name).is_file():
                raise OutputError(f"{self.out / name} is not a file, where the run keeps its {name}; move it out "
                                  "of the run folder and resume again")
        path = self._latest_checkpoint()
        if path is None:
            self.log(self._nothing_to_resume())
            return
        checkpoint = ckpt.load_checkpoint(path)
        log, notes = self.log, []
        self.log = notes.append  # what the checks say (changed settings, data): where the run goes on,
        try:
            state, saved = self._check_resumable(path, checkpoint)
        except LorakitError:
            for note in notes:  # or where a check refuses it: a changed setting may be why
                log(note)
            raise
        finally:
            self.log = log
        if state.step == self.prepared.settings.total_steps:
            found = finished_summary(self.out) if distributed.is_main() else None
            if distributed.broadcast_int(int(found is not None)):  # rank 0's answer: every rank returns, or none
                self.finished_summary = found or {}
                return
        for note in notes:
            self.log(note)
        self._restore(checkpoint, state, saved)
        if distributed.is_main():  # a finished run continued (more --max-steps) is unfinished until it ends
            (self.out / "summary.json").unlink(missing_ok=True)
        self.log(f"resumed from {path.name} (step {state.step}, epoch {state.epoch}, batch {state.batch_index})")

    def _nothing_to_resume(self) -> str:
        """A folder without a run's files may be a mistyped --output: say where the new run starts
        (a job script that always passes --resume starts its first run so, and must go on)."""
        if any((self.out / name).exists() for name in RUN_FILES):
            return "resume: no complete checkpoint found; starting from the beginning"
        return (f"resume: {self.out} holds no earlier run; starting a new one there (check --output if you meant "
                "to continue a run)")

    def _check_resumable(self, path: Path, checkpoint) -> tuple[TrainState, dict]:
        """The checkpoint's position and trainer state, once it is known to fit this model, data
        and run (grad_accum may be changed to keep its global batch)."""
        saved = checkpoint.trainer_state
        state = train_state_from(path, saved)
        if saved.get("fingerprint") not in (None, self.fingerprint):
            raise AdapterMismatchError(f"the checkpoint {path} was made for another base model; "
                                       "resume with the same --model, or start a new --output")
        check_tensors_fit(path, self.prepared.model, checkpoint.model_tensors)
        batch_change = self._global_batch_change(saved)
        self._note_changed_config(saved.get("config"), batch_change)
        retokenised = saved.get("tokenize_revision") != TOKENIZE_REVISION  # none saved: made before it was recorded
        if retokenised and saved.get("data_fingerprint") not in (None, self.data_fingerprint):
            self.log("resume: this lorakit turns the data into examples otherwise than the one that made the "
                     "checkpoint (which tokens train, how long texts are split); the run continues at the saved "
                     "position, so it will not match an uninterrupted run, and the base eval loss is measured again")
        elif saved.get("data_fingerprint") not in (None, self.data_fingerprint):
            saved_data = (saved.get("config") or {}).get("data") or {}
            same_files = saved_data.get("data") == self.config.data.data and \
                saved_data.get("columns", []) == self.config.data.columns  # else other columns read
            self.log(f"resume: the training data differs from the checkpoint's{' (same files, other contents)' if same_files else ''}; "
                     "the run continues on the new data at the saved position, so it will not match an uninterrupted run")
        if retokenised or changes_what_base_eval_measured(saved.get("config") or {}, self.config.to_dict()):
            saved = {**saved, "base_eval": None}  # measured on other data or another base: measure again
        self._check_data_position(path, state)
        if batch_change is None:
            self._keep_global_batch(saved)  # may change grad_accum, and with it the run's last step
        if state.step > self.prepared.settings.total_steps:
            raise ConfigError(f"the checkpoint {path} is at step {state.step}, past this run's last step "
                              f"({self.prepared.settings.total_steps}); resume with --max-steps {state.step} or more, "
                              "or start a new --output")
        return state, saved

    def _restore(self, checkpoint, state: TrainState, saved: dict) -> None:
        """Weights, optimizer, position, history and random streams as the checkpoint left them."""
        distributed.load_full_tensors(dict(self.prepared.model.named_parameters()), checkpoint.model_tensors)
        if distributed.world_size() > 1:  # whole tensors -> this run's layout (sharded or not)
            whole = checkpoint.optimizer_state_dict
            checkpoint.optimizer_state_dict = distributed.shard_optimizer_state(self.optimizer, whole)
        ckpt.load_optimizer_state(self.optimizer, checkpoint)
        self.state = state
        self.base_eval = saved.get("base_eval")
        self.history = read_history(self.out / "metrics.jsonl", state.step, saved.get("history_len"))
        if len(self.history) < (saved.get("history_len") or 0):
            self.log(f"resume: metrics.jsonl holds {len(self.history)} of the {saved['history_len']} entries logged "
                     "before the checkpoint (the file was removed or damaged); the run goes on, and metrics.jsonl, "
                     "loss.png and the final report's train loss cover what is left")
        self.train_seconds = saved.get("train_seconds", 0.0)
        self.paused_seconds = saved.get("paused_seconds", 0.0)
        measured_alike = (saved.get("peak_memory_device") == self.prepared.settings.device.type
                          and saved.get("world_size", 1) == distributed.world_size())  # per GPU, or a host's RSS
        self.earlier_peak_bytes = (saved.get("peak_memory_bytes") or 0) if measured_alike else 0
        checkpoint.restore_rng()
        if not distributed.restore_rank_rng(checkpoint.rng_tensors):  # another number of processes
            distributed.diverge_rank_rng()

    def _latest_checkpoint(self) -> Path | None:
        """Rank 0 picks (and tidies) the newest complete checkpoint; every rank loads that one."""
        root = self.out / "checkpoints"
        step = distributed.broadcast_int(self._checkpoint_code(root) if distributed.is_main() else _NO_CHECKPOINT)
        if step == _ALL_DAMAGED:
            raise AdapterFileError(f"--resume: every checkpoint in {root} is damaged (see the warnings above); "
                                   "restore one, or pass --overwrite instead of --resume to start again")
        if step == _FINISHED_RUN:
            raise ConfigError(f"--resume: {self.out} holds a finished run ({' and '.join(self._finished_files())}) "
                              "but no checkpoint to go on from; pass --overwrite to train it again from the start, "
                              "or choose another --output")
        return None if step < 0 else root / ckpt.step_dir_name(step)

    def _checkpoint_code(self, root: Path) -> int:
        """The step of the newest complete checkpoint, or why there is none (a negative code)."""
        found = ckpt.find_latest_valid(root)
        if found is not None:
            return int(found.name.rsplit("-", 1)[1])
        if ckpt.list_checkpoints(root):
            return _ALL_DAMAGED  # never silently start over
        if self._finished_files():
            return _FINISHED_RUN  # starting over would replace its adapter
        return _NO_CHECKPOINT

    def _finished_files(self) -> list[str]:
        return [name for name in ("summary.json", "adapter") if (self.out / name).exists()]

    def _check_data_position(self, path: Path, state: TrainState) -> None:
        batches = len(epoch_plan(self.prepared.train, self.prepared.settings, state.epoch))
        if state.batch_index > batches:
            raise DataError(f"the checkpoint {path} stopped after micro-batch {state.batch_index} of epoch {state.epoch}, "
                            f"but the data now makes {batches} micro-batches per epoch; resume with the same data, "
                            "--batch-size, --seq-len and --seed, or start a new --output")

    def _note_changed_config(self, saved: dict | None, batch_change: str | None) -> None:
        """Resuming with other settings is allowed (e.g. more --max-steps) but not exact: say so.
        grad_accum counts as changed only where the global batch does (`_global_batch_change`)."""
        changed = [change for change in config_changes(saved or {}, self.config.to_dict())
                   if not change.startswith("train.grad_accum ")] + ([batch_change] if batch_change else [])
        if changed:
            self.log("resume: settings differ from the checkpoint's (the run continues with the new ones, "
                     "so it will not match an uninterrupted run): " + ", ".join(changed))

    def _global_batch_change(self, saved: dict) -> str | None:
        """The new global batch this resume takes, in words, or None: a grad_accum given (flag or
        config file) other than the one the run last asked for, making other micro-batches per step
        than the checkpoint's. Otherwise the checkpoint's global batch is kept, on any number of
        processes: the same command resumes the same run, however often (the checkpoint's config
        may hold a grad_accum adjusted for another number of processes, so the request is saved
        apart, and recorded here for the next checkpoint)."""
        saved_config = (saved.get("config") or {}).get("train") or {}
        requested = saved.get("requested_grad_accum", saved_config.get("grad_accum"))
        asked = self.config.train.grad_accum
        if self.config.sources.get("train.grad_accum") not in ("flag", "config file") or asked == requested:
            self.requested_grad_accum = requested or asked
            return None
        self.requested_grad_accum = asked
        per_step = saved.get("micro_batches_per_step")  # None: a checkpoint older than the field
        now = asked * distributed.world_size()
        if per_step is None:
            return f"train.grad_accum {requested!r} -> {asked!r}"
        if now == per_step:
            return None
        return f"train.grad_accum {requested!r} -> {asked!r} ({per_step} -> {now} micro-batches per step)"

    def _keep_global_batch(self, saved: dict) -> None:
        """The checkpoint's micro-batches per step, on this run's processes (grad_accum adjusted)."""
        per_step = saved.get("micro_batches_per_step")
        notice = keep_global_batch(self.prepared, per_step) if per_step else None
        if notice:
            self.log(notice)

    # ---- checkpoints -----------------------------------------------------------------------
    def _train_seconds_so_far(self) -> float:
        """Training time up to now: a checkpoint taken mid-run must carry it, or a resume after a
        kill would report the time (and tokens/s) of its own steps alone."""
        running = time.perf_counter() - self._steps_started if self._steps_started is not None else 0.0
        return self.train_seconds + running

    def gather_peak_bytes(self) -> int:
        """The run's peak memory: the highest of its processes' (a collective: every rank calls it),
        or that of the run before a resume where higher (a run stopped in its final evaluation
        resumes into no training step at all)."""
        return max(distributed.max_int(peak_memory_bytes(self.prepared.settings.device)), self.earlier_peak_bytes)

    def save_checkpoint(self) -> Path:
        """Every rank gathers (sharded tensors need all of them); rank 0 alone writes."""
        s = self.prepared.settings
        tensors = distributed.full_tensors(trainable_parameters(self.prepared.model))
        optimizer = distributed.full_optimizer_state(self.optimizer) if s.world_size > 1 else self.optimizer
        rng_tensors, rng_meta = capture_rng()
        rng_tensors.update(distributed.gather_rank_rng())
        peak_bytes = self.gather_peak_bytes()  # a collective: every rank, before rank 0 alone writes
        trainer_state = {"state": self.state.to_json(), "config": self.config.to_dict(),
                         "fingerprint": self.fingerprint, "data_fingerprint": self.data_fingerprint,
                         "tokenize_revision": TOKENIZE_REVISION, "base_eval": self.base_eval,
                         "train_seconds": self._train_seconds_so_far(), "paused_seconds": self.paused_seconds,
                         "history_len": len(self.history),
                         "micro_batches_per_step": s.grad_accum * s.world_size, "world_size": s.world_size,
                         "requested_grad_accum": self.requested_grad_accum, "peak_memory_bytes": peak_bytes,
                         "peak_memory_device": s.device.type}

        def write() -> Path:
            return ckpt.save_checkpoint(self.out / "checkpoints", self.state.step, model_tensors=tensors,
                                        optimizer=optimizer, scheduler_state={"step": self.state.step},
                                        trainer_state=trainer_state, keep=self.config.output.keep_checkpoints,
                                        rng=(rng_tensors, rng_meta))

        # no rank goes on (or exits) before the checkpoint is complete; a failed write (a full
        # disk) stops every rank with rank 0's one message, not the others with a collective's error
        written = distributed.main_first(write)
        return written or self.out / "checkpoints" / ckpt.step_dir_name(self.state.step)

    # ---- logging ---------------------------------------------------------------------------
    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.metrics is not None:  # rank 0 only
            with translate_os_errors(self.out / "metrics.jsonl"):  # a torn last line: a resume cuts it
                self.metrics.write(json.dumps(entry) + "\n")
                self.metrics.flush()
        if self.tensorboard is not None:
            self.tensorboard.add(entry)

    def run_eval(self, label: str) -> dict | None:
        if self.prepared.eval is None:
            return None
        result = evaluate(self.prepared.model, self.prepared.eval, self.prepared.settings, self.config.train.eval_batches)
        self.record({"kind": "eval", "step": self.state.step, "label": label,
                     "eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
        return result

    # ---- the run ---------------------------------------------------------------------------
    def run(self, before_training: Callable[[], None] = lambda: None) -> RunResult:
        """Resume if asked, train, save; `before_training` is called once it is known that the run
        trains (not for a finished run resumed without more steps)."""
        self.resume_if_asked()
        if self.finished_summary is not None:
            more = "--max-steps" if self.config.train.max_steps is not None else "--epochs or --max-steps"
            self.log(f"the run in {self.out} finished at step {self.prepared.settings.total_steps}, its last; nothing "
                     f"to train (pass a larger {more} to train it further)")
            return RunResult(self.finished_summary, self.out, None, [], already_finished=True)
        before_training()
        if distributed.is_main():
            write_config(self.out, self.config)  # after resume: it may keep the checkpoint's global batch
            self._open_metrics()
        if self.base_eval is None and self.prepared.eval is not None:
            with disable_adapters(self.prepared.model):
                self.base_eval = self.run_eval("base")
            self.log(f"base model eval loss {self.base_eval['loss']:.4f} (perplexity {self.base_eval['perplexity']:.2f})")
            _refuse_non_finite_base(self.base_eval["loss"])
        trainer = Trainer(self.prepared.model, self.prepared.train, self.prepared.settings, self.optimizer, self.state)
        progress = Progress if distributed.is_main() else SilentProgress
        # the handlers stay through the stop's checkpoint: a late signal must not kill its save
        with StopSignals() as signals, surviving_closed_output(signals.output_closed):
            with progress(self.prepared.settings.total_steps, self.state.step, self.prepared.settings.device,
                          self.state.seen_tokens) as bar:
                # every rank stops at the same step, whichever rank got the signal
                hooks = Hooks(on_step=lambda s, r: self._on_step(s, r, bar),
                              should_stop=lambda: distributed.any_rank(signals.received is not None))
                self._steps_started = time.perf_counter()
                try:
                    trainer.run(hooks)
                finally:
                    self.train_seconds = self._train_seconds_so_far()
                    self._steps_started = None
            # an output that closed as the last step ended leaves nothing to stop: the run finishes
            stop = signals.received is not None and (signals.received != CLOSED_OUTPUT
                                                     or self.state.step < self.prepared.settings.total_steps)
            if distributed.any_rank(stop):
                return self._stop(signals.received or "a signal to another rank", signals.closed_streams)
        return self.finish()

    def _stop(self, signal_name: str, closed_streams: set[str]) -> RunResult:
        path = self.save_checkpoint()
        log = _to_stderr if "stdout" in closed_streams and distributed.is_main() else self.log  # `| head`
        log(f"stopped by {signal_name} at step {self.state.step}; checkpoint saved to {path}; {self.resume_hint}")
        return RunResult({}, self.out, signal_name, self.history)

    def _on_step(self, state: TrainState, result: StepResult, bar) -> None:
        t = self.config.train
        bar.update(state, result)
        if result.overflowed:
            self.log(f"step {state.step}: float16 gradients overflowed; update skipped, loss scale lowered to "
                     f"{state.loss_scale:g}")
        elif result.skipped:
            self.log(f"step {state.step}: non-finite loss or gradient, update skipped ({state.bad_in_row} in a row)")
        if result.spike:
            self.log(f"step {state.step}: loss spike ({result.loss:.3f}, running mean {state.loss_ema:.3f})")
        if state.step % t.log_every == 0 or state.step == self.prepared.settings.total_steps:
            self.record({"kind": "train", "step": state.step, "loss": result.loss, "lr": result.lr,
                         "grad_norm": result.grad_norm, "tokens": state.train_tokens, "skipped": state.skipped_steps})
        if t.eval_every and state.step % t.eval_every == 0 and state.step < self.prepared.settings.total_steps:
            with self._paused(bar):
                evaluation = self.run_eval(f"step {state.step}")
            bar.note(f"step {state.step}: eval loss {evaluation['loss']:.4f}" if evaluation else "")
        if t.save_every and state.step % t.save_every == 0 and state.step < self.prepared.settings.total_steps:
            with self._paused(bar):
                self.save_checkpoint()

    @contextlib.contextmanager
    def _paused(self, bar):
        """A mid-run eval or checkpoint: training time, but no step's (the tokens/s leaves it out)."""
        before = bar.paused_seconds
        with bar.paused():
            yield
        self.paused_seconds += bar.paused_seconds - before

    def _open_metrics(self) -> None:
        path = self.out / "metrics.jsonl"
        # atomic: a kill while rewriting must not lose the history a later resume reads back
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in self.history))
        self.metrics = path.open("a", encoding="utf-8")
        if self.config.output.tensorboard:
            # resumed at step s: TensorBoard hides what the killed run logged from step s on (purge_step),
            # the entries at s that the checkpoint kept are logged again, and later ones come anew
            resumed = self.state.step > 0
            self.tensorboard = TensorBoardLog(self.out / "tensorboard", self.state.step if resumed else None, self.log)
            if resumed:
                for entry in self.history:
                    if entry.get("step") == self.state.step:
                        self.tensorboard.add(entry)

    # ---- the end ---------------------------------------------------------------------------
    def finish(self) -> RunResult:
        if self.state.step and self.state.skipped_steps >= self.state.step:
            raise TrainingError(f"all {self.state.step} steps had a non-finite loss or gradient, so nothing was "
                                "learned and no adapter was written: check the model and the data (in float16, "
                                "--dtype auto's on a GPU without bf16, a model may overflow: --dtype float32), or "
                                "lower --lr")
        self.save_checkpoint()  # before the final eval: a resume from it evaluates (and logs) it once
        final_eval = self.run_eval("final")
        self._refuse_non_finite_final(final_eval)
        release_workspace()  # the loss's CPU buffers: no more loss in this run
        with distributed.whole_trainable(self.prepared.model):  # sharded adapters gathered on every rank
            if distributed.is_main():
                save_adapter(self.prepared.model, self.out / "adapter", base_model_name=_base_name(self.prepared),
                             system_turn=self.prepared.train.system_turn)
        peak = self.gather_peak_bytes()  # every rank: the highest of theirs
        if not distributed.is_main():
            return RunResult({}, self.out, None, self.history)
        summary = self.summary(final_eval, peak)
        try:
            _plot(self.history, self.out / "loss.png")
        except (OutputError, RuntimeError, ValueError) as exc:  # a picture: the run's figures are in metrics.jsonl
            self.log(f"warning: loss.png was not written ({exc}); the losses are in metrics.jsonl")
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        atomic_write_json(self.out / "summary.json", _strict_json(summary))  # last: marks the run finished
        return RunResult(summary, self.out, None, self.history)

    def _refuse_non_finite_final(self, final_eval: dict | None) -> None:
        """No adapter and no summary (a run that looks finished) from training that diverged: its
        adapter's weights are finite, but what the model computes with them is not."""
        if final_eval is None or math.isfinite(final_eval["loss"]):
            return
        state, lr = self.state, self.config.train.lr
        raise TrainingError(f"the final eval loss is {final_eval['loss']}: training diverged ({state.skipped_steps} of "
                            f"{state.step} steps had a non-finite loss or gradient) and no adapter was written; the "
                            f"newest checkpoints hold the diverged weights too: lower --lr (it is {lr:g}) and train "
                            "again, into a new --output or with --overwrite")

    def summary(self, final_eval: dict | None, peak_bytes: int) -> dict:
        report = lora_report(self.prepared.model)
        lora = self.config.lora
        # NaN losses (a skipped step's) are left out: NaN alone is unequal to itself
        train_losses = [e["loss"] for e in self.history if e["kind"] == "train" and e["loss"] == e["loss"]]
        tail = train_losses[-max(1, len(train_losses) // 10):] if train_losses else [float("nan")]
        return {
            "base_eval_loss": self.base_eval["loss"] if self.base_eval else None,
            "final_eval_loss": final_eval["loss"] if final_eval else None,
            "base_eval_perplexity": self.base_eval["perplexity"] if self.base_eval else None,
            "final_eval_perplexity": final_eval["perplexity"] if final_eval else None,
            "train_loss": sum(tail) / len(tail),
            "steps": self.state.step,
            "world_size": distributed.world_size(),
            "skipped_steps": self.state.skipped_steps,
            "train_tokens": self.state.train_tokens,  # those with a label: the loss's
            "seen_tokens": self.state.seen_tokens,  # every token of the batches: what tokens_per_second counts
            "tokens_per_second": self.state.seen_tokens / max(self.train_seconds - self.paused_seconds, 1e-9),
            "peak_memory_bytes": peak_bytes,
            "wall_seconds": self.train_seconds,  # the steps' time, with mid-run evals and checkpoints
            "eval_and_checkpoint_seconds": self.paused_seconds,
            "trainable_params": report.trainable_params,
            "total_params": report.total_params,
            "adapted_modules": report.adapted_modules,
            "r": lora.r, "alpha": lora.alpha, "scale": effective_scale(self.config),
            "target_modules": lora.targets, "exclude_modules": lora.exclude,
            "model": _base_name(self.prepared),
            "dtype": str(next(self.prepared.model.parameters()).dtype).removeprefix("torch."),
            "quantize": self.config.model.quantize,  # the base's bits: "none", "4bit", "8bit"
            "device": self.prepared.settings.device.type,
            "adapter": str(self.out / "adapter"),
        }


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _quiet(*args, **kwargs) -> None:
    pass


def _base_name(prepared: Prepared) -> str:
    from lorakit.models import base_model_name

    return base_model_name(prepared.model)


RESUME_FILES = ("metrics.jsonl", "summary.json")  # the run's own files a resume reads or removes


def _refuse_non_finite_base(loss: float) -> None:
    if not math.isfinite(loss):
        raise TrainingError(f"the base model's eval loss is {loss} before any training: its weights or the data give "
                            "non-finite values; check the model (in float16, --dtype auto's on a GPU without bf16, "
                            "a model may overflow: --dtype float32) and the data")


def _plot(history: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend switched under a user's notebook

    train = [(e["step"], e["loss"]) for e in history if e["kind"] == "train"]
    evals = [(e["step"], e["eval_loss"]) for e in history if e["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        # base and final alone (no --eval-every): two markers, not a line that reads as a curve
        ax.plot(*zip(*evals), "o-" if len(evals) > 2 else "o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _strict_json(value):
    """NaN and inf as null: summary.json is read by other tools (jq, JavaScript), whose JSON has
    no NaN; a diverged run's losses are non-finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value
