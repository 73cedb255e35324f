"""Synthetic long-memory tasks with known baselines: the adding problem and the copy task.

Both are generated on the fly from a ``torch.Generator``, so a seed fixes every batch. Inputs are
time-major, ``(T, N, features)``, as rnnkit's layers take them by default.

**Adding problem** (Hochreiter & Schmidhuber 1997; the form of Le et al. 2015 and Arjovsky et al.
2016). Each of ``T`` steps carries two numbers: a value ``u_t ~ U(0, 1)`` and a marker ``m_t``.
Exactly two markers are 1, one in each half of the sequence; the target is the sum of the two
marked values. Predicting the constant 1 (the sum's mean) gives the mean squared error of the
sum's variance, ``2 · 1/12 = 1/6 ≈ 0.167``: that is the baseline a model must beat, and beating
it requires remembering the first marked value for up to ``T`` steps.

**Copy task** (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016). Symbols: 0 is
blank, 1-8 are data, 9 is the delimiter. The input is 10 data symbols drawn uniformly from 1-8,
then ``T - 1`` blanks, the delimiter, and 10 more blanks: ``T + 20`` steps. The target is blank
for the first ``T + 10`` steps, then the 10 data symbols. A model without memory can at best
output blanks and then guess uniformly among the 8 data symbols, for a cross-entropy per step of
``10 · ln 8 / (T + 20)``: the baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ADDING_BASELINE_MSE = 1.0 / 6.0
COPY_SYMBOLS = 10  # blank, 8 data symbols, delimiter
COPY_LENGTH = 10  # data symbols to remember
COPY_BLANK, COPY_DELIMITER = 0, 9


def copy_baseline(delay: int) -> float:
    """Cross-entropy per step (nats) of the best memoryless guess: ``10 ln 8 / (T + 20)``."""
    return COPY_LENGTH * math.log(8) / (delay + 2 * COPY_LENGTH)


def _check(name: str, value: int, smallest: int) -> None:
    if not isinstance(value, int) or value < smallest:
        raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")


def adding_problem(batch_size: int, length: int, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A batch of the adding problem.

    Returns inputs ``(T, N, 2)`` (value, marker) and targets ``(N,)`` (the sum of the two marked
    values); one marker lies in ``[0, T // 2)`` and the other in ``[T // 2, T)``.
    """
    _check("length", length, 2)
    _check("batch_size", batch_size, 1)
    values = torch.rand(length, batch_size, generator=generator, dtype=dtype)  # (T, N)
    half = length // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, length, (batch_size,), generator=generator)
    markers = torch.zeros(length, batch_size, dtype=dtype)
    samples = torch.arange(batch_size)
    markers[first, samples] = 1
    markers[second, samples] = 1
    targets = values[first, samples] + values[second, samples]  # (N,)
    return torch.stack([values, markers], dim=2), targets


def copy_task(batch_size: int, delay: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A batch of the copy task with ``delay`` = T.

    Returns input symbols ``(T + 20, N)`` and target symbols ``(T + 20, N)``, both int64 in
    ``[0, 10)``; one-hot encode the inputs (``torch.nn.functional.one_hot``) to feed a layer.
    """
    _check("delay", delay, 1)
    _check("batch_size", batch_size, 1)
    total = delay + 2 * COPY_LENGTH
    data = torch.randint(1, 9, (COPY_LENGTH, batch_size), generator=generator)  # (10, N)
    inputs = torch.full((total, batch_size), COPY_BLANK, dtype=torch.int64)
    inputs[:COPY_LENGTH] = data
    inputs[COPY_LENGTH + delay - 1] = COPY_DELIMITER
    targets = torch.full((total, batch_size), COPY_BLANK, dtype=torch.int64)
    targets[-COPY_LENGTH:] = data
    return inputs, targets
