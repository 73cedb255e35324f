"""The shared training pieces: the three textbook clippings (against their formulas), one
optimiser step, early stopping."""

from __future__ import annotations

import math
import re

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


# The one loop (rnnkit.training.trainer): its policies, each once, on a toy regression task.

import os  # noqa: E402
import signal  # noqa: E402

from rnnkit.training.checkpoint import load_checkpoint  # noqa: E402
from rnnkit.training.loop import Interrupted  # noqa: E402
from rnnkit.training.trainer import (  # noqa: E402
    BaseTask,
    LoopConfig,
    NonFiniteLoss,
    Trainer,
    best_checkpoint_path,
    evaluating,
)


class Regression(BaseTask):
    """y = x · w* + b*; batches read in order from a fixed pool (the position resumes)."""

    def __init__(self, batch_size=8, validation=None):
        self.batch_size, self.position = batch_size, 0
        self.pool = torch.randn(4096, 3, generator=torch.Generator().manual_seed(1))
        self.scores = list(validation) if validation is not None else None
        self.x_valid = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))

    def build_model(self):
        return nn.Linear(3, 1)

    def target(self, x):
        return x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3

    def next_batch(self):
        x = self.pool[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return x, self.target(x)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, model):
        if self.scores is not None:  # a scripted validation curve
            return self.scores.pop(0)
        return float(((model(self.x_valid) - self.target(self.x_valid)) ** 2).mean())

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def loop(**settings):
    return LoopConfig(**{"steps": 12, "lr": 0.05, "eval_every": 3, "checkpoint_every": 3,
                         "device": "cpu", **settings})


def test_the_loop_learns_and_records_every_step_and_validation():
    trainer = Trainer(Regression(), loop(steps=60), show_progress=False)
    history = trainer.run()
    assert len(history.train) == len(history.gradient_norm) == 60
    assert history.validation_steps == list(range(3, 61, 3))
    assert history.validation[-1] < 0.05 * history.validation[0]


def test_accumulating_k_micro_batches_is_one_batch_k_times_larger():
    big = Trainer(Regression(batch_size=12), loop(steps=5, clip_norm=None), show_progress=False)
    small = Trainer(Regression(batch_size=4), loop(steps=5, clip_norm=None, accumulate=3),
                    show_progress=False)
    big.run(), small.run()  # the same 12 rows per step, in the same order
    for ours, theirs in zip(small.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert small.history.train == pytest.approx(big.history.train, rel=1e-5)


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights(tmp_path):
    scores = [5.0, 3.0, 4.0, 3.5, 9.0, 1.0]  # best at the 2nd validation (step 6)
    trainer = Trainer(Regression(validation=scores), loop(steps=30, patience=3),
                      checkpoint=tmp_path / "run.pt", kind="toy", show_progress=False)
    history = trainer.run()
    assert history.validation_steps == [3, 6, 9, 12, 15] and trainer.stopped_early
    assert trainer.stopping.best_epoch == 6
    best = load_checkpoint(best_checkpoint_path(tmp_path / "run.pt"), "toy")
    assert best["step"] == 6
    assert load_checkpoint(tmp_path / "run.pt", "toy")["step"] == 15  # the last, beside it
    trainer.restore_best()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best["model"][key])


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    trainer = Trainer(Regression(), loop(), checkpoint=tmp_path / "run.pt", kind="toy",
                      show_progress=False)
    trainer.run(until=6)
    saved = (tmp_path / "run.pt").read_bytes()
    with torch.no_grad():
        trainer.model.bias.fill_(float("inf"))
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLoss, match=r"the loss became inf at step 7 \(last finite loss "
                       r"at step 6; .*\); the checkpoint of step 6 in '.*run.pt' is kept"):
        trainer.run()
    assert trainer.step == 6  # nothing was updated at the failing step
    for before, after in zip(weights, trainer.model.parameters(), strict=True):
        assert torch.equal(before, after)
    assert (tmp_path / "run.pt").read_bytes() == saved


def test_resuming_a_checkpoint_continues_bit_for_bit(tmp_path):
    whole = Trainer(Regression(), loop(), show_progress=False)
    whole.run()
    first = Trainer(Regression(), loop(), checkpoint=tmp_path / "run.pt", kind="toy",
                    show_progress=False)
    first.run(until=6)
    resumed = Trainer(Regression(), loop(), checkpoint=tmp_path / "run.pt", kind="toy",
                      show_progress=False)
    resumed.load_state_dict(load_checkpoint(tmp_path / "run.pt", "toy"))
    assert resumed.step == 6
    history = resumed.run()
    assert history.train == whole.history.train and history.validation == whole.history.validation
    for ours, theirs in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_ctrl_c_finishes_the_step_checkpoints_it_and_says_how_to_resume(tmp_path):
    trainer = Trainer(Regression(), loop(), checkpoint=tmp_path / "run.pt", kind="toy",
                      resume_hint="continue with --resume {checkpoint}", show_progress=False)
    step = trainer.train_step

    def pressed_at_step_4():
        loss = step()
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the step, as a user's would
        return loss

    trainer.train_step = pressed_at_step_4
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a background job
    with pytest.raises(Interrupted, match=r"interrupted at step 4 of 12: checkpoint saved to "
                       r"'.*run.pt'; continue with --resume .*run.pt"):
        trainer.run()
    assert load_checkpoint(tmp_path / "run.pt", "toy")["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_evaluating_restores_the_mode_even_when_the_block_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("inside")
    assert model.training and torch.is_grad_enabled()


@pytest.mark.parametrize("setting, message", [
    ({"steps": 0}, "--steps must be a positive int (at most 2**63 - 1), got 0"),
    ({"accumulate": 0}, "--accumulate must be a positive int (at most 2**63 - 1), got 0"),
    ({"patience": 0}, "--patience must be a positive int (at most 2**63 - 1), or none, got 0"),
    ({"lr": 0.0}, "--lr must be positive, got 0.0"),
    ({"optimizer": "rmsprop"}, "--optimizer must be one of 'adam', 'sgd', got 'rmsprop'"),
    ({"device": "gpu"}, "--device takes auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_loop_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(Regression(), loop(**setting), show_progress=False)
