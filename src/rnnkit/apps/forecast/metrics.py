"""Forecast errors in the series' own units, and the season length they are scaled by.

With actual values ``y`` and forecasts ``ŷ`` over all (origin, step) pairs of the test tail:

    MAE   = mean |y - ŷ|
    RMSE  = sqrt(mean (y - ŷ)²)
    sMAPE = 100 · mean 2|y - ŷ| / (|y| + |ŷ|)          (a pair with y = ŷ = 0 counts 0)
    MASE  = MAE / mean_t |x_t - x_{t-m}|                (Hyndman & Koehler 2006)

where ``x`` is the history before the test tail (train and validation parts) and ``m`` the
season length (1 without a season: the in-sample naive forecast's error). MASE < 1 means the
forecast beats the in-sample (seasonal) naive forecast's one-step error.

The skill score against a reference is ``1 - MAE / MAE_reference``: 0 is as good as the
reference, 1 is perfect, negative is worse. Against a perfect reference (``MAE_reference = 0``)
it is the ratio's limit: 0 for a forecast as perfect (as good as the reference), -inf for any
other (infinitely worse than the reference).

Prediction intervals at levels ``ℓ`` (percent) are scored through their quantiles: the interval
of level ``ℓ`` is ``[q_{(1-ℓ/100)/2}, q_{(1+ℓ/100)/2}]`` (80 -> the 0.1 and 0.9 quantiles), and
with the median (the point forecast) they make the quantile set ``Q``:

    pinball_q(y, ŷ_q) = mean max(q (y - ŷ_q), (q - 1)(y - ŷ_q))     (0 <= q <= 1)
    SPL               = mean_{q ∈ Q} pinball_q / mean_t |x_t - x_{t-m}|   (scaled as MASE)
    coverage          = mean 1[lo <= y <= hi]                          (nominal: ℓ / 100)
    OWA               = (sMAPE / sMAPE_sn + MASE / MASE_sn) / 2        (M4, against seasonal
                                                                         naive "sn")

The pinball loss of the median is half the MAE; averaged over many quantiles the pinball loss
approaches half the CRPS, so SPL reads as a scaled CRPS of the interval forecast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

METRICS = ("MAE", "RMSE", "sMAPE", "MASE")


def mae(actual: np.ndarray, forecast: np.ndarray) -> float:
    return float(np.mean(np.abs(actual - forecast)))


def rmse(actual: np.ndarray, forecast: np.ndarray) -> float:
    return float(np.sqrt(np.mean((actual - forecast) ** 2)))


def smape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """In percent, from 0 to 200."""
    denominator = np.abs(actual) + np.abs(forecast)
    ratio = np.divide(2 * np.abs(actual - forecast), denominator,
                      out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)
    return float(100 * np.mean(ratio))


def mase_scale(history: np.ndarray, season: int | None) -> float:
    """Mean absolute error of the in-sample (seasonal) naive forecast on ``history``."""
    lag = season or 1
    if len(history) <= lag:
        raise ValueError(f"the history before the test tail has {len(history)} values, too few "
                         f"for the seasonal naive scale of MASE (season {lag})")
    scale = float(np.mean(np.abs(history[lag:] - history[:-lag])))
    if scale == 0:
        raise ValueError(f"the history repeats itself exactly every {lag} steps: the (seasonal) "
                         "naive forecast is perfect there, and MASE is undefined")
    return scale


def score(actual: np.ndarray, forecast: np.ndarray, scale: float) -> dict[str, float]:
    """Every metric of ``forecast`` against ``actual`` (same shape), MASE with ``scale``."""
    error = mae(actual, forecast)
    return {"MAE": error, "RMSE": rmse(actual, forecast), "sMAPE": smape(actual, forecast),
            "MASE": error / scale}


def skill(error: float, reference_error: float) -> float:
    """``1 - error / reference_error``; 0 or -inf against a perfect reference (module doc)."""
    if reference_error == 0:
        return 0.0 if error == 0 else float("-inf")
    return 1 - error / reference_error


def detect_season(values: np.ndarray, max_lag: int | None = None,
                  threshold: float = 0.3) -> int | None:
    """The season length of ``values`` from its autocorrelation, or None when there is none.

    A quadratic trend is first removed (a trend would otherwise make every lag look alike;
    differencing instead would leave mostly noise in a smooth series such as weekly CO2); the
    season is the shortest lag, from 2 to ``max_lag`` (default a third of the length, at most
    400), at a local maximum of the autocorrelation within 10 % of the highest such maximum,
    provided that one exceeds ``threshold``.
    """
    from statsmodels.tsa.stattools import acf

    time = np.arange(len(values))
    residual = values - np.polyval(np.polyfit(time, values, 2), time)
    max_lag = min(max_lag or len(residual) // 3, 400)
    if max_lag < 3 or np.std(residual) < 1e-12 * (np.abs(values).max() + 1e-300):
        return None
    correlation = acf(residual, nlags=max_lag, fft=True)
    lags = np.arange(2, max_lag)
    peaks = lags[(correlation[lags] > correlation[lags - 1])
                 & (correlation[lags] >= correlation[lags + 1])]
    if len(peaks) == 0:
        return None
    highest = correlation[peaks].max()
    if highest <= threshold:
        return None
    # Multiples of the season correlate about as strongly as the season itself: take the
    # shortest lag whose peak comes within 10 % of the highest.
    return int(peaks[correlation[peaks] >= 0.9 * highest][0])


def parse_levels(text: str) -> list[float]:
    """The interval levels of ``--levels`` (``"80,95"`` -> ``[80, 95]``), ascending.

    Each level is a percentage strictly inside (0, 100); a whole number comes back as ``int``
    (so that it names columns as ``lo-80``, not ``lo-80.0``). Repeats are an error.
    """
    levels = []
    for item in text.split(","):
        try:
            level = float(item)
        except ValueError:
            level = float("nan")
        if not 0 < level < 100:  # nan fails this too
            raise ValueError(f"--levels {text!r}: {item.strip()!r} is not a level; give "
                             "percentages strictly between 0 and 100, separated by commas "
                             "(e.g. 80,95)")
        level = int(level) if level.is_integer() else level
        if level in levels:
            raise ValueError(f"--levels {text!r}: {level} is given twice; give each level once")
        levels.append(level)
    return sorted(levels)


def level_name(level: float) -> str:
    """How ``level`` names its columns (``coverage-80``, ``lo-99.5``): ``{level:g}`` when that
    reads back as the same number, else every digit (``:g`` keeps 6, so 99.99999999 would
    read as a 100 % interval, and two close levels would share one column)."""
    text = f"{level:g}"
    return text if float(text) == level else repr(float(level))


def quantiles_of_levels(levels: Iterable[float]) -> list[float]:
    """The quantiles that bound the intervals of ``levels`` (percent), with the median, ascending:
    ``[80]`` -> ``[0.1, 0.5, 0.9]``; ``[80, 95]`` -> ``[0.025, 0.1, 0.5, 0.9, 0.975]``."""
    quantiles = {0.5}
    for level in levels:
        quantiles.update(((100 - level) / 200, (100 + level) / 200))
    return sorted(quantiles)


def quantile_forecasts(median: np.ndarray, intervals: Mapping[float, tuple[np.ndarray, np.ndarray]]
                       ) -> dict[float, np.ndarray]:
    """``{quantile: forecast}`` of a point forecast (taken as the median, the 0.5 quantile) and
    its ``{level: (lo, hi)}`` intervals, the keys in the order of `quantiles_of_levels`."""
    by_quantile = {0.5: median}
    for level, (lo, hi) in intervals.items():
        by_quantile[(100 - level) / 200] = lo
        by_quantile[(100 + level) / 200] = hi
    return {q: by_quantile[q] for q in quantiles_of_levels(intervals)}


def pinball_loss(actual: np.ndarray, quantile_forecast: np.ndarray, q: float) -> float:
    """Mean pinball (quantile) loss ``max(q (y - ŷ_q), (q - 1)(y - ŷ_q))`` of the ``q``-quantile
    forecast; it is lowest, in expectation, for the true ``q``-quantile."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be a quantile in [0, 1], got {q}")
    error = actual - quantile_forecast
    return float(np.mean(np.maximum(q * error, (q - 1) * error)))


