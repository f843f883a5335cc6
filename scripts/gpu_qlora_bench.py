"""QLoRA on one GPU: lorakit QLoRA vs lorakit bf16 LoRA vs PEFT QLoRA, in one process.

Same method as `lorakit bench` (src/lorakit/bench.py, whose pieces this reuses): a random-
initialised Llama of the preset's shape built from its config (seed 0), the same random batch
(labels = input_ids), LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down, AdamW lr 1e-4; a
step is forward + backward + optimizer step; tokens/s from the median of `--steps` timed steps
after `--warmup`; peak = torch.cuda.max_memory_allocated over the timed steps (weights included).

    lorakit-bf16          bf16 base, apply_lora + fast paths + chunked loss, fused AdamW:
                          what `lorakit train` runs
    lorakit-qlora         NF4 base (double quantisation, bf16 compute), the same lorakit setup;
                          the fused q/k/v/MLP paths need a dense base, so those fall back to the
                          plain path (printed), the chunked loss still applies
    peft-qlora            get_peft_model on the SAME NF4 model (defaults: fp32 adapters)
    peft-qlora-prepared   PEFT's recipe: prepare_model_for_kbit_training (every unquantised
                          parameter to fp32) then get_peft_model; it mutates the model: last

The NF4 model is built without a 16 GB fp32 copy: the bf16 model is built on the GPU (as
`lorakit bench` does), then each decoder linear is replaced, one at a time, by a bitsandbytes
Linear4bit quantised from its bf16 weight (what transformers' BitsAndBytesConfig(load_in_4bit,
nf4, double quant, bf16 compute) produces); the dense weight is freed as it goes. Embeddings,
norms and lm_head stay bf16. lorakit-qlora and peft-qlora share that model, so they start from
identical weights: their first losses must agree (checked, printed).

The device image has torch, transformers, peft but not bitsandbytes: carry its wheel. Here:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2
(43 MB, holds libbitsandbytes_cuda130.so for the image's torch 2.11+cu130; /.whl/ is ignored.) Then:
    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site"
                " .whl/bitsandbytes-*.whl && PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1"
                " python3 scripts/gpu_qlora_bench.py --json $OUT/qlora_8b.json", carry=[".whl"], timeout_s=600)
Planned: about 3 minutes for the three default variants at 8b, 2 x 2048, checkpointing on (PERF.md's
8b anchor: PEFT bf16 LoRA 6,407 tok/s, 23.4 GiB), two 8b builds included; add `--variants
lorakit-bf16 lorakit-qlora peft-qlora peft-qlora-prepared` when the budget allows (~1 min more).
A variant that fails (out of memory, an error) is reported in the table; the others still run.

A CPU dry run of the whole script (tiny shape; bitsandbytes >= 0.48 runs NF4 on CPU):
    PYTHONPATH=src python scripts/gpu_qlora_bench.py --preset tiny --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from lorakit import bench, bench_inputs, bench_settings, bench_variants

VARIANTS = ("lorakit-bf16", "lorakit-qlora", "peft-qlora", "peft-qlora-prepared")
DEFAULT_VARIANTS = VARIANTS[:3]
FIRST_LOSS_RTOL = 0.01  # lorakit-qlora vs peft-qlora on identical NF4 weights (chunked vs full CE)


# ---- the NF4 model -------------------------------------------------------------------------------

def quantize_in_place(model: nn.Module) -> int:
    """Replace every decoder projection (bench_variants.TARGETS) by an NF4 Linear4bit; returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in bench_variants.TARGETS]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _nf4_linear(getattr(parent, child)))
    model.is_loaded_in_4bit = True  # what PEFT's prepare_model_for_kbit_training looks for
    return len(names)


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")  # no throw-away init of a dense weight
    weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                               quant_type="nf4", module=layer)
    layer.weight = weight.to(device)  # quantises: bnb packs the codes on the first .to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def build_nf4_model(plan) -> nn.Module:
    from lorakit.quantize import prepare_for_kbit_training

    model = bench_variants.build_model(plan)  # bf16 on the GPU, seeded: the same weights as lorakit-bf16
    count = quantize_in_place(model)
    bench.release_cuda()
    prepare_for_kbit_training(model)  # freeze; keep embeddings, norms, head in bf16
    allocated = f", {torch.cuda.memory_allocated() / bench.GIB:.2f} GiB allocated" if plan.device == "cuda" else ""
    print(f"  NF4 model: {count} projections quantised{allocated}", flush=True)
    return model.train()


# ---- variants ------------------------------------------------------------------------------------

class NF4Holder:
    """The shared NF4 model: built on first use, adapters removed again after each variant."""

    def __init__(self, plan):
        self.plan, self.model = plan, None

    def get(self) -> nn.Module:
        if self.model is None:
            self.model = build_nf4_model(self.plan)
        return self.model


def prepare(name: str, plan, nf4: NF4Holder):
    """(Prepared, cleanup) for one variant."""
    if name == "lorakit-bf16":
        model = bench_variants.build_model(plan)
        return _lorakit(model, plan), lambda: None
    if name == "lorakit-qlora":
        return _lorakit(nf4.get(), plan), lambda: _remove_lorakit(nf4.model)
    model = nf4.get()
    if name == "peft-qlora-prepared":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.settings.grad_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = bench_variants.add_peft_adapters(model, plan)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    prepared = bench_variants.Prepared(peft_model, bench_variants.hf_loss(peft_model), torch.optim.AdamW(params, lr=bench_variants.LR),
                              "peft", [])

    def cleanup():
        nf4.model = peft_model.base_model.unload()  # the bare NF4 model again
    return prepared, cleanup


