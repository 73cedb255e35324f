"""Where a command writes, checked before any long work starts: one helper for folders, one for
files, so that a run never trains for minutes and then fails to write.

Both raise ``ValueError`` naming the option, the path and what is wrong (exit 1 on the command
line: the file system, not the command line, decides it). Writability is tested by creating and
removing a probe file, not by ``os.access`` alone: root passes every permission check, and a
read-only file system or a full quota is only found by trying.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def output_directory(out: str | Path, option: str = "--out") -> Path:
    """Create ``out`` (and its parents) if needed, check that files can be written in it and
    return it; ``ValueError`` naming ``option`` when it is an existing file, cannot be created
    or is not writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is an existing file; give a folder (it is "
                         "created if missing)")
    _make_folder(path, f"{option} {str(path)!r}")
    _probe(path, f"{option} {str(path)!r}")
    return path


def output_file(out: str | Path, option: str) -> Path:
    """Check that the file ``out`` can be written (creating its folder if needed) and return it;
    ``ValueError`` naming ``option`` when ``out`` is a folder, its folder is a file or cannot be
    created, or the folder or an existing ``out`` is not writable."""
    path = Path(out)
    described = f"{option} {str(path)!r}"
    if path.is_dir():
        raise ValueError(f"{described} is an existing folder; give a file path")
    folder = path.parent
    # The nearest existing ancestor says why a missing folder cannot be made: a file in the way.
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ValueError(f"{described} cannot be written: {str(ancestor)!r} is an existing file, "
                         "not a folder")
    _make_folder(folder, described)
    _probe(folder, described)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{described} exists and is not writable (permission denied)")
    return path


def _make_folder(folder: Path, described: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{described} cannot be created: {error.strerror or error}") from None


def _probe(folder: Path, described: str) -> None:
    """Create and remove a file in ``folder``: the one test of writability that root, read-only
    mounts and ACLs all answer truthfully."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".rnnkit-write-test-", dir=folder)
    except OSError as error:
        raise ValueError(f"{described} cannot be written: folder {str(folder)!r}: "
                         f"{error.strerror or error}") from None
    os.close(handle)
    os.unlink(probe)


def not_an_input(out: str | Path, option: str, inputs: dict[str, str | Path | None]) -> None:
    """``ValueError`` when the file ``out`` is one of the command's ``inputs`` (``{option:
    path}``, None for those not given): writing it would destroy what the command reads, such
    as the checkpoint, before the user sees why."""
    path = Path(out)
    for name, given in inputs.items():
        if given is None or not path.exists() or not Path(given).exists():
            continue
        if os.path.samefile(path, given):
            raise ValueError(f"{option} {str(path)!r} is the file given as {name} "
                             f"{str(given)!r}: writing it would overwrite that input; give "
                             f"{option} another file")
