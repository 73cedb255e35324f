"""The LSTM's native loops alone, and the language model's two layers against torch.nn.

    python benchmarks/lstm_loops.py [--batch 32] [--hidden 256] [--steps 100] [--rounds 40]
                                    [--input 64]

Prints, in microseconds per time step (median of ``--rounds`` calls, 2 threads):

- ``forward, for the backward``: `kernels.lstm_forward` on a precomputed projection, keeping
  the activated gates for a backward (training);
- ``forward, inference``: the same loop keeping nothing for a backward;
- ``backward``: `kernels.lstm_backward` of that forward.

Then a layer's whole native forward (`rnnkit.engine.native.functions.lstm_forward`) from a
``--input``-wide input, its projection taken before the loop (ATen's mm over all steps) and
inside it (`kernels.lstm_forward_input`, the default from batch 4 with an input narrower than
the state), alternated in one process: milliseconds and the ratio, for training and inference.

Then the two layers of `rnnkit lm`'s default model (2 x H, a 64-wide input, dropout 0.1
between the layers, the state carried between windows, the input's gradient) against
torch.nn.LSTM's, one training step (forward and backward) each, interleaved in one process:
median milliseconds and the ratio. Run it like `rnnkit` itself with freed memory kept
(`rnnkit.training.devices.keep_freed_memory`), which the CLI sets.

These are the figures of docs/benchmarks.md, "Issue 19, fourth part" and "fifth part".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.engine.native import build
from rnnkit.engine.native import functions as native_functions
from rnnkit.training.devices import keep_freed_memory


def loop_timings(steps: int, batch: int, hidden: int, rounds: int) -> dict[str, float]:
    """Microseconds per step of the forward (both ways) and backward loops."""
    kernels = build.kernels()
    if kernels is None:
        raise SystemExit("the native kernels could not be built: " + str(build.failure()))
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(steps, batch, 4 * hidden, generator=generator)
    bias = torch.randn(4 * hidden, generator=generator)
    zeros = torch.zeros(batch, hidden)
    w_hh = torch.randn(4 * hidden, hidden, generator=generator) * 0.05
    times: dict[str, list[float]] = {"forward, for the backward": [], "forward, inference": [],
                                     "backward": []}
    d_output = torch.randn(steps, batch, hidden, generator=generator)
    for round_ in range(rounds + 5):
        for name, keep in (("forward, inference", False), ("forward, for the backward", True)):
            gates = projection.clone()
            start = time.perf_counter()
            _, _, c_states = kernels.lstm_forward(gates, bias, zeros, zeros, w_hh, None, None,
                                                  None, False, keep)
            elapsed = time.perf_counter() - start
            if round_ >= 5:
                times[name].append(elapsed)
        c_new = c_states[1:]  # each step's new cell: the state it leaves (gates: activated)
        start = time.perf_counter()
        kernels.lstm_backward(d_output, zeros, zeros, gates, c_states, c_new, w_hh, None, None,
                              None, False)
        if round_ >= 5:
            times["backward"].append(time.perf_counter() - start)
    return {name: statistics.median(values) / steps * 1e6 for name, values in times.items()}


def input_projection_timings(steps: int, batch: int, input_size: int, hidden: int,
                             rounds: int) -> dict[str, float]:
    """Milliseconds of one layer direction's native forward, the input projected before the
    loop ("before") or inside it ("inside"), each for a backward ("train") and not ("infer")."""
    kernels = build.kernels()
    if kernels is None:
        raise SystemExit("the native kernels could not be built: " + str(build.failure()))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, input_size, generator=generator)
    w_ih = torch.randn(4 * hidden, input_size, generator=generator) * 0.1
    w_hh = torch.randn(4 * hidden, hidden, generator=generator) * 0.05
    bias = torch.randn(4 * hidden, generator=generator)
    zeros = torch.zeros(batch, hidden)
    default = kernels.lstm_input_min_batch()
    times: dict[str, list[float]] = {}
    try:
        for round_ in range(rounds + 5):
            for where, min_batch in (("before", 2**62), ("inside", 1)):
                kernels.set_lstm_input_min_batch(min_batch)
                for mode in ("train", "infer"):
                    start = time.perf_counter()
                    native_functions.lstm_forward(x, zeros, zeros, w_ih, w_hh, bias, bias, None,
                                                  None, None, False,
                                                  layer_outputs_only=mode == "infer")
                    if round_ >= 5:
                        times.setdefault(f"{mode}, {where}", []).append(
                            time.perf_counter() - start)
    finally:
        kernels.set_lstm_input_min_batch(default)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def model_layers(steps: int, batch: int, hidden: int, rounds: int) -> dict[str, float]:
    """Milliseconds of one training step of the language model's two layers, per library."""
    torch.manual_seed(0)
    layers = {"torch.nn": torch.nn.LSTM(64, hidden, 2, dropout=0.1),
              "rnnkit": rnnkit.LSTM(64, hidden, 2, dropout=0.1)}
    x = torch.randn(steps, batch, 64, requires_grad=True)
    states: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = dict.fromkeys(layers)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_ in range(rounds + 5):
        for name, layer in layers.items():
            start = time.perf_counter()
            output, (h_n, c_n) = layer(x, states[name])
            output.sum().backward()
            elapsed = time.perf_counter() - start
            states[name] = (h_n.detach(), c_n.detach())
            if round_ >= 5:
                times[name].append(elapsed)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--input", type=int, default=64, help="input width of the projection "
                        "timings (64: rnnkit lm's embedding)")
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    sizes = (arguments.steps, arguments.batch, arguments.hidden)
    print(f"(T, N, H) = {sizes}, 2 threads, median of {arguments.rounds}")
    for name, micros in loop_timings(*sizes, arguments.rounds).items():
        print(f"  loop {name:<26} {micros:7.1f} us per step")
    forward = input_projection_timings(arguments.steps, arguments.batch, arguments.input,
                                       arguments.hidden, arguments.rounds)
    for mode in ("train", "infer"):
        before, inside = forward[f"{mode}, before"], forward[f"{mode}, inside"]
        print(f"  forward from a {arguments.input}-wide input, {mode}: projected before the loop "
              f"{before:.2f} ms, inside it {inside:.2f} ms, inside x before {inside / before:.3f}")
    layers = model_layers(*sizes, arguments.rounds)
    ratio = layers["rnnkit"] / layers["torch.nn"]
    print(f"  lm layers, training step: rnnkit {layers['rnnkit']:.2f} ms, torch.nn "
          f"{layers['torch.nn']:.2f} ms, rnnkit x torch.nn {ratio:.3f}")


if __name__ == "__main__":
    main()
