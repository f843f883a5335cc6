"""cpu_gemm's products against plain PyTorch, with torch's GEMMs and with oneDNN's."""

import copy
import errno
import json
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import causal_loss, cpu_gemm, llama_patch
from lorakit.lora import LoraConfig, apply_lora
from tiny_models import randomize_lora, tiny_llama

@pytest.fixture
def onednn_calls(request, monkeypatch, gemm_backend):
    """Counts the oneDNN calls; at the end, checks that the oneDNN backend made some (where
    oneDNN runs the test's dtype on this CPU) and torch's none, so a test cannot pass on torch's
    path while meaning to test oneDNN's."""
    dtype = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dtype")
    computed_in = torch.float32 if dtype in cpu_gemm.widened_dtypes() else dtype or torch.float32
    runs = cpu_gemm._onednn_runs(computed_in)  # an AVX2-only CPU has no bf16 kernel (and widens bf16)
    calls = []
    for name in ("_onednn_linear", "_onednn_linear_add"):
        real = getattr(cpu_gemm, name)
        monkeypatch.setattr(cpu_gemm, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    yield calls
    assert (len(calls) > 0) == (gemm_backend == cpu_gemm.ONEDNN and runs)


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _loss_and_grads(model, loss_of):
    """(loss, the trainable parameters' gradients) of one fresh backward, in fp32."""
    model.zero_grad(set_to_none=True)  # the previous gradients, returned before, stay as they were
    loss = loss_of(model)
    loss.backward()
    return loss.detach().float(), [p.grad.float() for p in model.parameters() if p.requires_grad]


def _assert_16bit_close(got, want):
    """Two (loss, gradients) of a 16-bit model whose products rounded differently."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
    for got_grad, want_grad in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=5e-2, atol=5e-3)


def _tensors(dtype, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_f_linear(dtype, with_bias, onednn_calls):
    x, weight, bias = _tensors(dtype, (3, 7, 24), (40, 24), (40,))
    bias = bias if with_bias else None
    got = cpu_gemm.linear(x, weight, bias)
    assert got.shape == (3, 7, 40) and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x, weight, bias), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_and_matmul_add_read_the_weight_transposed(dtype, onednn_calls):
    dy, weight, acc = _tensors(dtype, (21, 40), (40, 24), (21, 24))
    torch.testing.assert_close(cpu_gemm.matmul(dy, weight), dy @ weight, **TOLERANCE[dtype])
    want = acc + dy @ weight
    torch.testing.assert_close(cpu_gemm.matmul_add(dy, weight, acc.clone()), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(5, 40), (40, 5)])  # an adapter's A and B gradients
def test_grad_weight_is_dy_transposed_times_x(dtype, widths, onednn_calls):
    dy, x = _tensors(dtype, (33, widths[0]), (33, widths[1]))
    torch.testing.assert_close(cpu_gemm.grad_weight(dy, x), dy.T @ x, **TOLERANCE[dtype])


@pytest.mark.usefixtures("gemm_backend")  # with torch's GEMMs and oneDNN's
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
def test_frozen_linear_forward_and_input_gradient(dtype, onednn_calls):
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


def test_frozen_linears_of_a_model_are_patched_and_match_the_plain_model(onednn_calls):
    """LoRA on q and v only: k, o and the MLP are frozen nn.Linear modules."""
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    loss_and_grads = lambda: _loss_and_grads(model, lambda m: causal_loss.causal_lm_loss(m, batch))  # noqa: E731

    plain = loss_and_grads()
    llama_patch.enable_fast_paths(model)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert type(k_proj) is cpu_gemm.CpuGemmLinear
    assert causal_loss.chunked_loss_blocker(model) is None  # the head's new class still chunks
    took = set()  # the weights whose products went through frozen_linear, inputs needing grad
    real = cpu_gemm.frozen_linear
    cpu_gemm.frozen_linear = lambda x, weight, bias=None: took.add(weight) or real(x, weight, bias)
    try:
        fast = loss_and_grads()
    finally:
        cpu_gemm.frozen_linear = real
    frozen = {m.weight for m in model.modules() if type(m) is cpu_gemm.CpuGemmLinear
              and not m.weight.requires_grad and m is not model.lm_head}  # the loss reads the head's weight
    assert len(frozen) == 2 * 7 and took == (frozen if cpu_gemm.backend_for(ids.float()) == "onednn" else set())
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=0)
    for got, want in zip(fast[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not llama_patch.fast_paths_enabled(model)  # no LoRA block runs fused
    llama_patch.disable_fast_paths(model)
    assert type(k_proj) is torch.nn.Linear


def test_the_faster_backend_is_chosen_by_a_clear_margin(monkeypatch):
    for onednn, aten, want in [(1.0, 2.0, cpu_gemm.ONEDNN), (0.9, 1.0, cpu_gemm.ATEN),
                               (1.2, 1.0, cpu_gemm.ATEN)]:
        timings = iter([onednn, aten])  # _faster_backend times oneDNN first
        monkeypatch.setattr(cpu_gemm, "_best_time", lambda product: next(timings))
        assert cpu_gemm._faster_backend(torch.float32, rounds=1) == want
    timings = iter([1.0, 2.0])  # however the timing would come out, bf16 keeps torch's path
    monkeypatch.setattr(cpu_gemm, "_best_time", lambda product: next(timings))
    assert cpu_gemm._faster_backend(torch.bfloat16) == cpu_gemm.ATEN
    # rounds alternate, and each side keeps its best: a burst of load in one round decides nothing
    timings = iter([5.0, 2.0, 1.0, 5.0, 1.0, 3.0])  # (oneDNN, torch) per round
    monkeypatch.setattr(cpu_gemm, "_best_time", lambda product: next(timings))
    assert cpu_gemm._faster_backend(torch.float32, rounds=3) == cpu_gemm.ONEDNN


@pytest.mark.parametrize("vendor, flags, dtype, want", [
    ("AuthenticAMD", "fpu avx2 avx512f avx512bw", torch.float32, cpu_gemm.ONEDNN),
    ("AuthenticAMD", "fpu avx2 avx512f avx512bw", torch.bfloat16, None),  # torch's bf16 mm is oneDNN already
    ("AuthenticAMD", "fpu avx2", torch.float32, cpu_gemm.ATEN),  # a Zen 3's step: MKL as fast or faster
    ("GenuineIntel", "fpu avx2 avx512f", torch.float32, cpu_gemm.ATEN),  # two Xeons measured MKL faster
    ("GenuineIntel", "fpu avx2 avx512f", torch.bfloat16, None),  # not measured: timed
    ("HygonGenuine", "fpu avx2", torch.float32, None),  # another vendor: timed
])
def test_fp32_on_an_amd_or_intel_cpu_is_chosen_without_a_timing(monkeypatch, tmp_path, vendor, flags, dtype, want):
    from lorakit import host

    if not cpu_gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(host, "proc_field", lambda path, key: vendor if key == "vendor_id" else None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: "avx512f" in flags.split())
    assert cpu_gemm._known_choice(dtype) == want
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    opposite = {cpu_gemm.ATEN: cpu_gemm.ONEDNN, cpu_gemm.ONEDNN: cpu_gemm.ATEN}
    timing = opposite.get(want, cpu_gemm.ATEN)  # a known choice must win over what a timing would say
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: timing)
    assert cpu_gemm._remembered_choice(dtype) == (want or timing)
    assert (tmp_path / cpu_gemm.CHOICES_FILE).exists() == (want is None)  # a known choice is not timed or kept


def test_another_generation_behind_the_same_cpu_name_times_again(monkeypatch, tmp_path):
    """A VM shows Zen 4 and Zen 5 alike as "AMD EPYC"; oneDNN pays on one and not the other."""
    from lorakit import host

    monkeypatch.setattr(cpu_gemm, "_known_choice", lambda dtype: None)  # timed on every machine
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    cpuinfo = {"model name": "AMD EPYC", "cpu family": "25", "model": "17"}
    monkeypatch.setattr(host, "proc_field", lambda path, key: cpuinfo.get(key))
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: cpu_gemm.ATEN)
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ATEN
    cpuinfo["cpu family"] = "26"
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: cpu_gemm.ONEDNN)
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ONEDNN
    saved = json.loads((tmp_path / cpu_gemm.CHOICES_FILE).read_text())
    assert sorted(key.split(" | ")[0] for key in saved) == ["AMD EPYC (family 25, model 17)",
                                                            "AMD EPYC (family 26, model 17)"]

def test_the_choice_is_remembered_per_machine_so_every_run_takes_the_same_products(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemm, "_known_choice", lambda dtype: None)  # timed on every machine
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    timed = []
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: timed.append(dtype) or cpu_gemm.ONEDNN)
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ONEDNN
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: timed.append(dtype) or cpu_gemm.ATEN)
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ONEDNN  # a later process: read, not timed
    assert timed == [torch.float32]
    saved = json.loads((tmp_path / cpu_gemm.CHOICES_FILE).read_text())
    assert list(saved.values()) == [cpu_gemm.ONEDNN] and f"{torch.get_num_threads()} threads" in next(iter(saved))
    (tmp_path / cpu_gemm.CHOICES_FILE).write_text("{damaged")
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ATEN and len(timed) == 2  # timed again
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")  # a cache that cannot be written: this process keeps its choice
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ATEN
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "full"))
    from lorakit import safe_io

    def full(path, fill, fix=None):  # the failure as lorakit reports it: an OutputError, not an OSError
        raise safe_io.output_error(OSError(errno.ENOSPC, "No space left on device"), path)

    monkeypatch.setattr(safe_io, "atomic_write_with", full)
    assert cpu_gemm._remembered_choice(torch.float32) == cpu_gemm.ATEN


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


def test_what_onednn_cannot_take_exactly_takes_torchs_path(onednn_calls):
    x, weight, bias = _tensors(torch.float32, (6, 24), (40, 24), (80,))
    for odd_bias in (bias[::2], bias[:1].expand(40), bias[:40].bfloat16()):  # strided, stride 0, dtype
        if odd_bias.dtype == x.dtype:
            torch.testing.assert_close(cpu_gemm.linear(x, weight, odd_bias), F.linear(x, weight, odd_bias))
        else:
            with pytest.raises(RuntimeError):  # as F.linear refuses it
                cpu_gemm.linear(x, weight, odd_bias)
    empty = torch.zeros(0, 24)
    assert cpu_gemm.grad_weight(torch.zeros(0, 40), empty).abs().sum() == 0
    assert cpu_gemm.linear(empty, weight).shape == (0, 40)
    x3 = _tensors(torch.float32, (5, 3, 24))[0].transpose(0, 1)  # not contiguous
    torch.testing.assert_close(cpu_gemm.linear(x3, weight), F.linear(x3, weight), rtol=1e-5, atol=1e-5)


def test_a_weight_onednn_would_pack_slowly_takes_torchs_path(onednn_calls):
    """An expanded or sliced weight took oneDNN's reference path, hundreds of times slower than
    torch's product (cpu_gemm._packs_fast); its dense copy, or a transpose, takes oneDNN's."""
    x, dy, big, acc = _tensors(torch.float32, (6, 24), (6, 40), (80, 48), (6, 24))
    odd = {"expanded": big[:1, :24].expand(40, 24), "every 2nd row": big[::2, :24], "every 2nd column": big[:40, ::2]}
    for name, weight in odd.items():
        torch.testing.assert_close(cpu_gemm.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu_gemm.matmul(dy, weight), dy @ weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu_gemm.matmul_add(dy, weight, acc.clone()), acc + dy @ weight,
                                   rtol=1e-5, atol=1e-5)
        narrow = x[:, :5]  # the wider operand is the one oneDNN reads as its weight
        torch.testing.assert_close(cpu_gemm.grad_weight(narrow, weight[:6]), narrow.T @ weight[:6],
                                   rtol=1e-5, atol=1e-5)
        assert not onednn_calls, name
    dense = big[:40, :24].contiguous()
    column_block = torch.zeros(6, 48)[:, :24]  # a sum not stored densely: torch's addmm_ writes into it
    torch.testing.assert_close(cpu_gemm.matmul_add(dy, dense, column_block), dy @ dense, rtol=1e-5, atol=1e-5)
    assert not onednn_calls
    for weight in (dense, big[:24, :40].contiguous().t()):  # the fixture checks that these take oneDNN's
        torch.testing.assert_close(cpu_gemm.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("gemm_backend")  # with torch's GEMMs and oneDNN's
def test_calls_that_record_a_graph_or_run_under_autocast_take_torchs_path():
    x, weight, bias, acc = _tensors(torch.float32, (6, 24), (40, 24), (40,), (6, 40))
    bias.requires_grad_()
    cpu_gemm.linear(x, weight, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((40,), 6.0))
    acc.requires_grad_()
    cpu_gemm.matmul_add(x, weight.T.contiguous(), acc.clone()).sum().backward()
    torch.testing.assert_close(acc.grad, torch.ones(6, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(x, weight).dtype == F.linear(x, weight).dtype == torch.bfloat16


@pytest.mark.usefixtures("gemm_backend")  # with torch's GEMMs and oneDNN's
def test_a_patched_linear_copies_pickles_and_vmaps():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    llama_patch.enable_fast_paths(model)
    twin = copy.deepcopy(model)
    k_proj, twin_k = model.model.layers[0].self_attn.k_proj, twin.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        twin_k.weight.zero_()
    x = torch.randn(2, 3, 64)
    assert twin_k(x).abs().sum() == 0 and k_proj(x).abs().sum() > 0  # the copy reads its own weight
    restored = pickle.loads(pickle.dumps(k_proj))
    assert type(restored) is cpu_gemm.CpuGemmLinear
    torch.testing.assert_close(restored(x), k_proj(x))
    torch.testing.assert_close(torch.vmap(k_proj)(x), F.linear(x, k_proj.weight))


def test_a_backend_fixed_in_one_thread_leaves_the_others_alone():
    seen = []
    with cpu_gemm.use_backend(cpu_gemm.ATEN):
        thread = threading.Thread(target=lambda: seen.append(cpu_gemm._forced.get()))
        thread.start()
        thread.join()
        assert cpu_gemm._forced.get() == cpu_gemm.ATEN
    assert seen == [None]


def test_an_unknown_environment_value_is_refused(monkeypatch, capsys):
    from lorakit.cli import main

    monkeypatch.setenv(cpu_gemm.ENV_VAR, "mkl")
    assert main(["estimate", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LORAKIT_CPU_GEMM='mkl' is not a CPU GEMM backend") and "Traceback" not in err


def test_onednn_caches_are_bounded_unless_the_user_chose():
    """Batches of varying length make new GEMM shapes every step; oneDNN's default caches of 1024
    shapes grew a run's memory by 0.6 GiB. Importing cpu_gemm bounds both (kept if already set)."""
    import os
    import subprocess
    import sys

    code = ("import os; import lorakit.kernels.cpu_gemm; "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                       text=True, check=True).stdout.split()
    assert run({}) == [cpu_gemm.CACHE_CAPACITY] * 2
    assert run({"LRU_CACHE_CAPACITY": "7"}) == [cpu_gemm.CACHE_CAPACITY, "7"]


def test_choosing_the_backend_is_not_counted_as_anyones_products(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemm, "_known_choice", lambda dtype: None)  # timed on every machine
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))  # nothing remembered: the timing runs
    timed = []
    real = cpu_gemm._faster_backend
    monkeypatch.setattr(cpu_gemm, "_faster_backend", lambda dtype: timed.append(dtype) or real(dtype))
    # a fresh choice, dropped after the test: kept, a timing under load could give the later tests
    # in this process torch's products where their subprocesses take oneDNN's (bits differ)
    monkeypatch.setattr(cpu_gemm, "_chosen", {})
    cpu_gemm._onednn_runs.cache_clear()
    before = cpu_gemm.onednn_products()
    cpu_gemm.backend_for(torch.zeros(2, 2))
    assert cpu_gemm.onednn_products() == before and timed == [torch.float32]


