"""How far a long run has come, shown to a person on a terminal and to a log file alike.

On a terminal (``stream.isatty()``) it is a live tqdm bar. Anywhere else (output redirected to a
file, CI, a batch scheduler) a bar's carriage returns turn into one huge line of overwritten
text, so `Progress` writes plain lines instead, at most one every ``interval`` seconds, and a
last one when it closes::

    training: step 120/1000 (12%) | loss 2.31 val 2.40 | 00:40 elapsed, ETA 04:53
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rnnkit._checks import require_int


def format_duration(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from one hour on (as tqdm writes durations)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Progress of a run of ``total`` units (steps, epochs), ``done`` of them already done.

    Args:
        total: the units the run will do in all; ``None`` when unknown (no percentage, no ETA).
        done: units done before this process started (a resumed run): the bar starts there
            and the ETA counts only the rate measured here.
        description: the line's first word(s), e.g. ``"training"``.
        unit: what one update counts, e.g. ``"step"`` or ``"epoch"``.
        quiet: show nothing at all (``--quiet``): no bar, no lines, no `write` messages.
        stream: where to write; ``None`` is ``sys.stderr`` at construction (stdout stays for
            results).
        interval: the least number of seconds between two plain lines (not on a terminal).
        enabled: False on every process but the main one of a multi-process run (pass
            ``enabled=distributed.is_main``): such a Progress prints nothing, as if quiet, so
            that N processes do not print N bars.
        clock: the monotonic clock in seconds the plain lines are timed with (tests inject a
            fake one).

    Use it as a context manager, or call `close` (which writes the final line)::

        with Progress(total=1000, done=start_step) as progress:
            for step in range(start_step, 1000):
                ...
                progress.update(status=f"loss {loss:.2f}")
    """

    def __init__(self, total: int | None, done: int = 0, description: str = "training",
                 unit: str = "step", quiet: bool = False, stream: TextIO | None = None,
                 interval: float = 5.0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total is not None:
            total = require_int("total", total, minimum=0)
        done = require_int("done", done, minimum=0)
        if total is not None and done > total:
            raise ValueError(f"done must be at most total ({total}), got {done}")
        if not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        self.total, self.done = total, done
        self.description, self.unit = description, unit
        self.status = ""
        self.silent = quiet or not enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock
        self._started_done = done
        self._started = self._last_line_time = clock()
        self._last_line_done: int | None = None
        self._closed = False
        self._bar = None
        if not self.silent and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=description, unit=unit,
                             file=self.stream, dynamic_ncols=True, mininterval=0.5)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1, status: str | None = None) -> None:
        """``n`` more units done; ``status`` (e.g. ``"loss 2.31 val 2.40"``) replaces the
        previous one when given. Cheap when nothing is due to be shown."""
        self.done += n
        if status is not None:
            self.status = status
        if self.silent:
            return
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last_line_time >= self.interval:
            self._write_plain_line(now)

    def write(self, line: str) -> None:
        """A message (``saved checkpoint ...``) on its own line that leaves the bar intact:
        tqdm prints it above the bar on a terminal. Nothing when quiet or not enabled."""
        if self.silent:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar, or write the final plain line (unless the last line already showed
        this many units); closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self.silent:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._last_line_done != self.done:
            self._write_plain_line(self.clock())

    def line(self, now: float) -> str:
        """The plain line at clock time ``now``:
        ``training: step 120/1000 (12%) | loss 2.31 | 00:40 elapsed, ETA 04:53``."""
        elapsed = now - self._started
        if self.total is None:
            count = f"{self.unit} {self.done}"
        else:
            percent = 100 * self.done // self.total if self.total else 100
            count = f"{self.unit} {self.done}/{self.total} ({percent}%)"
        timing = f"{format_duration(elapsed)} elapsed"
        done_here = self.done - self._started_done
        if self.total is not None and self.done < self.total:
            # The rate measured in this process only: a resumed run's earlier units took
            # no time here.
            if done_here > 0:
                eta = elapsed / done_here * (self.total - self.done)
                timing += f", ETA {format_duration(eta)}"
            else:
                timing += ", ETA ?"
        parts = [f"{self.description}: {count}"] + ([self.status] if self.status else [])
        return " | ".join(parts + [timing])

    def _write_plain_line(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._last_line_time, self._last_line_done = now, self.done


def _is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal; a stream without ``isatty`` (or a closed one) is not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
