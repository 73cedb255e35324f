"""The pieces of a streamed step (N = 1, H = 256, under no_grad), each timed in-process: a
``rnnkit.LSTMCell`` call, a one-step ``rnnkit.LSTM`` call, and the engine calls below them.
Min of 7 x 3000 calls. Run it from two checkouts alternately (``PYTHONPATH=<checkout>/src``)
to compare them (docs/benchmarks.md, "Cost of issue 15's operator boundary").

    python benchmarks/streamed_step_parts.py NAME
"""

from __future__ import annotations

import sys
import timeit

import torch

import rnnkit
from rnnkit import engine

HIDDEN = 256


def microseconds(call) -> float:
    with torch.no_grad():
        for _ in range(300):
            call()
        return min(timeit.repeat(call, number=3000, repeat=7)) / 3000 * 1e6


def main() -> None:
    torch.set_num_threads(2)
    cell = rnnkit.LSTMCell(HIDDEN, HIDDEN)
    layer = rnnkit.LSTM(HIDDEN, HIDDEN)
    x = torch.randn(1, HIDDEN)
    cell_state = (torch.zeros(1, HIDDEN), torch.zeros(1, HIDDEN))
    sequence = x.unsqueeze(0)
    layer_state = (torch.zeros(1, 1, HIDDEN), torch.zeros(1, 1, HIDDEN))
    kind, weights = cell.kind(), cell.weights()
    results = {
        "LSTMCell call": microseconds(lambda: cell(x, cell_state)),
        "one-step LSTM call": microseconds(lambda: layer(sequence, layer_state)),
        "engine.run_direction": microseconds(
            lambda: engine.run_direction(kind, sequence, cell_state, weights, None, False)),
    }
    if hasattr(engine, "ops"):  # checkouts from issue 15 on
        results["ops.run_native"] = microseconds(
            lambda: engine.ops.run_native(kind, sequence, cell_state, weights, None, False))
    name = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    print(name, {key: round(value, 1) for key, value in results.items()}, "µs")


if __name__ == "__main__":
    main()
