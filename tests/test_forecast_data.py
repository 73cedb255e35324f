"""Forecasting data: split, then window, then scale on the training part only; bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rnnkit.apps.forecast.data import (
    Scaler,
    builtin_dataset,
    prepare_series,
    read_csv,
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
    assert series.filled == 59 and not np.isnan(series.values).any()
    assert series.season == 52 and series.irregular_steps == 0 and len(series.values) == 2284
    frame, target, time, season = builtin_dataset("sunspots")
    series = prepare_series(frame, target, time, season=season)
    assert series.filled == 0 and len(series.values) == 309


def test_fill_rules_and_irregular_timestamps():
    frame = pd.DataFrame({"t": ["2024-01-01", "2024-01-02", "2024-01-04", "2024-01-05",
                                "2024-01-03"],
                          "y": [1.0, np.nan, 4.0, np.inf, 3.0]})
    series = prepare_series(frame, "y", "t", fill="interpolate")
    assert series.values[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]  # sorted by time first
    assert series.filled == 2 and series.irregular_steps == 0
    series = prepare_series(frame, "y", "t", fill="ffill")
    assert series.values[:, 0].tolist() == [1.0, 1.0, 3.0, 4.0, 4.0]
    gaps = pd.DataFrame({"t": ["2024-01-01", "2024-01-02", "2024-01-05", "2024-01-06"],
                         "y": [1.0, 2.0, 3.0, 4.0]})
    assert prepare_series(gaps, "y", "t").irregular_steps == 1


@pytest.mark.parametrize("frame,arguments,message", [
    (pd.DataFrame({"y": [1.0, 2.0]}), {"target": "sales"}, "column\\(s\\) 'sales' not in the data; it has 'y'"),
    (pd.DataFrame({"y": ["1", "two", "3"]}), {"target": "y"}, "column 'y' is not numeric: rows \\[1\\] hold \\['two'\\]"),
    (pd.DataFrame({"y": [1.0, np.nan, 3.0]}), {"target": "y", "fill": "error"}, "1 missing or infinite values \\(rows \\[1\\]"),
    (pd.DataFrame({"y": [1.0, np.inf, 3.0]}), {"target": "y", "fill": "error"}, "1 missing or infinite values"),
    (pd.DataFrame({"y": [1.0]}), {"target": "y", "fill": "zero"}, "fill must be one of interpolate, ffill, error, got 'zero'"),
    (pd.DataFrame({"t": ["2024-01-01", "soon"], "y": [1.0, 2.0]}), {"target": "y", "time": "t"}, "time column 't' has unreadable timestamps at rows \\[1\\]"),
])
def test_bad_series_are_named(frame, arguments, message):
    with pytest.raises(ValueError, match=message):
        prepare_series(frame, **arguments)


def test_bad_splits_files_and_constant_series(tmp_path):
    with pytest.raises(ValueError, match="horizon must be a positive integer, got 0"):
        split_series(100, 10, 0, 10, 10)
    with pytest.raises(ValueError, match="too few rows: 30, but lookback 10 \\+ horizon 5 \\+ validation 10 \\+ test 10 = 35"):
        split_series(30, 10, 5, 10, 10)
    with pytest.raises(ValueError, match="'y' are constant over the training part"):
        Scaler.fit(np.ones((20, 1)), ["y"])
    with pytest.raises(ValueError, match="does not exist"):
        read_csv(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="cannot be read as CSV"):
        read_csv(tmp_path / "empty.csv")
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
