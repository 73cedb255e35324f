"""Progress: a tqdm bar on a terminal; elsewhere plain lines, no carriage return, at most one per
interval and a final one; silent when quiet or on a non-main process."""

from __future__ import annotations

import io

import pytest
import tqdm

from rnnkit.training.progress import Progress, format_duration


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_are_timed_and_say_everything():
    stream, clock = io.StringIO(), FakeClock()
    with Progress(total=1000, stream=stream, interval=5.0, clock=clock) as progress:
        for step in range(1, 1001):
            clock.now += 0.1  # a step takes 0.1 s: 50 steps per 5 s
            progress.update(status=f"loss {3 - step / 1000:.2f}")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 100 s in all: one line each 5 s (the first after 5 s), the last one at step 1000.
    assert len(lines) == 20
    assert lines[0] == "training: step 50/1000 (5%) | loss 2.95 | 00:05 elapsed, ETA 01:35"
    assert lines[1] == "training: step 100/1000 (10%) | loss 2.90 | 00:10 elapsed, ETA 01:30"
    assert lines[-1] == "training: step 1000/1000 (100%) | loss 2.00 | 01:40 elapsed"


def test_final_line_at_close_and_no_line_before_the_interval():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(total=10, stream=stream, interval=5.0, clock=clock, unit="epoch",
                        description="forecast")
    clock.now += 2.0
    progress.update(3, status="val 0.40")
    assert stream.getvalue() == ""  # 2 s < interval: nothing yet
    clock.now += 1.0
    progress.close()
    assert stream.getvalue() == "forecast: epoch 3/10 (30%) | val 0.40 | 00:03 elapsed, ETA 00:07\n"
    progress.close()  # closing twice writes nothing more
    assert stream.getvalue().count("\n") == 1


def test_no_duplicate_final_line():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(total=4, stream=stream, interval=1.0, clock=clock)
    clock.now += 1.0
    progress.update(4)
    progress.close()
    assert stream.getvalue().splitlines() == ["training: step 4/4 (100%) | 00:01 elapsed"]


def test_resumed_run_counts_the_rate_measured_here():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(total=1000, done=900, stream=stream, interval=10.0, clock=clock)
    clock.now += 10.0
    progress.update(20)  # 20 steps in 10 s: the 80 left take 40 s
    progress.close()
    assert stream.getvalue().splitlines() == [
        "training: step 920/1000 (92%) | 00:10 elapsed, ETA 00:40"]


def test_unknown_total_and_no_progress_yet():
    stream, clock = io.StringIO(), FakeClock()
    unknown = Progress(total=None, stream=stream, clock=clock)
    clock.now += 65
    unknown.update(7)
    assert stream.getvalue() == "training: step 7 | 01:05 elapsed\n"
    stalled = Progress(total=5, stream=stream, clock=clock)
    clock.now += 6
    stalled.update(0)
    assert stream.getvalue().splitlines()[-1] == "training: step 0/5 (0%) | 00:06 elapsed, ETA ?"


def test_write_prints_a_message_line():
    stream = io.StringIO()
    with Progress(total=3, stream=stream, clock=FakeClock()) as progress:
        progress.write("saved checkpoint run/ckpt.pt")
    assert stream.getvalue().splitlines()[0] == "saved checkpoint run/ckpt.pt"


@pytest.mark.parametrize("silence", [{"quiet": True}, {"enabled": False}])
def test_quiet_and_non_main_print_nothing(silence):
    for stream in (io.StringIO(), FakeTerminal()):
        clock = FakeClock()
        with Progress(total=10, stream=stream, interval=0.0, clock=clock, **silence) as progress:
            clock.now += 100
            progress.update(5, status="loss 1.0")
            progress.write("a message")
        assert stream.getvalue() == ""
        assert progress.done == 5 and progress.status == "loss 1.0"  # still counted


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    created = []
    real_tqdm = tqdm.tqdm

    def recording_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        created.append((bar, kwargs))
        return bar

    monkeypatch.setattr(tqdm, "tqdm", recording_tqdm)
    stream = FakeTerminal()
    with Progress(total=100, done=10, stream=stream, description="lm") as progress:
        progress.update(5, status="loss 2.31")
        progress.write("evaluated: val 2.40")
    (bar, kwargs), = created
    assert kwargs["file"] is stream and kwargs["dynamic_ncols"] and kwargs["mininterval"] == 0.5
    assert kwargs["initial"] == 10 and kwargs["total"] == 100 and kwargs["desc"] == "lm"
    assert bar.n == 15
    text = stream.getvalue()
    assert "\r" in text  # a live bar redraws in place
    assert "15/100" in text and "loss 2.31" in text
    assert "evaluated: val 2.40\n" in text


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"done must be at most total \(5\), got 6"):
        Progress(total=5, done=6)
    with pytest.raises(ValueError, match="total must be an int >= 0, got -1"):
        Progress(total=-1)
    with pytest.raises(ValueError, match="interval must be a number of seconds >= 0, got -1"):
        Progress(total=1, interval=-1)


@pytest.mark.parametrize("seconds, text", [(0, "00:00"), (40.4, "00:40"), (293, "04:53"),
                                           (3600, "1:00:00"), (36125, "10:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
