"""Series for forecasting, prepared the honest way: split in time, then window, then scale.

1. A series comes from a CSV file (pandas) or a built-in dataset bundled with statsmodels
   (offline): ``co2`` (Mauna Loa, weekly, season 52) and ``sunspots`` (yearly, cycle ~11).
2. Missing values are filled by an explicit rule (``interpolate``, ``ffill`` or ``error``) and
   counted; irregular time steps are detected and counted.
3. The series is split in time order into train, validation and a test tail.
4. The scaler is fitted on the train part only.
5. Windows are cut per part after the split: a window's *targets* all lie inside its part; its
   inputs may reach back into earlier parts, which is only the past, known when forecasting.
No test value can reach the scaler or a training window (tests/test_forecast_data.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

DATASETS = ("co2", "sunspots")
FILL_RULES = ("interpolate", "ffill", "error")


def _rows(positions: np.ndarray) -> list[int]:
    """Row numbers for messages (plain ints), the first five."""
    return [int(p) for p in positions]


@dataclass
class Series:
    """A prepared series: target (and feature) columns, float64, with what preparation did."""

    values: np.ndarray  # (L, C): column 0 is the target, then the features
    columns: list[str]
    time: pd.Index | None  # timestamps, when the data has them
    season: int | None  # season length when known (built-in data) or given
    filled: int  # missing values filled (all columns)
    irregular_steps: int  # time steps that differ from the most common step


def builtin_dataset(name: str) -> tuple[pd.DataFrame, str, str | None, int]:
    """(frame, target column, time column or None, season length) of a bundled dataset."""
    import statsmodels.api as sm

    if name == "co2":
        frame = sm.datasets.co2.load_pandas().data
        frame = frame.rename_axis("date").reset_index()
        return frame, "co2", "date", 52
    if name == "sunspots":
        frame = sm.datasets.sunspots.load_pandas().data
        return frame, "SUNACTIVITY", "YEAR", 11
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file {str(path)!r} does not exist")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"CSV file {str(path)!r} cannot be read as CSV: "
                         f"{str(error).splitlines()[0]}") from None
    if frame.empty:
        raise ValueError(f"CSV file {str(path)!r} has no rows")
    return frame


def prepare_series(frame: pd.DataFrame, target: str, time: str | None = None,
                   features: list[str] | None = None, fill: str = "interpolate",
                   season: int | None = None) -> Series:
    """Select, check, order and fill the columns; see the module docstring."""
    if fill not in FILL_RULES:
        raise ValueError(f"fill must be one of {', '.join(FILL_RULES)}, got {fill!r}")
    columns = [target, *(features or [])]
    wanted = columns + ([time] if time else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"column(s) {', '.join(map(repr, missing))} not in the data; it has "
                         f"{', '.join(map(repr, frame.columns))}")
    data = frame[columns].apply(pd.to_numeric, errors="coerce")
    for column in columns:
        bad = frame[column].notna() & data[column].isna()
        if bad.any():
            rows = _rows(np.flatnonzero(bad.to_numpy())[:5])
            raise ValueError(f"column {column!r} is not numeric: rows {rows} hold "
                             f"{list(frame[column][bad].head(3))}")
    time_index, irregular = None, 0
    if time:
        stamps = frame[time]
        if not pd.api.types.is_numeric_dtype(stamps):
            stamps = pd.to_datetime(stamps, errors="coerce")
            if stamps.isna().any():
                rows = _rows(np.flatnonzero(stamps.isna().to_numpy())[:5])
                raise ValueError(f"time column {time!r} has unreadable timestamps at rows {rows}")
        order = np.argsort(stamps.to_numpy(), kind="stable")
        data, stamps = data.iloc[order].reset_index(drop=True), stamps.iloc[order]
        steps = pd.Series(stamps.to_numpy()).diff().dropna()
        if len(steps):
            irregular = int((steps != steps.mode().iloc[0]).sum())
        time_index = pd.Index(stamps.to_numpy())
    values = data.to_numpy(dtype=np.float64, copy=True)
    infinite = np.isinf(values)
    if infinite.any():
        values[infinite] = np.nan  # treated as missing: filled by the rule, or refused
    missing_count = int(np.isnan(values).sum())
    if missing_count:
        if fill == "error":
            rows = _rows(np.flatnonzero(np.isnan(values).any(axis=1))[:5])
            raise ValueError(f"{missing_count} missing or infinite values (rows {rows}, ...) and "
                             "--fill error; use --fill interpolate or --fill ffill")
        filled = pd.DataFrame(values)
        filled = (filled.interpolate(limit_direction="both") if fill == "interpolate"
                  else filled.ffill().bfill())
        values = filled.to_numpy()
    return Series(values, columns, time_index, season, missing_count, irregular)


@dataclass
class Scaler:
    """Per-column standardisation, fitted on the training part only."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray, columns: list[str]) -> Scaler:
        scale = train.std(axis=0)
        constant = [c for c, s in zip(columns, scale, strict=True) if s == 0]
        if constant:
            raise ValueError(f"column(s) {', '.join(map(repr, constant))} are constant over the "
                             "training part: nothing to forecast or learn from")
        return cls(train.mean(axis=0), scale)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale

    def inverse_target(self, target: np.ndarray) -> np.ndarray:
        return target * self.scale[0] + self.mean[0]


