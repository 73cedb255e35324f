"""A run's metrics as JSON lines (one record per write, flushed), optionally mirrored to
TensorBoard, and kept consistent when a run resumes from a checkpoint.

Each line of the log is one JSON object::

    {"step": 120, "time": 1718000000.5, "loss": 2.31, "lr": 0.001, "phase": "train"}

``step`` is the training step the values belong to, ``time`` the Unix time of the write; the
rest are the caller's values. JSON lines because a crashed run's log is still readable up to its
last line, and any tool reads it (`read_metrics`, ``pandas.read_json(path, lines=True)``, jq).

Decisions:

- **Non-finite numbers are written as ``null``.** JSON has no NaN or infinity; Python's ``NaN``
  token would make the file unreadable to strict parsers (jq, JavaScript, many JSON libraries).
  A diverged loss shows as a gap, and the run says why it stopped elsewhere. TensorBoard, which
  stores floats, receives the value itself.
- **Resuming drops the future.** Opened with ``resume_step=S`` (the step of the checkpoint a run
  continues from), records with ``step > S`` were written after that checkpoint by the run that
  died; the resumed run writes those steps again, so they are removed first (the file is
  rewritten atomically: a crash during the rewrite leaves the old file). The TensorBoard writer
  is opened with ``purge_step=S + 1`` for the same reason.
- **A new run starts a new log.** Opened without ``resume_step``, an existing file is replaced:
  records of two runs in one file would repeat steps. Refusing to overwrite a saved run is the
  caller's decision, made before the log is opened.
- **TensorBoard is optional.** With ``tensorboard_dir`` given, numeric values (ints and floats,
  not bools) also go to a ``torch.utils.tensorboard.SummaryWriter`` as scalars, when the
  ``tensorboard`` package is installed (``pip install tensorboard``); without it the log is
  JSON lines only and `MetricsLog.tensorboard` is False, so the caller can say so.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnkit._checks import describe, require_int

RESERVED_KEYS = ("step", "time")
"""Keys every record has; a value may not be named after one."""


class MetricsLog:
    """Appends metric records to the JSON-lines file ``path`` (see the module docstring).

    Args:
        path: the log file; its folder is created.
        resume_step: the step a resumed run continues from: records after it are dropped at
            open. ``None`` for a new run: the log starts empty.
        tensorboard_dir: also write numeric values to a TensorBoard event file there, when the
            ``tensorboard`` package is installed.
        enabled: False on every process but the main one of a multi-process run: then nothing
            is read, written or created.

    Use it as a context manager, or call `close`::

        with MetricsLog(run / "metrics.jsonl", resume_step=start_step) as log:
            log.write(step, loss=2.31, lr=1e-3)
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
                 tensorboard_dir: str | os.PathLike | None = None, enabled: bool = True) -> None:
        if resume_step is not None:
            resume_step = require_int("resume_step", resume_step, minimum=0)
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = False
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            # A new log replaces the path rather than writing through it: a symlink planted
            # there (or a hard link to another file) is unlinked, never followed, and the file
            # is created exclusively.
            self.path.unlink(missing_ok=True)
            self._file = open(self.path, "x", encoding="utf-8")
        else:
            _drop_records_after(self.path, resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is missing: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                purge_step = None if resume_step is None else resume_step + 1
                if purge_step is not None:
                    _wait_for_a_later_event_file_name(Path(tensorboard_dir))
                self._writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge_step)
                self.tensorboard = True

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, step: int, **values: Any) -> None:
        """Append ``{"step": step, "time": <now>, **values}`` as one line and flush it.

        Values are ints, floats, bools, strings or None; a one-element tensor or NumPy scalar is
        taken by its ``.item()``. Non-finite floats are written as null.

        Raises:
            TypeError: a value of another type (named by key).
            ValueError: a value named ``time`` (a key every record has).
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"metrics log {self.path} is closed; open a new MetricsLog "
                             "(resume_step=...) to write more")
        step = require_int("step", step, minimum=0)
        now = time.time()
        record: dict[str, Any] = {"step": step, "time": now}
        scalars = {}
        for key, value in values.items():
            if key in RESERVED_KEYS:
                raise ValueError(f"metric {key!r} is a name every record has "
                                 f"({', '.join(RESERVED_KEYS)}); give the value another name")
            value = _plain_value(key, value)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                scalars[key] = value
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
            record[key] = value
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, global_step=step, walltime=now)

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain_value(key: str, value: Any) -> Any:
    """``value`` as a JSON-ready Python value, or a TypeError naming ``key``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item) and (size() if callable(size) else size) == 1:
        # A one-element tensor or a NumPy scalar (.item() also waits for a GPU value).
        return _plain_value(key, item())
    raise TypeError(f"metric {key!r} must be an int, float, bool, str, None or a one-element "
                    f"tensor, got {describe(value)}")


