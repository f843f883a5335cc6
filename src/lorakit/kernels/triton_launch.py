"""How lorakit's Triton kernels are launched: Triton's own path, or directly (opt-in).

Each `kernel[grid](...)` binds the arguments, works out their specialisation and looks the
compiled kernel up again: on the H200's host about 120 us of CPU per launch against about 40 us
for an aten op (docs/performance.md), with ~160 launches in a 1b step whose CPU set its pace.
The direct launch keeps each compiled kernel under a key at least as fine as Triton's
specialisation (every int by value, each tensor's dtype and 16-byte alignment, the constexprs
and launch options, the device) and calls it with the bound arguments itself; a new key takes
Triton's own path once. Opt-in (LORAKIT_TRITON_LAUNCH=direct, or `launch_mode`) until a GPU run
measures it: `lorakit bench --variants lorakit,lorakit-directlaunch`.

The Triton import lives here too: `triton` is None where it is not installed, and INTERPRETED
says whether kernels run through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, tests).
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are then never launched; tl.constexpr must still resolve where they are defined
    triton = None
    tl = SimpleNamespace(constexpr=None)

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def launch(kernel, grid, like: torch.Tensor, *args, **meta) -> None:
    """kernel[grid](*args) on like's GPU: Triton launches on the current device otherwise."""
    if like.is_cuda and like.device.index != torch.cuda.current_device():  # a device switch costs a launch's time
        with torch.cuda.device(like.device):
            _run(kernel, grid, like, args, meta)
    else:
        _run(kernel, grid, like, args, meta)


LAUNCH_MODES = ("jit", "direct")
LAUNCH_ENV_VAR = "LORAKIT_TRITON_LAUNCH"


def _mode_from_environment() -> str:
    return os.environ.get(LAUNCH_ENV_VAR, "jit").strip().lower() or "jit"


_launch_mode = [_mode_from_environment()]
_compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, constexpr values in signature order)
_MAX_COMPILED = 4096  # keys hold exact ints: shapes that keep changing make new ones


def launch_mode(mode: str | None = None) -> str:
    """The launch mode in force; with `mode`, set it for the whole process (autograd runs CUDA
    backwards in its own threads) and return the previous one."""
    previous = _launch_mode[0]
    if mode is not None:
        if mode not in LAUNCH_MODES:
            raise ValueError(f"unknown Triton launch mode {mode!r}; use one of {', '.join(LAUNCH_MODES)}")
        _launch_mode[0] = mode
    return previous


def check_environment() -> None:
    """Refuse a LORAKIT_TRITON_LAUNCH value other than jit or direct (a CLI checks at start)."""
    if _mode_from_environment() not in LAUNCH_MODES:
        from lorakit.errors import ConfigError

        raise ConfigError(f"{LAUNCH_ENV_VAR}={os.environ[LAUNCH_ENV_VAR]!r} is not a Triton launch mode; "
                          f"set it to {' or '.join(LAUNCH_MODES)}, or unset it")


def _direct_launch_supported() -> bool:
    """Triton 3.3 and later pass a compiled kernel every parameter, constexprs included (earlier
    releases only the others): what the direct launch calls it with. Earlier ones take Triton's path."""
    if triton is None:
        return False
    major, minor = (int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return (major, minor) >= (3, 3)


_DIRECT_LAUNCH_SUPPORTED = _direct_launch_supported()


def _run(kernel, grid, like: torch.Tensor, args: tuple, meta: dict) -> None:
    if _launch_mode[0] != "direct" or INTERPRETED or not _DIRECT_LAUNCH_SUPPORTED:
        kernel[grid](*args, **meta)
        return
    key = (kernel, like.device.index, _specialisation(args), *sorted(meta.items()))
    known = _compiled.get(key)
    if known is None:
        compiled = kernel[grid](*args, **meta)  # compiles or finds it, and launches
        if compiled is not None:
            if len(_compiled) >= _MAX_COMPILED:
                _compiled.clear()
            _compiled[key] = (compiled, _constexpr_values(kernel, len(args), meta))
        return
    compiled, constexprs = known
    try:
        compiled[(*grid, 1, 1)[:3]](*args, *constexprs)
    except Exception as exc:  # noqa: BLE001 - a Triton whose compiled kernels take other arguments
        _give_up_direct_launch(exc)
        kernel[grid](*args, **meta)
        return
    _direct_launches[0] += 1


def _give_up_direct_launch(exc: Exception) -> None:
    """Triton's own launch path for the rest of the process, said once: a training run keeps going."""
    import warnings

    from lorakit.errors import LorakitWarning

    _launch_mode[0] = "jit"
    _compiled.clear()
    warnings.warn(f"the direct Triton launch failed ({type(exc).__name__}: {exc}); Triton's own launch path "
                  f"is used from now on (unset {LAUNCH_ENV_VAR})", LorakitWarning, stacklevel=2)


_direct_launches = [0]


def direct_launches() -> int:
    """Launches that took the compiled kernel directly in this process (the GPU check reports it)."""
    return _direct_launches[0]


def _specialisation(args: tuple) -> tuple:
    """What Triton specialises a launch on, or finer: tensors by dtype and 16-byte alignment,
    ints and bools by value, floats by type."""
    return tuple((arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor)
                 else float if isinstance(arg, float) else (type(arg), arg) for arg in args)


def _constexpr_values(kernel, positional: int, meta: dict) -> tuple:
    """The values of the kernel's parameters after the positional ones, in signature order: the
    compiled kernel takes every parameter, constexprs included (launch options are not parameters)."""
    import inspect

    names = list(inspect.signature(kernel.fn).parameters)[positional:]
    return tuple(meta[name] for name in names)