@dataclass
class Split:
    """Index boundaries of the parts: train [0, a), validation [a, b), test [b, L)."""

    train_end: int
    validation_end: int
    length: int


def split_series(length: int, lookback: int, horizon: int, test_size: int,
                 validation_size: int) -> Split:
    """Parts in time order; each must hold at least one window's targets."""
    for name, value in (("lookback", lookback), ("horizon", horizon), ("test size", test_size),
                        ("validation size", validation_size)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if test_size < horizon or validation_size < horizon:
        raise ValueError(f"test size ({test_size}) and validation size ({validation_size}) must "
                         f"be at least the horizon ({horizon})")
    train_end = length - test_size - validation_size
    needed = lookback + horizon + validation_size + test_size
    if train_end < lookback + horizon:
        raise ValueError(
            f"too few rows: {length}, but lookback {lookback} + horizon {horizon} + validation "
            f"{validation_size} + test {test_size} = {needed} are needed")
    return Split(train_end, train_end + validation_size, length)


def window_origins(start: int, end: int, lookback: int, horizon: int,
                   stride: int = 1) -> np.ndarray:
    """Forecast origins ``t`` (first target index) of the windows whose targets
    ``[t, t + horizon)`` lie in ``[start, end)`` and whose inputs ``[t - lookback, t)`` exist,
    every ``stride``-th from the first."""
    return np.arange(max(start, lookback), end - horizon + 1)[::stride]


def windows(values: np.ndarray, start: int, end: int, lookback: int, horizon: int,
            stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(n, lookback, C)`` and targets ``(n, horizon)`` of every window whose targets
    lie in ``[start, end)``: targets ``values[t : t + horizon, 0]``, inputs
    ``values[t - lookback : t]``, for the origins of `window_origins`.
    """
    origins = window_origins(start, end, lookback, horizon, stride)
    inputs = np.stack([values[t - lookback : t] for t in origins])
    targets = np.stack([values[t : t + horizon, 0] for t in origins])
    return inputs, targets


# Built-in datasets' natural lookback and horizon: two years -> one year of weekly CO2; three
# solar cycles -> one cycle of yearly sunspot numbers.
DATASET_DEFAULTS = {"co2": (104, 52), "sunspots": (33, 11)}
CSV_DEFAULTS = (24, 1)


@dataclass
class DataConfig:
    """Where the series comes from and how it is cut; one field per `rnnkit forecast` option."""

    dataset: str | None = None  # a built-in series (co2 | sunspots), or
    csv: str | None = None  # a CSV file with a header row
    target: str | None = None  # the column to forecast (CSV; built-in data knows its own)
    time: str | None = None  # the column of timestamps or numbers to sort by (optional)
    features: list[str] = field(default_factory=list)  # extra input columns (direct only)
    fill: str = "interpolate"  # interpolate | ffill | error, for missing or infinite values
    season: int | None = None  # season length; None: the dataset's or detected; 0: none
    lookback: int | None = None  # steps the network reads; None: the source's default
    horizon: int | None = None  # steps forecast from each origin; None: the source's default
    test_size: int | None = None  # length of the test tail; None: 10 % of the rows (>= horizon)
    validation_size: int | None = None  # length of the validation part; None: as the test tail
    stride: int = 1  # evaluate every stride-th origin of the test tail


def load_frame(config: DataConfig) -> tuple[pd.DataFrame, str, str | None, int | None, str]:
    """(frame, target column, time column, known season, description) of the configured source."""
    if (config.dataset is None) == (config.csv is None):
        raise ValueError("give --csv FILE (with --target COL) or --dataset NAME (one of them)")
    if config.dataset is not None:
        frame, target, time, season = builtin_dataset(config.dataset)
        if config.target not in (None, target):
            raise ValueError(f"dataset {config.dataset!r} has the target column {target!r}; "
                             f"drop --target {config.target}")
        return frame, target, time, season, f"built-in dataset {config.dataset!r}"
    if not config.target:
        raise ValueError(f"--target COL is required with --csv: which column of "
                         f"{config.csv!r} to forecast")
    return read_csv(config.csv), config.target, config.time, None, f"CSV file {config.csv!r}"


def resolve_sizes(config: DataConfig, length: int) -> DataConfig:
    """A copy of ``config`` with lookback, horizon and part sizes filled in for ``length`` rows."""
    lookback, horizon = DATASET_DEFAULTS.get(config.dataset, CSV_DEFAULTS)
    lookback = config.lookback if config.lookback is not None else lookback
    horizon = config.horizon if config.horizon is not None else horizon
    if horizon <= 0:
        raise ValueError(f"horizon must be a positive integer, got {horizon}")
    if lookback <= 0:
        raise ValueError(f"lookback must be a positive integer, got {lookback}")
    if config.stride <= 0:
        raise ValueError(f"stride must be a positive integer, got {config.stride}")
    test_size = config.test_size or max(horizon, round(0.1 * length))
    validation_size = config.validation_size or test_size
    return replace(config, lookback=lookback, horizon=horizon, test_size=test_size,
                   validation_size=validation_size)


def future_times(time: pd.Index | None, horizon: int) -> list | None:
    """The ``horizon`` timestamps after the last one, at the most common step (None without)."""
    if time is None or len(time) < 2:
        return None
    steps = pd.Series(time).diff().dropna()
    step = steps.mode().iloc[0]
    return [time[-1] + step * (k + 1) for k in range(horizon)]
