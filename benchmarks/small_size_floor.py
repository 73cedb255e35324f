"""How fast an LSTM training step could be at a small size: the matrix products over all steps
alone (input projection, then the gradients of W_ih, W_hh and of the input), timed as ATen's
mm runs them, against a whole torch.nn and rnnkit training step in the same rounds.

Those four products are what any implementation computes besides its two time loops, so their
time over torch.nn's step bounds from below the ratio any implementation can reach with the
same arithmetic (docs/benchmarks.md, issue 19).

    python benchmarks/small_size_floor.py T N H [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import rnnkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("steps", "batch", "hidden"):
        parser.add_argument(name, type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    steps, batch, hidden = arguments.steps, arguments.batch, arguments.hidden
    peer = nn.LSTM(hidden, hidden)
    layer = rnnkit.from_torch(peer)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    rows = torch.randn(steps * batch, hidden)  # x, or h entering each step
    gates = torch.randn(steps * batch, 4 * hidden)  # pre-activations, or their gradients
    w = torch.randn(4 * hidden, hidden)

    def train(module) -> None:
        output, _ = module(x)
        output.sum().backward()

    def products() -> None:
        torch.addmm(torch.zeros(4 * hidden), rows, w.t())  # input projection
        torch.mm(gates.t(), rows)  # dW_ih
        torch.mm(gates.t(), rows)  # dW_hh (h entering each step, same shapes)
        torch.mm(gates, w)  # dx

    calls = {"torch.nn step": lambda: train(peer), "rnnkit step": lambda: train(layer),
             "the four products": products}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(3):
            call()
    for _ in range(arguments.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    peer_ms = statistics.median(times["torch.nn step"]) * 1e3
    print(f"(T, N, H) = ({steps}, {batch}, {hidden}), {arguments.threads} threads, median of "
          f"{arguments.rounds} interleaved rounds:")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"  {name:18s} {ms:8.3f} ms  {ms / peer_ms:5.2f}x torch.nn's step")


if __name__ == "__main__":
    main()
