"""A/B of the native kernels compiled for 256-bit (AVX2) and 512-bit (AVX512) vectors, in one
process: both builds are loaded side by side and their LSTM and GRU forward loops (the kernel
call alone, input projection excluded) timed interleaved, median of 15. Needs a CPU with
AVX-512; each build is compiled once and cached like the library's own.

    python benchmarks/vector_width.py

Results: docs/benchmarks.md ("Kernels compiled for 512-bit vectors").
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from rnnkit.engine.native import build

SIZES = [(100, 32, 64), (100, 32, 256), (50, 64, 512), (200, 1, 128), (1, 1, 256)]
REPEATS = 15


def interleaved(first, second) -> tuple[float, float]:
    """Median milliseconds of two calls timed in turn, after two warm-up rounds."""
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(REPEATS + 2):
        for call, kept in zip((first, second), times, strict=True):
            start = time.perf_counter()
            call()
            if repeat >= 2:
                kept.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main() -> None:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise SystemExit("this CPU (as torch sees it) has no AVX-512")
    builds = [build._compile("AVX2"), build._compile("AVX512")]
    torch.manual_seed(0)
    for steps, batch, hidden in SIZES:
        h0, c0 = torch.zeros(batch, hidden), torch.zeros(batch, hidden)
        lstm_gates = torch.randn(steps, batch, 4 * hidden)
        w_lstm = 0.05 * torch.randn(4 * hidden, hidden)
        gru_gates = torch.randn(steps, batch, 3 * hidden)
        w_gru, b_gru = 0.05 * torch.randn(3 * hidden, hidden), torch.zeros(3 * hidden)
        lstm = interleaved(*(partial(k.lstm_forward, lstm_gates, h0, c0, w_lstm, None, None,
                                     None, False) for k in builds))
        gru = interleaved(*(partial(k.gru_forward, gru_gates, h0, w_gru, b_gru, None, False,
                                    True) for k in builds))
        size = f"{steps},{batch},{hidden}"
        print(f"{size:<11} LSTM forward avx2 {lstm[0]:8.3f} ms  avx512 {lstm[1]:8.3f} ms  "
              f"x {lstm[1] / lstm[0]:.2f}   GRU forward x {gru[1] / gru[0]:.2f}")


if __name__ == "__main__":
    main()
