"""The `lorakit` command: parse, call the library, print.

Each subcommand lives in its own module under `lorakit.cli` and exposes
`register(subparsers)`, which adds its parser and sets `func=run` on it. Modules are imported
lazily so that `lorakit --help` stays fast and a broken optional dependency of one command
never breaks the others.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import importlib
import os
import signal
import sys
import time
import warnings

from lorakit import host
from lorakit.errors import LorakitError, LorakitWarning, Terminated


# (command, module under lorakit.cli, one-line help)
COMMANDS = [
    ("train", "train", "fine-tune a model with LoRA (no arguments: the built-in offline demo)"),
    ("generate", "generate", "generate text with a base model plus an adapter"),
    ("eval", "evaluate", "loss and perplexity of base and adapter on a data file"),
    ("merge", "merge", "merge an adapter into its base and save a plain transformers model"),
    ("recommend", "recommend", "recommend r, alpha, targets and a full config for your model, data, hardware"),
    ("estimate", "estimate", "predict peak memory and FLOPs of a training config"),
    ("analyze", "analyze", "effective rank of a trained adapter, per module"),
    ("sweep", "sweep", "short trainings over a grid of r, alpha and targets"),
    ("bench", "bench", "speed and memory against PEFT on the same model and inputs"),
    ("export", "export", "export an adapter for vLLM, llama.cpp (GGUF) or as a merged model"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Fine-tune LLMs with LoRA and choose rank, alpha and target modules well.",
    )
    from lorakit import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _requested_command(argv)
    # `lorakit --help` (or no command, or a mistyped one) lists the commands: none is built, as
    # building some loads torch (seconds)
    listing_only = argv is not None and wanted is None
    for name, module, help_text in COMMANDS:
        if listing_only or (wanted is not None and name != wanted):
            sub.add_parser(name, help=help_text)  # listed in --help, built only when used
            continue
        try:
            mod = importlib.import_module(f"lorakit.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lorakit.cli.{module}":
                raise
            sub.add_parser(name, help=f"{help_text} (not available in this build)")
            continue
        mod.register(sub, name, help_text)
        sub.choices[name].formatter_class = HelpFormatter
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option's help ends with its default when it has a
    real one (not None, an off switch or an empty list) and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        no_default = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and "default" not in text and not no_default:  # 0 is a default, False not
            text += " (default: %(default)s)"
        return text


EMPTY_ALLOWED = {"system"}  # generate --system "": the chat template's own system turn, a choice


def _empty_option(command: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """What to say of the first flag given an empty string (train's config names its own empty
    values)."""
    if getattr(args, "command", None) == "train":
        return None
    for action in command._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if action.option_strings and action.dest not in EMPTY_ALLOWED and "" in values:
            fix = "give it a value" if action.required else "give it a value, or leave the flag out"
            return f"{action.option_strings[-1]} is empty; {fix}"
    return None


def _is_utf8(arg: str) -> bool:
    """Python reads a command line's non-UTF-8 bytes as lone surrogates, which UTF-8 cannot encode."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def adapter_folder_arg(path: str):
    """argparse's type for an adapter folder (adapter_or_run_folder), imported when a value is
    parsed: the adapter code loads torch, which `COMMAND --help` need not wait for."""
    from lorakit.lora.adapter_folder import adapter_or_run_folder

    return adapter_or_run_folder(path)


