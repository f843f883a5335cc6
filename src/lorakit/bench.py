"""Benchmark lorakit against PEFT: same model shape, same inputs, same LoRA, one table.

Every variant gets a fresh random-initialised Llama-shaped model built from the preset's
config (same seed), LoRA r on q,k,v,o,gate,up,down with alpha = 2r and dropout 0 (or
--dropout's), AdamW (lr 1e-4) and the same batch. A step is forward + backward + optimizer step.

The variants (lorakit, peft, peft-bf16, peft-liger and lorakit's ablations) are built in
bench_variants.py; the CPU child processes are run by bench_children.py.

GPU: bf16 weights, no autocast, every variant in this process with `empty_cache` and
`reset_peak_memory_stats` between them; peak = max allocated / reserved over the timed steps.
CPU: fp32, each variant in a child process, because a process's peak RSS never goes down;
peak = the child's peak RSS (imports and weights included). `interleave` (the CPU default)
starts every variant's child first and has them take their steps in turn (lockstep), so a
shared machine's bursts of load hit them alike; otherwise the children run one after the other.
(Models taking turns inside ONE process were tried and dropped: they slowed each other
unequally, PEFT by up to 30%, through the shared heap.)

Timing: `warmup` steps excluded, then over `steps` steps the median and min wall time (after a
device sync) and the median process CPU time. "saved" is what autograd keeps for backward in
one step (parameters excluded): a number noise cannot move.

MFU = F x tokens/s / peak, with F the model FLOPs per trained token (`flops_per_token`,
docs/performance.md) and the peak measured in the same run (bf16 8192^3 matmul on GPU, fp32
2048^3 on CPU) unless given. `check` (bench_check.py): gradients and losses against PEFT.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict

import torch

from lorakit.bench_inputs import make_inputs
from lorakit.bench_settings import GIB, BenchSettings, Plan, resolve
from lorakit.bench_variants import TARGETS, VARIANTS, Prepared, prepare_variant
from lorakit.errors import first_line
from lorakit.host import cpu_model, minor_page_faults, peak_rss_bytes
from lorakit.kernels import cpu_gemm
from lorakit.plan.estimate import model_flops

# ---- FLOPs -------------------------------------------------------------------------------------

def flops_per_token(shape: dict, r: int, context: float, labelled: float = 1.0) -> dict:
    """F = 4 N_mm + 6 N_lora + 6 L s h_q for a preset's config dict with LoRA on all seven
    projections: plan/estimate.py's `model_flops`, the one formula the estimator uses too."""
    return model_flops(shape, r, TARGETS, context, labelled)


def measure_matmul_peak(device: str, dtype: str = "float32") -> float:
    """Dense matmul TFLOP/s here: bf16 8192^3 on CUDA (mean of 10), 2048^3 in the model's dtype on
    the CPU (best of 5 through torch's mm and 5 through oneDNN's, kernels/cpu_gemm.py: the
    machine's faster GEMM; fewer where they take over PEAK_TIMING_BUDGET_S)."""
    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ a
        end.record()
        torch.cuda.synchronize()
        return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
    a, best = torch.randn(2048, 2048, dtype=getattr(torch, dtype)), float("inf")
    for backend in _backends_that_run(a):
        with cpu_gemm.use_backend(backend), torch.no_grad():
            spent = 0.0
            for _ in range(6):  # the first one warms up
                start = time.perf_counter()
                cpu_gemm.matmul(a, a)
                took = time.perf_counter() - start
                best, spent = min(best, took), spent + took
                if spent > PEAK_TIMING_BUDGET_S:
                    break
    return 2 * 2048**3 / best / 1e12


# products slower than this in all are timed no more: bf16 on a CPU without native bf16 takes
# about 10 s for one 2048^3 product (an AMD Zen 3), where more tries would only add minutes
PEAK_TIMING_BUDGET_S = 2.0


def _backends_that_run(t: torch.Tensor) -> tuple[str, ...]:
    """torch's and, where it takes this dtype here, oneDNN's (asking for it otherwise gets torch's)."""
    with cpu_gemm.use_backend(cpu_gemm.ONEDNN):
        onednn_runs = cpu_gemm.backend_for(t) == cpu_gemm.ONEDNN
    return (cpu_gemm.ATEN, cpu_gemm.ONEDNN) if onednn_runs else (cpu_gemm.ATEN,)


# ---- one variant -------------------------------------------------------------------------------

