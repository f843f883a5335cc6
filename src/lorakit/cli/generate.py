"""`lorakit generate --adapter DIR [--model M] PROMPT`: chat-aware generation that streams tokens.

Several adapters can be loaded at once (`--adapter a --adapter b --use b`); the base is loaded
once and the adapters are switched in place.
"""

from __future__ import annotations

import argparse
import sys

MIN_TEMPERATURE = 1e-4  # logits / t must stay finite in fp32 and bf16 for the sampler


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli.placement import add_placement_flags
    from lorakit.cli import adapter_folder_arg

    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR", type=adapter_folder_arg,
                   help="adapter folder, or a training run's folder for its adapter (repeat to load several); "
                        "none: the base model alone")
    p.add_argument("--use", metavar="NAME", help="which loaded adapter to use (folder name or path; a run's runs/NAME/adapter is NAME); "
                        "default: the first")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="with --temperature above 0: the sampler's seed, so that the same command gives the same text")
    p.add_argument("--system", metavar="TEXT",
                   help="the system turn (default: the one the adapter's training records all opened with, "
                        "else the chat template's own; \"\" for the template's own)")
    p.add_argument("--raw", action="store_true", help="continue raw text instead of a chat turn")
    p.add_argument("--allow-other-base", action="store_true", help="load an adapter made for another base model")
    add_placement_flags(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle files (model *.bin, adapter_model.bin) with torch.load(weights_only=True)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.adapters import AdapterSet, base_model_for, refuse_classifier_adapters
    from lorakit.cli.placement import use_threads
    from lorakit.errors import ConfigError
    from lorakit.generate import generate_text
    from lorakit.quantize import inference_quantize, load_for_inference

    if args.use and not args.adapter:
        raise ConfigError(f"--use {args.use} names an adapter, but none is loaded; add --adapter DIR")
    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; pass the text to answer or continue, e.g. lorakit generate \"Define 'knoll'.\"")
    if args.system is not None and args.raw:
        raise ConfigError("--system is a chat turn, and --raw continues plain text without one; use one of them")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} up, got "
                          f"{args.temperature:g} (below it the logits overflow: use 0 for greedy)")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), as train's, got {args.seed}")
    if args.seed is not None and args.temperature == 0:
        raise ConfigError("--seed sets the sampler's seed, and --temperature 0 is greedy, without one: pass "
                          "--temperature above 0 (e.g. 0.7), or leave --seed out")
    refuse_classifier_adapters(args.adapter or [], "generate")
    use_threads(args)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    quantize, notes = inference_quantize(args.quantize, args.adapter[0] if args.adapter else None, args.dtype)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    model, tokenizer, _ = load_for_inference(args.model or base_model_for(args.adapter), quantize, args.device,
                                             args.dtype, args.allow_pickle, chosen_by_run=args.quantize is None)
    system = args.system
    if args.adapter:
        adapters = AdapterSet(model, allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle)
        for path in args.adapter:
            adapters.add(path)
        adapters.activate(args.use or adapters.names[0])
        if system is None and not args.raw:
            system = _trained_system_turn(adapters)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, stream=True, raw=args.raw,
                  system=system)
    return 0


def _trained_system_turn(adapters) -> str | None:
    """The system turn the adapter was trained under, said on stderr: answering without it would
    ask the adapter something other than what it learned."""
    from lorakit.errors import shortened

    saved = adapters.system_turn()
    if saved:
        print(f"system turn: the one all its training records opened with ({shortened(saved)!r}); --system TEXT for "
              "another, --system \"\" for the chat template's own", file=sys.stderr)
    return saved

