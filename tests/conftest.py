import pytest
import torch

from lorakit.kernels import cpu_gemm
from tiny_models import tiny_llama

torch.set_num_threads(2)


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
