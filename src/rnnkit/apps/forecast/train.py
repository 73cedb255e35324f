"""Training the forecaster on the training windows, early-stopped on the validation windows.

Each epoch visits the training windows once in a seeded random order, in mini-batches, and
minimises the mean squared error of the scaled forecasts (direct: all ``horizon`` outputs;
recursive: the one-step forecast, the window holding true values). After each epoch the whole
multi-step forecast of every validation window is scored by the same error; the weights of the
best epoch are kept, and training stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.configuration import check_config
from rnnkit.training.devices import parse_device
from rnnkit.training.trainer import (
    CLIP_BOUND,
    CLIP_NORM,
    BaseTask,
    LoopConfig,
    Trainer,
    evaluating,
    model_device,
)


@dataclass
class FitConfig:
    """How to train; every field maps one to one onto an `rnnkit forecast train` option."""

    epochs: int = field(default=300, metadata={"check": "positive"})  # at most; early stopping
        # usually ends sooner
    patience: int = field(default=30, metadata={"check": "positive"})  # epochs without a better
        # validation loss before stopping
    batch_size: int = field(default=64, metadata={"check": "positive"})  # windows per optimiser
        # step (over all processes)
    lr: float = 3e-3  # Adam
    clip_norm: float | None = field(default=1.0, metadata=CLIP_NORM)  # global-norm bound
        # (tf.clip_by_global_norm); none: off
    clip_value: float | None = field(default=None, metadata=CLIP_BOUND)  # per-element bound
        # (tf.clip_by_value); none: off
    clip_tensor_norm: float | None = field(default=None, metadata=CLIP_BOUND)
        # per-tensor norm bound (tf.clip_by_norm); none: off
    seed: int = field(default=0, metadata={"check": "seed"})  # weights, the order of the windows,
        # dropout
    device: str = field(default="auto", metadata={"parse": parse_device})
        # auto (CUDA when available) | cpu | cuda | cuda:N

    def loop(self, batches_per_epoch: int) -> LoopConfig:
        """The loop's settings: an epoch is ``batches_per_epoch`` steps, validated at its end."""
        return LoopConfig(
            steps=self.epochs * batches_per_epoch, lr=self.lr, optimizer="adam",
            schedule="constant", clip_norm=self.clip_norm, clip_value=self.clip_value,
            clip_tensor_norm=self.clip_tensor_norm, eval_every=batches_per_epoch,
            patience=self.patience, checkpoint_every=self.epochs * batches_per_epoch,
            seed=self.seed, device=self.device)

    def check(self) -> None:
        check_fit_config(self)


@dataclass
class FitHistory:
    """Per-epoch mean training loss and validation loss (scaled MSE), and the epoch kept."""

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best_epoch: int = 0


def check_fit_config(config: FitConfig) -> None:
    for name in ("epochs", "patience", "batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    check_config(config.loop(1))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32)


def forecast_windows(model: Forecaster, inputs: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Scaled forecasts ``(n, horizon)`` of scaled windows ``(n, L, C)``, in evaluation mode."""
    device = model_device(model)
    with evaluating(model):
        outputs = [model(as_tensor(inputs[i : i + batch_size]).to(device)).double().cpu().numpy()
                   for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs)


def validation_loss(model: Forecaster, inputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((forecast_windows(model, inputs) - targets) ** 2))


class ForecastTask(BaseTask):
    """Epochs of shuffled training windows as a `TrainingTask`: each epoch visits every window
    once in a seeded random order, in mini-batches; over several processes each rank takes its
    part of every mini-batch (`torch.tensor_split`: as even as the batch allows)."""

    def __init__(self, model_config: ForecastModelConfig, config: FitConfig,
                 train: tuple[np.ndarray, np.ndarray],
                 validation: tuple[np.ndarray, np.ndarray]) -> None:
        self.model_config, self.config, self.validation = model_config, config, validation
        self.inputs, self.targets = as_tensor(train[0]), as_tensor(train[1])
        if model_config.strategy == "recursive":
            self.targets = self.targets[:, :1]  # teacher forcing: the next step from true values
        self.order = torch.Generator().manual_seed(config.seed)
        self.epoch: list[Tensor] = []

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of one epoch's mini-batches."""
        full, rest = divmod(len(self.inputs), self.config.batch_size)
        return [self.config.batch_size] * full + ([rest] if rest else [])

    def build_model(self) -> Forecaster:
        return Forecaster(self.model_config, chrono_span=self.inputs.shape[1])  # the lookback

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if not self.epoch:
            self.epoch = list(torch.randperm(len(self.inputs), generator=self.order)
                              .split(self.config.batch_size))[::-1]
        batch = self.epoch.pop()
        if self.distributed.world_size > 1:
            batch = torch.tensor_split(batch, self.distributed.world_size)[self.distributed.rank]
        return self.inputs[batch], self.targets[batch]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.mse_loss(model(inputs, one_step=True), targets)

    def evaluate(self, model: Forecaster) -> float:
        return validation_loss(model, *self.validation)


def fit_forecaster(model_config: ForecastModelConfig, config: FitConfig,
                   train: tuple[np.ndarray, np.ndarray],
                   validation: tuple[np.ndarray, np.ndarray],
                   show_progress: bool = True, **options) -> tuple[Forecaster, FitHistory]:
    """A new network trained on ``train`` (scaled windows, targets), early-stopped on
    ``validation``; returns it with the weights of its best validation epoch."""
    check_fit_config(config)
    task = ForecastTask(model_config, config, train, validation)
    sizes = task.batch_sizes
    trainer = Trainer(task, config.loop(len(sizes)), description="training", **options,
                      show_progress=show_progress)
    steps = trainer.run()
    epochs = len(steps.train) // len(sizes)
    history = FitHistory(validation=steps.validation,
                         best_epoch=trainer.stopping.best_epoch // len(sizes))
    for epoch in range(epochs):
        losses = steps.train[epoch * len(sizes) : (epoch + 1) * len(sizes)]
        total = 0.0
        for loss, size in zip(losses, sizes, strict=True):
            total += loss * size
        history.train.append(total / len(task.inputs))
    trainer.restore_best()
    trainer.model.eval()
    return trainer.model, history
