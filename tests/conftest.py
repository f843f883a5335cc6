import pytest
import torch

from tiny_models import tiny_llama

torch.set_num_threads(2)


@pytest.fixture
def llama():
    return tiny_llama()
