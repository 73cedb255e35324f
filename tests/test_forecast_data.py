"""Forecasting data: split, then window, then scale on the training part only; bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rnnkit.apps.forecast.data import (
    Scaler,
    builtin_dataset,
    fill_missing,
    future_times,
    prepare_series,
    read_csv,
    regular_step,
    split_series,
    window_origins,
    windows,
)


def pipeline(values, lookback=4, horizon=2, test_size=6, validation_size=5):
    """The honest order, as the app runs it: split, scale on train, window each part."""
    split = split_series(len(values), lookback, horizon, test_size, validation_size)
    scaler = Scaler.fit(values[: split.train_end], ["y"])
    scaled = scaler.transform(values)
    parts = {
        "train": windows(scaled, 0, split.train_end, lookback, horizon),
        "validation": windows(scaled, split.train_end, split.validation_end, lookback, horizon),
        "test": windows(scaled, split.validation_end, split.length, lookback, horizon),
    }
    return split, scaler, parts


def test_no_test_value_reaches_the_scaler_or_a_training_window():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 1)).cumsum(axis=0)
    changed = values.copy()
    changed[-6:] = 1e6  # a wildly different test tail
    split, scaler, parts = pipeline(values)
    split2, scaler2, parts2 = pipeline(changed)
    assert split == split2
    np.testing.assert_array_equal(scaler.mean, scaler2.mean)
    np.testing.assert_array_equal(scaler.scale, scaler2.scale)
    for part in ("train", "validation"):
        for a, b in zip(parts[part], parts2[part], strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(parts["test"][1], parts2["test"][1])  # the check can fail


def test_windows_targets_stay_in_their_part():
    values = np.arange(30, dtype=float).reshape(-1, 1)
    inputs, targets = windows(values, 20, 26, lookback=3, horizon=2)
    assert targets[0].tolist() == [20, 21] and targets[-1].tolist() == [24, 25]
    assert inputs[0, :, 0].tolist() == [17, 18, 19]  # the past, from the previous part
    assert inputs.shape == (5, 3, 1) and targets.shape == (5, 2)


def test_builtin_datasets_load_offline_with_their_gaps_filled():
    frame, target, time, season = builtin_dataset("co2")
    series = prepare_series(frame, target, time, season=season)
    assert series.missing == 59 and np.isnan(series.values).sum() == 59  # filled after the split
    assert not np.isnan(fill_missing(series, "interpolate", 2000).values).any()
    assert series.season == 52 and series.irregular_steps == 0 and len(series.values) == 2284
    assert series.step == pd.offsets.Week(weekday=5)  # Saturdays
    frame, target, time, season = builtin_dataset("sunspots")
    series = prepare_series(frame, target, time, season=season)
    assert series.missing == 0 and len(series.values) == 309 and series.step == 1.0


def test_fill_rules_and_irregular_timestamps():
    frame = pd.DataFrame({"t": ["2024-01-01", "2024-01-02", "2024-01-04", "2024-01-05",
                                "2024-01-03"],
                          "y": [1.0, np.nan, 4.0, np.inf, 3.0]})
    series = prepare_series(frame, "y", "t", fill="interpolate")
    assert series.missing == 2 and series.irregular_steps == 0  # sorted by time first
    filled = fill_missing(series, "interpolate")
    assert filled.values[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]
    assert fill_missing(series, "ffill").values[:, 0].tolist() == [1.0, 1.0, 3.0, 4.0, 4.0]
    gaps = pd.DataFrame({"t": ["2024-01-01", "2024-01-02", "2024-01-05", "2024-01-06"],
                         "y": [1.0, 2.0, 3.0, 4.0]})
    assert prepare_series(gaps, "y", "t").irregular_steps == 1


def test_filling_never_reads_the_test_tail():
    values = np.array([1.0, 2.0, np.nan, np.nan, 50.0, np.nan, 70.0, np.nan])[:, None]
    series = prepare_series(pd.DataFrame({"y": values[:, 0]}), "y")
    # History = the first 4 values: its trailing gap takes the last value before it, not 50.
    filled = fill_missing(series, "interpolate", history_end=4).values[:, 0]
    assert filled.tolist() == [1.0, 2.0, 2.0, 2.0, 50.0, 50.0, 70.0, 70.0]  # tail: forward only
    changed = series.values.copy()
    changed[4:] = [[-9.0], [np.nan], [-7.0], [-6.0]]
    other = fill_missing(replace(series, values=changed), "interpolate", 4)
    np.testing.assert_array_equal(other.values[:4], filled[:4, None])
    # All of it history: interpolated through.
    assert fill_missing(series, "interpolate").values[:, 0].tolist() == [
        1.0, 2.0, 18.0, 34.0, 50.0, 60.0, 70.0, 70.0]
    with pytest.raises(ValueError, match="column\\(s\\) 'y' have no value before the test tail"):
        fill_missing(prepare_series(pd.DataFrame({"y": [np.nan] * 4 + [1.0]}), "y"), "ffill", 4)


@pytest.mark.parametrize("stamps, step, future", [
    (pd.date_range("2022-01-01", periods=18, freq="MS"), pd.offsets.MonthBegin(),
     ["2023-07-01", "2023-08-01", "2023-09-01"]),
    # Month ends with one month missing: the calendar step still fits all but one step.
    (pd.date_range("2022-01-31", periods=18, freq="ME").delete(5), pd.offsets.MonthEnd(),
     ["2023-07-31", "2023-08-31", "2023-09-30"]),
    # The 15th of each month, one missing: a month apart, whatever the month's length.
    (pd.DatetimeIndex([f"2022-{m:02d}-15" for m in (1, 2, 3, 5, 6, 7)]), pd.DateOffset(months=1),
     ["2022-08-15", "2022-09-15", "2022-10-15"]),
])
def test_calendar_steps_are_regular_and_future_times_do_not_drift(stamps, step, future):
    frame = pd.DataFrame({"t": stamps.strftime("%Y-%m-%d"), "y": np.arange(len(stamps), 0.0, -1)})
    series = prepare_series(frame, "y", "t")
    assert series.step == step
    assert series.irregular_steps == (0 if len(stamps) == 18 else 1)
    assert [t.strftime("%Y-%m-%d") for t in future_times(series, 3)] == future


def test_numeric_time_steps():
    assert regular_step(pd.Index([1.0, 2.0, 3.0, 5.0, 6.0])) == (1.0, 1)
    assert regular_step(pd.Index([0.1 * k for k in range(10)]))[1] == 0  # float rounding
    big = regular_step(pd.Index(10**17 + 3 * np.arange(50)))  # beyond float64's integers
    assert big == (3, 0) and isinstance(big[0], int)


@pytest.mark.parametrize("stamps, step, irregular", [
    # Quarter ends anchored in January, one missing: month ends three months apart.
    (pd.date_range("2015-01-31", periods=24, freq="QE-JAN").delete(10), pd.offsets.MonthEnd(3), 1),
    # Year ends in February across leap years, one missing.
    (pd.date_range("2000-02-29", periods=10, freq="YE-FEB").delete(3), pd.offsets.MonthEnd(12), 1),
    # Two month ends: a calendar month, not 28 days.
    (pd.DatetimeIndex(["2022-01-31", "2022-02-28"]), pd.offsets.MonthEnd(1), 0),
])
def test_calendar_steps_with_any_anchor(stamps, step, irregular):
    assert regular_step(stamps) == (step, irregular)


def test_timestamps_with_several_utc_offsets_are_read_in_utc():
    frame = pd.DataFrame({"t": ["2020-03-28T00:00+01:00", "2020-03-30T00:00+02:00",
                                "2020-03-29T00:00+01:00"], "y": [1.0, 3.0, 2.0]})
    series = prepare_series(frame, "y", "t")
    assert str(series.time.tz) == "UTC" and series.values[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_a_utf16_csv_is_read(tmp_path):
    (tmp_path / "excel.csv").write_bytes("t,y\n1,2.5\n2,3.5\n".encode("utf-16"))
    assert read_csv(tmp_path / "excel.csv")["y"].tolist() == [2.5, 3.5]


@pytest.mark.parametrize("frame,arguments,message", [
    (pd.DataFrame({"y": [1.0, 2.0]}), {"target": "sales"}, "column\\(s\\) 'sales' not in the data; it has 'y'"),
    (pd.DataFrame({"y": ["1", "two", "3"]}), {"target": "y"}, "column 'y' is not numeric: data row 1 holds \\['two'\\]"),
    (pd.DataFrame({"y": [1.0, np.nan, 3.0]}), {"target": "y", "fill": "error"}, "1 missing or infinite values \\(column 'y': 1 at data row 1\\) and --fill error"),
    (pd.DataFrame({"y": [1.0, np.inf, 3.0], "x": [np.nan, 1.0, np.nan]}), {"target": "y", "features": ["x"], "fill": "error"}, "3 missing or infinite values \\(column 'y': 1 at data row 1; column 'x': 2 at data rows 0, 2\\)"),
    # Rows are named in the file's order, even though the series is sorted by time first.
    (pd.DataFrame({"t": [3, 2, 1], "y": [1.0, 2.0, np.nan]}), {"target": "y", "time": "t", "fill": "error"}, "column 'y': 1 at data row 2\\)"),
    (pd.DataFrame({"y": [1.0]}), {"target": "y", "fill": "zero"}, "fill must be one of interpolate, ffill, error, got 'zero'"),
    (pd.DataFrame({"t": ["2024-01-01", "soon"], "y": [1.0, 2.0]}), {"target": "y", "time": "t"}, "time column 't' has unreadable timestamps at data row 1"),
    (pd.DataFrame({"t": [1.0, np.nan, 3.0], "y": [1.0, 2.0, 3.0]}), {"target": "y", "time": "t"}, "time column 't' is empty or infinite at data row 1"),
    (pd.DataFrame({"t": ["2024-01-02", "2024-01-01", "2024-01-02"], "y": [1.0, 2.0, 3.0]}), {"target": "y", "time": "t"}, "time column 't' repeats 2024-01-02 00:00:00 at data rows 0, 2 \\(1 row\\(s\\) in all repeat an earlier stamp\\); aggregate them"),
])
def test_bad_series_are_named(frame, arguments, message):
    with pytest.raises(ValueError, match=message):
        prepare_series(frame, **arguments)


def test_bad_splits_files_and_constant_series(tmp_path):
    with pytest.raises(ValueError, match="horizon must be a positive integer, got 0"):
        split_series(100, 10, 0, 10, 10)
    with pytest.raises(ValueError, match="too few rows: 30, but lookback 10 \\+ 1 training target \\+ validation 10 \\+ test 10 = 31"):
        split_series(30, 10, 5, 10, 10)
    for constant in (1.0, 0.1):  # 0.1 repeated has a floating-point std of 1.4e-17, not 0
        with pytest.raises(ValueError, match="'y' are constant over the training part"):
            Scaler.fit(np.full((20, 1), constant), ["y"])
    with pytest.raises(ValueError, match="does not exist"):
        read_csv(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="cannot be read as CSV"):
        read_csv(tmp_path / "empty.csv")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="is binary \\(it holds NUL bytes\\), not CSV text"):
        read_csv(tmp_path / "binary.csv")
    (tmp_path / "header.csv").write_text("t,y\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_csv(tmp_path / "header.csv")
    with pytest.raises(ValueError, match="dataset must be one of co2, sunspots, got 'gdp'"):
        builtin_dataset("gdp")


def test_window_origins_with_a_stride_are_a_subset_of_the_windows():
    values = np.arange(40, dtype=float).reshape(-1, 1)
    inputs, targets = windows(values, 20, 40, lookback=5, horizon=3, stride=4)
    assert targets[:, 0].tolist() == [20, 24, 28, 32, 36]
    assert window_origins(20, 40, 5, 3, 4).tolist() == [20, 24, 28, 32, 36]
    assert window_origins(0, 12, 5, 3).tolist() == [5, 6, 7, 8, 9]  # inputs must exist
