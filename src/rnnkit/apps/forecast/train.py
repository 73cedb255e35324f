"""Training the forecaster on the training windows, early-stopped on a rolling validation.

Training draws mini-batches from epochs of the training windows (each window once per epoch, in a
seeded random order) and minimises the mean squared error of the scaled forecasts (direct: all
``horizon`` outputs; recursive: the one-step forecast, the window holding true values), for a
budget of optimiser ``steps``. Every ``eval_every`` steps the whole multi-step forecast of every
origin that reaches into the validation part is scored on the steps inside it (the rolling
validation of `rolling_windows`: every validation value at every lead time); the weights of the
best validation are kept, and training stops after ``patience`` validations without improvement,
but never before ``min_steps``. A budget in steps, not epochs, is what keeps a short series (a
few mini-batches an epoch) from stopping after a hundred updates.

With several ``seeds`` one network is trained per seed (`fit_ensemble`); the ensemble's forecast
is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.apps.forecast.metrics import quantiles_of_levels
from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.configuration import check_config, parse_seeds
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

SEEDS = {"parse": partial(parse_seeds, option="--seeds"), "metavar": "S,..."}


@dataclass
class FitConfig:
    """How to train; every field maps one to one onto an `rnnkit forecast train` option."""

    steps: int = field(default=3000, metadata={"check": "positive"})  # optimiser steps at most
        # (early stopping usually ends sooner)
    min_steps: int = 600  # steps before early stopping may end training
    eval_every: int = field(default=25, metadata={"check": "positive"})  # optimiser steps between
        # validations
    patience: int = field(default=20, metadata={"check": "positive"})  # validations without a
        # better validation loss before stopping
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
    seeds: list[int] = field(default_factory=list, metadata=SEEDS)  # an ensemble: one network
        # per seed, forecasts averaged (replaces --seed)
    refit: bool = False  # then train each network afresh on the train and validation parts
        # (the most recent history) for the steps early stopping chose, scaled by their windows
    device: str = field(default="auto", metadata={"parse": parse_device})
        # auto (CUDA when available) | cpu | cuda | cuda:N

    @property
    def ensemble_seeds(self) -> list[int]:
        """The seeds of the networks to train: ``seeds``, or ``[seed]``."""
        return list(self.seeds) or [self.seed]

    def loop(self, seed: int | None = None) -> LoopConfig:
        """The loop's settings for the network of ``seed`` (default: ``self.seed``)."""
        return LoopConfig(
            steps=self.steps, lr=self.lr, optimizer="adam", schedule="constant",
            clip_norm=self.clip_norm, clip_value=self.clip_value,
            clip_tensor_norm=self.clip_tensor_norm, eval_every=self.eval_every,
            patience=self.patience, min_steps=self.min_steps, checkpoint_every=self.steps,
            seed=self.seed if seed is None else seed, device=self.device)

    def check(self) -> None:
        check_fit_config(self)


@dataclass
class FitHistory:
    """One network's training: the mean training loss between validations, the validation loss
    (scaled MSE) at each, the steps they were taken at, and the step whose weights are kept."""

    train: list[float | None] = field(default_factory=list)  # None at step 0 (no training yet)
    validation: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    best_step: int = 0
    seed: int = 0
    refit_steps: int = 0  # steps of the refit on train + validation (0: not refitted)

    @property
    def steps(self) -> int:
        """Optimiser steps taken."""
        return self.validation_steps[-1] if self.validation_steps else 0

    @property
    def best_validation(self) -> float:
        return self.validation[self.validation_steps.index(self.best_step)]


