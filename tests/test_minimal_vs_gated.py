"""benchmarks/minimal_vs_gated.py on tiny settings: it sets the thread count it is given, prints
one row per pair and length with ratios and growth that are its own times' quotients, and the
streaming rows (with ``--streaming-only`` those alone); bad arguments are refused by
argparse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import minimal_vs_gated  # noqa: E402


def test_the_benchmark_prints_every_pair_and_length_with_consistent_ratios(capsys):
    threads = torch.get_num_threads()
    try:
        minimal_vs_gated.main(["--threads", "1", "--lengths", "4,8", "--batch", "2",
                               "--hidden", "4", "--repeats", "1", "--stream-steps", "3"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert ", 1 threads," in lines[0]
    rows = [line.split() for line in lines if line.startswith(("minGRU /", "minLSTM /"))]
    assert [(row[0], row[2], int(row[3])) for row in rows] == [
        ("minGRU", "GRU", 4), ("minGRU", "GRU", 8), ("minLSTM", "LSTM", 4), ("minLSTM", "LSTM", 8)]
    half = 0.005  # the times are printed to 0.01 ms: the quotients of the printed ones lie
    # within these bounds, up to the quotient's own printed rounding

    def within(printed: float, numerator: float, denominator: float, scale: float = 1.0,
               rounding: float = 0.0005):
        # ``rounding``: half the printed quotient's last place (min/gated has 3 decimals, the
        # growth 2: a growth of 0.0637 prints as 0.06)
        low = scale * (numerator - half) / (denominator + half)
        high = scale * (numerator + half) / max(denominator - half, 1e-9)
        return low - rounding <= printed <= high + 0.005

    for first, second in (rows[:2], rows[2:]):
        for row in (first, second):
            minimal, gated, steps = float(row[4]), float(row[5]), int(row[3])
            assert within(float(row[6]), minimal, gated)  # minimal / gated
            assert within(float(row[7]), minimal, steps + half, 1e3)  # us per time step
            assert within(float(row[8]), gated, steps + half, 1e3)
        assert first[9:] == ["-", "-"]
        assert within(float(second[9].rstrip("x")), float(second[4]), float(first[4]),
                      rounding=0.005)
        assert within(float(second[10].rstrip("x")), float(second[5]), float(first[5]),
                      rounding=0.005)
    _assert_streaming_rows(lines)


def _assert_streaming_rows(lines: list[str]) -> None:
    """Seven contenders per pair, the rnnkit gated cell first (x 1.000), every other ratio the
    quotient of the printed times (to their printed rounding)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    rows = [line.rsplit(maxsplit=2) for line in lines[start + 2:]]
    names = [row[0] for row in rows]
    pieces = ["step kernel alone", "native sequence path, T = 1"]
    assert names == ["rnnkit.GRUCell", "torch.nn.GRUCell", "rnnkit.MinGRUCell",
                     "MinGRU.stream() step", "one-step MinGRU call", *pieces,
                     "rnnkit.LSTMCell", "torch.nn.LSTMCell", "rnnkit.MinLSTMCell",
                     "MinLSTM.stream() step", "one-step MinLSTM call", *pieces]
    for pair in (rows[:7], rows[7:]):
        peer = float(pair[0][1])
        assert float(pair[0][2]) == 1.0
        for _, us, ratio in pair:
            assert float(us) > 0
            low, high = (float(us) - 0.005) / (peer + 0.005), (float(us) + 0.005) / (peer - 0.005)
            assert low - 0.0005 <= float(ratio) <= high + 0.0005


def test_streaming_only_skips_the_training_step(capsys):
    threads = torch.get_num_threads()
    try:
        minimal_vs_gated.main(["--threads", "1", "--hidden", "4", "--repeats", "1",
                               "--stream-steps", "3", "--streaming-only", "--stream-batch", "3"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith(("training step", "minGRU /")) for line in lines)
    assert "one step at batch 3," in "\n".join(lines)
    _assert_streaming_rows(lines)


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--lengths", "128,x"], ["--batch", "2,3"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        minimal_vs_gated.main(argv)
    assert exit_info.value.code == 2 and "expected" in capsys.readouterr().err
