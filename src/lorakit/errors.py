"""Errors a user can cause. The CLI prints their message and exits with code 2, no traceback.

Every message names the problem and the fix. Anything else that escapes is a bug and may
traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" for none): for one-line reports of an error
    whose full text is long (a traceback-like dump, a validator's listing)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def shortened(text: str, width: int = 60) -> str:
    """A user's text quoted in a one-line message, cut to `width` characters."""
    return text if len(text) <= width else text[:width - 3] + "..."


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training run's steps (StopSignals handles it within them): the command
    stops at once, like Ctrl-C, and says how to go on. A KeyboardInterrupt, not an Exception, so
    that no `except Exception` on the way turns it into another error."""


class LorakitWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one
    "warning:" line, without Python's file and line)."""


class LorakitError(Exception):
    """Base class for user-facing errors (bad flag, file, config, adapter, model)."""

    exit_code = 2
    # under torchrun every process runs the same command on the same input and meets the same
    # problem, which rank 0 alone reports; False for one a process meets on its own (its node's
    # GPUs or files), which it reports itself
    every_rank_alike = True


class ConfigError(LorakitError):
    """A configuration value is missing, of the wrong type or out of range."""


class TargetMatchError(LorakitError):
    """A requested target module matches nothing in the model (or matches the wrong kind)."""


class AdapterMismatchError(LorakitError):
    """An adapter does not fit the model it is being loaded onto."""


class AdapterFileError(LorakitError):
    """An adapter or checkpoint folder is missing, damaged, or in an unsafe format."""


class DataError(LorakitError):
    """A data file is missing, empty, malformed, or has no usable examples."""


class ModelLoadError(LorakitError):
    """A model path or id cannot be loaded."""


class OutputError(LorakitError):
    """The output folder cannot be written (is a file, read-only, holds another run, disk full)."""


class TrainingError(LorakitError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class MergeError(LorakitError):
    """An adapter cannot be merged safely (non-finite values, mismatched base)."""
