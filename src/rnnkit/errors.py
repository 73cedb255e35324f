"""The command line's error kinds and exit codes: what a failure means decides how it ends.

    0    success
    1    the command line is well formed, but running it failed: a file missing, unreadable,
         malformed or incompatible (text, CSV, checkpoint); data that do not fit the options
         (a text too short for one batch, a --layer the checkpoint lacks); an output path that
         cannot be written or would overwrite a saved run; a model too large for memory; a
         non-finite loss; an operating-system error (disk full, permission denied)
    2    the command line itself is wrong (argparse's convention): an option's value outside
         what it accepts, or options that do not go together, decided from the command line
         alone, before any file is read (`UsageError`)
    130  interrupted (Ctrl-C: 128 + SIGINT, as a shell reports it)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator running out: ``MemoryError``, or torch's
    ``RuntimeError`` ("can't allocate memory" on the CPU, its OutOfMemoryError subclass on CUDA).
    """
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower())


class UsageError(ValueError):
    """An option value or combination refused from the command line alone (exit 2).

    A ``ValueError`` subclass, so library callers that catch ``ValueError`` keep working."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Around checks that read only the command line's values (configuration validators shared
    with the library, which raise plain ``ValueError``): their errors become `UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from None