class SavedForBackward:
    """Bytes of distinct non-parameter storages autograd saves while the hooks are active."""

    def __init__(self, model: torch.nn.Module):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.param_ptrs:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(prepared: Prepared, batch: dict, device: str, hooks=None) -> tuple[float, float, float, int]:
    """One forward + backward + optimizer step: (wall seconds, process CPU seconds, loss, minor
    page faults)."""
    _sync(device)
    start, cpu_start, faults_start = time.perf_counter(), time.process_time(), minor_page_faults()
    forced = cpu_gemm.use_backend(prepared.gemm_backend) if prepared.gemm_backend else contextlib.nullcontext()
    with forced, _triton_launch(prepared.triton_launch):
        loss = _forward_backward(prepared, batch, hooks)
    prepared.optimizer.step()
    if prepared.captured is None:  # a replayed graph writes its gradients where they are
        prepared.optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # syncs the device too
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, value, minor_page_faults() - faults_start


def _forward_backward(prepared: Prepared, batch: dict, hooks=None) -> torch.Tensor:
    if prepared.captured is not None:
        return prepared.captured(batch)
    with hooks or contextlib.nullcontext():
        loss = prepared.loss_fn(batch)
    loss.backward()
    return loss


@contextlib.contextmanager
def _triton_launch(mode: str | None):
    """The variant's Triton launch mode for one step (process-wide: CUDA backwards run in
    autograd's threads), the previous one after."""
    if mode is None:
        yield
        return
    from lorakit.kernels import triton_launch

    previous = triton_launch.launch_mode(mode)
    try:
        yield
    finally:
        triton_launch.launch_mode(previous)


def new_raw(name: str) -> dict:
    return {"variant": name, "wall_s": [], "cpu_s": [], "faults": [], "losses": [], "saved_bytes": None,
            "notices": []}


def record_step(raw: dict, timed: bool, result: tuple[float, float, float, int]) -> None:
    raw["losses"].append(result[2])
    if timed:
        raw["wall_s"].append(result[0])
        raw["cpu_s"].append(result[1])
        raw["faults"].append(result[3])


def run_steps(name: str, prepared: Prepared, batch: dict, plan: Plan) -> dict:
    """Warm-up then timed steps of one variant; the first warm-up step also counts saved bytes."""
    s, saved, raw = plan.settings, SavedForBackward(prepared.model), new_raw(name)
    counts_saved = s.warmup > 0 and prepared.captured is None  # a graph's saved tensors live in its pool
    products = cpu_gemm.onednn_products()
    for step in range(s.warmup + s.steps):
        if step == s.warmup and plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hooks = saved.hooks() if step == 0 and counts_saved else None
        record_step(raw, step >= s.warmup, train_step(prepared, batch, plan.device, hooks))
    raw.update(saved_bytes=saved.nbytes if counts_saved else None, graphed=prepared.captured is not None,
               cpu_gemm=gemm_backend(cpu_gemm.onednn_products() - products, s.warmup + s.steps, plan.device))
    return raw


def gemm_backend(onednn_products: int, steps: int, device: str) -> str | None:
    """Whose GEMMs a CPU variant's frozen weights took, from the oneDNN products its steps made
    (kernels/cpu_gemm.py); None on a GPU."""
    if device != "cpu":
        return None
    return f"onednn ({onednn_products // steps} products per step)" if onednn_products else "aten"


def measure_variant(name: str, plan: Plan, inputs: dict) -> dict:
    """Build, train and measure one variant in this process."""
    rss_before = peak_rss_bytes()
    prepared = prepare_variant(name, plan)
    rss_built = peak_rss_bytes()
    raw = run_steps(name, prepared, inputs[prepared.inputs_key], plan)
    notices = prepared.notices + _attention_notice(name, plan)
    raw.update(notices=notices, memory=memory_figures(plan.device, rss_before, rss_built))
    del prepared
    return raw


def _attention_notice(name: str, plan: Plan) -> list[str]:
    """Packed GPU rows: whether torch's varlen kernel ran (it is dropped if its first call fails)."""
    variant = VARIANTS[name]
    if not (plan.settings.packing and plan.device == "cuda") or variant.peft or variant.mask_4d \
            or variant.per_document:
        return []
    from lorakit.kernels.varlen_attention import varlen_kernel_status

    return [varlen_kernel_status()]


def memory_figures(device: str, rss_before: int, rss_built: int) -> dict:
    if device == "cuda":
        return {"peak_allocated": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved()}
    return {"peak_rss": peak_rss_bytes(), "rss_at_start": rss_before, "rss_built": rss_built}


