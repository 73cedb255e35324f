"""Series for forecasting, prepared the honest way: split in time, then window, then scale.

1. A series comes from a CSV file (pandas) or a built-in dataset bundled with statsmodels
   (offline): ``co2`` (Mauna Loa, weekly, season 52) and ``sunspots`` (yearly, cycle ~11).
2. Rows are put in time order; missing or infinite values are counted (``--fill error`` refuses
   them); irregular time steps are detected and counted, repeated ones refused.
3. The series is split in time order into train, validation and a test tail.
4. Missing values are filled by the rule (``interpolate`` or ``ffill``) from the history only;
   in the test tail, forward only (`fill_missing`).
5. The scaler is fitted on the train part only.
6. Windows are cut per part after the split: a window's *targets* all lie inside its part; its
   inputs may reach back into earlier parts, which is only the past, known when forecasting.
No test value can reach the filled history, the scaler or a training window
(tests/test_forecast_data.py and tests/test_forecast_commands.py check it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from rnnkit.configuration import parse_columns, parse_season

DATASETS = ("co2", "sunspots")
FILL_RULES = ("interpolate", "ffill", "error")


def _at_rows(rows: np.ndarray) -> str:
    """Data rows for messages: 0 is the first row below the header, in the file's own order."""
    shown = ", ".join(str(int(r)) for r in rows[:5])
    return f"data row{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > 5 else ''}"


@dataclass
class Series:
    """A prepared series: target (and feature) columns, float64, with what preparation found.

    ``values`` holds NaN where a value was missing or infinite until `fill_missing` fills it
    (which needs to know where the test tail starts, so it runs after the split)."""

    values: np.ndarray  # (L, C): column 0 is the target, then the features; in time order
    columns: list[str]
    time: pd.Index | None  # timestamps (or numbers) in time order, when the data has them
    season: int | None  # season length when known (built-in data) or given
    missing: int  # missing or infinite values found (all columns)
    irregular_steps: int  # time steps that differ from the series' regular step
    step: object = None  # that step: a pandas offset or Timedelta, or a number; None without time


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
    with open(path, "rb") as stream:
        start = stream.read(8192)
    # A byte-order mark says UTF-16 (Excel's "Unicode text"); other NUL bytes say binary.
    encoding = "utf-16" if start[:2] in (b"\xff\xfe", b"\xfe\xff") else None
    if encoding is None and b"\0" in start:
        raise ValueError(f"CSV file {str(path)!r} is binary (it holds NUL bytes), not CSV text")
    try:
        frame = pd.read_csv(path, encoding=encoding)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"CSV file {str(path)!r} cannot be read as CSV: "
                         f"{str(error).splitlines()[0]}") from None
    if frame.empty:
        raise ValueError(f"CSV file {str(path)!r} has no rows")
    return frame


def _count_irregular(stamps, step) -> int:
    """Consecutive pairs of ``stamps`` that are not ``step`` apart."""
    with warnings.catch_warnings():  # some calendar offsets add element by element: fine here
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        return int((stamps[:-1] + step != stamps[1:]).sum())


def regular_step(stamps: pd.Index) -> tuple[object, int]:
    """(the series' regular step, how many steps differ from it) of sorted, distinct stamps.

    Numbers: the most common difference (equal to 1e-9 relative). Dates: pandas' inferred
    frequency when every step fits one; otherwise the calendar step (month, quarter, year: their
    lengths in days vary) or fixed duration that the most steps fit.
    """
    if len(stamps) < 2:
        return None, 0
    if not isinstance(stamps, pd.DatetimeIndex):
        if pd.api.types.is_integer_dtype(stamps.dtype):  # exact: no float rounding of big ints
            differences = np.diff(stamps.to_numpy(dtype=np.int64))
            step = int(pd.Series(differences).mode().iloc[0])
            return step, int((differences != step).sum())
        differences = np.diff(stamps.to_numpy(dtype=np.float64))
        step = float(pd.Series(differences).mode().iloc[0])
        return step, int((~np.isclose(differences, step, rtol=1e-9, atol=0)).sum())
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset
        warnings.simplefilter("ignore")
        inferred = pd.infer_freq(stamps) if len(stamps) >= 3 else None
    if inferred is not None:
        return to_offset(inferred), 0
    most_common = pd.Series(stamps[1:] - stamps[:-1]).mode().iloc[0]
    days = most_common / pd.Timedelta(days=1)
    months = 1 if 28 <= days <= 31 else 3 if 89 <= days <= 92 else 12 if 365 <= days <= 366 \
        else 0
    # Calendar steps first, so that they win ties (two month ends 28 days apart are monthly):
    # month ends (any anchor, 29 February included), or the same day of the month.
    candidates = ([pd.offsets.MonthEnd(months), pd.DateOffset(months=months)] if months else [])
    candidates.append(most_common)
    counts = [_count_irregular(stamps, step) for step in candidates]
    best = int(np.argmin(counts))
    return candidates[best], counts[best]


