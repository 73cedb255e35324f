"""Checkpoints: written atomically, verified and read without running code, refused clearly.

A checkpoint is one ``torch.save`` file (a zip archive) holding a dict with ``"format":
"rnnkit"``, the writing tool's ``"kind"`` (``"lm"``, ``"forecast"``, ...), a ``"version"``, a
``"checksum"`` and the tool's own payload.

- Nothing in a checkpoint can run code: it is read with ``torch.load(weights_only=True)``, whose
  unpickler builds tensors and plain Python data (dict, list, tuple, str, numbers, None) and
  refuses every other object instead of constructing it. A file that holds anything else (a
  pickle with a ``__reduce__`` that would run a command, say) is refused in one line, and what
  it would have run never runs.
- Corruption is detected: every record of the zip archive carries a CRC-32, checked before
  anything is unpickled (so a damaged record is named), and the payload carries the SHA-256 of
  its content (tensors by dtype, shape and bytes; containers and scalars by value), recomputed
  on load. A flipped byte anywhere in a tensor, the pickle or a header is refused by name.
- Only finite state is written: a payload with a NaN or infinite floating-point tensor (weights,
  optimiser moments, carried state) raises `NonFiniteState` and the previous checkpoint stays.
- Writing goes to a temporary file in the same folder (named after the writing process), flushed
  to disk, then renamed over the target: an interrupted or failed write (Ctrl-C, disk full)
  leaves the previous checkpoint whole. Temporary files of processes that died (SIGKILL) are
  removed by `remove_stale_temporaries`, which the next write calls.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "rnnkit"
VERSION = 2  # 2: with "checksum"; 1 (no checksum) is still read, its zip CRCs checked
READABLE_VERSIONS = (1, 2)
_HEADER = ("format", "kind", "version", "checksum")


class NonFiniteState(ValueError):
    """A payload to save holds a NaN or infinite tensor; ``key`` names the first one."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} holds NaN or infinite values; not saved")
        self.key = key


class WrongKind(ValueError):
    """A checkpoint written by another tool than the one asked for; ``found`` names it."""

    def __init__(self, message: str, found: object) -> None:
        super().__init__(message)
        self.found = found


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, no permission, ...); the previous file is whole."""


def save_checkpoint(path: str | Path, kind: str, payload: dict) -> None:
    """Write ``payload`` for tool ``kind`` to ``path`` atomically, with its checksum.

    Raises `NonFiniteState` (nothing written) when a floating-point tensor of the payload is
    not finite, and `CheckpointWriteError` when the file system refuses the write; either way a
    checkpoint already at ``path`` is left as it was.
    """
    path = Path(path)
    clashing = [key for key in _HEADER if key in payload]
    if clashing:
        raise ValueError(f"checkpoint payload keys {clashing} are reserved for the header")
    bad = first_non_finite(payload)
    if bad is not None:
        raise NonFiniteState(bad)
    content = {"format": FORMAT, "kind": kind, "version": VERSION, **payload}
    content["checksum"] = payload_checksum(content)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        handle, temporary = tempfile.mkstemp(
            prefix=f"{_temporary_prefix(path)}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointWriteError(
            error.errno, f"cannot write checkpoint {str(path)!r}: {error.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(content, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        kept = ("the previous checkpoint there is unchanged" if path.exists()
                else "nothing was written")
        raise CheckpointWriteError(
            error.errno,
            f"cannot write checkpoint {str(path)!r} ({error.strerror or error}); {kept}",
        ) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, kind: str) -> dict:
    """The checkpoint at ``path`` written by tool ``kind``; ``ValueError`` saying what is wrong.

    Nothing in the file is executed (see the module docstring); the returned dict is the
    payload with the header keys ``format``, ``kind`` and ``version``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a directory; give the checkpoint file "
                         f"that 'rnnkit {kind}' wrote")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    unreadable = f"checkpoint {str(path)!r} cannot be read (truncated or corrupted?)"
    try:
        damaged = _damaged_record(path)
    except OSError as error:
        raise ValueError(f"checkpoint {str(path)!r} cannot be opened: "
                         f"{error.strerror or error}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError) as error:
        raise ValueError(f"{unreadable}: not a complete torch checkpoint archive "
                         f"({_first_line(error)})") from None
    if damaged is not None:
        raise ValueError(f"{unreadable}: record {damaged!r} does not match its CRC-32 checksum")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses, without constructing it, any object that is not a tensor or
        # plain data; a genuine rnnkit checkpoint holds none.
        refused = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
        what = f" ({refused.group(1)})" if refused else ""
        raise ValueError(
            f"checkpoint {str(path)!r} is refused: it holds a Python object{what} other than "
            "tensors and plain data, which rnnkit never writes and does not load (loading it "
            "could run code)") from None
    except OSError as error:
        raise ValueError(f"checkpoint {str(path)!r} cannot be opened: "
                         f"{error.strerror or error}") from None
    except (RuntimeError, EOFError, ValueError, AttributeError, TypeError, KeyError,
            IndexError, struct.error) as error:
        raise ValueError(f"{unreadable}: {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an rnnkit checkpoint (a torch file, but not one "
                         f"that 'rnnkit {kind}' wrote)")
    if content.get("kind") != kind:
        raise WrongKind(
            f"checkpoint {str(path)!r} was written by 'rnnkit {content.get('kind')}', not "
            f"'rnnkit {kind}'", content.get("kind"))
    if content.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {content.get('version')!r}; this rnnkit "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if content["version"] >= 2:
        stored = content.pop("checksum", None)
        if stored != payload_checksum(content):
            raise ValueError(
                f"checkpoint {str(path)!r} is corrupted: its content does not match the SHA-256 "
                "checksum stored when it was written")
    return content


def payload_checksum(content: dict) -> str:
    """SHA-256 (hex) of a checkpoint's content, ``"checksum"`` itself left out.

    Defined on values, not on the file's bytes: dict keys in sorted order, tensors by dtype,
    shape and the bytes of their elements, scalars by exact value (floats by ``float.hex``).
    """
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in content.items() if key != "checksum"})
    return digest.hexdigest()