def release_cuda() -> None:
    """Free what the last variant left on the GPU and restart the peak counters. Nothing without
    CUDA: a CPU peak (RSS) never goes down, and a full collection in a large process takes seconds."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- running the variants ----------------------------------------------------------------------

def run_variants(plan: Plan, inputs: dict, log=print, measured=None) -> list[dict]:
    """Raw measurements of every variant: CPU children in lockstep (interleave) or one after the
    other (isolate), or in this process. `measured(results so far)` is called after each variant
    (not in lockstep, where all finish together)."""
    s = plan.settings
    from lorakit.bench_children import run_lockstep, spawn  # they import this module

    if s.interleave:
        return run_lockstep(plan, log)
    in_child, results = plan.device == "cpu" and s.isolate, []
    for name in s.variants:  # on GPU Liger comes last: its patches stay for the process
        log(f"  {name}: {'child process' if in_child else 'this process'}")
        results.append(spawn(name, plan) if in_child else _measure_here(name, plan, inputs, log))
        log(f"    {_progress(results[-1])}")
        if measured is not None:
            measured(results)
    return results


def _progress(raw: dict) -> str:
    if "error" in raw:
        return f"failed: {raw['error']}"
    mem = raw["memory"]
    peak = mem.get("peak_allocated", mem.get("peak_rss", 0)) / GIB
    return (f"median step {statistics.median(raw['wall_s']):.2f} s, CPU {statistics.median(raw['cpu_s']):.2f} s, "
            f"peak {peak:.2f} GiB, first loss {raw['losses'][0]:.4f}")


def _measure_here(name: str, plan: Plan, inputs: dict, log=print) -> dict:
    release_cuda()
    try:
        return measure_variant(name, plan, inputs)
    except torch.cuda.OutOfMemoryError as exc:
        return {"variant": name, "error": f"out of memory: {first_line(exc)}"}
    except Exception as exc:  # noqa: BLE001 - one broken variant (a kernel, a peer's patch) must not cost the others
        traceback.print_exc(file=sys.stderr)
        return {"variant": name, "error": _one_line(exc)}
    finally:
        try:  # after a sticky CUDA fault this raises too; the rows measured so far must still be reported
            release_cuda()
        except Exception as exc:  # noqa: BLE001
            log(f"    could not release GPU memory after {name}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


# ---- summary -----------------------------------------------------------------------------------

def summarize(raw: dict, tokens: int, flops: float, peak_tflops: float, device: str) -> dict:
    """One variant's figures from its raw measurements."""
    if "error" in raw:
        return {"variant": raw["variant"], "error": raw["error"]}
    step = statistics.median(raw["wall_s"])
    tokens_per_s = tokens / step
    mem = raw["memory"]
    row = {"variant": raw["variant"], "step_ms": 1e3 * step, "min_step_ms": 1e3 * min(raw["wall_s"]),
           "cpu_ms": 1e3 * statistics.median(raw["cpu_s"]), "timed_steps": len(raw["wall_s"]),
           # host page faults: a CPU step's cost of fresh memory (a GPU step's lives in its allocator)
           "page_faults": statistics.median(raw["faults"]) if raw.get("faults") and device == "cpu" else None,
           "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / (peak_tflops * 1e12),
           "saved_gib": None if raw["saved_bytes"] is None else raw["saved_bytes"] / GIB,
           "first_loss": raw["losses"][0], "last_loss": raw["losses"][-1], "notices": raw["notices"],
           "cpu_gemm": raw.get("cpu_gemm")}
    if device == "cuda":
        row.update(peak_allocated_gib=mem["peak_allocated"] / GIB, peak_reserved_gib=mem["peak_reserved"] / GIB)
        row["peak_gib"] = row["peak_allocated_gib"]
        if raw.get("graphed"):
            row["peak_gib"] = row["peak_reserved_gib"]
            row["notices"] = row["notices"] + ["peak = reserved memory: a replay allocates nothing, the graph's "
                                               "pool holds the step's memory"]
    else:
        row.update(peak_rss_gib=mem["peak_rss"] / GIB, rss_growth_gib=(mem["peak_rss"] - mem["rss_built"]) / GIB)
        row["peak_gib"] = row["peak_rss_gib"]
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speed (tokens/s, and CPU time) and peak-memory ratios against peft and peft-bf16."""
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        for base_name, suffix in (("peft", "peft"), ("peft-bf16", "peft_bf16")):
            base = by_name.get(base_name)
            row[f"speed_vs_{suffix}"] = base and row["tokens_per_s"] / base["tokens_per_s"]
            row[f"cpu_speed_vs_{suffix}"] = base and base["cpu_ms"] / row["cpu_ms"]
            row[f"memory_vs_{suffix}"] = base and row["peak_gib"] / base["peak_gib"]


def environment(plan: Plan) -> dict:
    import transformers

    import lorakit

    env = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "lorakit": lorakit.__version__,
           "peft": _version("peft"), "liger_kernel": _version("liger_kernel"), "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "threads": plan.settings.threads, "load_average": _load_average()}
    if plan.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ---- the whole benchmark -----------------------------------------------------------------------

def run_bench(settings: BenchSettings, log=print, partial=None) -> dict:
    """Everything `lorakit bench` reports, as a JSON-ready dict. `partial(result so far)` is
    called after the check and after each variant, so a run cut short keeps what it measured."""
    plan = resolve(settings)
    s = plan.settings
    torch.set_num_threads(s.threads)
    inputs = make_inputs(plan)
    flops = flops_per_token(plan.shape, s.r, inputs["context"], inputs["labelled"])
    log(f"{s.preset}: {s.layers} layers, batch {s.batch} x {s.seq_len}, {plan.dtype} on {s.device}, "
        f"{inputs['tokens']} real tokens per step, {100 * inputs['labelled']:.0f}% with a label")
    check = None
    if s.check:
        from lorakit.bench_check import check_against_peft

        log("  check: lorakit vs peft from identical weights")
        try:
            check = check_against_peft(plan, inputs)
        except Exception as exc:  # noqa: BLE001 - the speed rows still get measured and reported
            traceback.print_exc(file=sys.stderr)
            check = {"error": _one_line(exc), "passed": False}
        release_cuda()
    peak = s.peak_tflops or measure_matmul_peak(s.device, plan.dtype)
    report = functools.partial(_result, plan, inputs, flops, check=check)
    if partial is not None:
        partial(report([], peak))
    measured = None if partial is None else (lambda raw_so_far: partial(report(raw_so_far, peak)))
    raw = run_variants(plan, inputs, log, measured)
    if not s.peak_tflops and s.device == "cpu":  # a busy CPU's peak varies: the best seen in the run
        peak = max([peak, measure_matmul_peak("cpu", plan.dtype)] + [r.get("matmul_tflops", 0) for r in raw])
    return report(raw, peak)


def _result(plan: Plan, inputs: dict, flops: dict, raw: list[dict], peak: float, check: dict | None) -> dict:
    s = plan.settings
    rows = [summarize(r, inputs["tokens"], flops["per_token"], peak, s.device) for r in raw]
    add_ratios(rows)
    _compare_replayed_losses(raw, rows)
    return {"settings": asdict(s), "shape": plan.shape, "dtype": plan.dtype, "environment": environment(plan),
            "tokens_per_step": inputs["tokens"], "labelled_fraction": inputs["labelled"], "flops": flops,
            "peak": {"tflops": peak, "source": "--peak-tflops" if s.peak_tflops else _peak_source(plan)},
            "memory_note": _memory_note(plan), "notices": plan.notices, "variants": rows, "check": check}


def _compare_replayed_losses(raw: list[dict], rows: list[dict]) -> None:
    """A graphed row's losses against lorakit's, step by step (same seed, same batch, same
    kernels): a replay that computes something else (a copy left out of the capture) shows here."""
    eager = next((r["losses"] for r in raw if r["variant"] == "lorakit" and "error" not in r), None)
    for measured, row in zip(raw, rows):
        if not measured.get("graphed") or eager is None:
            continue
        pairs = list(zip(measured["losses"], eager))
        # a NaN compares as no difference in max(): a loss that is not a number is infinitely off
        worst = max(abs(a - b) / max(abs(b), 1e-12) if math.isfinite(a) else math.inf for a, b in pairs)
        row["loss_vs_lorakit"] = worst
        row["notices"] = row["notices"] + [f"losses against lorakit's over {len(pairs)} steps: max relative "
                                           f"difference {worst:.1e}"]


def _peak_source(plan: Plan) -> str:
    if plan.device == "cuda":
        return "measured: bf16 8192^3 matmul, mean of 10"
    dtype = "bf16" if plan.dtype == "bfloat16" else "fp32"
    return f"measured: {dtype} 2048^3 matmul, the best of 5 tries before, after, and in each child"


def _memory_note(plan: Plan) -> str:
    if plan.device == "cuda":
        return ("peak = torch.cuda.max_memory_allocated (and reserved) over the timed steps; all variants in "
                "one process, empty_cache + reset_peak_memory_stats between them")
    rss = "peak = a child process's peak RSS (VmHWM: imports and weights included), one child per variant "
    rss += "because a process's peak RSS never goes down"
    if plan.settings.interleave:
        return f"{rss}; the children take their steps in turn (lockstep)"
    if not plan.settings.isolate:
        return "peak RSS of this one process, cumulative over the variants: only the first variant's is its own"
    return rss

