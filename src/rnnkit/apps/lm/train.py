"""Training a language model with truncated backprop through time, resumable exactly.

The token stream is cut into ``batch_size`` parallel streams (time-major ``(S, N)``); step k
reads the window ``[p, p + seq_len)`` of every stream and predicts it shifted by one token. The
recurrent state is carried from one window to the next and detached (truncated BPTT), and reset
when the streams wrap around (a new epoch). A checkpoint holds everything the next step depends
on: model, optimiser, schedule, step, stream position, carried state, random state, vocabulary,
configuration and the text's fingerprint; resuming from it continues the very same run.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.apps.lm.corpus import LEVELS, Vocabulary
from rnnkit.apps.lm.model import LanguageModel, ModelConfig
from rnnkit.training.checkpoint import (
    NonFiniteState,
    load_checkpoint,
    remove_stale_temporaries,
    restoring,
    save_checkpoint,
)
from rnnkit.training.loop import Interrupted, interrupt_between_steps, progress_bar, take_step
from rnnkit.training.optimization import (
    OPTIMIZERS,
    SCHEDULES,
    check_clipping,
    make_optimizer,
    make_schedule,
)

KIND = "lm"


@dataclass
class TrainConfig:
    """How to train; every field maps one to one onto an `rnnkit lm train` option."""

    level: str = "char"  # char | word
    max_vocabulary: int | None = None  # most frequent tokens kept (words); None: all
    seq_len: int = 100  # truncated-BPTT window, in tokens
    batch_size: int = 32  # parallel streams
    steps: int = 1000  # total optimiser steps (a resumed run continues up to this)
    lr: float = 2e-3
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "cosine"  # constant | cosine | linear, over `steps`
    clip_norm: float | None = 1.0  # global-norm clipping bound; None: off
    clip_value: float | None = None  # per-element clipping bound; None: off
    clip_tensor_norm: float | None = None  # per-tensor norm bound (tf.clip_by_norm); None: off
    validation_fraction: float = 0.05  # the text's tail held out
    eval_every: int = 100  # steps between validation passes
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    seed: int = 0


@dataclass
class History:
    """Per-step training loss, and validation loss at the steps it was measured (nats/token)."""

    train: list[float] = field(default_factory=list)
    gradient_norm: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss, or weights or optimiser state that are not
    finite; the message says where, which checkpoint is kept, and what to try."""


