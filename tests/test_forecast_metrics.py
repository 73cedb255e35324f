"""Forecast metrics against values worked out by hand; season detection on known series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnkit.apps.forecast.metrics import (
    coverage,
    detect_season,
    mase_scale,
    owa,
    parse_levels,
    pinball_loss,
    quantile_forecasts,
    quantiles_of_levels,
    scaled_pinball_loss,
    score,
    skill,
    smape,
)

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


def test_pinball_loss_against_hand_computed_values_and_half_the_mae_at_the_median():
    actual = np.array([1.0, 2.0, 3.0, 4.0])
    forecast = np.array([2.0, 2.0, 1.0, 5.0])  # errors y - ŷ: -1, 0, 2, -1
    # q = 0.9: under-forecasts (error > 0) cost 0.9 each unit, over-forecasts 0.1.
    assert pinball_loss(actual, forecast, 0.9) == pytest.approx((0.1 + 0 + 1.8 + 0.1) / 4)
    assert pinball_loss(actual, forecast, 0.1) == pytest.approx((0.9 + 0 + 0.2 + 0.9) / 4)
    assert pinball_loss(actual, forecast, 0.5) == pytest.approx(0.5 * np.mean(np.abs(
        actual - forecast)))
    with pytest.raises(ValueError, match="q must be a quantile in \\[0, 1\\], got 1.5"):
        pinball_loss(actual, forecast, 1.5)


def test_pinball_loss_is_lowest_at_the_true_quantile_of_a_sample():
    sample = np.random.default_rng(0).normal(size=20_000)
    true = float(np.quantile(sample, 0.9))
    losses = {shift: pinball_loss(sample, np.full_like(sample, true + shift), 0.9)
              for shift in (-0.2, 0.0, 0.2)}
    assert losses[0.0] < losses[-0.2] and losses[0.0] < losses[0.2]


def test_scaled_pinball_loss_averages_the_quantiles_and_divides_by_the_mase_scale():
    actual = np.array([[1.0, 2.0], [3.0, 4.0]])
    median = actual + 1
    intervals = {80: (actual - 2, actual + 2)}
    by_quantile = quantile_forecasts(median, intervals)
    assert list(by_quantile) == [0.1, 0.5, 0.9]
    # q = 0.1: y - lo = +2 costs 0.1 * 2; q = 0.5: y - median = -1 costs 0.5 * 1;
    # q = 0.9: y - hi = -2 costs (1 - 0.9) * 2.
    expected = np.mean([0.1 * 2, 0.5 * 1, 0.1 * 2]) / 4.0
    assert scaled_pinball_loss(actual, by_quantile, scale=4.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one quantile"):
        scaled_pinball_loss(actual, {}, 1.0)


def test_coverage_counts_the_bounds_as_inside():
    actual = np.array([0.0, 1.0, 2.0, 3.0])
    assert coverage(actual, np.array([0.0, 2.0, 0.0, 0.0]), np.array([1.0, 3.0, 2.0, 2.9])) == 0.5


def test_coverage_of_normal_quantile_intervals_is_near_the_nominal_level():
    from statistics import NormalDist

    noise = np.random.default_rng(1).normal(size=40_000)
    for level in (80, 95):
        z = NormalDist().inv_cdf(0.5 + level / 200)
        inside = coverage(noise, np.full_like(noise, -z), np.full_like(noise, z))
        assert inside == pytest.approx(level / 100, abs=0.01)  # binomial sd < 0.002


def test_owa_is_the_mean_of_the_two_ratios_to_seasonal_naive():
    assert owa(10.0, 0.8, 20.0, 1.0) == pytest.approx(0.5 * (0.5 + 0.8))
    assert owa(20.0, 1.0, 20.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="mase_naive must be positive to divide by, got 0.0"):
        owa(1.0, 1.0, 2.0, 0.0)


def test_quantiles_of_levels_bound_each_interval_and_include_the_median():
    assert quantiles_of_levels([80]) == pytest.approx([0.1, 0.5, 0.9])
    assert quantiles_of_levels([95, 80]) == pytest.approx([0.025, 0.1, 0.5, 0.9, 0.975])
    assert quantiles_of_levels([]) == [0.5]


def test_parse_levels_reads_percentages_and_names_every_bad_one():
    assert parse_levels("80,95") == [80, 95] and parse_levels(" 95, 80 ") == [80, 95]
    assert all(isinstance(level, int) for level in parse_levels("80,95"))
    assert parse_levels("99.5") == [99.5]
    for text, bad in (("80,100", "'100'"), ("0", "'0'"), ("-5", "'-5'"), ("80,x", "'x'"),
                      ("80,,95", "''"), ("nan", "'nan'")):
        with pytest.raises(ValueError, match=f"--levels '{text}': {bad} is not a level; give "
                           "percentages strictly between 0 and 100"):
            parse_levels(text)
    with pytest.raises(ValueError, match="--levels '80,95,80': 80 is given twice"):
        parse_levels("80,95,80")
