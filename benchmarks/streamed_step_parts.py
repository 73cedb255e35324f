"""The pieces of a streamed step (batch 1, under no_grad), each timed in-process against
``torch.nn.LSTMCell`` in the same run: a ``rnnkit.LSTMCell`` call, a one-step ``rnnkit.LSTM``
call and torch.nn.LSTM's (its drop-in peer), a ``rnnkit.LSTM.stream()`` step, the engine calls
below them and the step kernel alone. The pieces are timed in turn, round after round (min of 7
rounds x 3000 calls each), so a busy spell of the machine hits them alike.

    python benchmarks/streamed_step_parts.py [--hidden 256] [--threads 2] [NAME]

Run it from two checkouts alternately (``PYTHONPATH=<checkout>/src``) to compare them
(docs/benchmarks.md). The thread count is set explicitly: left unset, torch.nn.LSTMCell took
12 ms a step at H = 64 on the Intel Xeon VM (its products' threads waited on each other), 25 µs
with it set.
"""

from __future__ import annotations

import argparse
import timeit

import torch
from torch import nn

import rnnkit
from rnnkit import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="this checkout")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    hidden = arguments.hidden
    torch.manual_seed(0)
    peer = nn.LSTMCell(hidden, hidden)
    cell = rnnkit.from_torch(peer)
    layer = rnnkit.LSTM(hidden, hidden)
    layer.load_state_dict({f"{k}_l0": v for k, v in peer.state_dict().items()})
    x = torch.randn(1, hidden)
    cell_state = (torch.zeros(1, hidden), torch.zeros(1, hidden))
    sequence = x.unsqueeze(0)
    layer_state = (torch.zeros(1, 1, hidden), torch.zeros(1, 1, hidden))
    peer_layer = nn.LSTM(hidden, hidden)
    peer_layer.load_state_dict(layer.state_dict())
    kind, weights = cell.kind(), cell.weights()
    calls = {
        "torch.nn.LSTMCell call": lambda: peer(x, cell_state),
        "rnnkit.LSTMCell call": lambda: cell(x, cell_state),
        "one-step torch.nn.LSTM call": lambda: peer_layer(sequence, layer_state),
        "one-step rnnkit.LSTM call": lambda: layer(sequence, layer_state),
        "engine.run_direction": lambda: engine.run_direction(kind, sequence, cell_state,
                                                             weights, None, False),
    }
    if hasattr(layer, "stream"):  # checkouts from issue 19's streamed step on
        stream = layer.stream()
        with torch.no_grad():
            stream(x)
        calls["rnnkit.LSTM.stream() step"] = lambda: stream(x)
        calls["engine.inference_step"] = lambda: engine.inference_step(kind, x, cell_state,
                                                                       weights)
    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for call in calls.values():
            for _ in range(300):
                call()
        for _ in range(7):
            for key, call in calls.items():
                best[key] = min(best[key], timeit.timeit(call, number=3000) / 3000 * 1e6)
    peer_time = best["torch.nn.LSTMCell call"]
    print(f"{arguments.name} (H = {hidden}, {arguments.threads} threads), µs per call and x "
          "torch.nn.LSTMCell:")
    for key, value in best.items():
        print(f"  {key:28s} {value:7.1f}  {value / peer_time:5.2f}x")


if __name__ == "__main__":
    main()