def _time_order(frame: pd.DataFrame, time: str) -> tuple[pd.Index, np.ndarray]:
    """(sorted stamps, the data row of each) of the time column; unreadable, empty or repeated
    stamps are refused with their rows."""
    stamps = frame[time]
    if not pd.api.types.is_numeric_dtype(stamps):
        original = stamps
        try:
            with warnings.catch_warnings():  # pandas 2 warns on mixed offsets (3 raises)
                warnings.simplefilter("ignore", FutureWarning)
                stamps = pd.to_datetime(original, errors="coerce")
        except ValueError:  # several UTC offsets (local time across a DST change): to UTC
            stamps = pd.to_datetime(original, errors="coerce", utc=True)
        if not pd.api.types.is_datetime64_any_dtype(stamps):  # pandas 2: mixed offsets, objects
            stamps = pd.to_datetime(original, errors="coerce", utc=True)
        if stamps.isna().any():
            raise ValueError(f"time column {time!r} has unreadable timestamps at "
                             f"{_at_rows(np.flatnonzero(stamps.isna().to_numpy()))}")
    else:
        bad = ~np.isfinite(stamps.to_numpy(dtype=np.float64))  # empty (NaN) or infinite
        if bad.any():
            raise ValueError(f"time column {time!r} is empty or infinite at "
                             f"{_at_rows(np.flatnonzero(bad))}")
    order = np.argsort(stamps.to_numpy(), kind="stable")
    sorted_stamps = pd.Index(stamps.to_numpy()[order])
    repeated = np.flatnonzero(sorted_stamps[1:] == sorted_stamps[:-1])
    if len(repeated):
        first = repeated[0]
        rows = order[(sorted_stamps == sorted_stamps[first])]
        raise ValueError(f"time column {time!r} repeats {sorted_stamps[first]} at "
                         f"{_at_rows(np.sort(rows))} ({len(repeated)} row(s) in all repeat an "
                         "earlier stamp); aggregate them to one row per time first")
    return sorted_stamps, order


def prepare_series(frame: pd.DataFrame, target: str, time: str | None = None,
                   features: list[str] | None = None, fill: str = "interpolate",
                   season: int | None = None,
                   future_features: list[str] | None = None) -> Series:
    """Select, check and order the columns (the target, the past-only ``features``, then the
    ``future_features``, known in advance); count missing values (refused under ``fill`` =
    ``"error"``) and irregular time steps. Filling waits for the split: `fill_missing`."""
    if fill not in FILL_RULES:
        raise ValueError(f"fill must be one of {', '.join(FILL_RULES)}, got {fill!r}")
    columns = [target, *(features or []), *(future_features or [])]
    roles = (["the target"] + ["--features"] * len(features or [])
             + ["--future-features"] * len(future_features or []))
    for k, column in enumerate(columns):
        if column in columns[:k]:
            raise ValueError(f"column {column!r} is given twice ({roles[columns.index(column)]} "
                             f"and {roles[k]}); give each column one role")
    wanted = columns + ([time] if time else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"column(s) {', '.join(map(repr, missing))} not in the data; it has "
                         f"{', '.join(map(repr, frame.columns))}")
    data = frame[columns].apply(pd.to_numeric, errors="coerce")
    for column in columns:
        bad = frame[column].notna() & data[column].isna()
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy())
            raise ValueError(f"column {column!r} is not numeric: {_at_rows(rows)} "
                             f"hold{'s' if len(rows) == 1 else ''} "
                             f"{list(frame[column][bad].head(3))}")
    rows = np.arange(len(frame))
    time_index, step, irregular = None, None, 0
    if time:
        time_index, rows = _time_order(frame, time)
        step, irregular = regular_step(time_index)
    values = data.to_numpy(dtype=np.float64, copy=True)[rows]
    values[np.isinf(values)] = np.nan  # treated as missing: filled by the rule, or refused
    absent = np.isnan(values)
    if absent.any() and fill == "error":
        found = [f"column {column!r}: {int(absent[:, k].sum())} at "
                 f"{_at_rows(np.sort(rows[absent[:, k]]))}"
                 for k, column in enumerate(columns) if absent[:, k].any()]
        raise ValueError(f"{int(absent.sum())} missing or infinite values ({'; '.join(found)}) "
                         "and --fill error; use --fill interpolate or --fill ffill")
    return Series(values, columns, time_index, season, int(absent.sum()), irregular, step)


