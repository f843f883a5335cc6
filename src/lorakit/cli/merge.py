"""`lorakit merge --adapter DIR --output DIR`: a plain transformers model folder, checked."""

from __future__ import annotations

import argparse
import json


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    add_merge_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, metavar="DIR")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (the merge itself runs in fp32)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-other-base", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lorakit.merge import merge_to_folder

    result = merge_to_folder(args.adapter, args.output, args.model, args.dtype, args.allow_other_base, args.overwrite)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(f"merged model written to {result['output']} ({result['dtype']}); reloaded with plain transformers, "
              f"max logit difference {result['max_abs_logit_difference']:.2e} (tolerance {result['tolerance']:g})")
    return 0