@pytest.fixture
def widened(monkeypatch):
    """This CPU taken for one without bf16 or fp16 instructions: their products widened to fp32.
    Returns the list of the widened products' fp32 calls (the weight blocks' shapes)."""
    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset({torch.bfloat16, torch.float16}))
    blocks = []
    real = cpu_gemm._fp32_row_blocks

    def counted(weight):
        for rows, block in real(weight):
            blocks.append(block.shape)
            yield rows, block

    monkeypatch.setattr(cpu_gemm, "_fp32_row_blocks", counted)
    return blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_this_cpu_cannot_multiply_are_fp32_products_rounded_once(dtype, widened):
    """With torch's fp32 GEMMs, each widened product is bit for bit the plain fp32 product of
    the upcast operands, rounded to the 16-bit dtype: what a native 16-bit GEMM computes, with
    fp32 accumulation (torch's emulation on a Zen 3 ran at 1/50 of the rate)."""
    x, weight, bias, dy, acc, out = _tensors(dtype, (3, 7, 24), (40, 24), (40,), (21, 40), (21, 24), (21, 40))
    f = lambda t: t.float()
    with cpu_gemm.use_backend(cpu_gemm.ATEN):
        assert torch.equal(cpu_gemm.linear(x, weight, bias), F.linear(f(x), f(weight), f(bias)).to(dtype))
        assert torch.equal(cpu_gemm.matmul(dy, weight), (f(dy) @ f(weight)).to(dtype))
        assert torch.equal(cpu_gemm.matmul_add(dy, weight, acc.clone()), (f(acc) + f(dy) @ f(weight)).to(dtype))
        xa = x.reshape(21, 24)
        assert torch.equal(cpu_gemm.addmm_(out.clone(), xa, weight.T, alpha=0.5),
                           (f(out) + 0.5 * (f(xa) @ f(weight).T)).to(dtype))
        assert torch.equal(cpu_gemm.grad_weight(dy, xa), (f(dy).T @ f(xa)).to(dtype))
    # each weight widened whole (grad_weight's operands, activations, are not weights: not blocked)
    assert len(widened) == 4 and all(shape in ((40, 24), (24, 40)) for shape in widened)


