"""One streamed sLSTM step (under no_grad), timed against ``rnnkit.LSTMCell``'s streamed step in
the same run: an ``rnnkit.SLSTMCell`` call, a one-step ``rnnkit.SLSTM`` call and, where the
checkout has them, the same call on forward's general path (``hx`` given as a list, which the
short way leaves to it), an ``SLSTM.stream()`` step, the step kernel alone and the native
sequence path on a one-step sequence (what the kernel replaces;
`rnnkit.engine.SLSTM_STEP_KERNEL_MAX_BATCH` is where the two cross), at 1 and 4 heads, the input
and hidden sizes equal.
Every call is timed on its own (``perf_counter_ns``); the pieces take turns, round after round
(7 rounds x 1000 calls each, after 300 warm-up calls), so a busy spell of the machine hits them
alike; each figure is the median over its 7000 calls.

    python benchmarks/slstm_streamed_step.py [--hidden 256] [--batch 1] [--threads 1] [NAME]

Run it from two checkouts alternately (``PYTHONPATH=<checkout>/src``, each with its own
``RNNKIT_BUILD_DIR``) to compare them (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.engine import ops
from rnnkit.engine.native import functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="this checkout")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    hidden, batch = arguments.hidden, arguments.batch
    torch.manual_seed(0)
    x = torch.randn(batch, hidden)
    peer = rnnkit.LSTMCell(hidden, hidden)
    peer_state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
    calls = {"rnnkit.LSTMCell call (peer)": lambda: peer(x, peer_state)}
    for heads in (1, 4):
        cell = rnnkit.SLSTMCell(hidden, hidden, num_heads=heads)
        with torch.no_grad():
            state = cell(x, cell(x))  # a state past the first step (n >= 1)
        layer = rnnkit.SLSTM(hidden, hidden, num_heads=heads)
        layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
        layer_state = tuple(part.unsqueeze(0) for part in state)
        sequence = x.unsqueeze(0)
        calls[f"SLSTMCell call, {heads} head(s)"] = (
            lambda cell=cell, state=state: cell(x, state))
        calls[f"one-step SLSTM call, {heads} head(s)"] = (
            lambda layer=layer, s=layer_state, q=sequence: layer(q, s))
        if hasattr(layer, "_one_step"):  # checkouts with the one-step call's short way
            # hx as a list: forward's general path (checks, splitting, stacking), which every
            # one-step call took before the short way
            calls[f"one-step call, general path, {heads} head(s)"] = (
                lambda layer=layer, s=list(layer_state), q=sequence: layer(q, s))
        if hasattr(layer, "stream"):  # checkouts from the sLSTM step kernel on
            stream = layer.eval().stream(layer_state)
            with torch.no_grad():
                stream(x)
            calls[f"SLSTM.stream() step, {heads} head(s)"] = lambda stream=stream: stream(x)
            weights = tuple(w.detach() for w in (cell.weight_ih, cell.weight_hh, cell.bias_ih))
            if hasattr(functions, "slstm_step_kernel"):  # bound once (issue 19's seventh part)
                kernel = functions.slstm_step_kernel(*weights, False)
                calls[f"step kernel alone, {heads} head(s)"] = (
                    lambda s=state, kernel=kernel: kernel(x, s))
            else:
                calls[f"step kernel alone, {heads} head(s)"] = (
                    lambda s=state, w=weights: functions.slstm_step(x, s, *w, False))
            calls[f"native sequence path, T = 1, {heads} head(s)"] = (
                lambda s=state, w=weights, q=sequence: ops.run_native_slstm(q, s, *w, None,
                                                                            False, False))
    times: dict[str, list[int]] = {key: [] for key in calls}
    clock = time.perf_counter_ns
    with torch.no_grad():
        for call in calls.values():
            for _ in range(300):
                call()
        for _ in range(7):
            for key, call in calls.items():
                spent = times[key]
                for _ in range(1000):
                    start = clock()
                    call()
                    spent.append(clock() - start)
    median = {key: statistics.median(spent) / 1e3 for key, spent in times.items()}
    peer_time = median["rnnkit.LSTMCell call (peer)"]
    print(f"{arguments.name} (N = {batch}, H = {hidden}, {arguments.threads} thread(s)), "
          "median µs per call and x rnnkit.LSTMCell's:")
    for key, value in median.items():
        print(f"  {key:42s} {value:7.1f}  {value / peer_time:5.2f}x")


if __name__ == "__main__":
    main()
