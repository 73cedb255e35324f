"""The forecasts a model must beat, each from every origin of the test tail, past data only.

From origin ``t`` (the first forecast step), with ``y_0 … y_{t-1}`` known, steps ``k = 1 … h``:

- ``Naive``:          ŷ_{t-1+k} = y_{t-1}
- ``SeasonalNaive``:  ŷ_{t-1+k} = y_{t-1+k-m·(⌊(k-1)/m⌋+1)}  (the same point of the last full
                      season)
- ``AutoARIMA``:      seasonal ARIMA(p,d,q)(P,D,Q)[m], orders by AICc (statsforecast, a mirror
                      of R's forecast::auto.arima)
- ``AutoETS``:        the exponential smoothing state space model ETS(error, trend, season)
                      chosen by AICc (statsforecast, a mirror of forecast::ets)
- ``AutoTheta``:      the best of the standard, optimised and dynamic theta models by in-sample
                      MSE, on a classically deseasonalised series when a season is detected

The names are statsforecast's own and stable: they are the ``model`` column of forecasts.csv.

Protocol. The three statistical models are fitted once, on ``values[:history_end]`` (the train
and validation parts: what the network sees), and then run from every origin ``t`` on
``values[:t]`` with statsforecast's ``forward``, which applies a fitted model to a new series
without refitting. What ``forward`` keeps and what it recomputes (statsforecast 2.1, read from
its source):

- AutoARIMA: the orders and every coefficient (AR, MA, seasonal, mean, drift) and the innovation
  variance σ² stay fixed; a Kalman filter runs over ``values[:t]`` for the state at ``t``.
- AutoETS: the form, the smoothing parameters and the initial states stay fixed; the states are
  filtered over ``values[:t]``, and σ² is re-estimated from those one-step residuals (so the
  intervals' width follows the past of each origin).
- AutoTheta: the theta model's type, level start, α and θ stay fixed; **the seasonal part is
  re-estimated at every origin**: forward re-runs the seasonality test (acf at lag m, 90 %) and
  the classical decomposition on ``values[:t]``, so both whether the series is deseasonalised
  and its seasonal indices come from the values before each origin. That is still past data
  only, but it is not "fitted once"; the theta parameters were fitted on the history's own
  decomposition.

Naive and SeasonalNaive have nothing to fit; their intervals are statsforecast's, in closed
form here (so that they run without statsforecast): with ``σ`` the root mean square of the
in-sample (seasonal) naive errors of ``values[:t]`` (divided by ``t - 1``, resp. ``t - m``),

    Naive:          ŷ ± z σ √k
    SeasonalNaive:  ŷ ± z σ √(⌊(k-1)/m⌋ + 1)              z = Φ⁻¹(1/2 + level/200)

Without a season (None or 1) the models get ``season_length=1``. With a season but a history of
fewer than two of them, the statistical models are fitted without a season (statsforecast would
silently drop it for ETS and Theta, or estimate a seasonal ARIMA from too little), and
``BaselineForecast.note`` says so.

AutoARIMA's search uses statsforecast's ``approximation=True`` (conditional sums of squares
while choosing the orders, then a final maximum-likelihood fit of the chosen model) when the
history is longer than 150 values or the season longer than 12: the default of R's
forecast::auto.arima, which statsforecast mirrors but does not copy. Weekly CO2 (season 52,
2056 values) otherwise takes more than ten minutes of CPU to fit; with it, about 35 s, and each
origin's forward about 0.26 s (a Kalman filter over 2000+ values with a state of dimension 108:
AR and MA lags up to 55 and 53 differencing states), so the 177 test origins add about 45 s.
The exact search stays for short series.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

STATISTICAL_MODELS = ("AutoARIMA", "AutoETS", "AutoTheta")
INSTALL_HINT = "pip install 'rnnkit[forecast]'"
# R's forecast::auto.arima: approximation = (length(x) > 150 | frequency(x) > 12).
APPROXIMATION_LENGTH, APPROXIMATION_SEASON = 150, 12


@dataclass
class BaselineForecast:
    """A baseline's forecasts from every origin, in the series' units."""

    name: str  # stable, statsforecast's model name: the table's method, forecasts.csv's model
    forecasts: np.ndarray  # (origins, horizon)
    intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # {level: (lo, hi)}, each (origins, horizon): the central prediction interval of that level
    # in percent; empty when no levels were asked for
    model: str = ""  # the form that was chosen, e.g. "ARIMA(3,1,2)(1,1,0)[52]", "ETS(A,Ad,N)"
    note: str | None = None  # what the reader must know, e.g. a season that was dropped


def normal_quantile(level: float) -> float:
    """``z = Φ⁻¹(1/2 + level/200)``: the half-width of the central ``level`` % normal interval
    in standard deviations (80 -> 1.2816, 95 -> 1.9600)."""
    return NormalDist().inv_cdf(0.5 + level / 200)


def _check_origins(origins: np.ndarray, lag: int, name: str) -> None:
    if len(origins) and origins.min() < lag + 1:
        raise ValueError(f"{name} needs more than {lag} values before every origin; the first "
                         f"origin is {int(origins.min())}")


def _naive_sigma(values: np.ndarray, origins: np.ndarray, lag: int) -> np.ndarray:
    """``σ_t = sqrt(Σ_{j=lag}^{t-1} (y_j - y_{j-lag})² / (t - lag))`` for each origin ``t``:
    statsforecast's in-sample error scale of the naive (lag 1) or seasonal naive forecast."""
    squared = np.concatenate([[0.0], np.cumsum((values[lag:] - values[:-lag]) ** 2)])
    return np.sqrt(squared[origins - lag] / (origins - lag))  # (origins,)


