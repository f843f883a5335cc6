"""`lorakit generate --adapter DIR [--model M] PROMPT | - | --prompts FILE`: chat-aware, streamed generation.

    lorakit generate --adapter runs/mine "Define the word knoll."
    echo "Define the word knoll." | lorakit generate --adapter runs/mine -     # PROMPT - : stdin
    lorakit generate --adapter runs/mine --prompts prompts.jsonl --output answers.jsonl

--prompts FILE answers many prompts with one load of the model: a .txt holds one prompt per
line; a .jsonl one object per line, with the prompt side of a record the trainer reads
("prompt", "instruction" (+ "input"), "question", "query", "text", "input", or a chat in
"messages"/"conversations", whose closing assistant turns are left out), and an optional
"system". It writes one JSON line per answer: {"prompt", "completion", "adapter", "line"} (and
"system" where the record had one), to stdout or, written whole or not at all, to --output.
The prompts are answered --batch-size at a time (default 8), in batches of like lengths, in the
file's order. --columns FIELD=COLUMN renames a .jsonl file's fields as train's --columns renames
its data's columns; by default an adapter's run's own mapping renames the fields a line has.
With --temperature above 0 each prompt samples from a generator of its own (--seed seeds them
all): its answer does not depend on --batch-size, --output or the prompts beside it, and every
adapter of --use all draws the same numbers for it.

Several adapters can be loaded at once (`--adapter a --adapter b --use b`); the base is loaded
once and the adapters are switched in place. `--use all` answers with each in turn (with
--prompts: every prompt with the first adapter, then every prompt with the next).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

MIN_TEMPERATURE = 1e-4  # logits / t must stay finite in fp32 and bf16 for the sampler
STDIN = "-"
ALL_ADAPTERS = "all"
BATCH_SIZE = 8  # prompts per generate call: on a CPU or a GPU several times faster than one at a time
STREAM_WINDOW = 4  # printed to stdout: the batches sorted by length together, before their answers print


def register(subparsers, name: str, help_text: str) -> None:
    from lorakit.cli.placement import add_placement_flags
    from lorakit.cli import adapter_folder_arg

    p = subparsers.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("prompt", nargs="?", help="the user message (or raw text with --raw); - reads it from stdin, "
                                             "all of it; leave it out with --prompts")
    p.add_argument("--prompts", metavar="FILE",
                   help="answer every prompt of a .txt (one per line) or .jsonl file (one object per line: "
                        "\"prompt\", \"messages\", ...), with one load of the model; prints one JSON line each")
    p.add_argument("--output", metavar="FILE.jsonl",
                   help="with --prompts: write the JSON lines to this file (whole, or not at all) instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N",
                   help="with --prompts: answer N prompts at a time, left-padded (greedy answers are the same as "
                        "one at a time in float32, and may tip a near tie in bf16 or fp16; 1: one at a time)")
    p.add_argument("--columns", nargs="+", metavar="FIELD=COLUMN",
                   help="with a .jsonl --prompts file: its fields under lorakit's names, as train's --columns "
                        "(default: the adapter's run's, from its config.yaml, where a line has those fields)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR", type=adapter_folder_arg,
                   help="adapter folder, or a training run's folder for its adapter (repeat to load several); "
                        "none: the base model alone")
    p.add_argument("--use", metavar="NAME", help="which loaded adapter to use (folder name or path; a run's "
                        "runs/NAME/adapter is NAME), or all: each in turn; default: the first")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="with --temperature above 0: the sampler's seed, so that the same command gives the same text "
                        "(a prompt's answer is the same at any --batch-size, in float32)")
    p.add_argument("--system", metavar="TEXT",
                   help="the system turn (default: the one the adapter's training records all opened with, "
                        "else the chat template's own; \"\" for the template's own; a --prompts record's "
                        "\"system\" field comes first)")
    p.add_argument("--raw", action="store_true", help="continue raw text instead of a chat turn")
    p.add_argument("--allow-other-base", action="store_true", help="load an adapter made for another base model")
    add_placement_flags(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickle files (model *.bin, adapter_model.bin) with torch.load(weights_only=True)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.placement import use_threads

    _refuse_bad_values(args)
    _refuse_bad_prompt_options(args)
    prompts = _read_prompts(args)  # one list per adapter: each is read with its own run's --columns
    if args.output is not None:
        _check_output(args)
    use_threads(args)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model, tokenizer, adapters = _load(args)
    if args.prompts is None:
        _answer_one(args, model, tokenizer, adapters, prompts[0][0].content)
    else:
        _answer_all(args, model, tokenizer, adapters, prompts)
    return 0


def _refuse_bad_values(args: argparse.Namespace) -> None:
    from lorakit.errors import ConfigError

    if args.use and not args.adapter:
        raise ConfigError(f"--use {args.use} names an adapter, but none is loaded; add --adapter DIR")
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
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (1: one prompt at a time), got {args.batch_size}")


def _refuse_bad_prompt_options(args: argparse.Namespace) -> None:
    """One source of prompts, and --output only where there are JSON lines to write. A missing
    PROMPT never reads stdin unasked: a job whose stdin is a pipe no one writes would wait forever."""
    from lorakit.errors import ConfigError

    if args.prompt is not None and args.prompts is not None:
        raise ConfigError(f"both a prompt ({args.prompt!r}) and --prompts {args.prompts} were given; pass one: "
                          "PROMPT (or - for stdin) for one answer, --prompts FILE for many")
    if args.prompt is None and args.prompts is None:
        raise ConfigError("no prompt given; pass it (lorakit generate --adapter DIR \"Define 'knoll'.\"), - to read "
                          "it from stdin, or --prompts FILE (.txt or .jsonl) for many")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("the prompt is empty; pass the text to answer or continue, e.g. "
                          "lorakit generate \"Define 'knoll'.\"")
    if args.output is not None and args.prompts is None:
        raise ConfigError("--output writes the JSON lines of --prompts FILE; with one PROMPT, redirect the answer "
                          "instead (lorakit generate ... PROMPT > answer.txt), or put the prompt in a file")
    if args.overwrite and args.output is None:
        raise ConfigError("--overwrite replaces an existing --output file, and none is given; leave it out")
    if args.columns and args.prompts is None:
        raise ConfigError("--columns renames the fields of a --prompts FILE's lines, and one PROMPT has none; leave "
                          "--columns out, or put the prompt in a .jsonl file")


def _read_prompts(args: argparse.Namespace) -> list[list]:
    """The prompts, once per --adapter (once for the base alone): a .jsonl file's fields renamed
    by --columns, else by the adapter's run's own mapping."""
    from lorakit.data.prompts import Prompt, read_stdin_prompt

    if args.prompts is not None:
        return _prompt_file_per_adapter(args)
    if args.prompt != STDIN:
        return [[Prompt(args.prompt)]] * max(len(args.adapter), 1)
    if sys.stdin is not None and sys.stdin.isatty():  # typed by hand: say how to end it
        print("reading the prompt from stdin; end it with Ctrl-D (Ctrl-Z, Enter on Windows)", file=sys.stderr)
    return [[Prompt(read_stdin_prompt(sys.stdin), where="stdin")]] * max(len(args.adapter), 1)


def _prompt_file_per_adapter(args: argparse.Namespace) -> list[list]:
    """A run trained on data whose columns it renamed (`data.columns` in its config.yaml) is asked
    its test file's prompts under the same mapping, as eval scores that file (said on stderr);
    lines already in lorakit's names are read as they are."""
    from lorakit.data.prompts import read_prompt_file
    from lorakit.evaluate import run_columns

    if args.columns or not args.adapter:
        return [read_prompt_file(args.prompts, args.columns or ())] * max(len(args.adapter), 1)
    mappings = [tuple(run_columns(path)) for path in args.adapter]
    read = {}
    for columns in mappings:
        if columns not in read:
            if columns:
                print(f"note: --columns {' '.join(columns)}: the run's own (its config.yaml), for the lines that "
                      "have those fields; pass --columns for others", file=sys.stderr)
            read[columns] = read_prompt_file(args.prompts, columns, from_the_run=True)
    return [read[columns] for columns in mappings]


