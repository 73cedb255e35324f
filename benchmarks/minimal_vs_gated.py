"""minGRU and minLSTM against the gated cells they simplify, on rnnkit's default engines: the
training step (forward + backward of ``output.sum()``, one layer, N = 16, input and hidden
H = 256) of MinGRU against rnnkit.GRU and MinLSTM against rnnkit.LSTM at T = 128, 512, 2048,
8192, and the single-step streaming latency (batch 1, or ``--stream-batch``) of MinGRUCell,
MinGRU.stream() and a one-step MinGRU call against rnnkit.GRUCell and torch.nn.GRUCell, and of
the minLSTM's against rnnkit.LSTMCell and torch.nn.LSTMCell, with the minimal step kernel alone
and the native sequence path on one step that it replaces
(`rnnkit.engine.MIN_STEP_KERNEL_MAX_BATCH` is where the two cross). Run it with ``PYTHONPATH``
on another checkout (and that checkout's ``RNNKIT_BUILD_DIR``) for a before/after: the
``stream()`` and kernel rows need a checkout that has them.

    python benchmarks/minimal_vs_gated.py [--threads 2] [--lengths 128,512,2048,8192]
        [--batch 16] [--hidden 256] [--repeats 5] [--stream-steps 1000] [--stream-batch 1]
        [--streaming-only]

Each training pair is timed interleaved (A, B, A, B, ...) after a warm-up, and reported by its
medians: milliseconds per training step, microseconds per time step, the ratio minimal / gated,
and how each step time grew from the previous T (4 for time linear in T when the lengths grow
by 4). Each streamed step is timed on its own (``--repeats`` rounds of ``--stream-steps`` calls
per contender, in turn), and reported by its median, so that a call the machine preempted
counts as one sample rather than inflating a whole run.
On a CPU the minimal cells' advantage is the absence of the recurrent product ``W_hh h``, not
parallelism: both run every time step's arithmetic. ``torch.set_num_threads`` is set from
``--threads``; like the rnnkit commands, malloc keeps freed memory
(`rnnkit.training.devices.keep_freed_memory`).

Results: docs/benchmarks.md, "minGRU and minLSTM against GRU and LSTM, T = 128-8192", and
"minGRU and minLSTM: the streamed step".
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import rnnkit
from rnnkit.engine import scan
from rnnkit.engine.native import functions as native_functions
from rnnkit.training.devices import keep_freed_memory

PAIRS = {  # minimal -> (its layer, its cell, the gated layer, the gated cell)
    "minGRU": (rnnkit.MinGRU, rnnkit.MinGRUCell, rnnkit.GRU, rnnkit.GRUCell),
    "minLSTM": (rnnkit.MinLSTM, rnnkit.MinLSTMCell, rnnkit.LSTM, rnnkit.LSTMCell),
}


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def positive_int(text: str) -> int:
    values = positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return values[0]


def interleaved_medians(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn ``repeats`` times after one warm-up."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def training_step(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        output, _ = layer(x)
        output.sum().backward()
    return run


def time_training(lengths: list[int], batch: int, hidden: int, repeats: int) -> None:
    print(f"training step (forward + backward), one layer, N = {batch}, H = {hidden}, median of "
          f"{repeats}")
    header = (f"{'pair':16} {'T':>6} {'minimal ms':>11} {'gated ms':>10} {'min/gated':>10} "
              f"{'min us/t':>9} {'gated us/t':>10} {'min growth':>11} {'gated growth':>12}")
    print(header)
    print("-" * len(header))
    for name, (minimal, _, gated, _) in PAIRS.items():
        previous: tuple[float, float] | None = None
        for steps in lengths:
            torch.manual_seed(0)
            x = torch.randn(steps, batch, hidden)
            medians = interleaved_medians({"minimal": training_step(minimal(hidden, hidden), x),
                                           "gated": training_step(gated(hidden, hidden), x)},
                                          repeats)
            ms_minimal, ms_gated = medians["minimal"] * 1e3, medians["gated"] * 1e3
            growth = (("-", "-") if previous is None else
                      (f"{ms_minimal / previous[0]:.2f}x", f"{ms_gated / previous[1]:.2f}x"))
            pair = f"{name} / {gated.__name__}"
            print(f"{pair:16} {steps:6d} {ms_minimal:11.2f} {ms_gated:10.2f} "
                  f"{ms_minimal / ms_gated:10.3f} {1e3 * ms_minimal / steps:9.2f} "
                  f"{1e3 * ms_gated / steps:10.2f} {growth[0]:>11} {growth[1]:>12}", flush=True)
            previous = (ms_minimal, ms_gated)


class Stepper:
    """One streamed step per call, on the next input of ``xs`` ``(T, 1, H)`` (cycling), the
    state kept between calls: ``mode`` ``"cell"`` (``state = cell(x, state)``), ``"stream"``
    (``layer.stream()``, opened at the first call) or ``"call"`` (a one-step layer call,
    ``_, state = layer(x.unsqueeze(0), state)``). Call it under ``no_grad``."""

    def __init__(self, module: torch.nn.Module, xs: torch.Tensor, mode: str) -> None:
        self.module, self.xs, self.mode = module, xs, mode
        self.index, self.state = 0, None
        self.stream = module.stream() if mode == "stream" else None

    def __call__(self) -> None:
        x = self.xs[self.index]
        self.index = (self.index + 1) % len(self.xs)
        if self.stream is not None:
            self.stream(x)
        elif self.mode == "cell":
            self.state = self.module(x, self.state)
        else:
            _, self.state = self.module(x.unsqueeze(0), self.state)


def per_call_medians(calls: dict[str, Callable[[], None]], rounds: int,
                     calls_per_round: int) -> dict[str, float]:
    """Median seconds of one call of each, every call timed on its own (a call the machine
    preempted is one sample among thousands, not part of every run's total), the contenders
    taking turns round after round after one warm-up round."""
    samples: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    with torch.no_grad():
        for call in calls.values():
            for _ in range(calls_per_round):
                call()
        for _ in range(rounds):
            for name, call in calls.items():
                spent = samples[name]
                for _ in range(calls_per_round):
                    started = clock()
                    call()
                    spent.append(clock() - started)
    return {name: statistics.median(values) / 1e9 for name, values in samples.items()}


def kernel_and_sequence_path(cell: torch.nn.Module, x: torch.Tensor
                             ) -> dict[str, Callable[[], None]]:
    """The minimal step kernel alone (``native.functions.min_step_kernel``, bound once; in
    older checkouts ``min_step``) and what it replaces, the native sequence path on a one-step
    sequence (``scan.run_native``, T = 1), from a fixed state, where the checkout has the
    kernel (else nothing)."""
    h = torch.rand(x.shape[0], cell.hidden_size, generator=torch.Generator().manual_seed(1))
    weight, bias = cell.weight_ih.detach(), cell.bias_ih.detach()
    family, sequence = cell.family, x.unsqueeze(0)
    if hasattr(native_functions, "min_step_kernel"):
        kernel = native_functions.min_step_kernel(weight, bias, family, False)
        alone = lambda: kernel(x, h)  # noqa: E731
    elif hasattr(native_functions, "min_step"):
        alone = lambda: native_functions.min_step(x, h, weight, bias, family, False)  # noqa: E731
    else:
        return {}
    return {"step kernel alone": alone,
            "native sequence path, T = 1": lambda: scan.run_native(
                family, sequence, h, weight, bias, None, False, False)}


def time_streaming(hidden: int, calls_per_round: int, rounds: int, batch: int = 1) -> None:
    print(f"\nstreaming: one step at batch {batch}, H = {hidden}, no_grad, the median of "
          f"{rounds} rounds x {calls_per_round} individually timed calls, contenders in turn; "
          "x = the gated rnnkit cell's time")
    header = f"{'contender':34} {'us/step':>8} {'x gated':>8}"
    print(header)
    print("-" * len(header))
    xs = torch.randn(64, batch, hidden, generator=torch.Generator().manual_seed(0))
    torch_cells = {rnnkit.GRUCell: torch.nn.GRUCell, rnnkit.LSTMCell: torch.nn.LSTMCell}
    for minimal_layer, minimal, _, gated in PAIRS.values():
        torch.manual_seed(0)
        layer = minimal_layer(hidden, hidden).eval()
        cell = minimal(hidden, hidden)
        calls = {
            f"rnnkit.{gated.__name__}": Stepper(gated(hidden, hidden), xs, "cell"),
            f"torch.nn.{gated.__name__}": Stepper(torch_cells[gated](hidden, hidden), xs, "cell"),
            f"rnnkit.{minimal.__name__}": Stepper(cell, xs, "cell"),
        }
        if hasattr(layer, "stream"):  # checkouts from the minimal step kernel on
            calls[f"{minimal_layer.__name__}.stream() step"] = Stepper(layer, xs, "stream")
        calls[f"one-step {minimal_layer.__name__} call"] = Stepper(layer, xs, "call")
        calls.update(kernel_and_sequence_path(cell, xs[0]))
        medians = per_call_medians(calls, rounds, calls_per_round)
        peer = medians[f"rnnkit.{gated.__name__}"]
        for name, seconds in medians.items():
            print(f"{name:34} {seconds * 1e6:8.2f} {seconds / peer:8.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="torch.set_num_threads (default 2)")
    parser.add_argument("--lengths", type=positive_ints, default=[128, 512, 2048, 8192],
                        help="sequence lengths T, comma-separated (default 128,512,2048,8192)")
    parser.add_argument("--batch", type=positive_int, default=16, help="N (default 16)")
    parser.add_argument("--hidden", type=positive_int, default=256,
                        help="input and hidden size H (default 256)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed repeats per contender, median reported (default 5)")
    parser.add_argument("--stream-steps", type=positive_int, default=1000,
                        help="streamed steps per contender and round, each timed on its own; "
                             "--repeats rounds (default 1000)")
    parser.add_argument("--stream-batch", type=positive_int, default=1,
                        help="batch of the streamed steps (default 1)")
    parser.add_argument("--streaming-only", action="store_true",
                        help="time the streamed step only, not the training step")
    arguments = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(arguments.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}")
    if not arguments.streaming_only:
        time_training(arguments.lengths, arguments.batch, arguments.hidden, arguments.repeats)
    time_streaming(arguments.hidden, arguments.stream_steps, arguments.repeats,
                   arguments.stream_batch)


if __name__ == "__main__":
    main()