def scaled_pinball_loss(actual: np.ndarray, quantile_forecasts: Mapping[float, np.ndarray],
                        scale: float) -> float:
    """The pinball loss averaged over the ``{quantile: forecast}`` of `quantile_forecasts`,
    divided by MASE's ``scale`` (`mase_scale`)."""
    if not quantile_forecasts:
        raise ValueError("scaled_pinball_loss needs at least one quantile forecast")
    losses = [pinball_loss(actual, forecast, q) for q, forecast in quantile_forecasts.items()]
    return float(np.mean(losses)) / scale


def coverage(actual: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """The fraction of ``actual`` inside its interval ``[lo, hi]`` (bounds included)."""
    return float(np.mean((lo <= actual) & (actual <= hi)))


def owa(smape: float, mase: float, smape_naive: float, mase_naive: float) -> float:
    """M4's overall weighted average against seasonal naive: ``(sMAPE / sMAPE_sn + MASE /
    MASE_sn) / 2``; 1 is as good as seasonal naive, below 1 better."""
    for name, value in (("smape_naive", smape_naive), ("mase_naive", mase_naive)):
        if not value > 0:
            raise ValueError(f"{name} must be positive to divide by, got {value}: seasonal "
                             "naive is perfect there and OWA is undefined")
    return 0.5 * (smape / smape_naive + mase / mase_naive)