def first_non_finite(value: object, key: str = "checkpoint") -> str | None:
    """The key path (``model['w']``) of the first floating tensor in ``value`` holding NaN or
    inf, or ``None`` when there is none."""
    if isinstance(value, Tensor):
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            return None if bool(torch.isfinite(value).all()) else key
        return None
    if isinstance(value, dict):
        for name, item in value.items():
            found = first_non_finite(item, f"{key}[{name!r}]")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = first_non_finite(item, f"{key}[{index}]")
            if found:
                return found
    return None


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path``'s earlier writes whose process is gone (killed
    mid-write); returns what was removed. A live writer's temporary file is left alone."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f"{glob.escape(prefix)}*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        writer = re.match(r"(\d+)-", candidate.name[len(prefix):])
        if writer and _process_alive(int(writer.group(1))) and int(writer.group(1)) != os.getpid():
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _damaged_record(path: Path) -> str | None:
    """The name of the first zip record whose CRC-32 does not match, or ``None``."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _feed(digest, value: object) -> None:
    """Add ``value`` to ``digest`` unambiguously: a type tag, a length, then the content."""
    if isinstance(value, Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(raw.numpy().tobytes())
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: (type(item[0]).__name__, repr(item[0])))
        digest.update(f"D{len(items)}".encode())
        for key, item in items:
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)}:".encode())
        digest.update(encoded)
    elif isinstance(value, bytes):
        digest.update(f"Y{len(value)}:".encode())
        digest.update(value)
    elif isinstance(value, bool) or value is None:
        digest.update(f"B{value}".encode())
    elif isinstance(value, int):
        digest.update(f"I{value};".encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex()};".encode())
    else:  # torch.dtype, torch.device and the like: their repr is their value
        digest.update(f"R{type(value).__name__}:{value!r};".encode())


@contextmanager
def restoring(path: str | Path, kind: str) -> Iterator[None]:
    """Around the code that rebuilds a run from a loaded checkpoint (and nothing else, since it
    reads every KeyError, TypeError and RuntimeError as the checkpoint's fault): a payload with a
    key missing, a configuration of the wrong form (from another rnnkit version, say), or
    weights that do not fit the configuration become one ``ValueError`` naming the file."""
    try:
        yield
    except (KeyError, TypeError, RuntimeError, IndexError, AttributeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = " ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")
        raise ValueError(
            f"checkpoint {str(path)!r} is not a complete, compatible 'rnnkit {kind}' "
            f"checkpoint ({type(error).__name__}: {detail})") from None
