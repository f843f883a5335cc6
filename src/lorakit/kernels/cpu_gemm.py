"""Products with frozen weights on the CPU: through oneDNN where it beats torch's BLAS, in fp32
where the CPU has no instructions for a 16-bit dtype.

torch's fp32 `mm` on the CPU calls MKL. MKL picks its kernels by CPU vendor as well as by
instruction set, and on this project's machines (AMD EPYC, Zen 5) its fp32 GEMMs run at about
half of what the AVX-512 units do: 215-222 GFLOP/s on 2 threads against oneDNN's 464-493 for the
same products (2048^3 and the shapes of a SmolLM2 block; docs/performance.md). oneDNN, which
torch also ships, chooses by instruction set. Its results are fp32 products like MKL's
(summation order aside: no reduced-precision arithmetic), so the fused LoRA blocks, the
chunked loss and the frozen nn.Linear modules route their GEMMs through here:

    linear(x, w, b)        x @ w.T + b     forward of a projection (w: out x in)
    matmul(x, w)           x @ w           its input gradient; w.T is read in place, not copied
    matmul_add(x, w, acc)  acc + x @ w     the same, summed over the projections sharing x
    grad_weight(dy, x)     dy.T @ x        an adapter matrix's gradient
    addmm_(out, x, w, s)   out += s * x @ w in place: an adapter's rank-r product
    frozen_linear(x, w, b) F.linear for a weight that gets no gradient, as an autograd function

A 16-bit product on a CPU without instructions for its dtype (bf16 without AVX512-BF16 or AMX,
fp16 without AVX512-FP16 or AMX-FP16) is computed from fp32 copies of its operands and rounded
once (`widens`): the product a native 16-bit GEMM gives (fp32 accumulation), summation order
aside, at fp32's rate instead of torch's emulation (an fp16 GEMM 5x slower on a Zen 4, a bf16 step
46x on a Zen 3; docs/performance.md). `linear` does so where autograd records it too (the unfused
LoRA layers' adapters), through an autograd function that saves the 16-bit operands.

`backend_for(t)` decides per dtype and thread count, the first time this machine asks, by timing
one GEMM both ways (under a second, oneDNN's kernel generation included): oneDNN when it is
clearly faster, torch's own `mm` otherwise (always for GPU tensors). Where the answer is known,
nothing is timed (_known_choice): fp32 takes oneDNN on an AMD CPU with AVX-512, and torch's on an
Intel CPU, where a step with oneDNN's took 12-13% longer, and on an AMD CPU without AVX-512 (a
Zen 3: as long, or 13-15% longer).
The choice is remembered per CPU model (name, family and model numbers) in lorakit's cache
(cpu_gemm.json: delete it to time again), so every run on the machine, and a run and its resume,
take the same products and give the same bits. LORAKIT_CPU_GEMM=onednn or =aten fixes the choice.
Whatever oneDNN cannot take exactly as torch would takes torch's path: a call that records an
autograd graph (the op has no derivative), autocast, torch.compile tracing, functorch transforms,
empty operands, a strided bias or one of another dtype; so does a weight oneDNN would pack
slowly (neither row- nor column-major: an expanded or sliced view) and a sum not stored densely.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import threading
import time

import torch

from lorakit.errors import ConfigError

ONEDNN, ATEN = "onednn", "aten"
WIDEN = "fp32"  # a route, not a backend: a 16-bit product computed from fp32 copies (widens)
WIDEN_BLOCK_BYTES = 64 << 20  # the largest fp32 copy of a weight's rows a widened product makes
ENV_VAR = "LORAKIT_CPU_GEMM"
CHOICES_FILE = "cpu_gemm.json"  # in lorakit's cache: each machine's choice, per dtype and thread count
# oneDNN is chosen when its best time is below this share of torch's: on Zen 5 it measured
# 0.45-0.5 in fp32 and 1.0 in bf16; where both run the same instruction set they are within a
# few percent
WIN_RATIO = 0.85
_TIMED_SHAPE = (512, 576, 1536)  # (rows, in, out): one of the MLP's GEMMs at a small batch
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

# oneDNN keeps each GEMM shape's primitive, with its scratch buffers, in two caches of 1024
# entries (oneDNN's own and ideep's, torch's wrapper). Batches of varying length bring new shapes
# every step: the demo's fp32 run grew by 0.6 GiB over 60 steps. 64 entries each keep a fixed-shape
# step's products (about 25) and bound the growth to about 0.2 GiB; a shape made anew costs about
# 2 ms. Both are read when oneDNN first runs, so this holds wherever lorakit is imported first;
# a value the user set stays.
CACHE_CAPACITY = "64"
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, CACHE_CAPACITY)

_chosen: dict[tuple[torch.dtype, int], str] = {}
_choosing = threading.Lock()
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("lorakit_cpu_gemm", default=None)


def backend_for(t: torch.Tensor) -> str:
    """The backend the products with `t`'s device and dtype take here."""
    if (t.device.type != "cpu" or t.dtype not in _ONEDNN_DTYPES or not _onednn_available()
            or not torch.backends.mkldnn.enabled):
        return ATEN
    choice = _forced.get() or _from_environment()
    if choice is not None:
        return choice if choice == ATEN or _onednn_runs(t.dtype) else ATEN
    key = (t.dtype, torch.get_num_threads())
    if key not in _chosen:
        with _choosing:
            if key not in _chosen:
                _chosen[key] = _remembered_choice(t.dtype)
    return _chosen[key]


