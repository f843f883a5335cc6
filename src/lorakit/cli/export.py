"""`lorakit export`: write an adapter for vLLM, llama.cpp (GGUF), or as a merged model.

    lorakit export --adapter runs/demo/adapter --format vllm --output served/demo
    lorakit export --adapter runs/demo/adapter --format gguf --output demo-lora.gguf --model BASE
    lorakit export --adapter runs/demo/adapter --format merged --output merged/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.errors import ConfigError


DESCRIPTION = """\
Export a PEFT-format adapter folder.
  vllm    check it against vLLM's LoRA loader and write a clean copy (or list what vLLM rejects)
  gguf    write a llama.cpp LoRA adapter (.gguf) for `llama-cli -m BASE.gguf --lora FILE`
  merged  merge it into its base model and save a plain transformers model
See docs/export.md for the rules and their sources."""


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli import adapter_folder_arg

    p = subparsers.add_parser(name, help=help_text, description=DESCRIPTION)
    p.add_argument("--adapter", required=True, type=adapter_folder_arg,
                   help="adapter folder (adapter_config.json + adapter_model.safetensors), or a training run's "
                        "folder for its adapter")
    p.add_argument("--format", required=True, choices=("vllm", "gguf", "merged"), help="what to write")
    p.add_argument("--output", required=True, type=Path,
                   help="vllm / merged: a new folder; gguf: a .gguf file path (or an existing folder)")
    p.add_argument("--model", "--base", "--base-config", dest="model", default=None, metavar="MODEL",
                   help="the base model (default: the adapter's base_model_name_or_path): merged: its folder or hub "
                        "id, as merge --model; vllm, gguf: its folder (or config.json), whose config the adapter is "
                        "checked against (--base and --base-config: the same flag, as older lorakit spelled it)")
    p.add_argument("--allow-embeddings", action="store_true",
                   help="vllm: accept LoRA on embed_tokens / lm_head (only some vLLM models support it)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="vllm: the --max-lora-rank you will serve with (vLLM's default is 16)")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16"), default=None,
                   help="gguf: tensor type (default f32, as llama.cpp's convert_lora_to_gguf.py)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickle adapter_model.bin (with torch.load(weights_only=True))")
    p.add_argument("--allow-other-base", action="store_true",
                   help="export an adapter made for another base model (its fingerprint differs from --model's)")
    p.add_argument("--overwrite", action="store_true", help="merged: replace an existing --output folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


# the options that only some formats read: given to another, they would be silently ignored
FORMATS_OF_OPTION = {"allow_embeddings": ("vllm",), "max_lora_rank": ("vllm",), "outtype": ("gguf",),
                     "overwrite": ("merged",)}


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.merge import say_lost_system_turn, say_quantized_training

    _refuse_options_of_other_formats(args)
    if args.format == "gguf" and args.outtype is None:
        args.outtype = "f32"
    if args.format == "vllm":
        result = _export_vllm(args)
    elif args.format == "gguf":
        result = _export_gguf(args)
    else:
        result = export_merged(args.adapter, args.output, base=args.model, allow_pickle=args.allow_pickle,
                               allow_other_base=args.allow_other_base, overwrite=args.overwrite)
        if not args.json:
            print(f"wrote merged model to {args.output}")
    say_lost_system_turn(args.adapter)
    if args.format == "merged":  # vllm and gguf keep the adapter apart: it meets the base it is served with
        say_quantized_training(args.adapter, None)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _refuse_options_of_other_formats(args: argparse.Namespace) -> None:
    for option, formats in FORMATS_OF_OPTION.items():
        if getattr(args, option) not in (None, False) and args.format not in formats:
            flag = "--" + option.replace("_", "-")
            why = ("; a {0} export never replaces a file: choose another --output or delete the old one"
                   if option == "overwrite" else ", which ignores it: leave it out").format(args.format)
            raise ConfigError(f"{flag} is for --format {' or '.join(formats)}, not {args.format}{why}")


def _base_config(args: argparse.Namespace) -> Path | None:
    return None if args.model is None else Path(args.model)


def _export_vllm(args: argparse.Namespace) -> dict:
    from lorakit.export.vllm import export_vllm

    done = export_vllm(args.adapter, args.output, max_lora_rank=args.max_lora_rank,
                       allow_embeddings=args.allow_embeddings, base_config_dir=_base_config(args),
                       allow_pickle=args.allow_pickle, allow_other_base=args.allow_other_base)
    for warning in done.check.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.json:
        print(f"wrote {done.output} ({done.modules} modules, {done.tensors} tensors, max rank {done.check.max_rank})")
        print(f"serve it with: vllm serve {_served_base(args, gguf=False)} --enable-lora --max-lora-rank "
              f"{done.check.max_lora_rank} "
              f"--lora-modules NAME={done.output}")
    return done.to_dict()


def _export_gguf(args: argparse.Namespace) -> dict:
    from lorakit.export.gguf import export_gguf

    done = export_gguf(args.adapter, args.output, base_config_dir=_base_config(args),
                       outtype=args.outtype, allow_pickle=args.allow_pickle, allow_other_base=args.allow_other_base)
    if not args.json:
        print(f"wrote {done.output} (arch {done.arch}, {done.tensors} tensor pairs, "
              f"alpha {done.alpha:g}, {done.outtype})")
        if done.baked:
            print(f"folded per-module scale factors into lora_b for {len(done.baked)} modules "
                  "(rsLoRA / alpha_pattern; llama.cpp applies one alpha)")
        print(f"use it with: llama-cli -m {_served_base(args, gguf=True)} --lora {done.output}")
    return done.to_dict()


def _served_base(args: argparse.Namespace, gguf: bool) -> str:
    """The base the printed command names: for the built-in model the files that hold it (its
    alias resolves in lorakit only), else the adapter's base (a GGUF of it is the user's to make)."""
    from lorakit.adapters import base_model_for
    from lorakit.models import names_the_builtin

    base = args.model or base_model_for([args.adapter])
    if base is None or names_the_builtin(base):
        from lorakit.errors import LorakitError
        from lorakit.gguf_convert import converted_gguf_dir
        from lorakit.models import builtin_gguf_path

        try:
            return str(builtin_gguf_path() if gguf else converted_gguf_dir(builtin_gguf_path()))
        except LorakitError:  # its package is not installed here: the export itself needs no base
            return "BASE.gguf" if gguf else "BASE"
    if gguf:
        return str(base) if str(base).lower().endswith(".gguf") else "BASE.gguf"
    return str(Path(base).parent) if Path(base).name == "config.json" else str(base)  # --model may name its config


def export_merged(adapter_dir: Path, output_dir: Path, base: str | None = None, allow_pickle: bool = False,
                  allow_other_base: bool = False, overwrite: bool = False) -> dict:
    """Thin call into `lorakit merge`'s library function."""
    from lorakit.merge import merge_to_folder

    return {"format": "merged", **merge_to_folder(adapter_dir, output_dir, base=base, allow_pickle=allow_pickle,
                                                  allow_other_base=allow_other_base, overwrite=overwrite)}
