"""The training step of an LSTM (GRU, RNN) with each normalisation/regularisation switch,
against the plain layer, interleaved in one process (median of repeats): a quicker,
narrower view than `rnnkit bench`, without the reference-loop peers that share its caches.

    python benchmarks/switch_overhead.py --size 100,32,256 --repeats 15 [--family gru]

Like the rnnkit commands, it first has malloc keep freed memory
(`rnnkit.training.devices.keep_freed_memory`); ``--default-malloc`` times glibc's defaults,
what a script that does not ask gets.

Results in docs/benchmarks.md ("Issue 18, second part").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.training.devices import describe_allocator, keep_freed_memory

SWITCHES = {
    "plain": {},
    "layer_norm": {"layer_norm": True},
    "zoneout": {"zoneout": 0.1},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "weight_drop": {"weight_drop": 0.5},
    "all four": {"layer_norm": True, "recurrent_dropout": 0.25, "zoneout": 0.1,
                 "weight_drop": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="200,1,128", help="T,N,H")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--family", choices=("lstm", "gru", "rnn"), default="lstm")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is")
    arguments = parser.parse_args()
    if not arguments.default_malloc:
        keep_freed_memory()
    layer = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}[arguments.family]
    steps, batch, hidden = (int(v) for v in arguments.size.split(","))
    torch.manual_seed(0)
    x = torch.randn(steps, batch, hidden)
    models = {name: layer(hidden, hidden, **options) for name, options in SWITCHES.items()}

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        output, _ = model(x)
        output.sum().backward()

    for model in models.values():  # warm up: kernels built, caches filled
        step(model)
        step(model)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(arguments.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            step(model)
            samples[name].append(time.perf_counter() - start)
    plain = statistics.median(samples["plain"])
    print(f"{arguments.family.upper()} training step at (T, N, H) = {arguments.size}, median of "
          f"{arguments.repeats}, {torch.get_num_threads()} threads; {describe_allocator()}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:18s} {median * 1e3:9.2f} ms  {median / plain:5.2f}x plain")


if __name__ == "__main__":
    main()
