import os
import signal

import pytest
import torch

from lorakit import host
from lorakit.kernels import adapter_dropout, cpu_gemm
from tiny_models import tiny_llama

MAX_WORKERS = 4  # each worker loads its own models and data


def pytest_xdist_auto_num_workers(config):
    # pyproject's `-n auto`: a worker per core this process may use (xdist's own count reads the
    # physical cores and ignores a container's or taskset's share)
    return min(MAX_WORKERS, len(host.usable_cores()))


# each worker's torch gets its share of the cores: oversubscribed, torch's spinning threads ran a
# test up to 4x slower
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, len(host.usable_cores()) // WORKERS)))

# A suite started in the background without job control (`pytest &` in a script) inherits SIGINT
# ignored, under nohup SIGHUP too, and so would every process it starts: the tests of Ctrl-C and
# of a closed terminal need them live, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(params=[cpu_gemm.ATEN, cpu_gemm.ONEDNN])
def gemm_backend(request):
    """Runs a test once with torch's own GEMMs and once with oneDNN's (kernels/cpu_gemm.py),
    whichever this machine would pick: both must compute what plain PyTorch does."""
    if request.param == cpu_gemm.ONEDNN and not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    with cpu_gemm.use_backend(request.param):
        yield request.param


@pytest.fixture(params=["kept", "redrawn"])
def mask_keeping(request, monkeypatch):
    """Runs a test with the fused blocks' dropout masks kept for backward (the CPU's way) and
    drawn again in backward from the generator's saved state (CUDA's, kernels/adapter_dropout)."""
    if request.param == "redrawn":
        monkeypatch.setattr(adapter_dropout, "REDRAWN_ON", adapter_dropout.REDRAWN_ON | {"cpu"})
    return request.param
