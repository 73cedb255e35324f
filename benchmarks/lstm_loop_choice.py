"""The native LSTM's two loops against each other and against torch.nn, at chosen sizes: the
resident loop (each thread's share of W_hh packed once per call, one barrier a step) and the
sequence loop (a product and the gate math per step, each a fork and join), with the rules that
pick between them and torch's kernel ("auto") beside them.

    python benchmarks/lstm_loop_choice.py infer|train T NxH[,NxH...] [--rounds 12] [--threads 2]
        [--variants auto,native,sequence,resident] [--input-grad]

For each ``NxH`` (batch x hidden, input size = hidden) these run in turn, the order reversed
every round, and the median milliseconds are printed with each one's time over torch.nn's:

- ``torch.nn``: torch.nn.LSTM (oneDNN's fused LSTM on the CPU);
- ``auto``: ``rnnkit.from_torch`` of it, the default backend (inference may run torch's kernel:
  `rnnkit.engine.TORCH_LSTM_MIN_BATCH`);
- ``native``: the same layer on backend "native", the kernels' own rules
  (``lstm_forward_runs_resident``, ``lstm_backward_runs_resident``);
- ``sequence``: native with every loop on the sequence loop (``resident_max_bytes_per_thread`` 0);
- ``resident``: native with every loop on resident weights, whatever their size.

The figures of docs/benchmarks.md, "Issue 19, eighth part".
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from shape_sweep import time_call  # benchmarks/, this script's folder

import rnnkit
from rnnkit.engine.native import build
from rnnkit.training.devices import keep_freed_memory

UNBOUNDED = 1 << 40
VARIANTS = ("auto", "native", "sequence", "resident")


def variant_list(text: str) -> tuple[str, ...]:
    """``"auto,native"`` -> ``("auto", "native")``, each one of `VARIANTS`."""
    names = tuple(name.strip() for name in text.split(","))
    if not names or any(name not in VARIANTS for name in names):
        raise argparse.ArgumentTypeError(
            f"variants must be a comma-separated list of {', '.join(VARIANTS)}, got {text!r}")
    return names


def size_list(text: str) -> list[tuple[int, int]]:
    """``"4x512,16x1024"`` -> ``[(4, 512), (16, 1024)]``."""
    try:
        sizes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be NxH[,NxH...] with N, H >= 1, got {text!r}")
    return sizes  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["infer", "train"])
    parser.add_argument("steps", type=int, help="sequence length T")
    parser.add_argument("sizes", type=size_list, help="NxH[,NxH...]")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", type=variant_list, default=VARIANTS,
                        help=f"which of {','.join(VARIANTS)} run beside torch.nn (default: all)")
    parser.add_argument("--input-grad", action="store_true",
                        help="training also asks for the input's gradient (a stacked layer's)")
    arguments = parser.parse_args()
    if arguments.steps < 2 or arguments.rounds < 3:
        parser.error(f"T must be >= 2 and --rounds >= 3, got {arguments.steps} and "
                     f"{arguments.rounds}")
    kernels = build.kernels()
    if kernels is None:
        raise SystemExit("the native kernels did not build: nothing to compare")
    torch.set_num_threads(arguments.threads)
    keep_freed_memory()
    default_bound = kernels.resident_max_bytes_per_thread()
    bounds = {"sequence": 0, "resident": UNBOUNDED}

    def configure(name: str) -> None:
        kernels.set_resident_max_bytes_per_thread(bounds.get(name, default_bound))

    try:
        for batch, hidden in arguments.sizes:
            medians = time_size(arguments.mode, arguments.steps, batch, hidden, arguments.rounds,
                                arguments.variants, configure, arguments.input_grad)
            peer = medians["torch.nn"]
            print(f"{arguments.mode} (T, N, H) = ({arguments.steps}, {batch}, {hidden}): "
                  + ", ".join(f"{name} {ms:.2f} ms ({ms / peer:.3f})"
                              for name, ms in medians.items()), flush=True)
    finally:
        kernels.set_resident_max_bytes_per_thread(default_bound)


def time_size(mode: str, steps: int, batch: int, hidden: int, rounds: int,
              variants: tuple[str, ...], configure: Callable[[str], None],
              input_grad: bool = False) -> dict[str, float]:
    """Median milliseconds of torch.nn and each variant at one size, the first two rounds left
    out."""
    torch.manual_seed(0)
    peer = torch.nn.LSTM(hidden, hidden)
    modules: dict[str, torch.nn.Module] = {"torch.nn": peer}
    for name in variants:
        modules[name] = rnnkit.from_torch(peer)
        if name != "auto":
            modules[name].backend = "native"
    x = torch.randn(steps, batch, hidden, requires_grad=input_grad and mode == "train")
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for round_index in range(rounds):
        order = list(modules) if round_index % 2 else list(reversed(modules))
        for name in order:
            configure(name)
            elapsed = time_call(mode, modules[name], x)
            if round_index >= 2:
                samples[name].append(elapsed * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    main()
