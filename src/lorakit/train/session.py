"""Running a prepared training job: resume, hooks (log, eval, checkpoint), signals, final files.

The output folder during and after a run:

    OUTPUT/config.yaml      resolved config (written at start)
    OUTPUT/metrics.jsonl    one JSON object per logged step (train) or evaluation (eval)
    OUTPUT/checkpoints/     crash-safe step checkpoints (train/checkpoint.py)
    OUTPUT/adapter/         the final adapter, PEFT format
    OUTPUT/loss.png         train and eval curves
    OUTPUT/summary.json     written LAST: a folder without it is an unfinished run
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import TrainingError
from lorakit.lora import adapter_state_dict, base_fingerprint, disable_adapters, lora_report, save_adapter, trainable_parameters
from lorakit.safe_io import atomic_write_json
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import Hooks, StepResult, StopSignals, Trainer, TrainState, evaluate
from lorakit.train.progress import Progress
from lorakit.train.run import Prepared, write_config


@dataclass
class RunResult:
    summary: dict
    output: Path
    interrupted: str | None = None
    history: list[dict] = field(default_factory=list)


def make_optimizer(prepared: Prepared) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(prepared.model)]
    t = prepared.config.train
    fused = prepared.settings.device.type == "cuda"
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {}))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


class Session:
    def __init__(self, prepared: Prepared, out: Path, log=print):
        self.p, self.out, self.log = prepared, out, log
        self.config = prepared.config
        self.optimizer = make_optimizer(prepared)
        self.state = TrainState()
        self.history: list[dict] = []
        self.metrics = None
        self.base_eval: dict | None = None
        self.last_eval: dict | None = None
        self.train_seconds = 0.0
        self.fingerprint = base_fingerprint(prepared.model)

    # ---- resume --------------------------------------------------------------------------
    def resume_if_asked(self) -> None:
        if not self.config.output.resume:
            return
        path = ckpt.find_latest_valid(self.out / "checkpoints")
        if path is None:
            self.log("resume: no complete checkpoint found; starting from the beginning")
            return
        checkpoint = ckpt.load_checkpoint(path)
        saved = checkpoint.trainer_state
        if saved.get("fingerprint") not in (None, self.fingerprint):
            from lorakit.errors import AdapterMismatchError

            raise AdapterMismatchError(f"the checkpoint {path} was made for another base model; "
                                       "resume with the same --model, or start a new --output")
        params = dict(self.p.model.named_parameters())
        with torch.no_grad():
            for name, tensor in checkpoint.model_tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))
        ckpt.load_optimizer_state(self.optimizer, checkpoint)
        self.state = TrainState(**saved["state"])
        self.base_eval = saved.get("base_eval")
        self.history = _read_history(self.out / "metrics.jsonl", self.state.step)
        self.train_seconds = saved.get("train_seconds", 0.0)
        checkpoint.restore_rng()
        self.log(f"resumed from {path.name} (step {self.state.step}, epoch {self.state.epoch}, batch {self.state.batch_index})")

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        tensors = {n: p.detach().cpu() for n, p in trainable_parameters(self.p.model)}
        trainer_state = {"state": self.state.to_json(), "config": self.config.to_dict(),
                         "fingerprint": self.fingerprint, "base_eval": self.base_eval,
                         "train_seconds": self.train_seconds}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.state.step, model_tensors=tensors,
                                    optimizer=self.optimizer, scheduler_state={"step": self.state.step},
                                    trainer_state=trainer_state, keep=self.config.output.keep_checkpoints)

    # ---- logging ---------------------------------------------------------------------------
    def record(self, entry: dict) -> None:
        self.history.append(entry)
        self.metrics.write(json.dumps(entry) + "\n")
        self.metrics.flush()

    def run_eval(self, label: str) -> dict | None:
        if self.p.eval is None:
            return None
        result = evaluate(self.p.model, self.p.eval, self.p.settings, self.config.train.eval_batches)
        self.record({"kind": "eval", "step": self.state.step, "label": label,
                     "eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
        return result

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        write_config(self.out, self.config)
        self.resume_if_asked()
        self._open_metrics()
        if self.base_eval is None and self.p.eval is not None:
            with disable_adapters(self.p.model):
                self.base_eval = self.run_eval("base")
            self.log(f"base model eval loss {self.base_eval['loss']:.4f} (perplexity {self.base_eval['perplexity']:.2f})")
        trainer = Trainer(self.p.model, self.p.train, self.p.settings, self.optimizer, self.state)
        with StopSignals() as signals, Progress(self.p.settings.total_steps, self.state.step, self.p.settings.device, self.state.seen_tokens) as bar:
            hooks = Hooks(on_step=lambda s, r: self._on_step(s, r, bar), should_stop=lambda: signals.received is not None)
            started = time.perf_counter()
            try:
                trainer.run(hooks)
            finally:
                self.train_seconds += time.perf_counter() - started
        if signals.received:
            path = self.save_checkpoint()
            self.log(f"stopped by {signals.received} at step {self.state.step}; checkpoint saved to {path}; "
                     "continue with the same command plus --resume")
            return RunResult({}, self.out, signals.received, self.history)
        return self.finish()

    def _on_step(self, state: TrainState, result: StepResult, bar) -> None:
        t = self.config.train
        bar.update(state, result)
        if result.skipped:
            self.log(f"step {state.step}: non-finite loss or gradient, update skipped ({state.bad_in_row} in a row)")
        if result.spike:
            self.log(f"step {state.step}: loss spike ({result.loss:.3f}, running mean {state.loss_ema:.3f})")
        if state.step % t.log_every == 0 or state.step == self.p.settings.total_steps:
            self.record({"kind": "train", "step": state.step, "loss": result.loss, "lr": result.lr,
                         "grad_norm": result.grad_norm, "tokens": state.train_tokens, "skipped": state.skipped_steps})
        if t.eval_every and state.step % t.eval_every == 0 and state.step < self.p.settings.total_steps:
            self.last_eval = self.run_eval(f"step {state.step}")
            bar.note(f"step {state.step}: eval loss {self.last_eval['loss']:.4f}" if self.last_eval else "")
        if t.save_every and state.step % t.save_every == 0 and state.step < self.p.settings.total_steps:
            self.save_checkpoint()

    def _open_metrics(self) -> None:
        path = self.out / "metrics.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in self.history))
        self.metrics = path.open("a", encoding="utf-8")

    # ---- the end ---------------------------------------------------------------------------
    def finish(self) -> RunResult:
        final_eval = self.run_eval("final")
        self.save_checkpoint()
        save_adapter(self.p.model, self.out / "adapter", base_model_name=_base_name(self.p))
        summary = self.summary(final_eval)
        _plot(self.history, self.out / "loss.png")
        self.metrics.close()
        atomic_write_json(self.out / "summary.json", summary)  # last: marks the run finished
        return RunResult(summary, self.out, None, self.history)

    def summary(self, final_eval: dict | None) -> dict:
        report = lora_report(self.p.model)
        lora = self.config.lora
        train_losses = [e["loss"] for e in self.history if e["kind"] == "train" and e["loss"] == e["loss"]]
        tail = train_losses[-max(1, len(train_losses) // 10):] if train_losses else [float("nan")]
        return {
            "base_eval_loss": self.base_eval["loss"] if self.base_eval else None,
            "final_eval_loss": final_eval["loss"] if final_eval else None,
            "base_eval_perplexity": self.base_eval["perplexity"] if self.base_eval else None,
            "final_eval_perplexity": final_eval["perplexity"] if final_eval else None,
            "train_loss": sum(tail) / len(tail),
            "steps": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "train_tokens": self.state.train_tokens,
            "tokens_per_second": self.state.seen_tokens / max(self.train_seconds, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.p.settings.device),
            "wall_seconds": self.train_seconds,
            "trainable_params": report.trainable_params,
            "total_params": report.total_params,
            "adapted_modules": report.adapted_modules,
            "r": lora.r, "alpha": lora.alpha, "scale": _scale(self.config),
            "target_modules": lora.targets,
            "model": _base_name(self.p),
            "adapter": str(self.out / "adapter"),
        }


def _scale(config) -> float:
    lora = config.lora
    return lora.alpha / (lora.r ** 0.5) if lora.rslora else lora.alpha / lora.r


def _base_name(prepared: Prepared) -> str:
    from lorakit.models import base_model_name

    return base_model_name(prepared.model)


def _read_history(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill: everything after it is newer than the checkpoint anyway
        if entry.get("step", 0) <= up_to_step:
            entries.append(entry)
    return entries


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if e["kind"] == "train"]
    evals = [(e["step"], e["eval_loss"]) for e in history if e["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
