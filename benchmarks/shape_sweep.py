"""rnnkit's plain layers against torch.nn's at sizes `rnnkit bench` does not time: one stream
(batch 1) at large hidden sizes, short sequences, large batches of small states.

    python benchmarks/shape_sweep.py infer|train lstm|gru|rnn [--seconds 6] [--input-grad]

For each (T, N, H) below, torch.nn's layer and ``rnnkit.from_torch`` of it (backend "auto") run
in turn, the order reversed every round (inference under no_grad; training: forward, backward of
``output.sum()``; with ``--input-grad`` the input's gradient too, as for every layer of a stack
above the first, or over an embedding), for at least 12 rounds and up to ``--seconds`` per size
(200 rounds at most);
prints the median milliseconds and rnnkit's time over torch.nn's. Two threads, freed memory
kept as the CLI keeps it. These are the figures of docs/benchmarks.md, "Issue 19, sixth part".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.training.devices import keep_freed_memory

SIZES = [(50, 1, 64), (50, 1, 512), (100, 4, 128), (100, 8, 256), (100, 16, 512),
         (100, 64, 128), (100, 128, 256), (20, 32, 1024), (300, 16, 64), (10, 256, 256)]
PEERS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


def time_call(mode: str, module: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one call of a recurrent ``module`` on ``x``: inference under no_grad, or a
    training step (forward, backward of ``output.sum()``; ``x``'s gradient too where it asks)."""
    if mode == "infer":
        with torch.no_grad():
            start = time.perf_counter()
            module(x)
            return time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    output, _ = module(x)
    output.sum().backward()
    return time.perf_counter() - start


def time_pair(mode: str, family: str, size: tuple[int, int, int], seconds: float,
              input_grad: bool = False) -> tuple[float, float, int]:
    """Median seconds of torch.nn's and rnnkit's call at ``size``, and the rounds run."""
    steps, batch, hidden = size
    torch.manual_seed(0)
    peer = PEERS[family](hidden, hidden)
    runs = {"torch.nn": peer, "rnnkit": rnnkit.from_torch(peer)}
    x = torch.randn(steps, batch, hidden, requires_grad=input_grad)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < 12 or (time.perf_counter() < deadline and rounds < 200):
        order = list(runs.items()) if rounds % 2 else list(reversed(runs.items()))
        for name, module in order:
            elapsed = time_call(mode, module, x)
            if rounds >= 2:
                samples[name].append(elapsed)
        rounds += 1
    return statistics.median(samples["torch.nn"]), statistics.median(samples["rnnkit"]), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["infer", "train"])
    parser.add_argument("family", choices=sorted(PEERS))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--input-grad", action="store_true",
                        help="training: the input's gradient too")
    arguments = parser.parse_args()
    if arguments.input_grad and arguments.mode != "train":
        parser.error("--input-grad times training; got mode infer")
    torch.set_num_threads(2)
    keep_freed_memory()
    for size in SIZES:
        peer, mine, rounds = time_pair(arguments.mode, arguments.family, size, arguments.seconds,
                                       arguments.input_grad)
        mode = arguments.mode + (" (input's gradient too)" if arguments.input_grad else "")
        print(f"{arguments.family} {mode} {size}: torch.nn {peer * 1e3:.3f} ms, rnnkit "
              f"{mine * 1e3:.3f} ms, rnnkit x torch.nn {mine / peer:.3f} ({rounds} rounds)",
              flush=True)


if __name__ == "__main__":
    main()
