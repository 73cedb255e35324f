"""minGRU and minLSTM: a training step (forward, backward of a fixed projection) on each
backend, the reference loop against the scans, with rnnkit.GRU's default engine as the peer.

One layer, N = 16, input and hidden size 256, T in ``STEPS``; every variant is timed
interleaved with the others (median of ``REPEATS``), so the ratios within a row come from the
same moments of the machine.

    python benchmarks/minimal_scan.py [--scans-only] [T ...]

``--scans-only`` leaves out the reference loop (minutes per step at T = 8192).

Results: docs/benchmarks.md ("minGRU and minLSTM: reference loop against the scans").
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import rnnkit

BATCH, SIZE, REPEATS = 16, 256, 5
STEPS = (128, 512, 2048)


def training_step(module, x):
    def run():
        output, _ = module(x)
        output.backward(torch.ones_like(output))
    return run


def variants(steps: int, scans_only: bool):
    torch.manual_seed(0)
    x = torch.randn(steps, BATCH, SIZE, requires_grad=True)
    rows = {}
    for family, layer in (("minGRU", rnnkit.MinGRU), ("minLSTM", rnnkit.MinLSTM)):
        for log_space in (False, True):
            for backend in ("scan",) if scans_only else ("reference", "scan"):
                module = layer(SIZE, SIZE, log_space=log_space, backend=backend)
                name = f"{family}{' log' if log_space else ''} {backend}"
                rows[name] = training_step(module, x)
                if log_space and backend == "scan":
                    module = layer(SIZE, SIZE, log_space=True, backend="log_scan")
                    rows[f"{family} log log_scan"] = training_step(module, x)
    rows["GRU auto (peer)"] = training_step(rnnkit.GRU(SIZE, SIZE), x)
    return rows


def main() -> None:
    scans_only = "--scans-only" in sys.argv[1:]
    steps_list = [int(a) for a in sys.argv[1:] if a != "--scans-only"] or list(STEPS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={BATCH}, "
          f"I=H={SIZE}, median of {REPEATS}, ms per training step")
    for steps in steps_list:
        rows = variants(steps, scans_only)
        for run in rows.values():  # warm-up
            run()
        times = {name: [] for name in rows}
        for _ in range(REPEATS):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        for name, ms in medians.items():
            family = name.split(" ")[0] + (" log" if " log " in name else "")
            reference = medians.get(f"{family} reference")
            ratio = f"  reference/this {reference / ms:6.1f}x" if reference else ""
            print(f"T={steps:5d}  {name:24s} {ms:9.2f} ms{ratio}")


if __name__ == "__main__":
    main()