def _remembered_choice(dtype: torch.dtype) -> str:
    """The backend this machine chose before (CHOICES_FILE in lorakit's cache), else timed now and
    remembered. The two backends round differently: two runs, or a run and its resume, must take
    the same one to give the same bits, and a timing on a busy machine could come out either way.
    Where the answer is known (_known_choice) nothing is timed."""
    from lorakit import host
    from lorakit.errors import OutputError
    from lorakit.safe_io import atomic_write_json

    known_choice = _known_choice(dtype)
    if known_choice is not None:
        return known_choice
    path = host.cache_dir() / CHOICES_FILE
    key = f"{host.cpu_model()} | torch {torch.__version__} | {dtype} | {torch.get_num_threads()} threads"
    known = _read_choices(path)
    if known.get(key) in (ONEDNN, ATEN):
        return known[key]
    choice = _faster_backend(dtype)
    with contextlib.suppress(OSError, OutputError):  # a read-only or full cache: this process keeps its choice
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**known, key: choice})
    return choice


def _known_choice(dtype: torch.dtype) -> str | None:
    """The fp32 choice where it is known, so that a timing on a busy machine cannot pick the slower
    and keep it (a busy Zen 4 once cached MKL: 1.2x PEFT instead of 1.4x). oneDNN on an AMD CPU
    with AVX-512: torch's MKL ran its fp32 GEMMs there at 0.45-0.5 of oneDNN's rate on Zen 5 and
    0.65-0.85 on Zen 4. torch's (MKL) on an Intel CPU, whose widest kernels MKL, Intel's own, runs:
    on two Xeons a step took 12-13% longer with oneDNN's; and on an AMD CPU without AVX-512, where
    the timed forward product chose oneDNN but a Zen 3's step took as long with it as with MKL on
    one day and 13-15% longer on another (docs/performance.md). None elsewhere: timed."""
    from lorakit import host

    vendor = host.proc_field("/proc/cpuinfo", "vendor_id") if dtype == torch.float32 else None
    if vendor == "GenuineIntel":
        return ATEN
    if vendor != "AuthenticAMD":
        return None
    avx512 = getattr(torch.cpu, "_is_avx512_supported", lambda: False)()  # torch.cpu: private, as models' bf16 probe
    return ONEDNN if avx512 and _onednn_runs(dtype) else ATEN


