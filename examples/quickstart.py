"""Train a small rnnkit LSTM on generated data (the adding problem) and print its loss.

Each input sequence has two channels: random numbers in U(0, 1) and a marker that is 1 at
exactly two positions. The target is the sum of the two marked numbers. Always predicting the
mean (1) gives mean squared error 1/6 ~ 0.167: a model must remember the marked numbers across
the sequence to do better.

    python examples/quickstart.py [--steps 500] [--length 30] [--cell lstm|gru|rnn] [--peephole]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import rnnkit

BASELINE_MSE = 1 / 6  # error of always predicting E[sum] = 1


def adding_batch(batch: int, length: int, generator: torch.Generator):
    """(x (T, N, 2), y (N,)): numbers and markers, and the sum of the two marked numbers."""
    numbers = torch.rand(length, batch, generator=generator)
    marks = torch.zeros(length, batch)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    marks[first, torch.arange(batch)] = 1.0
    marks[second, torch.arange(batch)] = 1.0
    return torch.stack([numbers, marks], dim=2), (numbers * marks).sum(dim=0)


class Regressor(nn.Module):
    """A recurrent layer read out at the last step by a linear layer."""

    def __init__(self, cell: str, hidden_size: int, peephole: bool):
        super().__init__()
        variants = {"peephole": peephole, "forget_bias": 1.0} if cell == "lstm" else {}
        layer_class = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}[cell]
        self.recurrent = layer_class(2, hidden_size, **variants)
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, x):
        output, _ = self.recurrent(x)  # (T, N, H)
        return self.readout(output[-1]).squeeze(1)  # (N,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    parser.add_argument("--peephole", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = Regressor(args.cell, args.hidden, args.peephole)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    test_x, test_y = adding_batch(1000, args.length, torch.Generator().manual_seed(12345))
    print(f"adding problem, T={args.length}: {model.recurrent}")
    print(f"baseline (always predict 1): test MSE {BASELINE_MSE:.4f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = adding_batch(64, args.length, generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                test_mse = nn.functional.mse_loss(model(test_x), test_y).item()
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  train MSE {loss.item():.4f}  test MSE {test_mse:.4f}  "
                  f"({elapsed:.1f} s)", flush=True)
    verdict = "below" if test_mse < BASELINE_MSE / 5 else "not yet below"
    print(f"final test MSE {test_mse:.4f}: {verdict} baseline/5 = {BASELINE_MSE / 5:.4f}")


if __name__ == "__main__":
    main()
