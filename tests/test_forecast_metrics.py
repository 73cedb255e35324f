"""Forecast metrics against values worked out by hand; season detection on known series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnkit.apps.forecast.metrics import detect_season, mase_scale, score, skill, smape

ACTUAL = np.array([[1.0, 2.0], [3.0, 4.0]])
FORECAST = np.array([[2.0, 2.0], [1.0, 5.0]])  # errors 1, 0, 2, 1


def test_metrics_agree_with_hand_computed_values():
    history = np.array([1.0, 3.0, 2.0, 6.0])  # naive errors 2, 1, 4; seasonal (m=2) 1, 3
    result = score(ACTUAL, FORECAST, mase_scale(history, None))
    assert result["MAE"] == pytest.approx(1.0)
    assert result["RMSE"] == pytest.approx(math.sqrt(6 / 4))
    # 2|e| / (|y| + |ŷ|): 2/3, 0, 4/4, 2/9
    assert result["sMAPE"] == pytest.approx(100 * (2 / 3 + 0 + 1 + 2 / 9) / 4)
    assert result["MASE"] == pytest.approx(1.0 / (7 / 3))
    assert mase_scale(history, 2) == pytest.approx(2.0)
    assert skill(1.0, 4.0) == pytest.approx(0.75) and skill(4.0, 4.0) == 0


def test_skill_against_a_perfect_reference_is_defined():
    # As good (0) when the forecast is perfect too, else infinitely worse (the ratio's limit).
    assert skill(0.0, 0.0) == 0 and skill(0.5, 0.0) == float("-inf")


def test_smape_counts_exact_zero_forecasts_of_zero_as_no_error():
    assert smape(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0
    assert smape(np.array([0.0]), np.array([5.0])) == pytest.approx(200)


def test_mase_scale_refuses_a_history_it_cannot_scale_by():
    with pytest.raises(ValueError, match="too few"):
        mase_scale(np.array([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="repeats itself exactly every 2 steps"):
        mase_scale(np.array([1.0, 2.0, 1.0, 2.0, 1.0]), 2)


def test_detect_season_finds_the_period_under_trend_and_noise():
    rng = np.random.default_rng(0)
    time = np.arange(400)
    series = np.sin(2 * np.pi * time / 12) + 0.05 * time + 0.3 * rng.normal(size=400)
    assert detect_season(series) == 12


@pytest.mark.parametrize("seed", range(3))
def test_detect_season_finds_none_in_a_random_walk(seed):
    assert detect_season(np.random.default_rng(seed).normal(size=400).cumsum()) is None


def test_detect_season_gives_none_for_too_short_or_constant_series():
    assert detect_season(np.arange(6.0)) is None
    assert detect_season(np.ones(100)) is None
