"""The one training loop every app runs: `Trainer` and the settings it reads, `LoopConfig`.

An app supplies a `TrainingTask`: the model to build, its batches, its loss and its validation
score. The loop owns everything else, once:

- seeding (``torch.manual_seed(seed)`` before the model is built, so a seed fixes the weights),
  device placement (model, and every tensor of every batch), the optimiser and its schedule;
- each optimiser step: ``accumulate`` micro-batches, each loss checked finite *before* its
  backward pass (the non-finite policy below), gradients summed as ``∇ (1/k) Σ_j L_j`` (so k
  micro-batches of n rows equal one batch of k·n rows), clipped (value, tensor norm, global
  norm; `clip_gradients`), then ``optimizer.step()`` and ``schedule.step()``;
- evaluation every ``eval_every`` steps and at the last, in evaluation mode (`evaluating`),
  keeping the best validation weights (in memory, and as ``<checkpoint>.best.pt`` beside the
  checkpoint) and stopping early after ``patience`` evaluations without improvement;
- checkpoints every ``checkpoint_every`` steps and at the end, atomically, holding everything the
  next step depends on (model, optimiser, schedule, step, history, random state, early stopping,
  the task's own state: a stream position, a carried recurrent state): a resumed run continues
  bit for bit;
- the non-finite policy: a NaN or infinite loss stops the run at that step, before it updates
  anything; `NonFiniteLoss` names the step, the last finite one and the checkpoint kept (a state
  that became non-finite is never written: the last finite checkpoint stays). Exit 1 on the
  command line;
- Ctrl-C: the first finishes the step under way, checkpoints it and raises `Interrupted`
  (exit 130) saying how to continue;
- progress on stderr and a metrics log (JSON lines of every evaluation in the run folder);
- several processes (``torchrun``): the model wrapped in ``DistributedDataParallel``, the task's
  batches sharded by rank (the task's job: it knows its batch dimension), flags (a NaN, a Ctrl-C)
  agreed by all ranks each step, and only rank 0 prints and writes.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rnnkit.configuration import check_config, parse_bound_or_off
from rnnkit.training.checkpoint import (
    NonFiniteState,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from rnnkit.training.devices import move_to, parse_device, resolve_device
from rnnkit.training.distributed import Distributed
from rnnkit.training.loop import (
    EarlyStopping,
    Interrupted,
    apply_gradients,
    interrupt_between_steps,
)
from rnnkit.training.metrics import MetricsLog
from rnnkit.training.optimization import (
    OPTIMIZERS,
    SCHEDULES,
    check_clipping,
    make_optimizer,
    make_schedule,
)
from rnnkit.training.progress import Progress

# The clipping options: 0 on the command line is off (None); a bound of 0 would zero every
# gradient.
CLIP_NORM = {"parse": parse_bound_or_off, "metavar": "BOUND"}
CLIP_BOUND = {"check": "positive_real", "metavar": "BOUND"}


@dataclass
class LoopConfig:
    """How the loop trains; every app embeds one (with its own defaults)."""

    steps: int = field(default=1000, metadata={"check": "positive"})  # total optimiser steps (a
        # resumed run continues up to this)
    lr: float = 1e-3  # learning rate (peak, with a schedule)
    optimizer: str = field(default="adam", metadata={"choices": tuple(OPTIMIZERS)})
        # adam | sgd (momentum 0.9)
    schedule: str = field(default="constant", metadata={"choices": tuple(SCHEDULES)})
        # constant | cosine | linear (decay to 0 over --steps)
    clip_norm: float | None = field(default=1.0, metadata=CLIP_NORM)  # global-norm clipping bound
        # (tf.clip_by_global_norm); none: off
    clip_value: float | None = field(default=None, metadata=CLIP_BOUND)  # per-element clipping
        # bound (tf.clip_by_value); none: off
    clip_tensor_norm: float | None = field(default=None, metadata=CLIP_BOUND)
        # per-tensor norm bound (tf.clip_by_norm); none: off
    accumulate: int = field(default=1, metadata={"check": "positive"})  # micro-batches summed into
        # each optimiser step (gradient accumulation)
    eval_every: int = field(default=100, metadata={"check": "positive"})  # optimiser steps between
        # validations (and one at the last step)
    patience: int | None = field(default=None, metadata={"check": "positive"})
        # validations without improvement before stopping; none: never
    min_steps: int = 0  # optimiser steps before early stopping may end a run
    checkpoint_every: int = field(default=500, metadata={"check": "positive"})
        # optimiser steps between checkpoints (and one at the end)
    seed: int = field(default=0, metadata={"check": "seed"})  # seeds the weights, the batches and
        # dropout
    device: str = field(default="auto", metadata={"parse": parse_device})
        # auto (CUDA when available) | cpu | cuda | cuda:N

    def check(self) -> None:
        """``ValueError`` for what the fields' metadata cannot say (see `check_config`, which
        checks those first and then calls this)."""
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or \
                not self.lr > 0:
            # (an infinite rate is let through: the non-finite policy stops it at step 1)
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or \
                self.min_steps < 0:
            raise ValueError(f"--min-steps must be a non-negative integer, got "
                             f"{self.min_steps!r}")
        check_clipping(clip_norm=self.clip_norm, clip_value=self.clip_value,
                       clip_tensor_norm=self.clip_tensor_norm)


class NonFiniteLoss(ValueError):
    """Training produced a NaN or infinite loss, or weights or optimiser state that are not
    finite; the message says where, which checkpoint is kept, and what to try."""


class TrainingTask(Protocol):
    """What an app supplies to `Trainer`; everything else is the loop's.

    ``next_batch`` is the app's batching (truncated-BPTT windows, shuffled epochs of windows,
    freshly generated sequences), already this rank's shard when several processes train; the
    loop moves its tensors to the device. ``loss`` is the mean loss of one batch (a scalar
    tensor). ``evaluate`` scores the model on held-out data (lower is better; called in
    evaluation mode, without gradients). ``state_dict``/``load_state_dict`` hold what the
    batching needs to resume exactly (a position, a carried state, a generator), the same for
    any number of processes.
    """

    def build_model(self) -> nn.Module: ...
    def next_batch(self) -> Any: ...
    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...
    def evaluate(self, model: nn.Module) -> float: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class BaseTask:
    """A `TrainingTask` with no batching state and no sharding; apps override what they need."""

    device: torch.device = torch.device("cpu")  # set by the Trainer before the first batch
    distributed: Distributed = Distributed()  # the Trainer's, set before the first batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@dataclass
class TrainingHistory:
    """Per-step training loss (the mean over the step's micro-batches) and gradient norm (before
    clipping), and the validation score at the steps it was measured."""

    train: list[float] = field(default_factory=list)
    gradient_norm: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode and no gradients inside; the model's previous mode restored after, also
    when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def best_checkpoint_path(checkpoint: str | Path) -> Path:
    """Where the best-validation checkpoint of ``checkpoint`` lives: ``lm.pt`` -> ``lm.best.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.best{checkpoint.suffix or '.pt'}")


