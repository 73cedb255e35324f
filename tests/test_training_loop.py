"""The shared training pieces: the three textbook clippings (against their formulas), one
optimiser step, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnkit.training.loop import EarlyStopping, take_step
from rnnkit.training.optimization import clip_gradients

GRADIENTS = [torch.tensor([3.0, -4.0]), torch.tensor([[0.5, -12.0], [0.0, 1.0]])]  # norms 5, ~12.05


def module_with(gradients) -> nn.Module:
    module = nn.Module()
    for k, gradient in enumerate(gradients):
        parameter = nn.Parameter(torch.zeros_like(gradient))
        parameter.grad = gradient.clone()
        module.register_parameter(f"p{k}", parameter)
    return module


def grads(module):
    return [p.grad for p in module.parameters()]


def global_norm(tensors):
    return math.sqrt(sum(float((t ** 2).sum()) for t in tensors))


def test_clip_by_value_clamps_every_element():
    module = module_with(GRADIENTS)
    norm = clip_gradients(module, max_value=1.0)
    assert norm == pytest.approx(global_norm(GRADIENTS))  # logged before clipping
    for got, raw in zip(grads(module), GRADIENTS, strict=True):
        torch.testing.assert_close(got, raw.clamp(-1, 1))


def test_clip_by_norm_scales_each_tensor_on_its_own():
    module = module_with(GRADIENTS)
    clip_gradients(module, max_tensor_norm=6.0)
    for got, raw in zip(grads(module), GRADIENTS, strict=True):
        expected = raw * 6.0 / max(float(raw.norm()), 6.0)  # tf.clip_by_norm
        torch.testing.assert_close(got, expected)
    assert torch.equal(grads(module)[0], GRADIENTS[0])  # norm 5 < 6: untouched


def test_clip_by_global_norm_scales_all_tensors_together():
    module = module_with(GRADIENTS)
    total = global_norm(GRADIENTS)
    assert clip_gradients(module, max_norm=2.0) == pytest.approx(total)
    for got, raw in zip(grads(module), GRADIENTS, strict=True):
        torch.testing.assert_close(got, raw * 2.0 / total)  # tf.clip_by_global_norm
    assert global_norm(grads(module)) == pytest.approx(2.0)


@pytest.mark.parametrize("bound", ["max_norm", "max_value", "max_tensor_norm"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_clipping_bound_that_would_zero_the_gradients_is_refused(bound, value):
    module = module_with(GRADIENTS)
    with pytest.raises(ValueError, match=f"{bound.replace('_', '-')} must be a positive number or None"):
        clip_gradients(module, **{bound: value})
    for got, raw in zip(grads(module), GRADIENTS, strict=True):
        torch.testing.assert_close(got, raw)  # untouched


def test_take_step_clips_before_the_optimiser_steps():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = 1000 * model(torch.ones(4, 3)).sum()
    norm = take_step(model, loss, optimizer, clip_norm=0.5)
    assert norm > 0.5
    step = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    assert global_norm(step) == pytest.approx(0.5)  # SGD with lr 1 moves by the clipped gradient


def test_early_stopping_keeps_the_best_state_and_counts_patience():
    model = nn.Linear(1, 1)
    stopping = EarlyStopping(patience=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stopping.update(1, 0.5, model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stopping.update(2, 0.7, model)
    assert stopping.update(3, 0.6, model)  # two epochs without improvement
    stopping.restore_best(model)
    assert model.weight.item() == 1.0 and stopping.best_epoch == 1
    with pytest.raises(ValueError, match="patience must be a positive integer, got 0"):
        EarlyStopping(0)