@pytest.mark.usefixtures("gemm_backend")  # the fp32 products through torch's GEMMs and oneDNN's
def test_a_large_weight_is_widened_a_block_of_rows_at_a_time(monkeypatch, widened):
    monkeypatch.setattr(cpu_gemm, "WIDEN_BLOCK_BYTES", 4 * 24 * 16)  # 16 rows of 24 columns
    x, weight, bias, dy, acc = _tensors(torch.bfloat16, (5, 24), (40, 24), (40,), (5, 40), (5, 24))
    f = lambda t: t.double()
    close = dict(rtol=2 ** -7, atol=1e-6)  # the fp32 sums in another order: one bf16 rounding apart at most
    torch.testing.assert_close(cpu_gemm.linear(x, weight, bias).double(),
                               F.linear(f(x), f(weight), f(bias)), **close)
    assert widened == [(16, 24), (16, 24), (8, 24)]
    torch.testing.assert_close(cpu_gemm.matmul(dy, weight).double(), f(dy) @ f(weight), **close)
    torch.testing.assert_close(cpu_gemm.matmul_add(dy, weight, acc.clone()).double(), f(acc) + f(dy) @ f(weight),
                               **close)
    assert len(widened) == 9


def test_widened_products_other_than_linear_keep_torchs_path_where_a_graph_is_recorded(widened):
    """Only linear has an autograd function for widened operands (_WidenedLinear); the products
    the fused blocks call inside their own autograd functions take torch's, with its derivative."""
    dy, weight, acc = _tensors(torch.bfloat16, (6, 40), (40, 24), (6, 24))
    weight.requires_grad_()
    cpu_gemm.matmul_add(dy, weight, acc.clone()).float().sum().backward()
    cpu_gemm.matmul(dy, weight).float().sum().backward()
    torch.testing.assert_close(weight.grad.float(), 2 * dy.float().sum(0)[:, None].expand(40, 24), rtol=2e-2, atol=0)
    assert not widened
    with torch.no_grad():
        cpu_gemm.matmul(dy, weight)
    assert widened == [(40, 24)]
    assert cpu_gemm._route(dy, weight.detach(), torch.zeros(24)) == cpu_gemm.ATEN  # an fp32 operand: torch's error