def _lorakit(model: nn.Module, plan) -> "bench_variants.Prepared":
    notices = bench_variants.add_lorakit_adapters(model, plan, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=bench_variants.LR, **({"fused": True} if plan.device == "cuda" else {}))
    return bench_variants.Prepared(model, bench_variants.lorakit_loss(model, plan, chunked=True), optimizer, "lorakit", notices)


def _remove_lorakit(model: nn.Module) -> None:
    from lorakit.kernels.llama_patch import disable_fast_paths
    from lorakit.lora import remove_lora

    disable_fast_paths(model)
    remove_lora(model, merge=False)


def measure(name: str, plan, inputs: dict, nf4: NF4Holder) -> dict:
    prepared, cleanup = prepare(name, plan, nf4)
    try:
        raw = bench.run_steps(name, prepared, inputs[prepared.inputs_key], plan)
        raw.update(variant=name, notices=prepared.notices, memory=bench.memory_figures(plan.device, 0, 0))
    finally:
        prepared.optimizer.zero_grad(set_to_none=True)
        del prepared
        cleanup()
        bench.release_cuda()
    return raw


# ---- report --------------------------------------------------------------------------------------

def table(rows: list[dict], device: str) -> str:
    peak = "peak allocated GiB" if device == "cuda" else "peak RSS GiB (process)"
    lines = [f"| variant | tokens/s | step ms | {peak} | first loss | vs lorakit-bf16 (speed, memory) |",
             "|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["variant"] == "lorakit-bf16" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | |")
            continue
        ratio = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x, {r['peak_gib'] / base['peak_gib']:.2f}x"
                 if base else "-")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {r['peak_gib']:.2f} | "
                     f"{r['first_loss']:.4f} | {ratio} |")
    return "\n".join(lines)


def first_loss_check(rows: list[dict]) -> str | None:
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    ours, theirs = by_name.get("lorakit-qlora"), by_name.get("peft-qlora")
    if not (ours and theirs):
        return None
    gap = abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])
    verdict = "ok" if gap <= FIRST_LOSS_RTOL else "MISMATCH: the two QLoRA setups do not compute the same model"
    return f"first-loss check, lorakit-qlora vs peft-qlora (same NF4 weights): relative gap {gap:.2e} ({verdict})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpu-8b", choices=sorted(bench_settings.PRESETS), help="model shape, batch, device")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--layers", type=int, help="fewer decoder layers (a quick try)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="keep every activation (checkpointing is on by default, as in PERF.md's 8b anchor)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import bitsandbytes  # fail now, not after building a model

    settings = bench.BenchSettings(preset=args.preset, r=args.r, steps=args.steps, warmup=args.warmup,
                                   layers=args.layers, grad_checkpointing=args.grad_checkpointing,
                                   variants=["lorakit"])
    plan = bench.resolve(settings)
    s = plan.settings
    torch.set_num_threads(s.threads)
    inputs = bench_inputs.make_inputs(plan)
    flops = bench.flops_per_token(plan.shape, s.r, inputs["context"])
    env = {**bench.environment(plan), "bitsandbytes": bitsandbytes.__version__}
    print(f"{s.preset}: {s.layers} layers, batch {s.batch} x {s.seq_len}, {plan.dtype} on {s.device}, "
          f"grad checkpointing {'on' if s.grad_checkpointing else 'off'}; {json.dumps(env)}", flush=True)
    peak_tflops = bench.measure_matmul_peak(s.device)
    nf4, rows = NF4Holder(plan), []
    order = sorted(dict.fromkeys(args.variants), key=VARIANTS.index)  # the prepared recipe mutates: last
    for name in order:
        print(f"  {name}", flush=True)
        start = time.perf_counter()
        try:
            raw = measure(name, plan, inputs, nf4)
        except torch.cuda.OutOfMemoryError as exc:
            raw = {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0]}"}
            bench.release_cuda()
        except Exception as exc:  # one broken variant must not cost the others' device time
            raw = {"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            bench.release_cuda()
        row = bench.summarize(raw, inputs["tokens"], flops["per_token"], peak_tflops, s.device)
        rows.append(row)
        print(f"    {json.dumps({k: v for k, v in row.items() if k != 'notices'}, default=str)} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for notice in row.get("notices") or []:
            print(f"    notice: {notice}", flush=True)
    print()
    print(table(rows, s.device))
    check = first_loss_check(rows)
    if check:
        print(check)
    print(f"\n{inputs['tokens']} tokens per step; median of {s.steps} steps after {s.warmup} warm-up; "
          f"model FLOPs/token {flops['per_token'] / 1e9:.1f} G; matmul peak {peak_tflops:.0f} TFLOP/s; "
          f"MFU per variant in the JSON lines above")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "settings": vars(args), "shape": plan.shape, "rows": rows,
                       "first_loss_check": check, "median_of": s.steps,
                       "step_ms_median": {r["variant"]: r.get("step_ms") for r in rows}}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