def _records(path: Path) -> Iterator[tuple[int, str, dict]]:
    """``(line number, line, record)`` for each record of the log at ``path``.

    A last line without its newline that is not JSON is a write the process did not finish
    (killed mid-line): it is skipped. Any other line that is not a JSON object with an int
    ``step`` raises ValueError naming the file and line.
    """
    with open(path, encoding="utf-8") as log:
        lines = log.read().split("\n")
    # split leaves "" after a final newline; a non-empty last piece is an unterminated line.
    unterminated = lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        yield number, line, _parse(path, number, line)
    if unterminated.strip():
        try:
            record = _parse(path, len(lines) + 1, unterminated)
        except ValueError:
            return  # cut short by a kill: the record was never complete
        yield len(lines) + 1, unterminated, record


def _parse(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"metrics log {path} line {number} is not JSON ({error.msg}); "
                         "fix or remove that line") from None
    if (not isinstance(record, dict) or isinstance(record.get("step"), bool)
            or not isinstance(record.get("step"), int)):
        raise ValueError(f"metrics log {path} line {number} is not a record with an integer "
                         "\"step\"; fix or remove that line")
    return record


def _drop_records_after(path: Path, resume_step: int) -> None:
    """Rewrite ``path`` without records whose step is after ``resume_step`` (atomically: a
    temporary file in the same folder, flushed to disk, renamed over it)."""
    if not path.exists():
        return
    kept, dropped = [], False
    with open(path, encoding="utf-8") as log:
        original = log.read()
    for _, line, record in _records(path):
        if record["step"] > resume_step:
            dropped = True
        else:
            kept.append(line + "\n")
    if not dropped and "".join(kept) == original:
        return  # nothing to remove: leave the file as it is
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as rewritten:
            rewritten.writelines(kept)
            rewritten.flush()
            os.fsync(rewritten.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of the JSON-lines log at ``path``, in file order (null values as None).

    Raises:
        ValueError: the file does not exist, or a line is not a record (named by number).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics log {path} does not exist (or is not a file)")
    return [record for _, _, record in _records(path)]


def _wait_for_a_later_event_file_name(folder: Path) -> None:
    """Wait, at most about a second, until a new event file in ``folder`` sorts after every one
    already there. TensorBoard reads a folder's event files in name order, and a resumed
    writer's purge (of the steps after the resume) applies only to the events read before it.
    A name is ``events.out.tfevents.<10-digit seconds>.<host>.<pid>.<counter>``: within one
    second of an earlier file from the same process the counter decides, and "10" sorts before
    "9", so a resumed curve could keep the steps it was meant to drop."""
    seconds = [int(name.split(".")[3]) for name in
               (entry.name for entry in folder.glob("events.out.tfevents.*"))
               if len(name.split(".")) > 3 and name.split(".")[3].isdigit()]
    now = time.time()
    # Only a file of this very second can tie: an earlier one already sorts first, and a name
    # from the future (a skewed clock) is not something waiting could fix.
    if seconds and max(seconds) == int(now):
        time.sleep(int(now) + 1 - now)