def _check_output(args: argparse.Namespace) -> None:
    """Refused before the model loads, not after every prompt was answered."""
    from lorakit.errors import ConfigError, OutputError
    from lorakit.safe_io import file_in_the_way, translate_os_errors

    output = Path(args.output)
    if output.suffix.lower() != ".jsonl":
        raise ConfigError(f"--output {output} must be a file name ending in .jsonl (it holds one JSON line per answer)")
    if output.is_dir():
        raise OutputError(f"--output {output} is a folder; give a file name in it, e.g. {output / 'answers.jsonl'}")
    if output.exists() and output.resolve() == Path(args.prompts).resolve():
        raise OutputError(f"--output {output} is the --prompts file; write the answers to another file")
    if output.exists() and not args.overwrite:
        raise OutputError(f"--output {output} already exists; pass --overwrite to replace it, or choose another name")
    blocking = file_in_the_way(output.parent)
    if blocking is not None:
        raise OutputError(f"--output {output}: {blocking} is a file, where its folder would be; choose another path")
    with translate_os_errors(output):  # a folder that cannot be made or written to: said now, not after the answers
        output.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output.parent).close()


def _load(args: argparse.Namespace):
    """The base (once, whatever the number of prompts and adapters) and the adapters' set (None
    without --adapter)."""
    from lorakit.adapters import AdapterSet, base_model_for, refuse_classifier_adapters
    from lorakit.quantize import inference_quantize, load_for_inference

    refuse_classifier_adapters(args.adapter or [], "generate")
    quantize, notes = inference_quantize(args.quantize, args.adapter[0] if args.adapter else None)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    model, tokenizer, _ = load_for_inference(args.model or base_model_for(args.adapter), quantize, args.device,
                                             args.dtype, args.allow_pickle, chosen_by_run=args.quantize is None)
    if not args.adapter:
        return model, tokenizer, None
    adapters = AdapterSet(model, allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle)
    for path in args.adapter:
        adapters.add(path)
    adapters.activate(_adapter_names(args, adapters)[0])  # an unknown --use is refused before any answer
    return model, tokenizer, adapters


