"""The folder a command writes its results into, made before any long work starts."""

from __future__ import annotations

from pathlib import Path


def output_directory(out: str | Path, option: str = "--out") -> Path:
    """Create ``out`` (and its parents) if needed and return it; ``ValueError`` naming
    ``option`` when it is an existing file or cannot be created, so that a run never trains for
    minutes and then fails to write."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is an existing file; give a folder (it is "
                         "created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {str(path)!r} cannot be created: {error.strerror}") from None
    return path