def _read_choices(path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: timed again
        return {}
    return known if isinstance(known, dict) else {}


@contextlib.contextmanager
def use_backend(name: str | None):
    """Fix the backend inside the block, in this thread (None: decide as usual); for tests and
    measurements."""
    if name not in (ONEDNN, ATEN, None):
        raise ValueError(f"unknown backend {name!r}; use {ONEDNN!r} or {ATEN!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def check_environment() -> None:
    """Refuse a LORAKIT_CPU_GEMM value other than auto, onednn or aten (a CLI checks at start)."""
    if _environment_value() not in ("auto", ONEDNN, ATEN):
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a CPU GEMM backend; "
                          f"set it to auto, {ONEDNN} or {ATEN}, or unset it")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x (..., in) and weight (out, in). Where autograd records it, a
    widened product goes through an autograd function (_WidenedLinear); oneDNN's, torch's path."""
    route = _route(x, weight, bias)
    if route != ATEN and _bias_fits(bias, x):
        return _widened_linear(x, weight, bias) if route == WIDEN else _onednn_linear(x, weight, bias)
    if widens(x) and _eligible_route(x, weight, bias) == WIDEN and _bias_fits(bias, x):
        return _WidenedLinear.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight for x (T, out) and weight (out, in): a projection's input gradient."""
    route = _route(x, weight)
    if route == WIDEN:
        return _widened_matmul(x, weight).to(x.dtype)
    if route == ONEDNN:
        return _onednn_linear(x, weight.t(), None)
    return x @ weight


def matmul_add(x: torch.Tensor, weight: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + x @ weight; torch's path adds into acc in place, oneDNN's in its output's epilogue."""
    route = _route(x, weight, acc)
    if route == WIDEN:
        return acc.add_(_widened_matmul(x, weight))  # computed in fp32, rounded once
    if route == ONEDNN and acc.dtype == x.dtype and acc.is_contiguous():
        return _onednn_linear_add(x, weight.t(), acc)
    return acc.addmm_(x, weight)


def addmm_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * x @ weight, in place (an adapter's rank-r product added into its
    projection's output or input gradient): torch's addmm_, or its fp32 product where WIDEN."""
    if widens(x) and _route(x, weight, out) == WIDEN:  # widens first: cheap, and false on most CPUs' fp32 and GPUs
        return out.add_(_widened_matmul(x, weight), alpha=alpha)
    return out.addmm_(x, weight, alpha=alpha)


def grad_weight(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy.T @ x for dy (T, a) and x (T, b): the gradient of a weight that read x and got dy
    (an adapter's A or B). oneDNN takes the narrower of the two as its input and the wider as
    its weight, read in place: 1.4-3x torch's time the other way round, on this machine."""
    narrow, wide = (dy, x) if dy.shape[1] <= x.shape[1] else (x, dy)
    route = _route(narrow, wide)
    if route == WIDEN:
        return grad_weight(dy.float(), x.float()).to(dy.dtype)
    if route == ATEN:
        return dy.T @ x
    product = _onednn_linear(narrow.t(), wide.t(), None)
    return product if narrow is dy else product.t()


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a weight and bias that get no gradient (a frozen projection
    outside the fused blocks), with both products through `linear` and `matmul`."""
    return _FrozenLinear.apply(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        grad_in = matmul(grad_out.reshape(-1, grad_out.shape[-1]), weight)
        return grad_in.view(*grad_out.shape[:-1], weight.shape[1]), None, None


class _WidenedLinear(torch.autograd.Function):
    """linear of 16-bit operands that need gradients (an unfused adapter's A and B), on a CPU that
    widens their dtype: every product widened, and the 16-bit operands saved, where autograd
    through fp32 copies would save the copies (twice the bytes)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _widened_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(rows, weight).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight(rows, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0, dtype=torch.float32).to(grad_out.dtype)
        return grad_x, grad_w, grad_b


class CpuGemmLinear(torch.nn.Linear):
    """An nn.Linear whose products take `frozen_linear` when nothing trains its weight or bias
    and oneDNN is this input's backend (the input may need a gradient: frozen_linear gives it
    one), and nn.Linear's own forward otherwise. enable_fast_paths gives every nn.Linear this
    class, trainable ones too, since what trains can change (a class, not a patched forward:
    copies and pickles of the model keep working); disable_fast_paths gives them theirs back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype and self._frozen()
                and _eligible_route(x, self.weight, self.bias) != ATEN):
            return frozen_linear(x, self.weight, self.bias)
        return super().forward(x)

    def _frozen(self) -> bool:
        """Nothing records a gradient for the weight or bias: they need none, or no graph is being
        recorded (eval and generation, whose model's weights may still ask for gradients)."""
        return not torch.is_grad_enabled() or not (self.weight.requires_grad
                                                    or (self.bias is not None and self.bias.requires_grad))


def traced() -> bool:
    """torch.compile or a functorch transform (vmap, grad, jvp) is running: they need ops with
    derivatives and batching rules, which oneDNN's linear lacks."""
    return torch.compiler.is_compiling() or _functorch_active()


# private in torch 2.13; a release without it runs no transform this module could see
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def onednn_products() -> int:
    """oneDNN products made in this process so far (lorakit bench reports them per variant)."""
    return _products[0]


_products = [0]


# the two oneDNN calls, one place each (tests count them)
def _onednn_linear(x, weight, bias):
    _products[0] += 1
    return _uncounted_linear(x, weight, bias)


def _uncounted_linear(x, weight, bias):
    """The probe and the timing: not products of anyone's step."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_linear_add(x, weight, acc):
    _products[0] += 1
    return torch.ops.mkldnn._linear_pointwise.binary(x, acc, weight, None, "add")


def _route(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> str:
    """How this product is computed (WIDEN, ONEDNN or ATEN), where no autograd graph is being
    recorded through it: oneDNN's op has no derivative, and a widened product would have
    autograd keep its fp32 copies."""
    if not x.is_cpu:  # first: on a GPU every fused product asks, and the answer is always ATEN
        return ATEN
    tensors = [t for t in (x, weight, *others) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ATEN
    return _eligible_route(x, weight, *others)


def _eligible_route(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> str:
    """WIDEN where this CPU has no instructions for x's 16-bit dtype; ONEDNN where oneDNN
    computes what torch would for these operands, from a weight it packs fast, and is this
    machine's choice; ATEN otherwise."""
    if traced() or torch.is_autocast_enabled("cpu"):  # autocast: F.linear would cast
        return ATEN
    if not (x.dtype == weight.dtype and x.dim() >= 2 and weight.dim() == 2
            and all(n > 0 for n in (*x.shape, *weight.shape))):
        return ATEN
    if widens(x):
        return WIDEN if all(t.dtype == x.dtype for t in others if t is not None) else ATEN
    return ONEDNN if _packs_fast(weight) and backend_for(x) == ONEDNN else ATEN


def widens(t: torch.Tensor) -> bool:
    """The products of `t` here are computed in fp32 and rounded to its 16-bit dtype: a CPU
    tensor of a dtype this CPU has no multiply instructions for."""
    return t.is_cpu and t.dtype in widened_dtypes()


@functools.cache
def widened_dtypes() -> frozenset[torch.dtype]:
    """The 16-bit dtypes whose products torch emulates on this CPU, element by element: a bf16
    GEMM ran at 0.9-3 GFLOP/s on an AMD Zen 3 (AVX2) against 150 in fp32, an fp16 one at 26-29
    on a Zen 4 (AVX512-BF16, no AVX512-FP16) against 96-118 (docs/performance.md). From fp32
    copies of the operands the same product, accumulated in fp32 as a native 16-bit GEMM's is
    and rounded once, runs at fp32's rate."""
    from lorakit import host
    from lorakit.models import cpu_has_native_bf16

    flags = (host.proc_field("/proc/cpuinfo", "flags") or "").split()
    native_fp16 = "avx512_fp16" in flags or getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()
    return frozenset(dtype for dtype, native in ((torch.bfloat16, cpu_has_native_bf16()),
                                                 (torch.float16, native_fp16)) if not native)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear's product in fp32, rounded to x's dtype; the weight widened a block of rows
    (output columns) at a time."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    x32 = x.float()
    for rows, weight32 in _fp32_row_blocks(weight):
        out[..., rows] = linear(x32, weight32, None if bias is None else bias[rows].float())
    return out


def _widened_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight in fp32 (not rounded): the weight's rows, which the product sums over, and
    x's matching columns widened a block at a time."""
    total = None
    for rows, weight32 in _fp32_row_blocks(weight):
        part = x[:, rows].float()
        total = matmul(part, weight32) if total is None else matmul_add(part, weight32, total)
    return total


def _fp32_row_blocks(weight: torch.Tensor):
    """(row slice, fp32 copy of those rows) over the weight, each copy at most WIDEN_BLOCK_BYTES:
    a whole fp32 copy of an 8B model's head would be 2.1 GB, twice its own size."""
    rows_per_block = max(1, WIDEN_BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        yield rows, weight[rows].float()


def _packs_fast(weight: torch.Tensor) -> bool:
    """oneDNN packs a weight quickly only from a row- or column-major layout: an expanded or
    sliced view took a reference path, 260 ms where torch's product took 0.5-1.8 ms (576 x 1024,
    16 rows, on an AMD Zen 3). A transpose reads the same memory, so either is fine."""
    return weight.is_contiguous() or weight.t().is_contiguous()


def _bias_fits(bias: torch.Tensor | None, x: torch.Tensor) -> bool:
    # oneDNN reads the bias as a dense vector: its strides are ignored
    return bias is None or (bias.dtype == x.dtype and bias.dim() == 1 and bias.is_contiguous())


def _from_environment() -> str | None:
    value = _environment_value()
    return value if value in (ONEDNN, ATEN) else None


def _environment_value() -> str:
    return os.environ.get(ENV_VAR, "auto").strip().lower()


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _onednn_runs(dtype: torch.dtype) -> bool:
    """oneDNN's linear takes this dtype on this CPU (an old CPU may have no bf16 kernel)."""
    x = torch.ones(4, 8, dtype=dtype)
    try:
        with torch.no_grad():
            return torch.equal(_uncounted_linear(x, x, None), torch.full((4, 4), 8, dtype=dtype))
    except RuntimeError:
        return False


def _faster_backend(dtype: torch.dtype, rounds: int = 3) -> str:
    """Time one GEMM both ways, best of 5 after a warm-up, in `rounds` alternating rounds (a burst
    of load on a busy machine then hits both). bf16 keeps torch's path: torch's own bf16 `mm`
    already calls oneDNN where the CPU multiplies bf16 natively (the only CPUs where train picks
    bf16), so both ran at the same speed, and a timing on a busy machine picked either."""
    if dtype == torch.bfloat16 or not _onednn_runs(dtype):
        return ATEN
    rows, inner, out = _TIMED_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    weight = torch.randn(out, inner, generator=generator).to(dtype)
    onednn = aten = float("inf")
    with torch.no_grad():
        for _ in range(rounds):
            onednn = min(onednn, _best_time(lambda: _uncounted_linear(x, weight, None)))
            aten = min(aten, _best_time(lambda: torch.nn.functional.linear(x, weight)))
    return ONEDNN if onednn < WIN_RATIO * aten else ATEN


def _best_time(product, repeats: int = 5) -> float:
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best
