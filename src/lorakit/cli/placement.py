"""--device and --dtype, as `lorakit eval` and `lorakit generate` take them."""

from __future__ import annotations

import argparse
import re

from lorakit.config import DTYPES


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", type=device_name,
                        help="auto, cpu, cuda or cuda:N (the N-th GPU); auto: the GPU when there is one, else the CPU")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype; auto: what lorakit train picks on that device (bfloat16 on a GPU "
                             "or a CPU with native bf16, else float32), so the losses match training's eval")


def device_name(text: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