def _normal_intervals(forecasts: np.ndarray, sigmah: np.ndarray,
                      levels: Sequence[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    return {level: (forecasts - normal_quantile(level) * sigmah,
                    forecasts + normal_quantile(level) * sigmah) for level in levels}


def last_value(values: np.ndarray, origins: np.ndarray, horizon: int,
               levels: Sequence[float] = ()) -> BaselineForecast:
    """``Naive``: the value before each origin, for every step; intervals ``± z σ √k``."""
    _check_origins(origins, 1, "Naive")
    forecasts = np.repeat(values[origins - 1, None], horizon, axis=1)  # (origins, horizon)
    sigmah = _naive_sigma(values, origins, 1)[:, None] * np.sqrt(np.arange(1, horizon + 1))
    return BaselineForecast("Naive", forecasts, _normal_intervals(forecasts, sigmah, levels),
                            model="last value")


def seasonal_naive(values: np.ndarray, origins: np.ndarray, horizon: int, season: int,
                   levels: Sequence[float] = ()) -> BaselineForecast:
    """``SeasonalNaive``: the same point of the last full season before each origin;
    intervals ``± z σ √(⌊(k-1)/m⌋ + 1)``."""
    _check_origins(origins, season, "SeasonalNaive")
    steps = np.arange(horizon)
    back = season * (steps // season + 1)  # (horizon,): how far back the copied value lies
    forecasts = values[origins[:, None] + steps[None, :] - back[None, :]]  # (origins, horizon)
    sigmah = _naive_sigma(values, origins, season)[:, None] * np.sqrt(steps // season + 1)
    return BaselineForecast("SeasonalNaive", forecasts,
                            _normal_intervals(forecasts, sigmah, levels),
                            model=f"seasonal naive (m={season})")


def missing_statistical_baselines() -> str | None:
    """Why AutoARIMA, AutoETS and AutoTheta cannot run (statsforecast is not installed, with the
    install hint), or None when they can."""
    try:
        import statsforecast.models  # noqa: F401
    except ImportError:
        return (f"{', '.join(STATISTICAL_MODELS)} left out: they need statsforecast "
                f"({INSTALL_HINT}); only Naive and SeasonalNaive were run")
    return None


@contextlib.contextmanager
def _quiet():
    """statsforecast warns on every hard optimisation step of its search; the information
    criterion already discards those candidates."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def statistical_model(name: str, season_length: int, history_length: int):
    """The unfitted statsforecast model ``name`` (one of `STATISTICAL_MODELS`)."""
    from statsforecast.models import AutoARIMA, AutoETS, AutoTheta

    if name == "AutoARIMA":
        approximate = (history_length > APPROXIMATION_LENGTH
                       or season_length > APPROXIMATION_SEASON)
        return AutoARIMA(season_length=season_length, approximation=approximate)
    if name == "AutoETS":
        return AutoETS(season_length=season_length)
    if name == "AutoTheta":
        return AutoTheta(season_length=season_length)
    raise ValueError(f"unknown statistical baseline {name!r}; expected one of "
                     f"{', '.join(STATISTICAL_MODELS)}")


def _chosen_form(name: str, fitted) -> str:
    """The selected model in the usual notation, for the log."""
    state = fitted.model_
    if name == "AutoARIMA":
        from statsforecast.arima import arima_string

        return " ".join(arima_string(state).split())
    if name == "AutoETS":
        error, trend, season, damped = state["components"][:4]
        return f"ETS({error},{trend}{'d' if damped == 'D' else ''},{season})"
    kind = state["modeltype"]
    return f"Theta {kind}" + (f", {state['decomposition_type']} season"
                              if state.get("decompose") else ", no season")


def statistical_baseline(name: str, values: np.ndarray, history_end: int, origins: np.ndarray,
                         horizon: int, season: int | None,
                         levels: Sequence[float] = ()) -> BaselineForecast:
    """One statsforecast model, fitted once on ``values[:history_end]`` and run forward from each
    origin ``t`` on ``values[:t]`` (module doc: what stays fixed)."""
    note = None
    season_length = season or 1
    if season_length > 1 and history_end < 2 * season_length:
        note = (f"{name} fitted without a season: the history holds {history_end} values, "
                f"fewer than two seasons of {season_length}")
        season_length = 1
    model = statistical_model(name, season_length, history_end)
    level = list(levels) or None
    forecasts = np.empty((len(origins), horizon))
    intervals = {lv: (np.empty_like(forecasts), np.empty_like(forecasts)) for lv in levels}
    with _quiet():
        try:
            model.fit(values[:history_end].astype(np.float64))
        except NotImplementedError as error:  # statsforecast's "tiny datasets" (ETS, Theta)
            raise ValueError(
                f"{name} cannot be fitted on the {history_end} values before the test tail "
                f"(statsforecast: {error}); give a longer series, or a smaller --test-size or "
                "--validation-size") from None
        for row, t in enumerate(origins):
            result = model.forward(values[:t].astype(np.float64), horizon, level=level)
            forecasts[row] = result["mean"]
            for lv, (lo, hi) in intervals.items():
                lo[row], hi[row] = result[f"lo-{lv}"], result[f"hi-{lv}"]
    return BaselineForecast(name, forecasts, intervals, model=_chosen_form(name, model),
                            note=note)


def all_baselines(values: np.ndarray, history_end: int, origins: np.ndarray, horizon: int,
                  season: int | None, levels: Sequence[float] = ()) -> list[BaselineForecast]:
    """Every baseline for the target ``values (L,)`` from each origin (``(origins, horizon)``
    forecasts, and intervals at ``levels``, percent): Naive, SeasonalNaive (with a season of
    2 or more), then AutoARIMA, AutoETS and AutoTheta when statsforecast is installed (else
    `missing_statistical_baselines` says why they are not here)."""
    values = np.asarray(values, dtype=np.float64)
    baselines = [last_value(values, origins, horizon, levels)]
    if season and season > 1:
        baselines.append(seasonal_naive(values, origins, horizon, season, levels))
    if missing_statistical_baselines() is None:
        baselines += [statistical_baseline(name, values, history_end, origins, horizon, season,
                                           levels) for name in STATISTICAL_MODELS]
    return baselines
