"""The offline forecasting benchmark's ``--global`` mode (benchmarks/forecast_suite.py): one
long-format CSV per season group, read back by rnnkit's own readers; each series' MASE read
from a global run's metrics.json, with the checks that keep rnnkit's and the suite's scores
comparable; ``--reuse`` of an earlier run's statistical rows; and one tiny real global run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import forecast_suite  # noqa: E402
from forecast_series import SeasonalSeries  # noqa: E402

from rnnkit.apps.forecast.data import prepare_series, read_csv, series_frames  # noqa: E402


def seasonal_record(name: str, length: int, season: int, start: str, seed: int = 0,
                    level: float = 20.0) -> SeasonalSeries:
    """A trending seasonal series of month or quarter starts from ``start``."""
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    values = level + 0.3 * time + 5 * np.sin(2 * np.pi * time / season) + rng.normal(0, 1, length)
    index = pd.date_range(start, periods=length, freq="MS" if season == 12 else "QS")
    return SeasonalSeries(name, pd.Series(values, index=index), season, "pkg", f"data/{name}")


def test_long_csv_is_each_series_with_its_own_dates_as_rnnkit_reads_it(tmp_path):
    records = [seasonal_record("fpp2/b:NZ", 40, 4, "1981-01", seed=1),
               seasonal_record("AER/a", 29, 4, "1960-04", seed=2, level=500.0)]
    path = tmp_path / "long.csv"
    forecast_suite.write_long_csv(records, path)
    frame = read_csv(path)
    assert list(frame.columns) == ["unique_id", "ds", "y"] and len(frame) == 69
    parts = dict(series_frames(frame, forecast_suite.GLOBAL_ID))
    assert sorted(parts) == ["AER/a", "fpp2/b:NZ"]
    for record in records:
        series = prepare_series(parts[record.name], "y", "ds", season=4)
        np.testing.assert_allclose(series.values[:, 0], record.series.to_numpy(), rtol=1e-15)
        assert list(pd.to_datetime(series.time)) == list(record.series.index)
        assert series.irregular_steps == 0 and series.missing == 0


@pytest.mark.parametrize("records, message", [
    ([seasonal_record("a", 30, 4, "2000-01"), seasonal_record("b", 30, 12, "2000-01")],
     r"one season .* got seasons \[4, 12\]"),
    ([seasonal_record("a", 30, 4, "2000-01"), seasonal_record("a", 31, 4, "2001-01")],
     r"series names must be unique .* \['a', 'a'\]"),
])
def test_long_csv_refuses_mixed_seasons_and_repeated_names(tmp_path, records, message):
    with pytest.raises(ValueError, match=message):
        forecast_suite.write_long_csv(records, tmp_path / "long.csv")


def test_season_groups_keep_the_order_of_first_appearance():
    records = [seasonal_record(name, 40, season, "2000-01")
               for name, season in (("q1", 4), ("m1", 12), ("q2", 4), ("m2", 12))]
    groups = forecast_suite.season_groups(records)
    assert [(season, [r.name for r in group]) for season, group in groups] == [
        (4, ["q1", "q2"]), (12, ["m1", "m2"])]


def global_metrics(records, plans, scales, mase):
    """A metrics.json of a global run as rnnkit writes it: per series a table whose rows share
    the series' MASE scale (``MAE = MASE * scale``)."""
    tables = {}
    for record in records:
        scale = scales[record.name]
        tables[record.name] = [
            {"method": "rnnkit", "MAE": mase[record.name] * scale, "MASE": mase[record.name]},
            {"method": "SeasonalNaive", "MAE": 1.5 * scale, "MASE": 1.5}]
    return {"origins": len(next(iter(plans.values())).origins), "training_seconds": 4.2,
            "data": {"lookback": 11, "id": "unique_id"},
            "networks": [{"seed": 0, "steps": 80, "best_step": 25},
                         {"seed": 1, "steps": 70, "best_step": 50}],
            "results": [{"method": "rnnkit", "MAE": 9.0, "MASE": 9.0}], "series": tables}


def suite_scale(record, plan):
    history = record.series.to_numpy()[: plan.history_end]
    return float(np.mean(np.abs(history[record.season:] - history[: -record.season])))


@pytest.mark.parametrize("protocol_name", ["one-origin", "rolling"])
def test_global_metrics_give_each_series_its_own_mase(tmp_path, protocol_name):
    records = [seasonal_record("a", 40, 4, "2000-01", seed=3),
               seasonal_record("b", 33, 4, "1990-01", seed=4)]
    plans = {r.name: forecast_suite.protocol(protocol_name, len(r.series), 4) for r in records}
    scales = {r.name: suite_scale(r, plans[r.name]) for r in records}
    metrics = global_metrics(records, plans, scales, {"a": 0.7, "b": 1.3})
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    found = forecast_suite.read_global_metrics(tmp_path, records, plans)
    assert {name: row["MASE"] for name, row in found.items()} == {"a": 0.7, "b": 1.3}
    for row in found.values():
        assert (row["lookback"], row["steps"], row["best_step"], row["error"]) == (
            11, "80;70", "25;50", "")
        assert row["rnnkit_seasonal_naive_MASE"] == 1.5 and row["training_seconds"] == 4.2


