"""The forecasts a model must beat, each from every origin of the test tail, past data only.

- last value:       ŷ_{t+k} = y_{t-1}
- seasonal naive:   ŷ_{t+k} = y_{t+k-m·(⌊k/m⌋+1)}  (the same point of the last full season)
- ETS:              Holt-Winters exponential smoothing (statsmodels), additive season when one
                    is known, with or without a damped additive trend, chosen by AIC
- ARIMA:            statsmodels SARIMAX (p, d, q), p ∈ {1, 2, 3}, d ∈ {0, 1}, q ∈ {0, 1}, a
                    constant when d = 0, chosen by AIC

The statistical models are fitted once, on the history before the test tail (the same data the
network sees: train and validation parts); their parameters then stay fixed while they are run
forward over the test tail, so that the forecast from origin t uses the values before t only.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class BaselineForecast:
    name: str  # as shown in the results table
    forecasts: np.ndarray  # (origins, horizon), in the series' units


def last_value(values: np.ndarray, origins: np.ndarray, horizon: int) -> BaselineForecast:
    return BaselineForecast("last value", np.repeat(values[origins - 1, None], horizon, axis=1))


def seasonal_naive(values: np.ndarray, origins: np.ndarray, horizon: int,
                   season: int) -> BaselineForecast:
    steps = np.arange(horizon)
    back = season * (steps // season + 1)  # (horizon,): how far back the copied value lies
    return BaselineForecast(f"seasonal naive (m={season})",
                            values[origins[:, None] + steps[None, :] - back[None, :]])


@contextlib.contextmanager
def _quiet():
    """statsmodels warns on every hard optimisation; the AIC comparison already handles it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def exponential_smoothing(values: np.ndarray, history_end: int, origins: np.ndarray,
                          horizon: int, season: int | None) -> BaselineForecast:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    history = values[:history_end]
    seasonal = "add" if season and history_end >= 2 * season else None
    candidates = []
    for trend in (None, "add"):
        options = dict(trend=trend, damped_trend=trend is not None, seasonal=seasonal,
                       seasonal_periods=season if seasonal else None)
        with _quiet():
            result = ExponentialSmoothing(history, **options).fit()
        if np.isfinite(result.aic):
            candidates.append((result.aic, options, result.params))
    if not candidates:
        raise ValueError("exponential smoothing could not be fitted to the history")
    _, options, params = min(candidates, key=lambda c: c[0])
    fixed = {name: params[name] for name in
             ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")
             if options["trend"] or name in ("smoothing_level", "smoothing_seasonal")}
    if not seasonal:
        fixed.pop("smoothing_seasonal")
    known = dict(initialization_method="known", initial_level=params["initial_level"],
                 initial_trend=params["initial_trend"] if options["trend"] else None,
                 initial_seasonal=params["initial_seasons"] if seasonal else None)
    forecasts = []
    with _quiet():
        for t in origins:
            # The fitted parameters and initial states run over the values before the origin:
            # a filter, not a refit (optimized=False).
            model = ExponentialSmoothing(values[:t], **options, **known)
            forecasts.append(model.fit(optimized=False, **fixed).forecast(horizon))
    forecasts = np.stack(forecasts)
    trend = "damped trend" if options["trend"] else "no trend"
    season_text = f", season {season}" if seasonal else ""
    return BaselineForecast(f"ETS ({trend}{season_text})", forecasts)


def arima(values: np.ndarray, history_end: int, origins: np.ndarray,
          horizon: int) -> BaselineForecast:
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    history = values[:history_end]
    best = None
    for p, d, q in itertools.product((1, 2, 3), (0, 1), (0, 1)):
        with _quiet():
            result = SARIMAX(history, order=(p, d, q), trend="c" if d == 0 else "n").fit(
                disp=False)
        if np.isfinite(result.aic) and (best is None or result.aic < best[0]):
            best = (result.aic, (p, d, q), result)
    if best is None:
        raise ValueError("no ARIMA model could be fitted to the history")
    _, order, result = best
    # The same parameters over the whole series; a dynamic prediction from origin t conditions
    # on the values before t only.
    with _quiet():
        filtered = result.apply(values)
        forecasts = np.stack([
            filtered.get_prediction(start=t, end=t + horizon - 1, dynamic=True).predicted_mean
            for t in origins])
    return BaselineForecast(f"ARIMA{order}", forecasts)


def all_baselines(values: np.ndarray, history_end: int, origins: np.ndarray, horizon: int,
                  season: int | None) -> list[BaselineForecast]:
    """Every baseline for the target ``values (L,)`` from each origin (seasonal naive only with
    a season)."""
    baselines = [last_value(values, origins, horizon)]
    if season:
        baselines.append(seasonal_naive(values, origins, horizon, season))
    baselines.append(exponential_smoothing(values, history_end, origins, horizon, season))
    baselines.append(arima(values, history_end, origins, horizon))
    return baselines