class Trainer:
    """One training run of ``task`` under ``config`` (kept as ``loop``); `run` trains, and
    `load_state_dict` of a checkpoint's payload continues a saved run.

    ``kind`` and ``payload`` are what the app puts in its checkpoints (its tool name and its
    configuration, vocabulary, ...) beside the loop's state; ``resume_hint`` is the sentence
    that tells a user how to continue an interrupted run (``{checkpoint}`` is replaced by the
    checkpoint's path). ``metrics`` is an open `MetricsLog` that every validation is written to
    (with ``metrics_fields`` beside the loop's values); ``distributed`` the run's processes (from
    `setup_distributed`; one process on ``config.device`` when not given). Progress goes to
    stderr unless ``show_progress`` is False or ``quiet``; ``unit_of_work`` turns the steps per
    second into the rate the app's users think in (tokens per second).
    """

    def __init__(self, task: TrainingTask, config: LoopConfig, *,
                 checkpoint: str | Path | None = None, kind: str = "run",
                 payload: Callable[[], dict] | None = None, description: str = "training",
                 resume_hint: str = "", metrics: MetricsLog | None = None,
                 metrics_fields: dict | None = None, show_progress: bool = True,
                 quiet: bool = False, distributed: Distributed | None = None,
                 unit_of_work: Callable[[float], str] | None = None) -> None:
        check_config(config)
        self.task, self.loop, self.kind = task, config, kind
        self.payload = payload or dict
        self.description, self.resume_hint = description, resume_hint
        self.metrics, self.metrics_fields = metrics, metrics_fields or {}
        self.show_progress, self.quiet = show_progress, quiet
        self.distributed = distributed or Distributed(device=resolve_device(config.device))
        self.unit_of_work = unit_of_work
        self.checkpoint_path = Path(checkpoint) if checkpoint else None
        if self.checkpoint_path is not None:
            remove_stale_temporaries(self.checkpoint_path)  # left by a killed run
        self.saved_step: int | None = None  # the step of the checkpoint on disk, if any
        self.device = self.distributed.device
        task.device, task.distributed = self.device, self.distributed
        torch.manual_seed(config.seed)
        self.model = task.build_model().to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, config.lr)
        self.schedule = make_schedule(self.optimizer, config.schedule, config.steps)
        self.step = 0
        self.history = TrainingHistory()
        self.stopping = EarlyStopping(config.patience)
        self.stopped_early = False
        self.random_state = torch.get_rng_state()
        self._trained = self._wrap(self.model)

    # -- the run's state ----------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the loss runs through: ``DistributedDataParallel`` over several processes
        (it averages the gradients of the ranks' shards), the model itself otherwise."""
        if self.distributed.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @property
    def is_main(self) -> bool:
        return self.distributed.is_main

    def state_dict(self) -> dict:
        """Everything the next step depends on; written by rank 0 with the task's global state."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "history": asdict(self.history),
            "stopping": {"best_loss": self.stopping.best_loss,
                         "best_step": self.stopping.best_epoch, "waited": self.stopping.waited},
            "task": self.task.state_dict(),
            "random_state": torch.get_rng_state(),
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue the run whose checkpoint payload is ``saved`` (from `load_checkpoint`)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.step = int(saved["step"])
        self.saved_step = self.step
        self.history = TrainingHistory(**saved["history"])
        stopping = saved["stopping"]
        self.stopping.best_loss = float(stopping["best_loss"])
        self.stopping.best_epoch = int(stopping["best_step"])
        self.stopping.waited = int(stopping["waited"])
        self.task.load_state_dict(saved["task"])
        self.random_state = saved["random_state"]
        if self.checkpoint_path is not None:
            kept = self._best_in(best_checkpoint_path(self.checkpoint_path))
            if kept is not None:
                self.stopping.best_state = kept["model"]

    def continue_in(self, checkpoint: str | Path) -> None:
        """Write this resumed run's checkpoints to ``checkpoint`` from now on, and make the best
        file beside it hold this run's best weights or nothing: a stale one there (another
        run's, or steps past the resumed checkpoint) would otherwise pass for this run's best."""
        resumed, self.checkpoint_path = self.checkpoint_path, Path(checkpoint)
        best = best_checkpoint_path(self.checkpoint_path)
        if self._best_in(best) is not None:
            return
        if self.step == self.stopping.best_epoch and self.history.validation_steps:
            self.save(best)  # the resumed weights are the best so far (every rank: collective)
            return
        if not self.is_main:
            return
        own = best_checkpoint_path(resumed) if resumed is not None else best
        if own != best and self._best_in(own) is not None:
            shutil.copyfile(own, best)
        else:
            best.unlink(missing_ok=True)

    def _best_in(self, path: Path) -> dict | None:
        """The checkpoint at ``path`` if it is this run's best (its step and score), else None:
        another run's, or one from steps past the resumed checkpoint, is not."""
        if not path.is_file() or not math.isfinite(self.stopping.best_loss):
            return None
        try:
            kept = load_checkpoint(path, self.kind)
            same = kept["step"] == self.stopping.best_epoch and \
                kept["stopping"]["best_loss"] == self.stopping.best_loss
        except (ValueError, KeyError, TypeError):
            return None
        return kept if same else None

    def kept_checkpoint(self) -> str:
        """Which checkpoint a stopped run leaves, in words."""
        if self.checkpoint_path is None:
            return "no checkpoint is written (no checkpoint path)"
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the checkpoint of step {self.saved_step} in {str(self.checkpoint_path)!r} is kept"

    def save(self, path: Path | None = None) -> None:
        """Checkpoint the run (rank 0 writes; nothing without a checkpoint path); `NonFiniteLoss`,
        with nothing written, when the weights or the optimiser state are not finite."""
        path = path or self.checkpoint_path
        if path is None:
            return
        state = self.state_dict()  # every rank: the task may gather its shards
        if not self.is_main:
            if path == self.checkpoint_path:
                self.saved_step = self.step
            return
        try:
            save_checkpoint(path, self.kind, {**self.payload(), **state})
        except NonFiniteState as error:
            raise NonFiniteLoss(
                f"the model's state became NaN or infinite by step {self.step} ({error.key}), "
                f"so it was not saved; {self.kept_checkpoint()}. Try a smaller --lr, or "
                "--clip-norm 1.0.") from None
        if path == self.checkpoint_path:
            self.saved_step = self.step

    # -- training -----------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimiser step over ``accumulate`` micro-batches; returns its mean loss."""
        accumulate = self.loop.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulate):
            batch = move_to(self.task.next_batch(), self.device)
            last = micro == accumulate - 1
            # Over several processes the gradients are averaged once, at the last micro-batch.
            synchronised = nullcontext() if last or not hasattr(self._trained, "no_sync") \
                else self._trained.no_sync()
            with synchronised:
                loss = self.task.loss(self._trained, batch)
                value = loss.item()
                self._stop_unless_finite(value)
                (loss if accumulate == 1 else loss / accumulate).backward()
            total += value
        norm = apply_gradients(self.model, self.optimizer, self.loop.clip_norm,
                               self.loop.clip_value, self.schedule, self.loop.clip_tensor_norm)
        self.step += 1
        loss_value = total if accumulate == 1 else total / accumulate
        self.history.train.append(loss_value)
        self.history.gradient_norm.append(norm)
        return loss_value

    def _stop_unless_finite(self, value: float) -> None:
        # Every rank stops at the same step, or the others would wait for it forever.
        finite = not self.distributed.any_flag(not math.isfinite(value))
        if finite:
            return
        # Every recorded loss is finite (this check runs before recording), so the last finite
        # one is the last step taken.
        norm = self.history.gradient_norm[-1] if self.history.gradient_norm else float("nan")
        shown = value if not math.isfinite(value) else "non-finite on another process"
        raise NonFiniteLoss(
            f"the loss became {shown} at step {self.step + 1} (last finite loss at step "
            f"{self.step or 'none'}; gradient norm before clipping at the last step {norm:.3g}); "
            f"{self.kept_checkpoint()}. Try a smaller --lr, or --clip-norm 1.0.")

    def validate(self) -> float:
        """Score the model on the task's held-out data; track the best (saving it beside the
        checkpoint) and log the evaluation."""
        with evaluating(self.model):
            score = float(self.task.evaluate(self.model))
        self.history.validation_steps.append(self.step)
        self.history.validation.append(score)
        improved_before = self.stopping.best_epoch
        if self.stopping.update(self.step, score, self.model) and \
                self.step >= self.loop.min_steps:
            self.stopped_early = True
        if self.stopping.best_epoch != improved_before and self.checkpoint_path is not None:
            self.save(best_checkpoint_path(self.checkpoint_path))
        if self.metrics is not None and self.is_main:
            since = self.history.validation_steps[-2] if len(self.history.validation_steps) > 1 \
                else 0
            recent = self.history.train[since:] or [math.nan]
            self.metrics.write(self.step, **self.metrics_fields,
                               train_loss=sum(recent) / len(recent),
                               validation=score, best_validation=self.stopping.best_loss,
                               best_step=self.stopping.best_epoch,
                               lr=self.optimizer.param_groups[0]["lr"])
        return score

    def run(self, until: int | None = None) -> TrainingHistory:
        """Train up to ``config.steps`` (or stop after step ``until``, or early), validating and
        checkpointing on the way.

        Ctrl-C stops after the step under way: the run is checkpointed at that step and
        `Interrupted` raised, whose message says where and how to resume.
        """
        last = self.loop.steps if until is None else min(until, self.loop.steps)
        torch.set_rng_state(self.random_state)
        self.model.train()
        progress = Progress(self.loop.steps, self.step, self.description, quiet=self.quiet,
                            enabled=self.is_main) if self.show_progress else None
        try:
            with interrupt_between_steps(self.description) as interrupt:
                self._run_steps(last, progress, interrupt)
        finally:
            if progress is not None:
                progress.close()
        return self.history

    def _interrupt_requested(self, interrupt) -> bool:
        return self.distributed.any_flag(interrupt.requested)  # Ctrl-C reaches every rank

    def _run_steps(self, last: int, progress, interrupt) -> None:
        started, first_step = time.perf_counter(), self.step
        while self.step < last and not self.stopped_early:
            if self._interrupt_requested(interrupt):
                raise self._interrupted()
            loss = self.train_step()
            final = self.step == self.loop.steps
            if self.step % self.loop.eval_every == 0 or final:
                self.validate()
            if self.step % self.loop.checkpoint_every == 0 or final or self.stopped_early:
                self.save()
            if progress is not None:
                rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
                validation = (f" val {self.history.validation[-1]:.4g} (best "
                              f"{self.stopping.best_loss:.4g})" if self.history.validation else "")
                work = self.unit_of_work(rate) if self.unit_of_work else f"{rate:.1f} steps/s"
                progress.update(1, f"loss {loss:.4g}{validation} | {work}")
        if self._interrupt_requested(interrupt) and self.step < self.loop.steps \
                and not self.stopped_early:
            raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        """Checkpoint the run at the current step (if not already) and say how to continue."""
        if self.checkpoint_path is None:
            return Interrupted(f"interrupted at step {self.step}; nothing saved (no checkpoint "
                               "path)")
        if self.saved_step != self.step:
            self.save()
        hint = self.resume_hint.format(checkpoint=self.checkpoint_path)
        return Interrupted(
            f"interrupted at step {self.step} of {self.loop.steps}: checkpoint saved to "
            f"{str(self.checkpoint_path)!r}" + (f"; {hint}" if hint else ""))

    def restore_best(self) -> None:
        """Load the best validation weights into the model (the last ones when none was taken)."""
        self.stopping.restore_best(self.model)
