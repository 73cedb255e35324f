"""Checkpoints: written atomically, read back with a clear error for anything that is not one.

A checkpoint is one ``torch.save`` file holding a dict with ``"format": "rnnkit"``, the writing
tool's ``"kind"`` (``"lm"``, ``"forecast"``, ...), a ``"version"`` and the tool's own payload.
Writing goes to a temporary file in the same folder, flushed to disk, then renamed over the
target: an interrupted write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT = "rnnkit"
VERSION = 1


def save_checkpoint(path: str | Path, kind: str, payload: dict) -> None:
    """Write ``payload`` for tool ``kind`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save({"format": FORMAT, "kind": kind, "version": VERSION, **payload}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, kind: str) -> dict:
    """The checkpoint at ``path`` written by tool ``kind``; ``ValueError`` saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a directory; give the checkpoint file "
                         f"that 'rnnkit {kind}' wrote")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the payload holds optimizer and random states (plain Python and
        # tensors), written by rnnkit itself; never load a checkpoint you did not make.
        content = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ModuleNotFoundError) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read (truncated or corrupted?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an rnnkit checkpoint (a torch file, but not one "
                         f"that 'rnnkit {kind}' wrote)")
    if content.get("kind") != kind:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by 'rnnkit {content.get('kind')}', not "
            f"'rnnkit {kind}'")
    if content.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {content.get('version')}; this rnnkit "
            f"reads version {VERSION}")
    return content


@contextmanager
def restoring(path: str | Path, kind: str) -> Iterator[None]:
    """Around the code that rebuilds a run from a loaded checkpoint (and nothing else, since it
    reads every KeyError, TypeError and RuntimeError as the checkpoint's fault): a payload with a
    key missing, a configuration of the wrong form (from another rnnkit version, say), or
    weights that do not fit the configuration become one ``ValueError`` naming the file."""
    try:
        yield
    except (KeyError, TypeError, RuntimeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")
        raise ValueError(
            f"checkpoint {str(path)!r} is not a complete, compatible 'rnnkit {kind}' "
            f"checkpoint ({type(error).__name__}: {detail})") from None
