"""CPU benchmark of lorakit's fast paths against PEFT: step time and process peak RSS.

Each variant runs in its own child process (peak RSS, ru_maxrss, is per process and never
goes down), on a freshly built random-initialised model, same seed, same batch:

    peft            PEFT get_peft_model defaults, model(**batch, labels=...).loss
    lorakit         lorakit LoRA, plain HF forward and loss (full logits)
    lorakit+ce      + causal_lm_loss (chunked lm_head + cross-entropy, no full logits)
    lorakit+fused   + enable_fast_paths (fused q/k/v, o, SwiGLU MLP autograd)
    lorakit+all     both

A step is forward + backward + AdamW. Reported: median step seconds over --steps after one
warm-up step (wall clock, and process CPU time, which a shared machine disturbs less), the
bytes autograd saves for backward (measured on the warm-up step; deterministic), tokens/s, peak RSS and its growth over the model-built RSS, and the first loss
(all variants must agree). CPU timings drift between machines: compare ratios from one run.

    PYTHONPATH=src python scripts/bench_cpu_paths.py                 # SmolLM2-135M shape
    PYTHONPATH=src python scripts/bench_cpu_paths.py --layers 2 --steps 1   # smoke test
    PYTHONPATH=src python scripts/bench_cpu_paths.py --micro         # per block, in one process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ["peft", "lorakit", "lorakit+ce", "lorakit+fused", "lorakit+all"]
SHARED_OPTIONS = ["layers", "batch", "seq", "rank", "steps", "threads", "chunk_size"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class _SavedForBackward:
    """Bytes of distinct non-parameter storages autograd saves during one forward."""

    def __init__(self, params_of):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params_of.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.param_ptrs:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


def _add_adapters(model, variant, args):
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                lora_dropout=0.0, target_modules=TARGETS))
    from lorakit.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS))
    if variant in ("lorakit+fused", "lorakit+all"):
        from lorakit.kernels.llama_patch import enable_fast_paths

        notices = enable_fast_paths(model)
        assert not notices, notices
    return model


def _loss_fn(model, variant, args):
    if variant in ("lorakit+ce", "lorakit+all"):
        from lorakit.kernels.llama_patch import causal_lm_loss

        return lambda batch: causal_lm_loss(model, batch, chunk_size=args.chunk_size)
    return lambda batch: model(**batch, use_cache=False).loss


def run_child(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = _add_adapters(_build_model(args), variant, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    batch = dict(input_ids=ids, labels=ids)
    loss_fn = _loss_fn(model, variant, args)
    rss_built, times, cpu_times, losses = _rss_gib(), [], [], []
    saved = _SavedForBackward(params_of=model)
    for step in range(1 + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        with saved.hooks() if step == 0 else contextlib.nullcontext():
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(float(loss))
    step_s = statistics.median(times[1:])
    return dict(variant=variant, step_s=round(step_s, 3), min_step_s=round(min(times[1:]), 3),
                steps_s=[round(t, 3) for t in times],
                cpu_s=round(statistics.median(cpu_times[1:]), 3),
                saved_gib=round(saved.nbytes / 2**30, 3),
                tokens_per_s=round(args.batch * args.seq / step_s, 1),
                peak_rss_gib=round(_rss_gib(), 3),
                rss_growth_gib=round(_rss_gib() - rss_built, 3),
                trainable=sum(p.numel() for p in params), first_loss=round(losses[0], 5))


def _micro_layers(args):
    import torch
    from torch import nn

    from lorakit.lora import LoraLinear

    def lora(n_in, n_out):
        layer = LoraLinear(nn.Linear(n_in, n_out, bias=False).requires_grad_(False),
                           args.rank, 2 * args.rank, 2.0)
        nn.init.normal_(layer.lora_B.weight, std=0.02)
        return layer

    torch.manual_seed(0)
    return ([lora(576, 576), lora(576, 192), lora(576, 192)], lora(576, 576),
            [lora(576, 1536), lora(576, 1536), lora(1536, 576)])


def _micro_cases(args):
    """name -> (plain fwd, fused fwd), each returning what to backprop from."""
    import torch
    import torch.nn.functional as F

    from lorakit.kernels.chunked_ce import chunked_lm_head_loss
    from lorakit.kernels.fused_lora import lora_linear, lora_mlp, lora_qkv

    tokens = args.batch * args.seq
    x = torch.randn(tokens, 576, requires_grad=True)
    head = torch.randn(49152, 576) * 0.02
    labels = torch.randint(0, 49152, (tokens,))
    qkv, o, (gate, up, down) = _micro_layers(args)
    return {
        "q,k,v": (lambda: sum(m(x).sum() for m in qkv), lambda: sum(t.sum() for t in lora_qkv(x, *qkv))),
        "o": (lambda: o(x).sum(), lambda: lora_linear(x, o).sum()),
        "mlp": (lambda: down(F.silu(gate(x)) * up(x)).sum(), lambda: lora_mlp(x, gate, up, down).sum()),
        "lm_head+ce": (lambda: F.cross_entropy(F.linear(x, head).float(), labels),
                       lambda: chunked_lm_head_loss(x, head, labels, chunk_size=args.chunk_size)),
    }


def run_micro(args) -> list[dict]:
    """Per-block fwd+bwd, plain vs fused, interleaved; min over repeats resists a busy machine."""
    import torch

    torch.set_num_threads(args.threads)
    results = []
    for name, fns in _micro_cases(args).items():
        best = [float("inf"), float("inf")]
        for _ in range(args.repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn().backward()
                best[i] = min(best[i], time.perf_counter() - start)
        results.append(dict(block=name, plain_ms=round(1e3 * best[0], 2),
                            fused_ms=round(1e3 * best[1], 2), speedup=round(best[0] / best[1], 2)))
    return results


def _spawn(variant: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, *argv],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return dict(variant=variant, error=out.stderr.strip().splitlines()[-1:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_table(results: list[dict]) -> None:
    base = next((r for r in results if r["variant"] == "peft" and "error" not in r), None)
    print(f"{'variant':<15}{'step s':>9}{'cpu s':>8}{'tok/s':>9}{'peak GiB':>10}"
          f"{'growth GiB':>12}{'saved GiB':>11}{'x PEFT speed':>14}{'first loss':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<15} failed: {r['error']}")
            continue
        ratio = f"{base['step_s'] / r['step_s']:.2f}" if base else "-"
        print(f"{r['variant']:<15}{r['step_s']:>9.2f}{r['cpu_s']:>8.2f}{r['tokens_per_s']:>9.0f}"
              f"{r['peak_rss_gib']:>10.2f}{r['rss_growth_gib']:>12.2f}{r['saved_gib']:>11.3f}{ratio:>14}"
              f"{r['first_loss']:>12.4f}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=4096, help="tokens per lm_head chunk")
    p.add_argument("--micro", action="store_true",
                   help="time single blocks (q,k,v / o / mlp / lm_head+ce), plain vs fused")
    p.add_argument("--repeats", type=int, default=10, help="repeats per block with --micro")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main() -> int:
    args = _parser().parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return 0
    if args.micro:
        print(json.dumps(run_micro(args), indent=1))
        return 0
    argv = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHARED_OPTIONS]
    results = []
    for variant in args.variants:  # one at a time: the machine is shared
        results.append(_spawn(variant, argv))
        if not args.json:
            print(f"  done {variant}", file=sys.stderr)
    print(json.dumps(results, indent=1)) if args.json else _print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