def _requested_command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    names = {name for name, _, _ in COMMANDS}
    for arg in args:
        if not arg.startswith("-"):
            return arg if arg in names else None
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while torch and transformers load, before any command runs
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`| head`): stop without a word, as others do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # or the interpreter's last flush raises it again
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _requested_command(argv) == "train":
        from lorakit.config import explicit_switches

        argv = explicit_switches(argv)
    parser = build_parser(argv)
    with _quiet_unless_speaking():
        args, unknown = parser.parse_known_args(argv)  # argparse prints its errors itself
        command = _subparsers(parser).get(getattr(args, "command", None), parser)
        if unknown:  # report it with the subcommand's usage, which lists the flags that do exist
            command.error(f"unrecognized arguments: {' '.join(unknown)} (see `{command.prog} --help`)")
        empty = _empty_option(command, args)
        if empty is not None:  # taken for "not given" (a default path, this machine's memory) or for "."
            command.error(empty)
        undecodable = next((arg for arg in argv if not _is_utf8(arg)), None)
        if undecodable is not None:  # a finished run lost its checkpoint to such a path: refused up front
            command.error(f"{ascii(undecodable)} holds bytes that are not UTF-8 (a name in another encoding?); "
                          "lorakit records paths in its JSON and YAML files, which hold UTF-8: rename it")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if not argv else 2
    if host.several_processes() and args.command != "train":  # each process would run all of it, twice over
        return _say_error(f"lorakit {args.command} runs in one process; start it without torchrun (only "
                          "`lorakit train` shares its work across processes)", 2, args)
    _show_lorakit_warnings_as_one_line()
    try:
        # checked here, not mid-run (importing them loads torch, and triton)
        if os.environ.get("LORAKIT_CPU_GEMM"):
            from lorakit.kernels import cpu_gemm

            cpu_gemm.check_environment()
        if os.environ.get("LORAKIT_TRITON_LAUNCH"):
            from lorakit.kernels import triton_launch

            triton_launch.check_environment()
        _load_libraries_holding_ctrl_c(args.command)
        with _terminated_on_sigterm():
            return int(args.func(args) or 0)
    except LorakitError as exc:
        return refuse(exc, args)
    except OSError as exc:  # a path the user gave that the system refused, where no command said why
        from lorakit.safe_io import os_error_words

        words = os_error_words(exc, "path")
        if words is None or exc.filename is None:
            raise
        return _say_error(f"{exc.filename}: {words[0]} ({exc.strerror}); {_path_fix(exc, words[1])}", 2, args)
    except RuntimeError as exc:  # pathlib's resolve() before Python 3.13; an OSError (ELOOP) since
        if _a_peer_stopped(exc):
            return _say_error("another process of this torchrun job stopped (its error is above); fix that and "
                              "run again", 1, args)
        if not str(exc).startswith("Symlink loop"):
            raise
        from lorakit.safe_io import os_error_words

        return _say_error(f"{exc}; {os_error_words(OSError(errno.ELOOP, ''), 'path')[1]}", 2, args)
    except Terminated:
        if _speaks():
            print(_stopped_by_sigterm(getattr(args, "command", None)), file=sys.stderr)
        return 143


MODEL_LOADING_COMMANDS = {"train", "generate", "eval", "merge", "sweep", "export"}


def _load_libraries_holding_ctrl_c(command: str) -> None:
    """Imports torch, and for the commands that load a model transformers' model code, before
    the command runs: with Ctrl-C held back (import_holding_ctrl_c)."""
    modules = ["torch"] + (["transformers.modeling_utils"] if command in MODEL_LOADING_COMMANDS else [])
    import_holding_ctrl_c([name for name in modules if name not in sys.modules])


def import_holding_ctrl_c(modules: list[str]) -> None:
    """Imports modules with SIGINT held back, then lets a Ctrl-C that came meanwhile through.
    Raised inside a library's import code, the KeyboardInterrupt can be swallowed by a bare
    `except:` (numpy left half-imported: a RecursionError later) or mark the process as killed
    by SIGINT (exit -2 after "interrupted", not 130). A terminal's Ctrl-C comes to a thread that
    does not hold it: called before torch starts any, as the command line does, that is this one."""
    if not modules:
        return
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, ValueError, OSError):  # no sigmask on this platform: import as is
        held = None
    try:
        for name in modules:  # threads these imports start inherit the mask: SIGINT comes to this one
            importlib.import_module(name)
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending Ctrl-C is raised here


