"""Training the forecaster on the training windows, early-stopped on the validation windows.

Each epoch visits the training windows once in a seeded random order, in mini-batches, and
minimises the mean squared error of the scaled forecasts (direct: all ``horizon`` outputs;
recursive: the one-step forecast, the window holding true values). After each epoch the whole
multi-step forecast of every validation window is scored by the same error; the weights of the
best epoch are kept, and training stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.training.loop import EarlyStopping, progress_bar, take_step
from rnnkit.training.optimization import check_clipping, make_optimizer


@dataclass
class FitConfig:
    """How to train; every field maps one to one onto an `rnnkit forecast train` option."""

    epochs: int = 300  # at most; early stopping usually ends sooner
    patience: int = 30  # epochs without a better validation loss before stopping
    batch_size: int = 64
    lr: float = 3e-3  # Adam
    clip_norm: float | None = 1.0  # global-norm bound (tf.clip_by_global_norm); None: off
    clip_value: float | None = None  # per-element bound (tf.clip_by_value); None: off
    clip_tensor_norm: float | None = None  # per-tensor norm bound (tf.clip_by_norm); None: off
    seed: int = 0


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
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    check_clipping(clip_norm=config.clip_norm, clip_value=config.clip_value,
                   clip_tensor_norm=config.clip_tensor_norm)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32)


@torch.no_grad()
def forecast_windows(model: Forecaster, inputs: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Scaled forecasts ``(n, horizon)`` of scaled windows ``(n, L, C)``, in evaluation mode."""
    was_training = model.training
    model.eval()
    outputs = [model(as_tensor(inputs[i : i + batch_size])).double().numpy()
               for i in range(0, len(inputs), batch_size)]
    model.train(was_training)
    return np.concatenate(outputs)


def validation_loss(model: Forecaster, inputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((forecast_windows(model, inputs) - targets) ** 2))


def fit_forecaster(model_config: ForecastModelConfig, config: FitConfig,
                   train: tuple[np.ndarray, np.ndarray],
                   validation: tuple[np.ndarray, np.ndarray],
                   show_progress: bool = True) -> tuple[Forecaster, FitHistory]:
    """A new network trained on ``train`` (scaled windows, targets), early-stopped on
    ``validation``; returns it with the weights of its best validation epoch."""
    check_fit_config(config)
    torch.manual_seed(config.seed)
    model = Forecaster(model_config)
    optimizer = make_optimizer(model.parameters(), "adam", config.lr)
    order = torch.Generator().manual_seed(config.seed)
    inputs, targets = as_tensor(train[0]), as_tensor(train[1])
    if model_config.strategy == "recursive":
        targets = targets[:, :1]  # teacher forcing: learn the next step from true values
    stopping, history = EarlyStopping(config.patience), FitHistory()
    bar = progress_bar(config.epochs, description="training", unit="epoch") if show_progress \
        else None
    model.train()
    for epoch in range(1, config.epochs + 1):
        total = 0.0
        for batch in torch.randperm(len(inputs), generator=order).split(config.batch_size):
            loss = F.mse_loss(model.step(inputs[batch]), targets[batch])
            take_step(model, loss, optimizer, config.clip_norm, config.clip_value,
                      clip_tensor_norm=config.clip_tensor_norm)
            total += loss.item() * len(batch)
        history.train.append(total / len(inputs))
        history.validation.append(validation_loss(model, *validation))
        if not math.isfinite(history.train[-1]):
            raise ValueError(f"the training loss became {history.train[-1]} in epoch {epoch}; "
                             "try a smaller --lr")
        done = stopping.update(epoch, history.validation[-1], model)
        if bar is not None:
            bar.set_postfix_str(f"train {history.train[-1]:.4f} val {history.validation[-1]:.4f}"
                                f" best {stopping.best_loss:.4f} (epoch {stopping.best_epoch})")
            bar.update(1)
        if done:
            break
    if bar is not None:
        bar.close()
    stopping.restore_best(model)
    history.best_epoch = stopping.best_epoch
    model.eval()
    return model, history
