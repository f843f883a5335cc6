"""`lorakit train` end to end where it runs (made for the GPU run: the trainer's CUDA path,
bf16 weights, fused AdamW, the memory plan, packed attention, checkpoint and resume).

    PYTHONPATH=src python3 scripts/gpu_train_smoke.py OUT_DIR [--hidden 1024 --layers 8 --steps 40]

Builds OUT_DIR/model: a byte-level BPE tokenizer trained on the demo's training file (no
download) and a random Llama of the given width and depth. Then runs, as a user would,

    python -m lorakit train --model OUT_DIR/model --data <demo train> --eval-data <demo eval>
        --packing --max-steps STEPS --save-every STEPS/2 --output OUT_DIR/run

and the same again with --max-steps 1.5 x STEPS --resume. Prints both runs' output and
summary.json (eval loss before and after, tokens/s, peak memory). Exits 1 if a run failed, did
not train on the GPU where there is one, did not resume from the checkpoint or reach 1.5 x STEPS,
or if the eval loss did not fall. OUT_DIR is cleared first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "demo"
TRAIN, EVAL = DEMO / "wordnet_define_train.jsonl", DEMO / "wordnet_define_eval.jsonl"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_model_folder(folder: Path, hidden: int, layers: int, vocab: int) -> None:
    """A ChatML tokenizer trained on the demo data and a random Llama, saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [" ".join(str(v) for v in json.loads(line).values()) for line in TRAIN.open(encoding="utf-8")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    torch.manual_seed(0)  # the same base on every build: a resume checks the base's fingerprint
    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         vocab_size=len(tokenizer), max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train(folder: Path, run: Path, steps: int, save_every: int, *extra: str) -> tuple[int, str]:
    command = [sys.executable, "-m", "lorakit", "train", "--model", str(folder), "--data", str(TRAIN),
               "--eval-data", str(EVAL), "--packing", "--max-steps", str(steps), "--save-every", str(save_every),
               "--output", str(run), *extra]
    print("$", " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as child:
        for line in child.stdout:  # as it comes: a timeout still leaves the progress in the log
            print(line, end="", flush=True)
            lines.append(line)
    return child.returncode, "".join(lines)


def report(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    print("summary.json:", json.dumps(summary), flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # a rerun on the same machine starts afresh
    folder, run = args.out / "model", args.out / "run"
    build_model_folder(folder, args.hidden, args.layers, args.vocab)
    problems = _train_twice(folder, run, args.steps)
    print("train smoke:", "; ".join(problems) if problems else "ok", flush=True)
    return 1 if problems else 0


def _train_twice(folder: Path, run: Path, steps: int) -> list[str]:
    half = max(1, steps // 2)
    code, output = train(folder, run, steps, half)
    if code != 0:
        return [f"the first run exited with {code}"]
    device = "cuda" if _cuda_available() else "cpu"
    if f"device: {device}" not in output:
        return [f"the run did not say it trains on {device}"]
    code, output = train(folder, run, steps + half, half, "--resume")
    if code != 0:
        return [f"the resumed run exited with {code}"]
    if f"resumed from step-{steps:06d}" not in output:
        return [f"the second run did not resume from step-{steps:06d}"]
    summary = report(run)
    problems = [] if summary.get("steps") == steps + half else [f"summary.json says {summary.get('steps')} "
                                                                 f"steps, not {steps + half}"]
    return problems + _loss_problems(summary)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _loss_problems(summary: dict) -> list[str]:
    base, final = summary.get("base_eval_loss"), summary.get("final_eval_loss")
    if base is None or final is None:
        return ["summary.json has no base/final eval loss"]
    return [] if final < base else [f"eval loss did not fall: {base:.4f} -> {final:.4f}"]


if __name__ == "__main__":
    sys.exit(main())