@pytest.mark.parametrize("flags, amx_fp16, native_bf16, want", [
    ("fpu avx2", False, False, {torch.bfloat16, torch.float16}),  # AMD Zen 3
    ("avx512f avx512_bf16", False, True, {torch.float16}),  # AMD Zen 4 and 5
    ("avx512f avx512_bf16 avx512_fp16 amx_tile", False, True, set()),  # Intel Sapphire Rapids
    ("avx512f amx_tile", True, True, set()),  # AMX-FP16 alone
])
def test_the_dtypes_widened_are_those_this_cpu_cannot_multiply(monkeypatch, flags, amx_fp16, native_bf16, want):
    from lorakit import host, models

    monkeypatch.setattr(host, "proc_field", lambda path, key: flags if key == "flags" else None)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native_bf16)
    assert cpu_gemm.widened_dtypes.__wrapped__() == want


def test_a_bf16_model_on_a_cpu_without_bf16_trains_the_same_through_widened_products(monkeypatch, widened):
    """The fused blocks, the frozen projections and the chunked loss of a bf16 model: their
    products widened, and the loss and adapter gradients those of torch's bf16 products."""
    model = tiny_llama().to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # o_proj stays a frozen nn.Linear
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora(model)
    llama_patch.enable_fast_paths(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    loss_and_grads = lambda: _loss_and_grads(model, lambda m: causal_loss.causal_lm_loss(m, batch))  # noqa: E731

    fast = loss_and_grads()
    assert llama_patch.fast_paths_enabled(model)
    # the head (chunked loss), gate and up, down, o_proj (frozen), q/k/v's merged A (3 x rank 4), down's A
    assert {(256, 64), (128, 64), (64, 128), (64, 64), (12, 64), (4, 128)} <= set(widened)
    products = len(widened)
    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset())  # torch's own bf16 products
    native = loss_and_grads()
    assert len(widened) == products
    _assert_16bit_close(fast, native)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_widened_linear_that_records_a_graph_saves_its_16bit_operands(dtype, widened):
    """An unfused adapter's products need gradients: the forward and both gradients are the fp32
    products rounded, bit for bit with torch's fp32 GEMMs, and autograd keeps only 16-bit tensors."""
    x, weight, bias, grad = _tensors(dtype, (3, 5, 24), (40, 24), (40,), (3, 5, 40))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    saved = []
    with cpu_gemm.use_backend(cpu_gemm.ATEN):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            out = cpu_gemm.linear(*leaves)
        out.backward(grad)
    assert saved and set(saved) == {dtype} and len(widened) == 2  # the weight in forward and in the input gradient
    f = lambda t: t.float()
    assert torch.equal(out, F.linear(f(x), f(weight), f(bias)).to(dtype))
    assert torch.equal(leaves[0].grad, (f(grad) @ f(weight)).to(dtype))
    assert torch.equal(leaves[1].grad, (f(grad).reshape(15, 40).T @ f(x).reshape(15, 24)).to(dtype))
    assert torch.equal(leaves[2].grad, f(grad).sum((0, 1)).to(dtype))


