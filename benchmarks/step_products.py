"""A/B of the native engine's two ways to multiply a step's states by the recurrent weights, in
one process: the kernels' own register tiles only, against ATen's mm (BLAS) for products of at
least ``blas_min_multiply_adds`` (the default). One training step (forward and backward of
``output.sum()``) per measurement, the two settings interleaved, median of 7 after a warm-up.

    python benchmarks/step_products.py

Results: docs/benchmarks.md ("Step products on ATen's mm").
"""

from __future__ import annotations

import statistics
import time

import torch

import rnnkit
from rnnkit.engine.native import build

SIZES = [(100, 32, 64), (100, 32, 256), (50, 64, 512), (200, 1, 128)]  # rnnkit bench's (T, N, H)
REPEATS = 7


def main() -> None:
    kernels = build.kernels()
    if kernels is None:
        raise SystemExit("the native kernels are not built on this machine")
    default = kernels.blas_min_multiply_adds()
    settings = {"tiles": 2**62, "mm": default}
    print(f"step products of >= {default:,} multiply-adds on mm; training step, median of "
          f"{REPEATS}")
    try:
        for family in ("lstm", "gru", "rnn"):
            for steps, batch, hidden in SIZES:
                torch.manual_seed(0)
                layer = getattr(rnnkit, family.upper())(hidden, hidden)
                x = torch.randn(steps, batch, hidden, requires_grad=True)
                times: dict[str, list[float]] = {name: [] for name in settings}
                for repeat in range(REPEATS + 1):
                    for name, threshold in settings.items():
                        kernels.set_blas_min_multiply_adds(threshold)
                        start = time.perf_counter()
                        layer(x)[0].sum().backward()
                        if repeat:  # the first round warms up
                            times[name].append(time.perf_counter() - start)
                tiles, mm = (statistics.median(times[name]) * 1e3 for name in settings)
                size = f"{steps},{batch},{hidden}"
                print(f"{family:<5} {size:<11} tiles {tiles:8.2f} ms   "
                      f"with mm {mm:8.2f} ms   with mm / tiles {mm / tiles:.2f}")
    finally:
        kernels.set_blas_min_multiply_adds(default)


if __name__ == "__main__":
    main()
