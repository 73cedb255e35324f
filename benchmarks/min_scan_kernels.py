"""minGRU and minLSTM: the native scan kernels alone, nanoseconds per unit and step.

Times ``min_scan_forward`` and ``min_scan_backward`` (`kernels.cpp`, "minGRU and minLSTM") on a
random projection, median of 9 calls, one thread, at a size whose buffers stay in the caches
(T = 1000, N = 2, H = 128) and at the adding problem's (T = 1000, N = 50, H = 128), beside the
cost of allocating and filling a fresh buffer of the projection's size (the page faults a
backward's new gradient buffer takes outside a training loop that keeps freed memory).

    python benchmarks/min_scan_kernels.py [--family minlstm|mingru] [--log-space]

Results: docs/benchmarks.md ("minLSTM's native coefficients without log σ").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnnkit.engine.native.build import kernels

SIZES = ((1000, 2, 128), (1000, 50, 128))


def median_seconds(run, repeats: int = 9) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_size(native, steps: int, batch: int, hidden: int, minlstm: bool,
              log_space: bool) -> tuple[float, float, float]:
    """Seconds of the forward, the backward and a fresh projection-sized buffer at one size."""
    gates = 3 if minlstm else 2
    flags = (False, minlstm, log_space)  # reverse, minlstm, log_space
    projected = torch.randn(steps, batch, gates * hidden)
    h0 = torch.randn(batch, hidden)
    if log_space:
        h0 = h0.abs()
    _, states = native.min_scan_forward(projected, h0, None, *flags)
    d_output, d_h_n = torch.randn(steps, batch, hidden), torch.randn(batch, hidden)
    forward = median_seconds(lambda: native.min_scan_forward(projected, h0, None, *flags))
    backward = median_seconds(lambda: native.min_scan_backward(
        d_output, d_h_n, projected, states, None, *flags))
    fresh = median_seconds(lambda: torch.empty_like(projected).fill_(1.0))
    return forward, backward, fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("minlstm", "mingru"), default="minlstm")
    parser.add_argument("--log-space", action="store_true")
    options = parser.parse_args()
    native = kernels()
    if native is None:
        raise SystemExit("the native kernels could not be built here")
    torch.set_num_threads(1)
    for steps, batch, hidden in SIZES:
        units = steps * batch * hidden
        forward, backward, fresh = time_size(native, steps, batch, hidden,
                                             options.family == "minlstm", options.log_space)
        print(f"{options.family}{' log-space' if options.log_space else ''} "
              f"(T, N, H) = ({steps}, {batch}, {hidden}): forward {forward / units * 1e9:.2f}, "
              f"backward {backward / units * 1e9:.2f}, a fresh projection-sized buffer "
              f"{fresh / units * 1e9:.2f} ns per unit and step")


if __name__ == "__main__":
    main()
