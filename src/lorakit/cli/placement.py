"""--device, --dtype, --quantize and --threads, as `lorakit eval` and `lorakit generate` take them."""

from __future__ import annotations

import argparse
import re

from lorakit.config import DTYPES, MAX_THREADS, QUANTIZE, dtype_name


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", type=device_name,
                        help="auto, cpu, cuda or cuda:N (the N-th GPU); auto: the GPU when there is one, else the CPU")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, type=dtype_name,
                        help="weights dtype; auto: what lorakit train picks on that device (bfloat16 where the "
                             "GPU or CPU multiplies it natively, else float16 on a GPU, float32 on a CPU), so the "
                             "losses match training's eval")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE,
                        help="load the base in 4 or 8 bits (bitsandbytes), as QLoRA trains; default: as the "
                             "adapter's run trained (its config.yaml), else none")
    parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice, all cores); on a shared machine, "
                             "about as many as the free cores")


def use_threads(args: argparse.Namespace) -> None:
    """torch's CPU threads as --threads asks (none given: torch's own choice)."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def thread_count(text: str) -> int:
    if text.strip().isdigit() and 1 <= int(text) <= MAX_THREADS:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a thread count: use a whole number from 1 to {MAX_THREADS}, "
                                     "about as many as the free cores")


def device_name(text: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