def _adapter_names(args: argparse.Namespace, adapters) -> list:
    """The adapters to answer with, in order ([None]: the base model alone)."""
    if adapters is None:
        return [None]
    if args.use == ALL_ADAPTERS and ALL_ADAPTERS not in adapters.names:  # an adapter named all: its own name
        return adapters.names
    return [args.use or adapters.names[0]]


def _system_turn(args: argparse.Namespace, adapters, name) -> str | None:
    """--system, else the one the adapter was trained under (said on stderr): answering without
    it would ask the adapter something other than what it learned."""
    from lorakit.errors import shortened

    if args.system is not None or args.raw or adapters is None:
        return args.system
    saved = adapters.system_turn(name)
    if saved:
        print(f"system turn{f' of {name}' if len(args.adapter) > 1 else ''}: the one all its training records opened "
              f"with ({shortened(saved)!r}); --system TEXT for another, --system \"\" for the chat template's own",
              file=sys.stderr)
    return saved


def _answer_one(args: argparse.Namespace, model, tokenizer, adapters, prompt: str) -> None:
    """One prompt, streamed to stdout; with --use all once per adapter, each named on stderr first."""
    from lorakit.generate import generate_text

    names = _adapter_names(args, adapters)
    seeds = _prompt_seeds(args, 1)  # each adapter draws the same numbers
    for name in names:
        if name is not None:
            adapters.activate(name)
        system = _system_turn(args, adapters, name)
        if len(names) > 1:
            print(f"adapter {name}:", file=sys.stderr, flush=True)
        generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, stream=True, raw=args.raw,
                      system=system, seed=seeds and seeds[0])


