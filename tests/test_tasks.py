"""Task generators: their structure, and baselines that match the closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from rnnkit.tasks import ADDING_BASELINE_MSE, adding_problem, copy_baseline, copy_task


def test_adding_problem_marks_one_value_in_each_half_and_sums_them():
    inputs, targets = adding_problem(64, 30, torch.Generator().manual_seed(0))
    assert inputs.shape == (30, 64, 2) and targets.shape == (64,)
    markers = inputs[..., 1]
    assert torch.equal(markers.sum(0), torch.full((64,), 2.0))
    assert torch.equal(markers[:15].sum(0), torch.ones(64))  # one in the first half
    torch.testing.assert_close(targets, (inputs[..., 0] * markers).sum(0))


def test_adding_baseline_matches_one_sixth_within_three_standard_errors():
    _, targets = adding_problem(200_000, 10, torch.Generator().manual_seed(1),
                                dtype=torch.float64)
    errors = (targets - 1) ** 2  # predicting the mean, 1
    standard_error = float(errors.std()) / math.sqrt(errors.numel())
    assert abs(float(errors.mean()) - ADDING_BASELINE_MSE) < 3 * standard_error


@pytest.mark.parametrize("delay", [1, 5, 40])
def test_copy_task_layout(delay):
    inputs, targets = copy_task(16, delay, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (delay + 20, 16)
    assert ((inputs[:10] >= 1) & (inputs[:10] <= 8)).all()
    assert (inputs[10 : 9 + delay] == 0).all() and (inputs[9 + delay] == 9).all()
    assert (inputs[10 + delay :] == 0).all() and (targets[: delay + 10] == 0).all()
    assert torch.equal(targets[-10:], inputs[:10])


def test_copy_baseline_matches_the_best_memoryless_predictor():
    delay, batch = 30, 20_000
    _, targets = copy_task(batch, delay, torch.Generator().manual_seed(2))
    # The best guess that ignores the input: each step's symbol frequencies over the batch.
    counts = torch.nn.functional.one_hot(targets, 10).double().mean(1)  # (T, 10)
    log_likelihood = torch.log(counts.clamp_min(1e-300)).gather(1, targets)  # (T, N)
    per_sequence = -log_likelihood.mean(0)  # (N,) cross-entropy per step
    standard_error = float(per_sequence.std()) / math.sqrt(batch)
    # Frequencies estimated on the same batch bias the cross-entropy low by about
    # (8 - 1) / (2 N) nats at each of the 10 data positions (of T + 20): allow twice that.
    plug_in_bias = 10 * 7 / (2 * batch) / (delay + 20)
    difference = abs(float(per_sequence.mean()) - copy_baseline(delay))
    assert difference < 3 * standard_error + 2 * plug_in_bias
    assert copy_baseline(delay) == pytest.approx(10 * math.log(8) / 50)


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="length must be an integer >= 2, got 1"):
        adding_problem(4, 1)
    with pytest.raises(ValueError, match="delay must be an integer >= 1, got 0"):
        copy_task(4, 0)