@contextlib.contextmanager
def _terminated_on_sigterm():
    """In one process, SIGTERM raises Terminated (one line, exit 143) instead of ending the process
    without a word, and a half-written output's temp file or folder is removed on the way out;
    a training run's steps have their own handler (loop.StopSignals: a checkpoint at the next step
    boundary). Not under torchrun: a Python handler waits for a collective blocked in C++ (up to
    its 30-minute timeout), and there SIGTERM is how torchrun stops the others when one failed."""
    def terminate(signum, frame):
        raise Terminated()

    if host.several_processes():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (tests in threads): leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped_by_sigterm(command: str | None) -> str:
    if command == "train":
        return ("stopped by SIGTERM (between the training steps: loading, evaluating or saving); every file "
                "written is whole: run the same command with --resume to go on")
    if command == "sweep":
        return ("stopped by SIGTERM; every file written is whole: run the same command again to go on (a "
                "stopped point continues from its checkpoint)")
    return "stopped by SIGTERM; nothing half-written is left: run the same command again"


@contextlib.contextmanager
def _quiet_unless_speaking():
    """argparse's own error line from rank 0 alone; the others exit with its code once rank 0 had
    its time to say it."""
    if _speaks():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            yield
        except SystemExit as exit:
            if exit.code:
                _leave_rank_0_time_to_speak()
            raise


# how long a quiet rank waits for rank 0 to say the error they share (torchrun stops it sooner)
RANK_0_GRACE_SECONDS = 10.0


def _leave_rank_0_time_to_speak() -> None:
    """torchrun stops every process once one fails: a quiet rank that failed first ended rank 0
    before it printed the error they share (CI saw a bad flag's torchrun job end without a word).
    So a quiet rank waits, with SIGTERM's default action, for torchrun to end it after rank 0 has
    spoken and exited; the wait is bounded in case rank 0 went another way."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # another launcher may not stop the rest: no wait
        return
    with contextlib.suppress(ValueError):  # not the main thread: the handler stays as it is
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(RANK_0_GRACE_SECONDS)


def _speaks() -> bool:
    """Whether this process reports the problems every process of a torchrun job meets alike:
    rank 0 does (the others exit with the same code), as does any process outside torchrun."""
    return not host.several_processes() or os.environ.get("RANK", "0") == "0"


# a collective's words when the process at the other end is gone (gloo; NCCL's watchdog says it otherwise)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _a_peer_stopped(exc: RuntimeError) -> bool:
    """A collective failed because another torchrun process stopped first (it said why)."""
    return host.several_processes() and any(words in str(exc) for words in _PEER_GONE)


def refuse(exc: LorakitError, args) -> int:
    """A user error's one line (see `_say_error`); under torchrun, one the other processes met
    alike only from rank 0, and one a process met on its own from that process, marked."""
    if exc.every_rank_alike or _speaks():
        return _say_error(str(exc), exc.exit_code, args)
    return _say_error(f"[rank {os.environ.get('RANK')}] {exc}", exc.exit_code, args, every_rank_alike=False)


def _say_error(message: str, exit_code: int, args, every_rank_alike: bool = True) -> int:
    """The one error line on stderr; with --json also {"error", "exit_code"} on stdout, so a script
    reading the JSON gets an answer either way."""
    if every_rank_alike and not _speaks():
        _leave_rank_0_time_to_speak()
        return exit_code
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False) is True:
        print(json.dumps({"error": message, "exit_code": exit_code}))
    return exit_code


def _show_lorakit_warnings_as_one_line() -> None:
    """lorakit's own warnings are for the user, not a developer: no file, line or source."""
    show_others = warnings.showwarning
    if getattr(show_others, "lorakit", False):  # main() called again in one process (tests)
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, LorakitWarning):
            return show_others(message, category, filename, lineno, file, line)
        if _speaks():  # under torchrun every rank meets the same setting: rank 0 says it once
            print(f"warning: {message}", file=sys.stderr if file is None else file)

    show.lorakit = True
    warnings.showwarning = show


def _path_fix(exc: OSError, fix: str) -> str:
    """`fix`, or LORAKIT_CACHE when the path is in lorakit's own cache (not one the user gave on
    the command line)."""
    from pathlib import Path

    from lorakit.host import cache_dir

    cache, path = cache_dir().absolute(), Path(os.fsdecode(exc.filename)).absolute()
    if path == cache or cache in path.parents:
        return f"it is in lorakit's cache ({cache}): set LORAKIT_CACHE to a writable folder"
    return fix


if __name__ == "__main__":
    sys.exit(main())
