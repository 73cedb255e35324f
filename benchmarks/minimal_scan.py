"""minGRU and minLSTM: a training step (forward, backward of a fixed projection) on each
backend, the reference loop against the scans and the native loop, with rnnkit.GRU's default
engine as the peer.

One layer, N = 16, input and hidden size 256, T in ``STEPS``; every variant is timed
interleaved with the others (median of ``REPEATS``), so the ratios within a row come from the
same moments of the machine.

    python benchmarks/minimal_scan.py [--scans-only] [--inference] [--batch N] [T ...]

``--scans-only`` leaves out the reference loop (minutes per step at T = 8192); ``--inference``
times the forward alone under ``torch.no_grad()`` (T = 1 with ``--batch 1``: one streamed
step).

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


def inference(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def variants(steps: int, batch: int, scans_only: bool, timed):
    torch.manual_seed(0)
    x = torch.randn(steps, batch, SIZE, requires_grad=timed is training_step)
    rows = {}
    backends = ("scan", "native") if scans_only else ("reference", "scan", "native")
    for family, layer in (("minGRU", rnnkit.MinGRU), ("minLSTM", rnnkit.MinLSTM)):
        for log_space in (False, True):
            for backend in backends + (("log_scan",) if log_space else ()):
                module = layer(SIZE, SIZE, log_space=log_space, backend=backend)
                name = f"{family}{' log' if log_space else ''} {backend}"
                rows[name] = timed(module, x)
    rows["GRU auto (peer)"] = timed(rnnkit.GRU(SIZE, SIZE), x)
    return rows


def main() -> None:
    arguments = sys.argv[1:]
    scans_only, timed = "--scans-only" in arguments, training_step
    batch = BATCH
    if "--inference" in arguments:
        timed = inference
    if "--batch" in arguments:
        batch = int(arguments.pop(arguments.index("--batch") + 1))
    steps_list = [int(a) for a in arguments if not a.startswith("--")] or list(STEPS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={batch}, "
          f"I=H={SIZE}, median of {REPEATS}, ms per "
          f"{'training step' if timed is training_step else 'forward (no_grad)'}")
    for steps in steps_list:
        rows = variants(steps, batch, scans_only, timed)
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
            ratios = ""
            for peer in ("reference", "scan"):
                peer_ms = medians.get(f"{family} {peer}")
                ratios += f"  {peer}/this {peer_ms / ms:6.2f}x" if peer_ms else ""
            print(f"T={steps:5d}  {name:24s} {ms:9.3f} ms{ratios}")


if __name__ == "__main__":
    main()
