"""What the host (Linux, CPU side) says: memory, the CPU's name, lorakit's cache folder; one
reader for every command.

- `peak_rss_bytes`: this process's resident-set high-water mark, from VmHWM in
  /proc/self/status. `getrusage`'s ru_maxrss is the fallback only: it carries the parent's
  peak through fork + exec, so a child started by a big process (the bench's variants, a
  sweep's points) would report its parent's size.
- `available_memory_bytes`: MemAvailable in /proc/meminfo, what can be allocated without
  swapping (free memory plus reclaimable caches), None where there is no such file.
- `reset_peak_rss` and `return_freed_memory`: so that a sweep's next point in the same process
  reads its own peak, starting from a small resident set.
- `keep_freed_memory`: large blocks reused from the C heap, not mapped and faulted in anew each
  step (a CPU run's fast paths).
- `usable_cores`, `cores_busy_elsewhere`: the cores this process may run on, and how many of
  them other processes keep busy now (/proc/stat sampled twice, this process's own time out).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from pathlib import Path

KIB = 1024
MEMINFO = "/proc/meminfo"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_BLOCK_LIMIT = 1 << 30  # blocks above it are still mapped on their own


def proc_field(path: str, key: str) -> str | None:
    """The value of `key: value` in a /proc file, None where there is none."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    return None


def _kib_field(path: str, key: str) -> int | None:
    value = proc_field(path, key)  # "123456 kB"
    try:
        return int(value.split()[0]) * KIB if value else None
    except (ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set (see the module docstring for why VmHWM)."""
    hwm = _kib_field("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * KIB  # macOS reports bytes, Linux and BSD KiB


def minor_page_faults() -> int:
    """Page faults this process has taken that needed no disk read (fresh pages faulted in):
    a cost of allocating big tensors anew, paid in the kernel (docs/performance.md)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def available_memory_bytes() -> int | None:
    """MemAvailable: what this host can still hand out without swapping."""
    return _kib_field(MEMINFO, "MemAvailable")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current resident set (Linux's clear_refs "5"; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def return_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim; elsewhere a no-op), so
    that the resident set shrinks to what is still in use."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to HEAP_BLOCK_LIMIT from its heap and keep the pages
    they free. By default a block above 32 MiB is a fresh mapping, every page of it faulted in
    (and zeroed) on first write and unmapped on free; a CPU training step allocates and frees the
    same large tensors every step (SmolLM2's 200 MB head logits among them): 65k page faults a
    step on an AMD Zen 4, none after this, at the same peak RSS (docs/performance.md). The
    resident set then stays near its peak between steps; `return_freed_memory` still hands the
    pages back. Process-wide; glibc only (True where it took), elsewhere a no-op."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cache_dir() -> Path:
    """Root of lorakit's cache: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    root = os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit"
    return Path(root).expanduser()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a lock or temp folder it named may be stale)."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def torchrun_job() -> str | None:
    """The torchrun job this process is a worker of: its run id, the same in each restart of its
    workers (a new uuid for each `torchrun --standalone`; --rdzv-id's value, which the user keeps
    unique per launch); None outside torchrun and for "none", torchrun's id where none was given."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    return None if run_id in ("", "none") else run_id


def torchrun_restarts() -> int:
    """How often torchrun restarted this job's workers so far (--max-restarts); 0 outside it. Only
    on one node is it the same in every process: each node's torchrun counts its own."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def one_node() -> bool:
    """Every process of the job runs on this node (torchrun's LOCAL_WORLD_SIZE is its WORLD_SIZE)."""
    return os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies (prctl PR_SET_PDEATHSIG);
    False where that is not available. torchrun's workers run in sessions of their own: with
    torchrun killed (SIGKILL, the OOM killer) they would train on, holding the GPUs and --output."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    return False


def torchrun_number(name: str, default: int | None, least: int = 0) -> int | None:
    """The whole number torchrun set in `name` (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE),
    `default` where unset; ConfigError where it is not a whole number of at least `least`."""
    from lorakit.errors import ConfigError

    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        error = ConfigError(f"{name}={text!r} is not a whole number of at least {least}; torchrun sets it: unset it "
                            "to run one process, or start the processes with torchrun")
        # a process's own rank: rank 0, which speaks for the rest, is not this one when RANK is damaged
        error.every_rank_alike = name not in ("RANK", "LOCAL_RANK")
        raise error
    return value


def several_processes() -> bool:
    """WORLD_SIZE says this process is one of several (a value that is not a number: no; the
    trainer's own start refuses it with one message)."""
    with contextlib.suppress(ValueError):
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return False


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity: a container's or `taskset`'s share)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cores_busy_elsewhere(interval: float = 0.25) -> float | None:
    """Cores' worth of CPU time that other processes used over `interval` seconds on the cores
    this process may run on (0.0 to their count), None where /proc/stat cannot be read."""
    import time

    cores = usable_cores()
    first, own_first = _cpu_jiffies(cores), os.times()
    time.sleep(interval)
    second, own_second = _cpu_jiffies(cores), os.times()
    if first is None or second is None:
        return None
    busy = 0.0
    for core in cores:
        (busy_before, total_before), (busy_after, total_after) = first[core], second[core]
        if total_after > total_before:
            busy += (busy_after - busy_before) / (total_after - total_before)
    own = (own_second.user + own_second.system) - (own_first.user + own_first.system)  # seconds
    return max(0.0, busy - own / interval)


def _cpu_jiffies(cores: list[int]) -> dict[int, tuple[int, int]] | None:
    """{core: (busy, total) clock ticks since boot} from the per-core lines of /proc/stat."""
    ticks = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    fields = [int(value) for value in values[:8]]
                    idle = fields[3] + fields[4]  # idle + iowait
                    ticks[int(name[3:])] = (sum(fields) - idle, sum(fields))
        return ticks if all(core in ticks for core in cores) else None
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_model() -> str:
    """cpu_name, with the family and model numbers where /proc/cpuinfo has them: a VM may show
    every generation as "AMD EPYC", and Zen 4 (family 25) and Zen 5 (26) pick other GEMMs."""
    family, model = proc_field("/proc/cpuinfo", "cpu family"), proc_field("/proc/cpuinfo", "model")
    return f"{cpu_name()} (family {family}, model {model})" if family and model else cpu_name()
