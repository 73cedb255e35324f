"""Baselines: the naive ones by hand; the statistical ones use only the past of each origin."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rnnkit.apps.forecast.baselines import (
    all_baselines,
    arima,
    exponential_smoothing,
    last_value,
    seasonal_naive,
)

VALUES = np.arange(10.0) ** 2  # 0 1 4 9 16 25 36 49 64 81


def test_last_value_repeats_the_value_before_each_origin():
    result = last_value(VALUES, np.array([3, 5]), horizon=2)
    assert result.forecasts.tolist() == [[4, 4], [16, 16]]


def test_seasonal_naive_copies_the_last_full_season_even_beyond_one_season():
    result = seasonal_naive(VALUES, np.array([4, 6]), horizon=3, season=2)
    # origin 4: steps 4, 5, 6 copy 2, 3, 4 - 2 = 2  -> values 4, 9, 4
    assert result.forecasts.tolist() == [[4, 9, 4], [16, 25, 16]]


def seasonal_series(length=160, season=8, seed=0):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    return 10 + 0.02 * time + np.sin(2 * np.pi * time / season) + 0.1 * rng.normal(size=length)


@pytest.mark.parametrize("make", [
    lambda values, origins: exponential_smoothing(values, 120, origins, 4, season=8),
    lambda values, origins: arima(values, 120, origins, 4),
], ids=["ets", "arima"])
def test_statistical_forecasts_use_only_values_before_their_origin(make):
    values = seasonal_series()
    origins = np.array([120, 130, 140])
    changed_future = values.copy()
    changed_future[141:] += 50  # after the last origin's first target: unseen by every forecast
    changed_past = values.copy()
    changed_past[135] += 5  # before origin 140: must move its forecast (the check can fail)
    base = make(values, origins).forecasts
    np.testing.assert_array_equal(base, make(changed_future, origins).forecasts)
    moved = make(changed_past, origins).forecasts
    np.testing.assert_array_equal(base[:2], moved[:2])
    assert not np.allclose(base[2], moved[2])


def test_arima_rolling_forecast_equals_a_fresh_filter_of_the_past():
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    values = seasonal_series()
    result = arima(values, 120, np.array([120, 133]), 5)
    order = tuple(int(x) for x in result.name[len("ARIMA("):-1].split(","))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = SARIMAX(values[:120], order=order, trend="c" if order[1] == 0 else "n").fit(
            disp=False)
        expected = [fitted.apply(values[:t]).forecast(5) for t in (120, 133)]
    np.testing.assert_allclose(result.forecasts, np.stack(expected), rtol=1e-8)


def test_ets_at_the_first_origin_is_the_fitted_models_own_forecast():
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    values = seasonal_series()
    result = exponential_smoothing(values, 120, np.array([120]), 6, season=8)
    assert "season 8" in result.name
    trend = "add" if "damped" in result.name else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = ExponentialSmoothing(values[:120], trend=trend, damped_trend=trend is not None,
                                      seasonal="add", seasonal_periods=8).fit()
    np.testing.assert_allclose(result.forecasts[0], fitted.forecast(6), rtol=1e-8)


def test_all_baselines_skips_seasonal_naive_without_a_season():
    values = seasonal_series()
    names = [b.name for b in all_baselines(values, 120, np.array([120]), 2, None)]
    assert names[0] == "last value" and not any("seasonal naive" in n for n in names)
    assert len(names) == 3