def check_fit_config(config: FitConfig) -> None:
    for name in ("steps", "patience", "batch_size", "eval_every"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if isinstance(config.min_steps, bool) or not isinstance(config.min_steps, int) \
            or config.min_steps < 0:
        raise ValueError(f"min-steps must be a non-negative integer, got {config.min_steps!r}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"--seeds repeats a seed: {config.seeds}; each network needs its own")
    for seed in config.ensemble_seeds:
        check_config(config.loop(seed))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float32)


def forecast_windows(model: Forecaster, inputs: np.ndarray, batch_size: int = 1024,
                     quantiles: bool = False) -> np.ndarray:
    """Scaled forecasts ``(n, horizon)`` of scaled windows ``(n, L, C)``, in evaluation mode;
    with ``quantiles``, every quantile ``(n, horizon, Q)``."""
    device = model_device(model)
    with evaluating(model):
        outputs = [model(as_tensor(inputs[i : i + batch_size]).to(device), quantiles=quantiles)
                   .double().cpu().numpy() for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs)


def pinball_loss(forecast: Tensor, target: Tensor, quantiles: list[float],
                 scored: Tensor | None = None) -> Tensor:
    """Mean pinball loss of quantile forecasts ``(N, h, Q)`` against ``target (N, h)``:
    ``mean max(τ e, (τ - 1) e)`` with ``e = y - ŷ_τ`` over all steps and quantiles ``τ``; the
    slots where ``scored (N, h)`` is False count 0."""
    tau = torch.tensor(quantiles, dtype=forecast.dtype, device=forecast.device)
    error = target[..., None] - forecast
    loss = torch.maximum(tau * error, (tau - 1) * error)
    if scored is not None:
        loss = torch.where(scored[..., None], loss, 0.0)
    return loss.mean()


def validation_loss(model: Forecaster, inputs: np.ndarray, targets: np.ndarray) -> float:
    """The training criterion on the scored steps (NaN targets, outside the validation part,
    `rolling_windows`, are left out): the mean squared error of the scaled forecasts, or with
    prediction intervals the mean pinball loss of their quantiles."""
    scored = ~np.isnan(targets)
    if len(model.quantiles) == 1:
        return float(np.mean(((forecast_windows(model, inputs) - targets) ** 2)[scored]))
    forecast = forecast_windows(model, inputs, quantiles=True)  # (n, h, Q)
    return float(pinball_loss(torch.as_tensor(forecast[scored]), torch.as_tensor(targets[scored]),
                              model.quantiles))


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
        lookback = self.inputs.shape[1] - (self.model_config.horizon
                                           if self.model_config.future_size else 0)
        return Forecaster(self.model_config, chrono_span=lookback)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if not self.epoch:
            self.epoch = list(torch.randperm(len(self.inputs), generator=self.order)
                              .split(self.config.batch_size))[::-1]
        batch = self.epoch.pop()
        if self.distributed.world_size > 1:
            batch = torch.tensor_split(batch, self.distributed.world_size)[self.distributed.rank]
        return self.inputs[batch], self.targets[batch]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The mean over every (window, step) slot of the squared error (or the pinball loss
        with levels); a slot whose target lies past the train part (NaN, `rolling_windows`)
        counts 0, so that equal shards of a batch weigh equally over several processes."""
        inputs, targets = batch
        scored = ~torch.isnan(targets)
        targets = torch.where(scored, targets, 0.0)
        if self.model_config.levels:
            forecast = model(inputs, one_step=True, quantiles=True)
            return pinball_loss(forecast, targets, quantiles_of_levels(self.model_config.levels),
                                scored)
        errors = (model(inputs, one_step=True) - targets) ** 2
        return torch.where(scored, errors, 0.0).mean()

    def evaluate(self, model: Forecaster) -> float:
        return validation_loss(model, *self.validation)


def fit_forecaster(model_config: ForecastModelConfig, config: FitConfig,
                   train: tuple[np.ndarray, np.ndarray],
                   validation: tuple[np.ndarray, np.ndarray], seed: int | None = None,
                   show_progress: bool = True, **options) -> tuple[Forecaster, FitHistory]:
    """A new network (seeded by ``seed``, default ``config.seed``) trained on ``train`` (scaled
    windows, targets), early-stopped on ``validation`` (NaN targets not scored); returns it with
    the weights of its best validation."""
    check_fit_config(config)
    seed = config.seed if seed is None else seed
    task = ForecastTask(model_config, replace(config, seed=seed), train, validation)
    options["metrics_fields"] = {**options.get("metrics_fields", {}), "seed": seed}
    trainer = Trainer(task, config.loop(seed), description=f"training (seed {seed})",
                      **options, show_progress=show_progress)
    # Step 0: the untrained network is the naive forecast (`Forecaster`), kept when no later
    # validation beats it.
    trainer.validate()
    steps = trainer.run()
    history = FitHistory(validation=steps.validation, validation_steps=steps.validation_steps,
                         best_step=trainer.stopping.best_epoch, seed=seed)
    since = 0
    for step in steps.validation_steps:
        losses = steps.train[since:step]
        history.train.append(sum(losses) / len(losses) if losses else None)  # step 0: none
        since = step
    trainer.restore_best()
    trainer.model.eval()
    return trainer.model, history


def refit_forecaster(model_config: ForecastModelConfig, config: FitConfig,
                     history: tuple[np.ndarray, np.ndarray], steps: int, seed: int,
                     show_progress: bool = True, **options) -> Forecaster:
    """A new network (seeded by ``seed``) trained on ``history`` (the windows of the train and
    validation parts) for ``steps`` steps, with no held-out data to stop on: the weights of
    the last step. (The loop's one evaluation, at the end, scores ``history`` itself: logged
    in-sample, not a validation.)"""
    loop = replace(config, steps=steps, eval_every=steps, min_steps=steps, seed=seed)
    task = ForecastTask(model_config, loop, history, history)
    options["metrics_fields"] = {**options.get("metrics_fields", {}), "seed": seed,
                                 "refit": True}
    trainer = Trainer(task, loop.loop(seed), description=f"refitting (seed {seed})", **options,
                      show_progress=show_progress)
    trainer.run()
    trainer.model.eval()
    return trainer.model


def fit_ensemble(model_config: ForecastModelConfig, config: FitConfig,
                 train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                 history: tuple[np.ndarray, np.ndarray] | None = None,
                 **options) -> list[tuple[Forecaster, FitHistory]]:
    """One network per seed of ``config.ensemble_seeds``, each trained by `fit_forecaster`;
    with ``config.refit``, each then retrained from its seed on ``history`` (the train and
    validation windows) by `refit_forecaster`, for its best step times ``len(history) /
    len(train)`` steps (as many epochs), unless early stopping kept step 0 (the naive
    forecast: nothing to refit)."""
    fitted = []
    for seed in config.ensemble_seeds:
        model, record = fit_forecaster(model_config, config, train, validation, seed=seed,
                                       **options)
        if config.refit and record.best_step > 0:
            if history is None:
                raise ValueError("refit needs the windows of the train and validation parts")
            record.refit_steps = max(1, round(record.best_step * len(history[0])
                                              / len(train[0])))
            model = refit_forecaster(model_config, config, history, record.refit_steps, seed,
                                     **options)
        fitted.append((model, record))
    return fitted

