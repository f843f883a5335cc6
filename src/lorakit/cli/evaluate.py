"""`lorakit eval --adapter DIR --data FILE`: loss and perplexity of the base and the adapter;
`lorakit eval --model DIR --data FILE`: of a model alone (a merged one, say)."""

from __future__ import annotations

import argparse
import json

from lorakit.config import DATA_FORMATS


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli import adapter_folder_arg

    from lorakit.cli.placement import add_placement_flags

    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--adapter", metavar="DIR", type=adapter_folder_arg,
                   help="the adapter folder (PEFT format), or a training run's folder for its adapter (without it, "
                        "--model is scored alone)")
    p.add_argument("--data", required=True, nargs="+", action="extend", metavar="FILE", help="data files to score, read as lorakit train reads them")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path); without "
                                   "--adapter, the model to score")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS,
                   help="data format (default: the run's, from its config.yaml beside the adapter; else detected)")
    p.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                   help="your columns under lorakit's names, as train's --columns (default: the run's, from its "
                        "config.yaml beside the adapter)")
    p.add_argument("--seq-len", type=int, help="maximum tokens per sequence (longer examples are cut; default: "
                                              "the run's, from its config.yaml beside the adapter, else 512)")
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction,
                   help="score the prompts' tokens too, as a run with --train-on-inputs trained (default: the run's "
                        "setting, from its config.yaml beside the adapter; else off)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--allow-other-base", action="store_true", help="load an adapter made for another base model")
    add_placement_flags(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle files (model *.bin, adapter_model.bin) with torch.load(weights_only=True)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.placement import use_threads
    from lorakit.evaluate import evaluate_adapter

    use_threads(args)
    result = evaluate_adapter(args.adapter, args.data, model=args.model, fmt=args.format, seq_len=args.seq_len,
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              train_on_inputs=args.train_on_inputs, quantize=args.quantize, columns=args.columns,
                              allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for note in result["notes"]:
            print(f"note: {note}")
        print(f"{'':10}{'loss':>10}{'perplexity':>12}")
        for row in ("base", "adapter", "model"):
            if f"{row}_loss" in result:
                print(f"{row:10}{result[f'{row}_loss']:>10.4f}{result[f'{row}_perplexity']:>12.2f}")
        print(f"({result['tokens']:,} scored tokens)")
    return 0
