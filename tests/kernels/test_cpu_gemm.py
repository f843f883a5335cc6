"""cpu_gemm's products against plain PyTorch, with torch's GEMMs and with oneDNN's."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import cpu_gemm, llama_patch
from lorakit.lora import LoraConfig, apply_lora
from tiny_models import randomize_lora, tiny_llama

pytestmark = pytest.mark.usefixtures("gemm_backend")  # torch's GEMMs and oneDNN's

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _tensors(dtype, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_f_linear(dtype, with_bias):
    x, weight, bias = _tensors(dtype, (3, 7, 24), (40, 24), (40,))
    bias = bias if with_bias else None
    got = cpu_gemm.linear(x, weight, bias)
    assert got.shape == (3, 7, 40) and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x, weight, bias), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_and_matmul_add_read_the_weight_transposed(dtype):
    dy, weight, acc = _tensors(dtype, (21, 40), (40, 24), (21, 24))
    torch.testing.assert_close(cpu_gemm.matmul(dy, weight), dy @ weight, **TOLERANCE[dtype])
    want = acc + dy @ weight
    torch.testing.assert_close(cpu_gemm.matmul_add(dy, weight, acc.clone()), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(5, 40), (40, 5)])  # an adapter's A and B gradients
def test_grad_weight_is_dy_transposed_times_x(dtype, widths):
    dy, x = _tensors(dtype, (33, widths[0]), (33, widths[1]))
    torch.testing.assert_close(cpu_gemm.grad_weight(dy, x), dy.T @ x, **TOLERANCE[dtype])


def test_float64_and_grad_recording_calls_take_torchs_path():
    x, weight = _tensors(torch.float64, (5, 8), (6, 8))
    assert cpu_gemm.backend_for(x) == cpu_gemm.ATEN
    assert cpu_gemm.backend_for(torch.zeros(2, 2, device="meta")) == cpu_gemm.ATEN  # not a CPU tensor
    x32, w32 = _tensors(torch.float32, (5, 8), (6, 8))
    w32.requires_grad_()
    out = cpu_gemm.linear(x32, w32)  # records a graph: the oneDNN op has no derivative
    out.sum().backward()
    torch.testing.assert_close(w32.grad, x32.sum(0).expand(6, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_linear_forward_and_input_gradient(dtype):
    x, weight, bias = _tensors(dtype, (2, 5, 24), (40, 24), (40,))
    x_plain = x.clone().requires_grad_()
    x.requires_grad_()
    out = cpu_gemm.frozen_linear(x, weight, bias)
    want = F.linear(x_plain, weight, bias)
    torch.testing.assert_close(out, want, **TOLERANCE[dtype])
    (grad_out,) = _tensors(dtype, (2, 5, 40), seed=1)
    out.backward(grad_out)
    want.backward(grad_out)
    torch.testing.assert_close(x.grad, x_plain.grad, **TOLERANCE[dtype])
    assert weight.grad is None and bias.grad is None


def test_frozen_linears_of_a_model_are_patched_and_match_the_plain_model():
    """LoRA on q and v only: k, o and the MLP are frozen nn.Linear modules."""
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = llama_patch.causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = loss_and_grads()
    llama_patch.enable_fast_paths(model)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert "forward" in k_proj.__dict__  # patched per instance
    fast = loss_and_grads()
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=0)
    for got, want in zip(fast[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not llama_patch.fast_paths_enabled(model)  # no LoRA block runs fused
    llama_patch.disable_fast_paths(model)
    assert "forward" not in k_proj.__dict__


def test_the_faster_backend_is_chosen_by_a_clear_margin(monkeypatch):
    for onednn, aten, want in [(1.0, 2.0, cpu_gemm.ONEDNN), (0.9, 1.0, cpu_gemm.ATEN),
                               (1.2, 1.0, cpu_gemm.ATEN)]:
        timings = iter([onednn, aten])  # _faster_backend times oneDNN first
        monkeypatch.setattr(cpu_gemm, "_best_time", lambda product: next(timings))
        assert cpu_gemm._faster_backend(torch.float32) == want


def test_the_environment_fixes_the_backend(monkeypatch):
    x = torch.zeros(2, 2)
    with cpu_gemm.use_backend(None):
        monkeypatch.setenv(cpu_gemm.ENV_VAR, "aten")
        assert cpu_gemm.backend_for(x) == cpu_gemm.ATEN
        if cpu_gemm._onednn_available():
            monkeypatch.setenv(cpu_gemm.ENV_VAR, "onednn")
            assert cpu_gemm.backend_for(x) == cpu_gemm.ONEDNN
    with pytest.raises(ValueError, match="unknown backend"):
        with cpu_gemm.use_backend("mkl"):
            pass
