"""Training the forecaster: it learns a seasonal series, and keeps its best validation epoch."""

from __future__ import annotations

import numpy as np
import pytest

from rnnkit.apps.forecast.baselines import last_value
from rnnkit.apps.forecast.data import Scaler, split_series, window_origins, windows
from rnnkit.apps.forecast.metrics import mae
from rnnkit.apps.forecast.model import ForecastModelConfig
from rnnkit.apps.forecast.train import FitConfig, fit_forecaster, forecast_windows, validation_loss
from rnnkit.apps.recurrent import RecurrentConfig

LOOKBACK, HORIZON = 24, 6


def seasonal_parts(length=360, season=12, seed=0):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    values = (5 + 0.01 * time + 2 * np.sin(2 * np.pi * time / season)
              + 0.2 * rng.normal(size=length))[:, None]
    split = split_series(length, LOOKBACK, HORIZON, test_size=48, validation_size=48)
    scaler = Scaler.fit(values[: split.train_end], ["y"])
    scaled = scaler.transform(values)
    parts = [windows(scaled, start, end, LOOKBACK, HORIZON) for start, end in
             ((0, split.train_end), (split.train_end, split.validation_end),
              (split.validation_end, length))]
    return values[:, 0], split, scaler, parts


@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_the_model_beats_the_last_value_on_a_seasonal_series(strategy):
    values, split, scaler, (train, validation, test) = seasonal_parts()
    model, _ = fit_forecaster(
        ForecastModelConfig(1, HORIZON, strategy=strategy,
                            recurrent=RecurrentConfig(hidden_size=16)),
        FitConfig(steps=160, eval_every=4, patience=10, min_steps=0), train, validation, show_progress=False)
    forecast = scaler.inverse_target(forecast_windows(model, test[0]))
    actual = scaler.inverse_target(test[1])
    origins = window_origins(split.validation_end, split.length, LOOKBACK, HORIZON)
    naive = last_value(values, origins, HORIZON).forecasts
    np.testing.assert_allclose(naive[:, 0], values[origins - 1])
    assert mae(actual, forecast) < 0.5 * mae(actual, naive)


def test_early_stopping_keeps_the_weights_of_the_best_validation_epoch():
    _, _, _, (train, validation, _) = seasonal_parts()
    model, history = fit_forecaster(
        ForecastModelConfig(1, HORIZON, recurrent=RecurrentConfig(hidden_size=8)),
        FitConfig(steps=400, eval_every=4, patience=3, min_steps=0, lr=0.05),
        train, validation, show_progress=False)
    best = history.validation_steps[int(np.argmin(history.validation))]
    assert history.best_step == best
    assert validation_loss(model, *validation) == pytest.approx(min(history.validation),
                                                                rel=1e-6)
    # Stopped: three evaluations without a better one, long before the 101 of the budget.
    assert len(history.train) < 101 and len(history.train) == len(history.validation)
    assert history.validation_steps[-1] == history.best_step + 3 * 4


def test_bad_fit_settings_are_named():
    _, _, _, (train, validation, _) = seasonal_parts()
    with pytest.raises(ValueError, match="patience must be a positive integer, got 0"):
        fit_forecaster(ForecastModelConfig(1, HORIZON), FitConfig(patience=0), train,
                       validation, show_progress=False)
