"""`lorakit bench --check`: correctness beside speed, lorakit against PEFT from identical weights.

Both models are built from the same seed (the check verifies the embeddings match), lorakit's
adapters are randomised (A as initialised, B non-zero: with B = 0 half of the gradient algebra
would be invisible) and copied into PEFT's (defaults: fp32 adapters). Each then trains
`check_steps` steps on the benchmark's batch (lorakit: fast paths + chunked loss, on the packed
batch with --packing; PEFT: its model's own loss, on the padded batch) with AdamW at a larger
learning rate than the benchmark's, so the loss curve moves. Reported:

    min over adapter tensors of cos(grad_lorakit, grad_peft) at step 1     must be >= 0.999
    max over steps of |loss_lorakit - loss_peft| / |loss_peft|             fp32 1e-3, bf16 2e-2

A fast path that changes the result is a bug, however fast it is.
"""

from __future__ import annotations

import torch

from lorakit import bench, bench_variants

CHECK_LR = 1e-3
MIN_COSINE = 0.999
LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}


def check_against_peft(plan: bench.Plan, inputs: dict) -> dict:
    """lorakit (fast paths, chunked loss) vs PEFT defaults from identical weights and batches."""
    from lorakit.lora import lora_layers

    s = plan.settings
    ours = bench_variants.build_model(plan)
    bench_variants.add_lorakit_adapters(ours, plan, fused=True)
    _randomise_lora_b(ours, s.seed)
    theirs = bench_variants.add_peft_adapters(bench_variants.build_model(plan), plan)
    if not torch.equal(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight):
        raise RuntimeError("the two seeded models differ: the check would compare different bases")
    pairs = [(name, layer, theirs.base_model.model.get_submodule(name)) for name, layer in lora_layers(ours)]
    with torch.no_grad():
        for _, layer, peft_layer in pairs:
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    losses, cosines = _train_both(ours, theirs, pairs, plan, inputs)
    return _check_report(losses, cosines, plan)


def _randomise_lora_b(model, seed: int, std: float = 0.02) -> None:
    """B starts at zero, which would hide half of the gradient algebra: make it non-zero."""
    from lorakit.lora import lora_layers

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=g) * std)


def _train_both(ours, theirs, pairs, plan: bench.Plan, inputs: dict):
    """check_steps steps of each from the same start: loss pairs and step-1 gradient cosines."""
    steps = [(bench_variants.lorakit_loss(ours, plan, chunked=True), inputs["lorakit"], ours),
             (bench_variants.hf_loss(theirs), inputs["peft"], theirs)]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=CHECK_LR)
                  for _, _, m in steps]
    losses, cosines = [], {}
    for step in range(plan.settings.check_steps):
        pair = []
        for loss_fn, batch, _ in steps:
            loss = loss_fn(batch)
            loss.backward()
            pair.append(loss.item())
        if step == 0:
            cosines = _gradient_cosines(pairs)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(pair)
    return losses, cosines


def _gradient_cosines(pairs) -> dict[str, float]:
    cosines = {}
    for name, layer, peft_layer in pairs:
        for part in ("lora_A", "lora_B"):
            ours = getattr(layer, part).weight.grad
            theirs = getattr(peft_layer, part)["default"].weight.grad
            if ours is None or theirs is None:
                cosines[f"{name}.{part}"] = float("nan")
                continue
            cosines[f"{name}.{part}"] = float(torch.nn.functional.cosine_similarity(
                ours.double().flatten(), theirs.double().flatten(), dim=0))
    return cosines


def _check_report(losses: list[list[float]], cosines: dict[str, float], plan: bench.Plan) -> dict:
    worst = min(cosines, key=lambda k: -1.0 if cosines[k] != cosines[k] else cosines[k])
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in losses)
    tolerance = LOSS_TOLERANCE[plan.dtype]
    min_cosine = cosines[worst]
    return {"min_grad_cosine": min_cosine, "worst_tensor": worst, "tensors": len(cosines),
            "max_loss_rel_diff": rel, "loss_tolerance": tolerance, "losses": losses, "lr": CHECK_LR,
            "steps": len(losses), "min_cosine_required": MIN_COSINE,
            "passed": bool(min_cosine >= MIN_COSINE and rel <= tolerance)}
