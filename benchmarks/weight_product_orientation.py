"""The weight gradient's product over all steps in its two orientations, at narrow inputs.

    python benchmarks/weight_product_orientation.py [--rows 2000,50000] [--gates 32,384,2048]
        [--columns 1,4,16,24,48] [--threads 1] [--repeats 5]

A layer's input weight gradient is ``d^T x``, summed over all ``R = T * N`` rows: ``d (R, G)``
(G = gates x hidden) and ``x (R, K)``. ``d.t() @ x`` and ``(x.t() @ d).t()`` are the same sums;
MKL ran the first far slower when ``K`` is small on the AMD EPYC VM, which is why
`rnnkit.engine.products.weight_product` turns it around for `FEW_COLUMNS` columns. For each
size this prints the median milliseconds of both (the second including the copy that makes it
contiguous) and their ratio (docs/benchmarks.md, issue 19's tenth part).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from minimal_vs_gated import positive_ints  # benchmarks/, this script's folder


def median_ms(call, repeats: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_ints, default=[2000, 50000])
    parser.add_argument("--gates", type=positive_ints, default=[32, 384, 2048])
    parser.add_argument("--columns", type=positive_ints, default=[1, 4, 16, 24, 48])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    if arguments.threads < 1 or arguments.repeats < 1:
        parser.error(f"--threads and --repeats must be >= 1, got {arguments.threads} and "
                     f"{arguments.repeats}")
    torch.set_num_threads(arguments.threads)
    for rows in arguments.rows:
        for gates in arguments.gates:
            cells = []
            for columns in arguments.columns:
                d, x = torch.randn(rows, gates), torch.randn(rows, columns)
                plain = median_ms(lambda d=d, x=x: d.t() @ x, arguments.repeats)
                turned = median_ms(lambda d=d, x=x: (x.t() @ d).t().contiguous(),
                                   arguments.repeats)
                cells.append(f"K={columns} {plain:.2f}/{turned:.2f} ({turned / plain:.2f})")
            print(f"R={rows} G={gates}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
