"""The direct Triton launch (kernels/triton_launch.py) with stand-in kernels: Triton's own launch
once per specialisation, then the compiled kernel; and the launch-mode settings."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # as the other kernel tests: the first import of Triton decides

import pytest  # noqa: E402
import torch  # noqa: E402

from lorakit.kernels import triton_launch as launcher  # noqa: E402


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: compiled[grid](*every parameter's value)."""

    def __init__(self, log, refuses: bool = False):
        self.log, self.refuses = log, refuses

    def __getitem__(self, grid):
        def launch(*args):
            if self.refuses:
                raise TypeError("launcher takes 3 arguments")
            self.log.append(("direct", grid, args))
        return launch


class _FakeKernel:
    """Stands in for a JITFunction: kernel[grid](*args, **meta) launches and returns the compiled kernel."""

    def __init__(self, compiled_refuses: bool = False):
        self.log, self.compiled_refuses = [], compiled_refuses
        self.fn = lambda x_ptr, n, eps, BLOCK, FLAG: None  # the jitted function's signature

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _FakeCompiled(self.log, self.compiled_refuses)
        return launch


@pytest.fixture
def direct_launch(monkeypatch):
    monkeypatch.setattr(launcher, "INTERPRETED", False)  # the interpreter always takes Triton's path
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH_SUPPORTED", True)
    monkeypatch.setattr(launcher, "_compiled", {})
    previous = launcher.launch_mode("direct")
    yield
    launcher.launch_mode(previous)


@pytest.mark.usefixtures("direct_launch")
def test_direct_launch_reuses_the_compiled_kernel_only_for_the_same_specialisation():
    kernel, x = _FakeKernel(), torch.zeros(64)
    meta = dict(BLOCK=64, FLAG=True, num_warps=4)
    launcher.launch(kernel, (8,), x, x, 64, 1e-6, **meta)
    launcher.launch(kernel, (8,), x, x, 64, 1e-5, **meta)  # another float: the same specialisation
    assert [entry[0] for entry in kernel.log] == ["jit", "direct"]
    # every parameter in signature order, constexprs included, launch options not; a 3-d grid
    assert kernel.log[1] == ("direct", (8, 1, 1), (x, 64, 1e-5, 64, True))
    for changed in ([x, 65, 1e-6], [x[1:], 64, 1e-6], [x.double(), 64, 1e-6]):  # an int, alignment, dtype
        before = len(kernel.log)
        launcher.launch(kernel, (8,), x, *changed, **meta)
        assert kernel.log[before][0] == "jit"
    launcher.launch(kernel, (8,), x, x, 64, 1e-6, **{**meta, "num_warps": 8})  # another launch option
    assert kernel.log[-1][0] == "jit"


@pytest.mark.usefixtures("direct_launch")
def test_a_compiled_kernel_that_refuses_its_arguments_turns_direct_launch_off_with_one_warning():
    from lorakit.errors import LorakitWarning

    kernel, x = _FakeKernel(compiled_refuses=True), torch.zeros(16)
    launcher.launch(kernel, (1,), x, x, 16, 0.0, BLOCK=16, FLAG=False)  # Triton's path, keyed
    with pytest.warns(LorakitWarning, match="direct Triton launch failed .TypeError: launcher takes 3"):
        launcher.launch(kernel, (1,), x, x, 16, 0.0, BLOCK=16, FLAG=False)  # refused, relaunched by Triton
    launcher.launch(kernel, (1,), x, x, 16, 0.0, BLOCK=16, FLAG=False)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit", "jit"] and launcher.launch_mode() == "jit"


def test_a_triton_before_3_3_takes_its_own_path_even_in_direct_mode(direct_launch, monkeypatch):
    # before 3.3 a compiled kernel took its non-constexpr arguments only
    monkeypatch.setattr(launcher, "_DIRECT_LAUNCH_SUPPORTED", False)
    kernel, x = _FakeKernel(), torch.zeros(16)
    for _ in range(2):
        launcher.launch(kernel, (1,), x, x, 16, 0.0, BLOCK=16, FLAG=False)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
    pytest.importorskip("triton")
    monkeypatch.setattr(launcher.triton, "__version__", "3.2.0")
    assert not launcher._direct_launch_supported()


def test_jit_launch_mode_always_takes_tritons_path(monkeypatch):
    monkeypatch.setattr(launcher, "INTERPRETED", False)
    previous = launcher.launch_mode("jit")
    try:
        kernel, x = _FakeKernel(), torch.zeros(16)
        for _ in range(2):
            launcher.launch(kernel, (1,), x, x, 16, 0.0, BLOCK=16, FLAG=False)
        assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
        with pytest.raises(ValueError, match="unknown Triton launch mode"):
            launcher.launch_mode("fast")
    finally:
        launcher.launch_mode(previous)


def test_an_unknown_launch_mode_in_the_environment_is_refused(monkeypatch, capsys):
    from lorakit.cli import main

    monkeypatch.setenv(launcher.LAUNCH_ENV_VAR, "fast")
    assert main(["estimate", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LORAKIT_TRITON_LAUNCH='fast' is not a Triton launch mode") and "Traceback" not in err