def fill_missing(series: Series, fill: str, history_end: int | None = None) -> Series:
    """A copy of ``series`` with its missing values filled, never from the test tail.

    The history ``[0, history_end)`` (train and validation) is filled from its own values by
    ``fill``: ``interpolate`` (linear between the neighbours; the edges take the nearest value)
    or ``ffill`` (the last value before, the first one for a leading gap). The test tail
    ``[history_end, L)`` is filled forward only, with the last value before each gap, as a
    forecaster standing at that point would know it: interpolating there would read values after
    the forecast origin. ``history_end=None``: all of it is history (forecasting the future).
    (So `predict` on a file cut at a test origin interpolates a gap inside the tail where the
    evaluation carried the last value forward: the two forecasts agree when the tail is whole.)
    """
    history_end = len(series.values) if history_end is None else history_end
    history = pd.DataFrame(series.values[:history_end])
    empty = [column for column, count in zip(series.columns, history.notna().sum(), strict=True)
             if count == 0]
    if empty:
        where = "before the test tail" if history_end < len(series.values) else "at all"
        raise ValueError(f"column(s) {', '.join(map(repr, empty))} have no value {where}: "
                         "nothing to fill the missing values from")
    history = (history.interpolate(limit_direction="both") if fill == "interpolate"
               else history.ffill().bfill())
    whole = pd.concat([history, pd.DataFrame(series.values[history_end:])], ignore_index=True)
    return replace(series, values=whole.ffill().to_numpy())


SCALERS = ("robust", "standard")


