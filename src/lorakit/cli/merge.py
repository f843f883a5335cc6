"""`lorakit merge --adapter DIR --output DIR`: a plain transformers model folder, checked."""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.config import DTYPES, QUANTIZE, dtype_name


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    add_merge_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    from lorakit.cli import adapter_folder_arg

    p.add_argument("--adapter", required=True, metavar="DIR", type=adapter_folder_arg,
                   help="the adapter folder (PEFT format), or a training run's folder for its adapter")
    p.add_argument("--output", required=True, metavar="DIR", help="the merged model's new folder")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=[d for d in DTYPES if d != "auto"], type=dtype_name,
                   help="dtype of the merged weights (default: the base's own, from its config.json; float32 "
                        "where it records none or for a .gguf; bfloat16 with --quantize). The base is read and "
                        "merged in fp32, a 16-bit result rounded once, and the reloaded folder checked in fp32 "
                        "against base+adapter")
    p.add_argument("--quantize", default=None, choices=[q for q in QUANTIZE if q != "none"],
                   help="the adapter was trained on a 4-/8-bit base (QLoRA): load the base the same way, "
                        "dequantise it and merge into that (needs bitsandbytes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--allow-other-base", action="store_true", help="merge an adapter made for another base model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle files (model *.bin, adapter_model.bin) with torch.load(weights_only=True)")


def run(args: argparse.Namespace) -> int:
    from lorakit.merge import merge_to_folder

    result = merge_to_folder(args.adapter, args.output, args.model, args.dtype, args.allow_other_base, args.overwrite,
                             quantize=getattr(args, "quantize", None), allow_pickle=getattr(args, "allow_pickle", False))
    say_lost_system_turn(args.adapter)
    say_quantized_training(args.adapter, getattr(args, "quantize", None))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(f"merged model written to {result['output']} ({result['dtype']}); reloaded with plain transformers, "
              f"max logit difference {result['max_abs_logit_difference']:.2e} (tolerance {result['tolerance']:g})")
        if "max_abs_logit_difference_vs_quantized" in result:
            print(f"{result['dequantized_layers']} {result['quantize']} layers dequantised, each checked against its "
                  f"kernel; vs the {result['quantize']} model as trained (16-bit arithmetic): max logit difference "
                  f"{result['max_abs_logit_difference_vs_quantized']:.2e} (tolerance {result['tolerance_vs_quantized']:.3g})")
    return 0


def say_quantized_training(adapter, quantize: str | None) -> None:
    """merge and export: an adapter whose run trained on a 4/8-bit base, merged into the base's
    full weights, gives another model than the one training saw (on SmolLM2, logits 41% apart)."""
    from lorakit.quantize import trained_quantize

    trained = trained_quantize(adapter)
    if trained and quantize != trained:
        print(f"note: the adapter was trained on the {trained} base (its run's config.yaml); merged into other "
              f"weights it gives another model than training saw: `lorakit merge --quantize {trained}` folds it "
              "into the weights it trained with", file=sys.stderr)


def say_lost_system_turn(adapter) -> None:
    """merge and export: the adapter's trained system turn, which their outputs do not keep."""
    from lorakit.lora.adapter_folder import lost_system_turn_note

    note = lost_system_turn_note(adapter)
    if note:
        print(note, file=sys.stderr)