def test_unfused_adapters_train_the_same_through_widened_products(monkeypatch, widened):
    """LoRA layers outside the fused blocks (dropout, another architecture, QLoRA's base): their
    adapters' products widened too, and the loss and gradients those of torch's fp16 products."""
    model = tiny_llama().to(torch.float16)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    loss_and_grads = lambda: _loss_and_grads(model, lambda m: m(input_ids=ids, labels=ids).loss)  # noqa: E731

    widening = loss_and_grads()
    assert {(4, 64), (64, 4), (4, 128)} <= set(widened)  # A of q, B of q and down (as weights), A of down
    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset())  # torch's own fp16 products
    plain = loss_and_grads()
    _assert_16bit_close(widening, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_scored_without_a_graph_widens_its_products_though_its_weights_ask_for_gradients(widened, dtype):
    """`lorakit eval --model` scores a model without an adapter: nothing froze its weights, but
    under no_grad nothing records their gradients, so its frozen products may widen (emulated
    fp16 on a Zen 4 took 70 s for the demo's eval set, 23 s widened; float32 22 s)."""
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        plain = causal_loss.causal_lm_loss(model, batch)
    llama_patch.enable_fast_paths(model)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        fast = causal_loss.causal_lm_loss(model, batch)
    decoder_weights = 2 * 7  # tiny_llama's 2 layers of 7 projections, each widened whole
    assert len(widened) >= decoder_weights
    torch.testing.assert_close(fast.float(), plain.float(), rtol=1e-2, atol=0)
    widened.clear()  # with a graph recorded, the products of weights that train keep torch's path
    causal_loss.causal_lm_loss(model, batch).float().backward()
    assert len(widened) < decoder_weights
    llama_patch.disable_fast_paths(model)
