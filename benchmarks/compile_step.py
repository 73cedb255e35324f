"""torch.compile of a model that contains rnnkit layers: compile time, and the compiled training
step's time against eager, next to the same model on torch.nn.LSTM, in one process.

The model is a character language model's shape (Embedding 96 -> 2-layer LSTM 256 -> Linear
96), one training step = forward, cross-entropy, backward, SGD update, at (T, N) = (100, 32).
Each variant is compiled with the default backend (inductor) and ``fullgraph=True`` where it
can be (torch.nn.LSTM needs dynamo's ``allow_rnn``); the first compiled call's time is the
compile time; steps are then timed interleaved, median of ``REPEATS``.

    python benchmarks/compile_step.py

Results: docs/benchmarks.md ("torch.compile of rnnkit layers").
"""

from __future__ import annotations

import statistics
import time

import torch
import torch._dynamo
from torch import nn

import rnnkit

VOCABULARY, HIDDEN, LAYERS, STEPS, BATCH, REPEATS = 96, 256, 2, 100, 32, 9


class CharModel(nn.Module):
    def __init__(self, recurrent: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, HIDDEN)
        self.rnn = recurrent
        self.head = nn.Linear(HIDDEN, VOCABULARY)

    def forward(self, tokens):
        output, _ = self.rnn(self.embed(tokens))
        return self.head(output)


def training_step(model: nn.Module, optimiser, tokens, targets):
    def step():
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        return loss
    return step


def main() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCABULARY, (STEPS, BATCH))
    targets = torch.randint(0, VOCABULARY, (STEPS, BATCH))
    recurrent = {
        "torch.nn.LSTM": lambda: nn.LSTM(HIDDEN, HIDDEN, LAYERS),
        "rnnkit.LSTM": lambda: rnnkit.LSTM(HIDDEN, HIDDEN, LAYERS),
        "rnnkit.LSTM peephole": lambda: rnnkit.LSTM(HIDDEN, HIDDEN, LAYERS, peephole=True),
    }
    runs, compile_seconds = {}, {}
    for name, make in recurrent.items():
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = CharModel(make())
            optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
            if mode == "compiled":
                torch._dynamo.config.allow_rnn = name.startswith("torch.nn")
                model = torch.compile(model, fullgraph=True)
            step = training_step(model, optimiser, tokens, targets)
            start = time.perf_counter()
            step()  # the first call compiles
            if mode == "compiled":
                compile_seconds[name] = time.perf_counter() - start
            runs[(name, mode)] = step
    times: dict = {key: [] for key in runs}
    for _ in range(REPEATS):
        for key, step in runs.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    print(f"training step of Embedding -> {LAYERS}-layer LSTM {HIDDEN} -> Linear at "
          f"(T, N) = ({STEPS}, {BATCH}), median of {REPEATS}, torch {torch.__version__}")
    print(f"{'model':24s} {'eager ms':>9s} {'compiled ms':>12s} {'compiled/eager':>15s} "
          f"{'compile s':>10s}")
    for name in recurrent:
        eager = statistics.median(times[(name, "eager")]) * 1e3
        compiled = statistics.median(times[(name, "compiled")]) * 1e3
        print(f"{name:24s} {eager:9.1f} {compiled:12.1f} {compiled / eager:15.2f} "
              f"{compile_seconds[name]:10.1f}")


if __name__ == "__main__":
    main()
