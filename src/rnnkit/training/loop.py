"""The pieces of a training loop every app shares: one optimiser step, early stopping, Ctrl-C.

Apps differ in how they cut data into batches (truncated BPTT over text, windows of a series,
generated tasks); what happens to a batch's loss does not, so it lives here once.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from rnnkit.training.optimization import clip_gradients


def take_step(model: nn.Module, loss: Tensor, optimizer, clip_norm: float | None = None,
              clip_value: float | None = None, schedule=None,
              clip_tensor_norm: float | None = None) -> float:
    """Backpropagate ``loss``, clip (by value, by norm per tensor, by global norm: each if
    given; see `clip_gradients`), step the optimiser and the schedule; returns the global
    gradient norm *before* clipping, for logging."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return apply_gradients(model, optimizer, clip_norm, clip_value, schedule, clip_tensor_norm)


def apply_gradients(model: nn.Module, optimizer, clip_norm: float | None = None,
                    clip_value: float | None = None, schedule=None,
                    clip_tensor_norm: float | None = None) -> float:
    """The second half of `take_step`, for gradients already accumulated in ``model``: clip,
    step the optimiser and the schedule; returns the global gradient norm before clipping."""
    norm = clip_gradients(model, clip_norm, clip_value, clip_tensor_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return norm


class EarlyStopping:
    """Keeps the weights of the best validation loss so far; says when ``patience`` evaluations
    in a row brought no improvement (by more than ``min_delta``); ``patience=None`` never stops
    (the best weights are still kept)."""

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.best_state = math.inf, 0, None
        self.waited = 0

    def update(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record the validation ``loss`` after ``epoch``; True when training should stop."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.waited = loss, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.waited += 1
        return self.patience is not None and self.waited >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C at a step boundary; ``str()`` is the one line to print
    (where the run was saved and how to continue it)."""


class InterruptRequest:
    """Whether Ctrl-C was pressed inside `interrupt_between_steps`."""

    requested: bool = False


@contextmanager
def interrupt_between_steps(what: str = "training") -> Iterator[InterruptRequest]:
    """Turn the first Ctrl-C (SIGINT) into a request that the loop reads between steps.

    A step interrupted half-way would leave the weights updated but the step count and carried
    state not, so a checkpoint taken then could not resume exactly; and an interrupt inside a
    checkpoint write surfaces as a traceback from deep in ``torch.save``. So the first Ctrl-C
    only sets ``requested`` (and says so on stderr); the loop finishes its step, saves and
    stops. A second Ctrl-C stops at once (default behaviour). Off the main thread, where Python
    cannot install signal handlers, Ctrl-C keeps its default behaviour.
    """
    request = InterruptRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_interrupt(signum, frame) -> None:
        request.requested = True
        print(f"\nrnnkit: stopping {what} after this step (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