def check_train_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first field outside its accepted range."""
    if config.level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {config.level!r}")
    for name in ("seq_len", "batch_size", "steps", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not 0 < config.validation_fraction < 1:
        raise ValueError(
            f"validation-fraction must be in (0, 1), got {config.validation_fraction!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{config.optimizer!r}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{config.schedule!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    check_clipping(clip_norm=config.clip_norm, clip_value=config.clip_value,
                   clip_tensor_norm=config.clip_tensor_norm)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def streams(ids: Tensor, batch_size: int) -> Tensor:
    """``(L,)`` ids -> ``(S, N)`` time-major streams; a tail that does not fit is dropped."""
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length).t().contiguous()


def split_text_ids(ids: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """(train, validation) ids: the validation part is the tail, so no window straddles both."""
    held_out = max(2, int(ids.numel() * config.validation_fraction))
    train, validation = ids[:-held_out], ids[-held_out:]
    needed = config.batch_size * (config.seq_len + 1)
    if train.numel() < needed:
        raise ValueError(
            f"the text is too short: {train.numel()} training tokens, but batch-size "
            f"{config.batch_size} x (seq-len {config.seq_len} + 1) = {needed} are needed for one "
            "batch; give more text or smaller --batch-size/--seq-len")
    return train, validation


def detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


@torch.no_grad()
def evaluate(model: LanguageModel, ids: Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Mean negative log-likelihood (nats per token) of ``ids`` under the model."""
    was_training = model.training
    model.eval()
    data = streams(ids, min(batch_size, max(1, (ids.numel() - 1) // 2)))
    total, count, state = 0.0, 0, None
    for start in range(0, data.shape[0] - 1, seq_len):
        window = data[start : start + seq_len + 1]
        logits, state = model(window[:-1], state)
        total += float(F.cross_entropy(logits.flatten(0, 1), window[1:].flatten(),
                                       reduction="sum"))
        count += window[1:].numel()
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    """One training run: build or resume, then `run` to the configured number of steps."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, vocabulary: Vocabulary,
                 text: str, checkpoint_path: str | Path | None) -> None:
        check_train_config(config)
        self.config, self.vocabulary = config, vocabulary
        self.text_fingerprint = fingerprint(text)
        ids, _ = vocabulary.encode(text)
        train_ids, self.validation_ids = split_text_ids(ids, config)
        self.data = streams(train_ids, config.batch_size)  # (S, N)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        if self.checkpoint_path is not None:
            remove_stale_temporaries(self.checkpoint_path)  # left by a killed run
        self.saved_step: int | None = None  # the step of the checkpoint on disk, if any
        torch.manual_seed(config.seed)
        self.model = LanguageModel(model_config)
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, config.lr)
        self.schedule = make_schedule(self.optimizer, config.schedule, config.steps)
        self.step, self.position, self.state = 0, 0, None
        self.history = History()
        self.random_state = torch.get_rng_state()

    @classmethod
    def resume(cls, path: str | Path, text: str, steps: int | None = None) -> Trainer:
        """The run saved at ``path``, on the same text, optionally with more total ``steps``."""
        saved = load_checkpoint(path, KIND)
        with restoring(path, KIND):  # a damaged payload: one error naming the file
            if saved["text_fingerprint"] != fingerprint(text):
                raise ValueError(
                    f"checkpoint {str(path)!r} was trained on other text (fingerprint "
                    f"{saved['text_fingerprint']}, this text {fingerprint(text)}); resume with the "
                    "same file or corpus")
            config = TrainConfig(**saved["train_config"])
            if steps is not None:
                config.steps = steps
            vocabulary = Vocabulary(tuple(saved["vocabulary"]), config.level)
            trainer = cls(ModelConfig(**saved["model_config"]), config, vocabulary, text, path)
            trainer.model.load_state_dict(saved["model"])
            trainer.optimizer.load_state_dict(saved["optimizer"])
            trainer.schedule.load_state_dict(saved["schedule"])
            trainer.step, trainer.position = saved["step"], saved["position"]
            trainer.saved_step = trainer.step
            trainer.state = saved["state"]
            trainer.history = History(**saved["history"])
            trainer.random_state = saved["random_state"]
            return trainer

    def kept_checkpoint(self) -> str:
        """Which checkpoint a stopped run leaves, in words."""
        if self.checkpoint_path is None:
            return "no checkpoint is written (no checkpoint path)"
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the checkpoint of step {self.saved_step} in {str(self.checkpoint_path)!r} is kept"

    def save(self) -> None:
        """Checkpoint the run to ``checkpoint_path`` (nothing without one); `NonFiniteLoss`,
        with nothing written, when the weights or the optimiser state are not finite."""
        if self.checkpoint_path is None:
            return
        try:
            self._write_checkpoint()
        except NonFiniteState as error:
            raise NonFiniteLoss(
                f"the model's state became NaN or infinite by step {self.step} ({error.key}), "
                f"so it was not saved; {self.kept_checkpoint()}. Try a smaller --lr, or "
                "--clip-norm 1.0.") from None
        self.saved_step = self.step

    def _write_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, KIND, {
            "model_config": asdict(self.model.config),
            "train_config": asdict(self.config),
            "vocabulary": list(self.vocabulary.tokens),
            "text_fingerprint": self.text_fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "position": self.position,
            "state": self.state,
            "history": asdict(self.history),
            "random_state": torch.get_rng_state(),
        })

    def _next_window(self) -> Tensor:
        """The next ``(seq_len + 1, N)`` window; wraps (and resets the state) at the end."""
        if self.position + self.config.seq_len + 1 > self.data.shape[0]:
            self.position, self.state = 0, None
        window = self.data[self.position : self.position + self.config.seq_len + 1]
        self.position += self.config.seq_len
        return window

    def train_step(self) -> float:
        """One optimiser step on the next window; returns its loss in nats per token."""
        window = self._next_window()
        logits, state = self.model(window[:-1], self.state)
        loss = F.cross_entropy(logits.flatten(0, 1), window[1:].flatten())
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            # Every recorded loss is finite (this check runs before recording), so the last
            # finite one is the last step taken.
            norm = self.history.gradient_norm[-1] if self.history.gradient_norm else float("nan")
            raise NonFiniteLoss(
                f"the loss became {loss_value} at step {self.step + 1} (last finite loss at "
                f"step {self.step or 'none'}; gradient norm before clipping "
                f"at the last step {norm:.3g}); {self.kept_checkpoint()}. Try a smaller --lr, or "
                "--clip-norm 1.0.")
        norm = take_step(self.model, loss, self.optimizer, self.config.clip_norm,
                         self.config.clip_value, self.schedule, self.config.clip_tensor_norm)
        self.state = detach_state(state)
        self.step += 1
        self.history.train.append(loss_value)
        self.history.gradient_norm.append(norm)
        return loss_value

    def run(self, until: int | None = None) -> History:
        """Train up to ``config.steps`` (or stop after step ``until``), validating and
        checkpointing on the way.

        Ctrl-C stops after the step under way: the run is checkpointed at that step and
        `Interrupted` raised, whose message says where and how to resume.
        """
        last = self.config.steps if until is None else min(until, self.config.steps)
        torch.set_rng_state(self.random_state)
        self.model.train()
        bar = progress_bar(self.config.steps, self.step)
        try:
            with interrupt_between_steps() as interrupt:
                self._run_steps(last, bar, interrupt)
        finally:
            bar.close()
        return self.history

    def _run_steps(self, last: int, bar, interrupt) -> None:
        tokens_per_step = self.config.seq_len * self.config.batch_size
        started, first_step = time.perf_counter(), self.step
        while self.step < last:
            if interrupt.requested:
                raise self._interrupted()
            loss = self.train_step()
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                self.history.validation_steps.append(self.step)
                self.history.validation.append(
                    evaluate(self.model, self.validation_ids, self.config.seq_len))
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save()
            elapsed = time.perf_counter() - started
            rate = (self.step - first_step) * tokens_per_step / max(elapsed, 1e-9)
            validation = (f" val {self.history.validation[-1]:.3f}"
                          if self.history.validation else "")
            bar.set_postfix_str(f"loss {loss:.3f}{validation} | {rate:,.0f} tok/s")
            bar.update(1)
        if interrupt.requested and self.step < self.config.steps:
            raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        """Checkpoint the run at the current step (if not already) and say how to continue."""
        if self.checkpoint_path is None:
            return Interrupted(f"interrupted at step {self.step}; nothing saved (no checkpoint "
                               "path)")
        if self.saved_step != self.step:
            self.save()
        return Interrupted(
            f"interrupted at step {self.step} of {self.config.steps}: checkpoint saved to "
            f"{str(self.checkpoint_path)!r}; continue with 'rnnkit lm train' on the same text "
            f"and --resume {self.checkpoint_path}")