def _answer_all(args: argparse.Namespace, model, tokenizer, adapters, prompt_sets: list) -> None:
    """Every prompt, with each adapter asked for: all rendered and checked first (a bad one stops the
    command before any answer is written), then answered one adapter at a time (one switch each)."""
    plan = []
    for name in _adapter_names(args, adapters):
        system = _system_turn(args, adapters, name)
        # read per --adapter, in the order of adapters.names
        prompts = prompt_sets[adapters.names.index(adapters.loaded_name(name))] if name is not None else prompt_sets[0]
        plan.append((name, [(prompt, _checked_ids(args, model, tokenizer, prompt, system)) for prompt in prompts]))
    lines, answered, total = [], 0, sum(len(jobs) for _, jobs in plan)
    seeds = _prompt_seeds(args, max(len(jobs) for _, jobs in plan))
    for name, jobs in plan:
        if name is not None:
            adapters.activate(name)
        ready = iter(prompt for prompt, _ in jobs)  # the answers come in the file's order
        for count, texts in _answers(args, model, tokenizer, [ids for _, ids in jobs], seeds):
            for text in texts:
                line = json.dumps(_answer_record(next(ready), text, name), ensure_ascii=False)
                if args.output is None:
                    print(line, flush=True)  # as they are answered: a long batch shows its progress, `| head` works
                lines.append(line)
            answered += count
            if args.output is not None:
                _say_progress(answered, total)
    if args.output is not None:
        _write_answers(Path(args.output), lines)


def _prompt_seeds(args: argparse.Namespace, count: int) -> list[int] | None:
    """The sampler's seed for each prompt's place in the file, the same for every adapter (None: greedy)."""
    from lorakit.generate import sampling_seeds

    return sampling_seeds(count) if args.temperature > 0 else None


def _answers(args: argparse.Namespace, model, tokenizer, prompts: list, seeds: list[int] | None):
    """complete_in_order's batches: for stdout sorted by length a few batches at a time, so that the
    first answers print soon; for --output, written at the end, all at once (the least padding)."""
    from lorakit.generate import complete_in_order

    window = None if args.output is not None else STREAM_WINDOW * args.batch_size
    return complete_in_order(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.batch_size, window,
                             seeds and seeds[:len(prompts)])


def _checked_ids(args: argparse.Namespace, model, tokenizer, prompt, system: str | None) -> list:
    """The prompt's token ids; its problem (a chat with --raw, too long) as an error naming its line."""
    from lorakit.errors import ConfigError, LorakitError
    from lorakit.generate import prompt_ids

    if args.raw and (isinstance(prompt.content, list) or prompt.system):
        what = "is a chat (a list of turns)" if isinstance(prompt.content, list) else "has a 'system' turn"
        raise ConfigError(f"{prompt.where} {what}, and --raw continues plain text without turns; leave out --raw, "
                          "or give the line a plain \"prompt\" string")
    try:
        return prompt_ids(model, tokenizer, prompt.content, args.max_new_tokens, raw=args.raw,
                          system=prompt.system or system)
    except LorakitError as exc:
        raise type(exc)(f"{prompt.where}: {exc}") from None


def _answer_record(prompt, text: str, adapter) -> dict:
    record = {"prompt": prompt.content, "completion": text, "adapter": adapter, "line": prompt.line}
    return record if prompt.system is None else {**record, "system": prompt.system}


def _say_progress(done: int, total: int) -> None:
    """A counter on a terminal's stderr while answers go to --output (a log file gets none)."""
    if sys.stderr.isatty():
        print(f"\ranswered {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _write_answers(output: Path, lines: list) -> None:
    from lorakit.safe_io import atomic_write_text

    atomic_write_text(output, "".join(f"{line}\n" for line in lines))  # its folder: made by _check_output
    print(f"wrote {len(lines)} answers to {output}")
