"""sLSTM: a training step (forward, backward of a fixed projection) of rnnkit.SLSTM on its native
and fused operators and on the reference loop, against rnnkit.LSTM (default engine) at the same
sizes.

One layer, input and hidden size H, batch N, T in ``STEPS``, sLSTM with 1 and 4 heads; every
variant is timed interleaved with the others (median of ``REPEATS``), so the ratios within a
row come from the same moments of the machine. Prints milliseconds per step and each time as a
ratio to rnnkit.LSTM's (< 1: faster than the LSTM), and each native time as a ratio to the fused
one at the same heads (< 1: native faster).

    OMP_NUM_THREADS=1 python benchmarks/slstm_step.py [--no-reference] [--size H] [--batch N]
                                                       [T ...]

``--no-reference`` leaves out the reference loop (the slowest by far at long T).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit

REPEATS = 5
STEPS = (64, 256, 1024)


def training_step(module, x):
    """Forward and backward of ``output.sum()``-like projection; gradients cleared each time."""
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        output, _ = module(x)
        output.backward(torch.ones_like(output))
    return run


def variants(steps: int, size: int, batch: int, with_reference: bool) -> dict:
    torch.manual_seed(0)
    x = torch.randn(steps, batch, size, requires_grad=True)
    rows = {"LSTM (peer)": training_step(rnnkit.LSTM(size, size), x)}
    for heads in (1, 4):
        for backend in ("native", "fused", "reference") if with_reference else ("native",
                                                                                 "fused"):
            module = rnnkit.SLSTM(size, size, num_heads=heads, backend=backend)
            rows[f"sLSTM heads={heads} {backend}"] = training_step(module, x)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", type=int, default=list(STEPS), help="lengths T")
    parser.add_argument("--size", type=int, default=256, help="input and hidden size H")
    parser.add_argument("--batch", type=int, default=16, help="batch size N")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the reference loop")
    arguments = parser.parse_args()
    if arguments.size % 4:
        parser.error(f"--size must be divisible by 4 (the 4-head variant), got {arguments.size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={arguments.batch}, "
          f"I=H={arguments.size}, median of {REPEATS}, ms per training step")
    for steps in arguments.steps:
        rows = variants(steps, arguments.size, arguments.batch, not arguments.no_reference)
        for run in rows.values():  # warm-up (the LSTM's kernels may build on first use)
            run()
        times = {name: [] for name in rows}
        for _ in range(REPEATS):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        peer = medians["LSTM (peer)"]
        for name, ms in medians.items():
            versus_fused = ""
            if name.endswith(" native"):
                fused = medians[name.replace(" native", " fused")]
                versus_fused = f"  {ms / fused:6.2f}x fused"
            print(f"T={steps:5d}  {name:28s} {ms:9.2f} ms  {ms / peer:6.2f}x LSTM{versus_fused}")


if __name__ == "__main__":
    main()
