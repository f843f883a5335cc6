"""`lorakit eval --adapter DIR --data FILE`: loss and perplexity of the base and the adapter."""

from __future__ import annotations

import argparse
import json


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.models import add_placement_flags

    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--adapter", required=True, metavar="DIR")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "instruction", "chat"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--allow-other-base", action="store_true", help="load an adapter made for another base model")
    add_placement_flags(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle files (model *.bin, adapter_model.bin) with torch.load(weights_only=True)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.adapters import base_model_for
    from lorakit.data.formats import pad_token_id, tokenize_records
    from lorakit.data.reading import read_records
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.kernels.varlen_attention import use_varlen_attention
    from lorakit.lora import disable_adapters, load_adapter
    from lorakit.models import inference_placement, load_model_and_tokenizer
    from lorakit.train.loop import LoopSettings, evaluate
    from lorakit.train.run import autocast_dtype_for, packed_attention_for

    placement, dtype = inference_placement(args.device, args.dtype)
    model, tokenizer, _ = load_model_and_tokenizer(args.model or base_model_for([args.adapter]), dtype=dtype,
                                                   device=placement, allow_pickle=args.allow_pickle)
    data = tokenize_records(read_records(args.data), tokenizer, args.format, args.seq_len)
    load_adapter(model, args.adapter, allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle)
    # the trainer's eval path (fast paths, packed rows without a 4D mask): in 16 bits their
    # roundings differ from transformers' ops, and eval should reproduce a run's own eval loss
    enable_fast_paths(model)
    use_varlen_attention(model)
    device = next(model.parameters()).device
    settings = LoopSettings(lr=0, total_steps=0, warmup_steps=0, schedule="constant", grad_accum=1, max_grad_norm=0,
                            max_bad_steps=1, batch_size=args.batch_size, seq_len=args.seq_len, packing=True, seed=0,
                            pad_id=pad_token_id(tokenizer), device=device,
                            autocast_dtype=autocast_dtype_for(model, device),
                            packed_attention=packed_attention_for(model, packing=True))
    with disable_adapters(model):
        base = evaluate(model, data, settings)
    tuned = evaluate(model, data, settings)
    result = {"base_loss": base["loss"], "base_perplexity": base["perplexity"], "adapter_loss": tuned["loss"],
              "adapter_perplexity": tuned["perplexity"], "tokens": tuned["tokens"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'':10}{'loss':>10}{'perplexity':>12}")
        print(f"{'base':10}{base['loss']:>10.4f}{base['perplexity']:>12.2f}")
        print(f"{'adapter':10}{tuned['loss']:>10.4f}{tuned['perplexity']:>12.2f}")
        print(f"({tuned['tokens']:,} scored tokens)")
    return 0
