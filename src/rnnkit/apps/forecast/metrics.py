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
"""

from __future__ import annotations

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