def test_global_metrics_refuse_another_scale_other_series_or_origins(tmp_path):
    records = [seasonal_record("a", 40, 4, "2000-01", seed=3),
               seasonal_record("b", 33, 4, "1990-01", seed=4)]
    plans = {r.name: forecast_suite.protocol("rolling", len(r.series), 4) for r in records}
    scales = {r.name: suite_scale(r, plans[r.name]) for r in records}

    def refused(metrics, message):
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        with pytest.raises(RuntimeError, match=message):
            forecast_suite.read_global_metrics(tmp_path, records, plans)

    # A scale off by one part in a million: rnnkit's history (or season) was not the suite's.
    refused(global_metrics(records, plans, {**scales, "b": scales["b"] * (1 + 1e-6)},
                           {"a": 0.7, "b": 1.3}), r"series 'b': rnnkit's MASE scale is")
    missing = global_metrics(records, plans, scales, {"a": 0.7, "b": 1.3})
    del missing["series"]["b"]
    refused(missing, r"rnnkit scored the series \['a'\] .* gave it \['a', 'b'\]")
    refused(global_metrics(records, plans, scales, {"a": 0.7, "b": 1.3}) | {"origins": 1},
            r"rnnkit scored 1 origins per series .* the suite \[5\]")


def test_a_group_of_one_series_reads_the_results_table(tmp_path):
    """With one series rnnkit writes no ``series`` tables: its ``results`` are that series'."""
    (record,) = records = [seasonal_record("only", 36, 4, "2000-01")]
    plans = {"only": forecast_suite.protocol("one-origin", 36, 4)}
    metrics = global_metrics(records, plans, {"only": suite_scale(record, plans["only"])},
                             {"only": 0.9})
    metrics["results"] = metrics.pop("series")["only"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert forecast_suite.read_global_metrics(tmp_path, records, plans)["only"]["MASE"] == 0.9


def test_reuse_takes_an_earlier_runs_rows_and_checks_them(tmp_path):
    record = seasonal_record("a", 40, 4, "2000-01")
    earlier = pd.DataFrame(
        [{"series": "a", "season": 4, "length": 40, "protocol": "rolling", "method": name,
          "MASE": 0.5 + k, "seconds": 1.0, "error": "", "steps": np.nan}
         for k, name in enumerate(forecast_suite.STATISTICAL)]
        + [{"series": "a", "season": 4, "length": 40, "protocol": "rolling",
            "method": "rnnkit-ens3", "MASE": 0.4, "seconds": 9.0, "error": "", "steps": "600"}])
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    table = forecast_suite.combine([str(tmp_path / "earlier.csv")], "--reuse")
    results = forecast_suite.reused_results(table, record, "rolling", ["rnnkit-global"])
    assert [(r["method"], r["MASE"]) for r in results] == [
        ("AutoETS", 0.5), ("AutoARIMA", 1.5), ("AutoTheta", 2.5), ("SeasonalNaive", 3.5),
        ("rnnkit-ens3", 0.4)]
    assert "steps" not in results[0] and results[-1]["steps"] == 600  # its own columns only
    with pytest.raises(SystemExit, match=r"already score \['rnnkit-ens3'\] on a / rolling"):
        forecast_suite.reused_results(table, record, "rolling", ["rnnkit-ens3"])
    with pytest.raises(SystemExit, match="no AutoETS, AutoARIMA, AutoTheta, SeasonalNaive row "
                                         "for a / one-origin"):
        forecast_suite.reused_results(table, record, "one-origin", ["rnnkit-global"])
    longer = seasonal_record("a", 44, 4, "2000-01")
    with pytest.raises(SystemExit, match=r"scored on \[40\] values of season \[4\], this run "
                                         "reads 44 of season 4"):
        forecast_suite.reused_results(table, longer, "rolling", ["rnnkit-global"])


def test_global_labels_and_flags():
    arguments = forecast_suite.parse_arguments(["--global", "--rnnkit-args", "--seeds 0,1"])
    assert arguments.global_model
    assert arguments.configurations == [("rnnkit-global --seeds 0,1", ["--seeds", "0,1"])]
    assert forecast_suite.parse_arguments([]).configurations == [("rnnkit", [])]


def test_a_tiny_global_run_scores_each_series_on_the_suites_scale(tmp_path, monkeypatch):
    """Two short quarterly series of different lengths and dates through the real `rnnkit
    forecast train --id` (a few optimiser steps): each gets its own MASE, rnnkit's scale is the
    suite's (checked inside the reader), its SeasonalNaive equals the suite's, the lookback is
    the default resolved on the shorter series, and the run's seconds are shared out."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    records = [seasonal_record("long", 48, 4, "1980-01", seed=5),
               seasonal_record("short", 32, 4, "1991-07", seed=6, level=80.0)]
    plans = {r.name: forecast_suite.protocol("rolling", len(r.series), 4) for r in records}
    csv = tmp_path / "global-m4.csv"
    forecast_suite.write_long_csv(records, csv)
    found = forecast_suite.run_rnnkit_global(
        csv, records, 4, plans, tmp_path / "run",
        ["--steps", "12", "--min-steps", "6", "--eval-every", "6", "--hidden", "8"],
        timeout=120)
    for record in records:
        row = found[record.name]
        assert row["error"] == "" and np.isfinite(row["MASE"]) and row["MASE"] > 0
        values = record.series.to_numpy()
        (naive,) = forecast_suite.score_statistical(values, 4, plans[record.name],
                                                    ("SeasonalNaive",))
        assert row["rnnkit_seasonal_naive_MASE"] == pytest.approx(naive["MASE"], rel=1e-9)
        # 32 rows - 8 test - 8 validation - 1 = 15 of room: lookback min(24, 15 // 2) = 7.
        assert row["lookback"] == 7 and row["group_series"] == 2
        assert row["seconds"] == pytest.approx(row["group_seconds"] / 2)
    assert found["long"]["MASE"] != found["short"]["MASE"]