@dataclass
class Scaler:
    """Per-column affine scaling ``(x - center) / scale``, fitted on the training part only.

    - ``standard``: every column's mean and standard deviation.
    - ``robust`` (the default of `rnnkit forecast`): the target's median and its mean absolute
      one-step change ``mean_t |y_t - y_{t-1}|`` (the in-sample naive forecast's error); the
      features standardised. A level shift or a trend inflates the standard deviation of the
      training part (and so shrinks every change the network sees to a sliver of its inputs'
      range); it moves the one-step changes by one term only. The network works relative to the
      window's last value (`Forecaster`), so the center matters little for the target: the scale
      sets the size of the changes it learns.
    """

    mean: np.ndarray  # (C,) the center subtracted
    scale: np.ndarray  # (C,) the divisor

    @classmethod
    def fit(cls, train: np.ndarray, columns: list[str], method: str = "standard") -> Scaler:
        """The scaler of ``train (L, C)`` (column 0 the target) by ``method``."""
        if method not in SCALERS:
            raise ValueError(f"scaler must be one of {', '.join(SCALERS)}, got {method!r}")
        # The range, not the deviation: std of 0.1 repeated is 1.4e-17, not 0.
        spread = np.ptp(train, axis=0)
        constant = [c for c, s in zip(columns, spread, strict=True) if s == 0]
        if constant:
            raise ValueError(f"column(s) {', '.join(map(repr, constant))} are constant over the "
                             "training part: nothing to forecast or learn from")
        center, scale = train.mean(axis=0), train.std(axis=0)
        if method == "robust":
            center[0] = np.median(train[:, 0])
            # Not constant, so some step changes: the mean absolute change is positive.
            scale[0] = np.mean(np.abs(np.diff(train[:, 0])))
        return cls(center, scale)

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
    """Parts in time order. The test tail holds at least one whole forecast (``horizon``
    values); training and validation score every origin whose forecast reaches into their part
    (`rolling_windows`), so the train part needs one target after a ``lookback`` window, and
    the validation part one value."""
    for name, value in (("lookback", lookback), ("horizon", horizon), ("test size", test_size),
                        ("validation size", validation_size)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if test_size < horizon:
        raise ValueError(f"test size ({test_size}) must be at least the horizon ({horizon})")
    train_end = length - test_size - validation_size
    needed = lookback + 1 + validation_size + test_size
    if train_end < lookback + 1:
        raise ValueError(
            f"too few rows: {length}, but lookback {lookback} + 1 training target + validation "
            f"{validation_size} + test {test_size} = {needed} are needed")
    return Split(train_end, train_end + validation_size, length)


def window_origins(start: int, end: int, lookback: int, horizon: int,
                   stride: int = 1) -> np.ndarray:
    """Forecast origins ``t`` (first target index) of the windows whose targets
    ``[t, t + horizon)`` lie in ``[start, end)`` and whose inputs ``[t - lookback, t)`` exist,
    every ``stride``-th from the first."""
    return np.arange(max(start, lookback), end - horizon + 1)[::stride]


def window_inputs(values: np.ndarray, origins: np.ndarray, lookback: int, horizon: int,
                  future: int = 0) -> np.ndarray:
    """The network's input from each origin ``t``: the past ``values[t - lookback : t]``
    ``(n, lookback, C)``; with ``future`` known-future columns (the last ``future`` of ``C``),
    ``(n, lookback + horizon, C)``: the past, then the ``horizon`` rows from ``t`` holding those
    columns' values alone (every other column NaN there: the target after the origin is never
    part of an input; `Forecaster` reads the future rows' last ``future`` columns only)."""
    past = np.stack([values[t - lookback : t] for t in origins])
    if not future:
        return past
    if origins[-1] + horizon > len(values):
        raise ValueError(f"the known future features end at row {len(values) - 1}, but the "
                         f"forecast from row {origins[-1]} reads them up to row "
                         f"{origins[-1] + horizon - 1}")
    ahead = np.full((len(origins), horizon, values.shape[1]), np.nan)
    ahead[..., -future:] = np.stack([values[t : t + horizon, -future:] for t in origins])
    return np.concatenate([past, ahead], axis=1)


def windows(values: np.ndarray, start: int, end: int, lookback: int, horizon: int,
            stride: int = 1, future: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(n, lookback, C)`` (`window_inputs`: ``(n, lookback + horizon, C)`` with
    ``future`` known-future columns) and targets ``(n, horizon)`` of every window whose targets
    lie in ``[start, end)``: targets ``values[t : t + horizon, 0]``, inputs
    ``values[t - lookback : t]``, for the origins of `window_origins`.
    """
    origins = window_origins(start, end, lookback, horizon, stride)
    inputs = window_inputs(values, origins, lookback, horizon, future)
    targets = np.stack([values[t : t + horizon, 0] for t in origins])
    return inputs, targets


def rolling_windows(values: np.ndarray, start: int, end: int, lookback: int,
                    horizon: int, future: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rolling validation of the part ``[start, end)``: every origin whose forecast reaches
    into it, scored on the steps that land inside.

    Origins ``t`` run from ``max(lookback, start - horizon + 1)`` to ``end - 1``; inputs are
    ``values[t - lookback : t]`` (the past of ``t``: train and validation values only, since
    ``t < end``); targets ``(n, horizon)`` hold ``values[t + k, 0]`` where ``start <= t + k <
    end`` and NaN elsewhere (those steps are not scored, and values at or after ``end`` are
    never read). Every value of the part is so scored at every lead time 1..horizon (when the
    history before it is long enough), instead of from the ``end - start - horizon + 1`` origins
    whose whole forecast fits: one origin when the part is one horizon long. With ``future``
    known-future columns the inputs also hold their values over each forecast
    (`window_inputs`), which may lie past ``end``: they are known in advance.
    """
    origins = np.arange(max(lookback, start - horizon + 1), end)
    if len(origins) == 0:
        raise ValueError(f"no origin forecasts into rows {start} to {end - 1} with lookback "
                         f"{lookback}")
    known = np.full(end + horizon, np.nan)
    known[start:end] = values[start:end, 0]
    inputs = window_inputs(values, origins, lookback, horizon, future)
    targets = np.stack([known[t : t + horizon] for t in origins])
    return inputs, targets


# Built-in datasets' natural lookback and horizon: two years -> one year of weekly CO2; three
# solar cycles -> one cycle of yearly sunspot numbers.
DATASET_DEFAULTS = {"co2": (104, 52), "sunspots": (33, 11)}
CSV_DEFAULTS = (24, 1)


FEATURES = {"parse": parse_columns, "metavar": "COL,..."}


@dataclass
class DataConfig:
    """Where the series comes from and how it is cut; one field per `rnnkit forecast` option."""

    dataset: str | None = field(default=None, metadata={"choices": DATASETS})
        # a built-in series (co2 | sunspots), or
    csv: str | None = field(default=None, metadata={"metavar": "FILE"})  # a CSV file with a header
        # row
    target: str | None = field(default=None, metadata={"metavar": "COL"})  # the column to forecast
        # (CSV; built-in data knows its own)
    time: str | None = field(default=None, metadata={"metavar": "COL"})  # the column of timestamps
        # or numbers to sort by (optional)
    id: str | None = field(default=None, metadata={"metavar": "COL"})  # long format (unique_id,
        # ds, y): the column naming each series; one network over all, each scaled on its own
    features: list[str] = field(default_factory=list, metadata=FEATURES)  # extra input columns
        # known up to the origin only (direct only)
    future_features: list[str] = field(default_factory=list, metadata=FEATURES)  # input
        # columns known in advance (calendar, promotions): the network also reads their values
        # over the forecast horizon; predict needs them on the rows after the series' last value
    fill: str = field(default="interpolate", metadata={"choices": FILL_RULES})
        # interpolate | ffill | error, for missing or infinite values
    scaler: str = field(default="robust", metadata={"choices": SCALERS})
        # robust: the target by its median and mean absolute step change | standard: mean, std
    season: int | None = field(default=None, metadata={"parse": parse_season})
        # season length; None: the dataset's or detected; 0: none
    lookback: int | None = field(default=None, metadata={"check": "positive"})
        # steps the network reads; None: the source's default (24 for a CSV), at most half the
        # train part but a whole --season
    horizon: int | None = field(default=None, metadata={"check": "positive"})
        # steps forecast from each origin; None: the source's default
    test_size: int | None = field(default=None, metadata={"check": "positive"})
        # length of the test tail; None: 10 % of the rows (>= horizon)
    validation_size: int | None = field(default=None, metadata={"check": "positive"})
        # length of the validation part; None: as the test tail
    stride: int = field(default=1, metadata={"check": "positive"})  # evaluate every stride-th
        # origin of the test tail
    windows: int = field(default=1, metadata={"check": "positive"})  # a rolling-origin
        # backtest: K test tails of --test-size rows, each scored after refitting everything on
        # the rows before it


def series_frames(frame: pd.DataFrame, id_column: str) -> list[tuple[str, pd.DataFrame]]:
    """The rows of each series of a long-format frame (``unique_id, ds, y``), by the id in
    ``id_column``, in the order of the ids (as text, sorted: the file's row order does not
    matter)."""
    if id_column not in frame.columns:
        raise ValueError(f"--id column {id_column!r} not in the data; it has "
                         f"{', '.join(map(repr, frame.columns))}")
    ids = frame[id_column]
    if ids.isna().any():
        raise ValueError(f"--id column {id_column!r} is empty at "
                         f"{_at_rows(np.flatnonzero(ids.isna().to_numpy()))}: every row needs "
                         "the id of its series")
    ids = ids.astype(str)
    return [(series_id, frame[ids == series_id].reset_index(drop=True))
            for series_id in sorted(ids.unique())]


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
    horizon = config.horizon if config.horizon is not None else horizon
    if horizon <= 0:
        raise ValueError(f"horizon must be a positive integer, got {horizon}")
    if lookback <= 0:
        raise ValueError(f"lookback must be a positive integer, got {lookback}")
    if config.stride <= 0:
        raise ValueError(f"stride must be a positive integer, got {config.stride}")
    test_size = config.test_size or max(horizon, round(0.1 * length))
    validation_size = config.validation_size or test_size
    if config.lookback is not None:
        lookback = config.lookback
    else:  # the default, shortened to leave a short series training windows: at most half
        # the train part, but a whole given season (the network corrects seasonal naive)
        room = length - test_size - validation_size - 1
        lookback = min(lookback, max(room // 2, 1))
        if config.season and config.season <= room:
            lookback = max(lookback, config.season)
    return replace(config, lookback=lookback, horizon=horizon, test_size=test_size,
                   validation_size=validation_size)


def future_times(series: Series, horizon: int) -> list | None:
    """The ``horizon`` time stamps after the last one, at the series' regular step (None without
    time). Step k is ``last + k * step``: calendar steps do not drift (31 Jan + 2 months is
    31 Mar with a month-end step)."""
    if series.time is None or series.step is None:
        return None
    last = series.time[-1]
    return [last + series.step * (k + 1) for k in range(horizon)]
