"""Errors that reach the user as one line (the CLI prints ``error: <message>``).

Raise these for bad input (config keys and values, checkpoints, files, datasets): the message
names the thing that is wrong and says how to fix it. Anything else is a bug and keeps its
traceback.
"""


class TunelabError(Exception):
    """Base class: bad user input, reported as one line without a traceback."""


class ConfigError(TunelabError, ValueError):
    """A config key or value is unknown, mistyped or out of range."""


class CheckpointError(TunelabError, ValueError):
    """A checkpoint folder or file is missing, corrupt or unsupported."""


class DataError(TunelabError, ValueError):
    """A dataset or tokenizer cannot be used (e.g. no usable row)."""


def path_error(error: OSError) -> TunelabError | None:
    """An OS error about a named file (a path the user gave: too long, not permitted, a
    folder where a file was expected, ...) as a one-line error naming it; None for one without
    a file name, which is more likely a bug and keeps its traceback."""
    if error.filename is None:
        return None
    return TunelabError(f"{error.filename}: {error.strerror or error}")


class RunFinished(Exception):
    """Raised on ``resume=true`` when the run already trained every step it plans: not an
    error (the recipe entry exits 0); the message says where the outputs are."""
