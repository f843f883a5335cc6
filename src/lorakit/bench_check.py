"""`lorakit bench --check`: correctness beside speed, lorakit against PEFT from identical weights.

Both models are built from the same seed (the check verifies the embeddings match), lorakit's
adapters are randomised (A as initialised, B non-zero: with B = 0 half of the gradient algebra
would be invisible) and copied into PEFT's (defaults: fp32 adapters). Each then trains
`check_steps` steps on the benchmark's batch (lorakit: fast paths + chunked loss, on the packed
batch with --packing; PEFT: its model's own loss, on the padded batch) with AdamW at a larger
learning rate than the benchmark's, so the loss curve moves. Reported:

    min over adapter tensors of cos(grad_lorakit, grad_peft) at step 1
    max over steps of |loss_lorakit - loss_peft| / |loss_peft|

fp32 models: the verdict is those two against fixed bounds (cosine >= 0.999, loss 1e-3).

bf16 models: bf16 rounding alone moves both runs further than that. At the 1b shape PEFT's own
step-1 gradients sit near cosine 0.998 from exact ones, and over 50 steps at this learning rate
two correct bf16 runs drift about 2% apart. So a third model, an fp32 copy of PEFT's (TF32
matmuls on CUDA: 8x finer than bf16 and fast enough for 50 steps), is the reference, and
lorakit must be about as close to it as PEFT is:

    min cos(grad_lorakit, grad_ref) >= min(0.999, min cos(grad_peft, grad_ref) - 0.002)
    max rel |loss_lorakit - loss_ref| <= max(2e-2, 1.5 x max rel |loss_peft - loss_ref|)

A fast path that changes the result is a bug, however fast it is: a wrong loss or scale moves
the cosine to 0.9 or below, far outside that slack.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit import bench, bench_variants
from lorakit.kernels.llama_patch import wants_triton

CHECK_LR = 1e-3
MIN_COSINE = 0.999
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}
# bf16: how much further from the fp32 reference than PEFT lorakit may be
COSINE_SLACK, LOSS_SLACK = 0.002, 1.5


@dataclass
class _Run:
    """One model of the check: its loss on its batch, its optimizer, its losses so far."""

    model: torch.nn.Module
    loss_fn: Callable
    batch: dict
    optimizer: torch.optim.Optimizer
    matmul_precision: str | None = None  # CUDA fp32 matmuls: "high" = TF32
    losses: list[float] = field(default_factory=list)

    def forward_backward(self) -> None:
        with _matmul_precision(self.matmul_precision):
            loss = self.loss_fn(self.batch)
            loss.backward()
        self.losses.append(loss.item())

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def check_against_peft(plan: bench.Plan, inputs: dict) -> dict:
    """lorakit (fast paths as the trainer takes them, chunked loss) vs PEFT defaults from identical
    weights and batches; with a bf16 model also both against an fp32 reference."""
    from lorakit.lora import lora_layers

    s = plan.settings
    ours = bench_variants.build_model(plan)
    bench_variants.add_lorakit_adapters(ours, plan, fused=True, triton=wants_triton("auto", torch.device(plan.device)))
    _randomise_lora_b(ours, s.seed)
    theirs = bench_variants.add_peft_adapters(bench_variants.build_model(plan), plan)
    if not torch.equal(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight):
        raise RuntimeError("the two seeded models differ: the check would compare different bases")
    names = [name for name, _ in lora_layers(ours)]
    with torch.no_grad():
        for name in names:
            layer, peft_layer = ours.get_submodule(name), _peft_layer(theirs, name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    runs = {"lorakit": _run(ours, bench_variants.lorakit_loss(ours, plan, chunked=True), inputs["lorakit"]),
            "peft": _run(theirs, bench_variants.hf_loss(theirs), inputs["peft"])}
    if plan.dtype != "float32":
        reference = copy.deepcopy(theirs).float()
        runs["reference"] = _run(reference, bench_variants.hf_loss(reference), inputs["peft"],
                                 matmul_precision="high" if plan.device == "cuda" else None)
    grads = _train(runs, plan.settings.check_steps)
    return _check_report(runs, grads, plan)


def _run(model, loss_fn, batch, matmul_precision=None) -> _Run:
    params = [p for p in model.parameters() if p.requires_grad]
    return _Run(model, loss_fn, batch, torch.optim.AdamW(params, lr=CHECK_LR), matmul_precision)


def _peft_layer(model, name: str):
    return model.base_model.model.get_submodule(name)


@contextlib.contextmanager
def _matmul_precision(precision: str | None):
    if precision is None:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _randomise_lora_b(model, seed: int, std: float = 0.02) -> None:
    """B starts at zero, which would hide half of the gradient algebra: make it non-zero."""
    from lorakit.lora import lora_layers

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=g) * std)


def _train(runs: dict[str, _Run], steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """`steps` steps of every run from the same start; each run's step-1 adapter gradients."""
    grads = {}
    for step in range(steps):
        for name, run in runs.items():
            run.forward_backward()
            if step == 0:
                grads[name] = _adapter_grads(run.model)
            run.update()
    return grads


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    """{module name.lora_A/lora_B: gradient in float64 on the CPU} for lorakit and PEFT models."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_" not in name or not param.requires_grad:
            continue
        module, part = name.split(".lora_")[0], "lora_" + name.split(".lora_")[1][0]
        module = module.removeprefix("base_model.model.")
        out[f"{module}.{part}"] = None if param.grad is None else param.grad.detach().double().cpu()
    return out


def _cosines(ours: dict, theirs: dict) -> dict[str, float]:
    """Per adapter tensor; NaN (the worst) where one side has no gradient or no such tensor."""
    cosines = {}
    for key in sorted(ours.keys() | theirs.keys()):
        mine, other = ours.get(key), theirs.get(key)
        if mine is None or other is None:
            cosines[key] = float("nan")
            continue
        cosines[key] = float(torch.nn.functional.cosine_similarity(mine.flatten(), other.flatten(), dim=0))
    return cosines


def _worst(cosines: dict[str, float]) -> str:
    return min(cosines, key=lambda k: -1.0 if cosines[k] != cosines[k] else cosines[k])


def _max_rel(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference))


def _check_report(runs: dict[str, _Run], grads: dict, plan: bench.Plan) -> dict:
    cosines = _cosines(grads["lorakit"], grads["peft"])
    worst = _worst(cosines)
    min_cosine = cosines[worst]
    rel = _max_rel(runs["lorakit"].losses, runs["peft"].losses)
    tolerance = LOSS_TOLERANCE[plan.dtype]
    report = {"min_grad_cosine": min_cosine, "worst_tensor": worst, "tensors": len(cosines),
              "max_loss_rel_diff": rel, "loss_tolerance": tolerance,
              "losses": [list(pair) for pair in zip(runs["lorakit"].losses, runs["peft"].losses)],
              "lr": CHECK_LR, "steps": len(runs["lorakit"].losses), "min_cosine_required": MIN_COSINE,
              "reference": None}
    if "reference" not in runs:
        report["passed"] = bool(min_cosine >= MIN_COSINE and rel <= tolerance)
        return report
    report["reference"] = _reference_report(runs, grads, tolerance)
    report["passed"] = report["reference"]["passed"]
    return report


def _reference_report(runs: dict[str, _Run], grads: dict, tolerance: float) -> dict:
    """lorakit and PEFT each against the fp32 reference, and the verdict (module docstring)."""
    ref = runs["reference"]
    ours, theirs = _cosines(grads["lorakit"], grads["reference"]), _cosines(grads["peft"], grads["reference"])
    cos_ours, cos_theirs = ours[_worst(ours)], theirs[_worst(theirs)]
    rel_ours, rel_theirs = _max_rel(runs["lorakit"].losses, ref.losses), _max_rel(runs["peft"].losses, ref.losses)
    cosine_bound = min(MIN_COSINE, cos_theirs - COSINE_SLACK)
    loss_bound = max(tolerance, LOSS_SLACK * rel_theirs)
    return {"matmul": "tf32" if ref.matmul_precision == "high" else "fp32",
            "min_grad_cosine": {"lorakit": cos_ours, "peft": cos_theirs}, "worst_tensor": _worst(ours),
            "max_loss_rel_diff": {"lorakit": rel_ours, "peft": rel_theirs}, "losses": ref.losses,
            "cosine_bound": cosine_bound, "loss_bound": loss_bound,
            "passed": bool(cos_ours >= cosine_bound and rel_ours <= loss_bound)}
