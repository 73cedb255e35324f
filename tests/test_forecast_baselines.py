"""Baselines: the naive ones by hand and against statsforecast's; the statistical ones agree with
statsforecast called directly and use only the past of each origin."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from rnnkit.apps.forecast.baselines import (
    STATISTICAL_MODELS,
    all_baselines,
    last_value,
    missing_statistical_baselines,
    normal_quantile,
    seasonal_naive,
    statistical_baseline,
)

VALUES = np.arange(10.0) ** 2  # 0 1 4 9 16 25 36 49 64 81
LEVELS = (80, 95)
SEASON, HISTORY_END, HORIZON = 8, 96, 6
ORIGINS = np.array([96, 104, 112])


def test_last_value_repeats_the_value_before_each_origin():
    result = last_value(VALUES, np.array([3, 5]), horizon=2)
    assert result.name == "Naive" and result.forecasts.tolist() == [[4, 4], [16, 16]]


def test_seasonal_naive_copies_the_last_full_season_even_beyond_one_season():
    result = seasonal_naive(VALUES, np.array([4, 6]), horizon=3, season=2)
    # origin 4: steps 4, 5, 6 copy 2, 3, 4 - 2 = 2  -> values 4, 9, 4
    assert result.name == "SeasonalNaive"
    assert result.forecasts.tolist() == [[4, 9, 4], [16, 25, 16]]


def test_naive_intervals_by_hand():
    # Before origin 3 the naive errors are 1 and 3: σ = sqrt((1 + 9) / 2) = sqrt(5).
    result = last_value(VALUES, np.array([3]), horizon=2, levels=[80])
    lo, hi = result.intervals[80]
    half_width = normal_quantile(80) * np.sqrt(5) * np.sqrt([1, 2])
    np.testing.assert_allclose(hi[0] - 4, half_width)
    np.testing.assert_allclose(4 - lo[0], half_width)
    assert normal_quantile(95) == pytest.approx(1.959964, abs=1e-6)


def seasonal_series(length=128, season=SEASON, seed=0):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    return 10 + 0.02 * time + np.sin(2 * np.pi * time / season) + 0.1 * rng.normal(size=length)


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def assert_agrees(baseline, row, expected, levels=LEVELS, rtol=1e-8):
    np.testing.assert_allclose(baseline.forecasts[row], expected["mean"], rtol=rtol)
    for level in levels:
        lo, hi = baseline.intervals[level]
        np.testing.assert_allclose(lo[row], expected[f"lo-{level}"], rtol=rtol)
        np.testing.assert_allclose(hi[row], expected[f"hi-{level}"], rtol=rtol)


@pytest.fixture(scope="module")
def baselines():
    values = seasonal_series()
    return values, {b.name: b for b in all_baselines(values, HISTORY_END, ORIGINS, HORIZON,
                                                     SEASON, LEVELS)}


def test_all_baselines_are_the_five_stable_names_with_their_intervals(baselines):
    _, by_name = baselines
    assert list(by_name) == ["Naive", "SeasonalNaive", *STATISTICAL_MODELS]
    for baseline in by_name.values():
        assert baseline.forecasts.shape == (len(ORIGINS), HORIZON) and baseline.note is None
        assert sorted(baseline.intervals) == list(LEVELS)
    assert by_name["AutoARIMA"].model.startswith("ARIMA(")
    assert by_name["AutoETS"].model.startswith("ETS(")


def test_naive_forecasts_and_intervals_equal_statsforecasts_own(baselines):
    from statsforecast.models import Naive, SeasonalNaive

    values, by_name = baselines
    for name, model in (("Naive", Naive()), ("SeasonalNaive", SeasonalNaive(SEASON))):
        for row, t in enumerate(ORIGINS):
            expected = quietly(model.forward, values[:t], HORIZON, level=list(LEVELS))
            assert_agrees(by_name[name], row, expected)


@pytest.mark.parametrize("name", STATISTICAL_MODELS)
def test_the_first_origin_is_the_fitted_models_own_forecast(baselines, name):
    import statsforecast.models

    values, by_name = baselines
    model = getattr(statsforecast.models, name)(season_length=SEASON)
    expected = quietly(lambda: model.fit(values[:HISTORY_END]).predict(HORIZON,
                                                                       level=list(LEVELS)))
    assert_agrees(by_name[name], 0, expected)
    # A later origin is the same fitted model run forward, not a refit on values[:t].
    forwarded = quietly(model.forward, values[: ORIGINS[2]], HORIZON, level=list(LEVELS))
    assert_agrees(by_name[name], 2, forwarded)


def test_intervals_are_ordered_around_the_forecast(baselines):
    _, by_name = baselines
    for name, baseline in by_name.items():
        (lo80, hi80), (lo95, hi95) = baseline.intervals[80], baseline.intervals[95]
        assert np.all(lo95 <= lo80) and np.all(hi80 <= hi95), name
        assert np.all(lo80 <= baseline.forecasts) and np.all(baseline.forecasts <= hi80), name
        assert np.all(lo95 < hi95), name  # not collapsed to the point forecast


@pytest.mark.parametrize("name", STATISTICAL_MODELS)
def test_statistical_forecasts_use_only_values_before_their_origin(baselines, name):
    values, by_name = baselines
    changed_future = values.copy()
    changed_future[ORIGINS[-1]:] += 50  # from the last origin on: unseen by every forecast
    changed_past = values.copy()
    changed_past[ORIGINS[-1] - 4] += 5  # before the last origin: must move it (can fail)

    def run(series):
        return statistical_baseline(name, series, HISTORY_END, ORIGINS, HORIZON, SEASON,
                                    LEVELS)

    base = by_name[name]
    future = run(changed_future)
    np.testing.assert_array_equal(base.forecasts, future.forecasts)
    for level in LEVELS:
        np.testing.assert_array_equal(base.intervals[level], future.intervals[level])
    moved = run(changed_past).forecasts
    np.testing.assert_array_equal(base.forecasts[:2], moved[:2])
    assert not np.allclose(base.forecasts[2], moved[2])


def test_a_history_shorter_than_two_seasons_drops_the_season_and_says_so():
    values = seasonal_series(length=40, season=12)
    result = statistical_baseline("AutoETS", values, 20, np.array([20, 30]), 4, 12, [80])
    assert result.note == ("AutoETS fitted without a season: the history holds 20 values, "
                           "fewer than two seasons of 12")
    from statsforecast.models import AutoETS

    expected = quietly(lambda: AutoETS(season_length=1).fit(values[:20]).predict(4, level=[80]))
    assert_agrees(result, 0, expected, levels=[80])


def test_all_baselines_skips_seasonal_naive_without_a_season():
    values = seasonal_series()
    for season in (None, 1):
        names = [b.name for b in all_baselines(values, 120, np.array([120]), 2, season)]
        assert names == ["Naive", *STATISTICAL_MODELS]


def test_without_statsforecast_the_naive_baselines_run_and_one_note_says_why(monkeypatch):
    for module in [name for name in sys.modules if name.split(".")[0] == "statsforecast"]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "statsforecast", None)  # import statsforecast -> ImportError
    note = missing_statistical_baselines()
    assert note == ("AutoARIMA, AutoETS, AutoTheta left out: they need statsforecast "
                    "(pip install 'rnnkit[forecast]'); only Naive and SeasonalNaive were run")
    values = seasonal_series()
    baselines = all_baselines(values, HISTORY_END, ORIGINS, HORIZON, SEASON, [80])
    assert [b.name for b in baselines] == ["Naive", "SeasonalNaive"]
    assert sorted(baselines[1].intervals) == [80]


def test_statsforecast_installed_means_no_note():
    assert missing_statistical_baselines() is None


def test_naive_baselines_refuse_origins_without_enough_past():
    with pytest.raises(ValueError, match="SeasonalNaive needs more than 8 values before every "
                       "origin; the first origin is 8"):
        seasonal_naive(seasonal_series(), np.array([8, 9]), 2, SEASON)
