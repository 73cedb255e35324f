"""`rnnkit forecast train|predict` end to end on small CSV files: outputs, no leakage from the
test tail, predict = evaluation, and every bad input named on one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rnnkit import cli
from rnnkit.apps.forecast.commands import restore
from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint

FAST = ["--hidden", "8", "--steps", "12", "--eval-every", "2", "--min-steps", "0",
        "--patience", "3", "--lookback", "14",
        "--horizon", "4", "--test-size", "20", "--validation-size", "20"]


def write_series(path, length=160, seed=0, tail=None, gap=None):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    values = 20 + 0.05 * time + 3 * np.sin(2 * np.pi * time / 7) + 0.3 * rng.normal(size=length)
    if tail is not None:
        values[-len(tail):] = tail
    if gap is not None:
        values[gap] = np.nan
    frame = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=length, freq="D"),
                          "sales": values, "price": 1 + 0.1 * rng.normal(size=length)})
    frame.to_csv(path, index=False)
    return frame


def train(tmp_path, name, *extra, csv=None):
    out = tmp_path / name
    argv = ["forecast", "train", "--csv", str(csv or tmp_path / "series.csv"), "--target",
            "sales", "--time", "day", *FAST, "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return out


def test_train_writes_results_and_predict_reproduces_the_evaluation_forecast(tmp_path, capsys):
    frame = write_series(tmp_path / "series.csv")
    out = train(tmp_path, "run")
    printed = capsys.readouterr().out
    assert "season: 7 (detected)" in printed and "rnnkit" in printed and "ARIMA" in printed
    for name in ("metrics.csv", "metrics.json", "forecasts.csv", "model.pt", "forecast.png"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    methods = [row["method"] for row in metrics["results"]]
    assert methods[0] == "rnnkit" and "Naive" in methods and "SeasonalNaive" in methods
    assert metrics["origins"] == 20 - 4 + 1 and metrics["split"]["validation_end"] == 140

    # The forecast made at a test origin, from a file that ends just before it.
    forecasts = pd.read_csv(out / "forecasts.csv")
    assert list(forecasts.columns) == ["unique_id", "cutoff", "ds", "step", "y", "model", "value"]
    cutoff = forecasts["cutoff"].iloc[8 * 4]
    expected = forecasts[(forecasts["cutoff"] == cutoff) & (forecasts["model"] == "rnnkit")]
    origin = int(np.flatnonzero(frame["day"].astype(str) == cutoff)[0]) + 1
    np.testing.assert_allclose(expected["y"], frame["sales"][origin : origin + 4])
    expected = expected.rename(columns={"value": "rnnkit", "ds": "time"})
    frame.iloc[:origin].to_csv(tmp_path / "past.csv", index=False)
    assert cli.main(["forecast", "predict", str(out / "model.pt"), "--csv",
                     str(tmp_path / "past.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    assert list(predicted.columns) == ["step", "time", "sales"]
    np.testing.assert_allclose(predicted["sales"], expected["rnnkit"], rtol=1e-6)
    assert list(predicted["time"]) == list(expected["time"])
    assert predicted["step"].tolist() == [1, 2, 3, 4]


def test_the_plot_draws_history_tail_forecast_and_best_baseline_in_original_units(
        tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    frame = write_series(tmp_path / "series.csv")
    drawn = {}
    savefig = Figure.savefig

    def keep_lines(figure, *args, **kwargs):
        for line in figure.axes[0].get_lines():
            drawn.setdefault(line.get_label(), []).append(line.get_ydata())
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_lines)
    out = train(tmp_path, "plotted")
    results = json.loads((out / "metrics.json").read_text())["results"]
    best = next(row["method"] for row in results if row["best_baseline"])
    labels = [label for label in drawn if not label.startswith("_")]
    assert labels == ["history", "actual (test tail)", "rnnkit (from origins 4 steps apart)",
                      f"best baseline: {best}"]
    np.testing.assert_allclose(drawn["actual (test tail)"][0], frame["sales"][140:])  # units
    history = drawn["history"][0]  # the history just before the tail
    np.testing.assert_allclose(history, frame["sales"][140 - len(history) : 140])


@pytest.mark.parametrize("fill", ["interpolate", "ffill"])
def test_no_test_tail_value_reaches_the_scaler_or_the_trained_weights(tmp_path, fill):
    # Only the test tail (rows 140-159) differs; a gap (rows 136-143) straddles its start, so
    # filling the validation part's end could read the tail if it were done before the split.
    gap = slice(136, 144)
    write_series(tmp_path / "series.csv", gap=gap)
    write_series(tmp_path / "changed.csv", tail=np.full(20, 1e4), gap=gap)
    first = train(tmp_path, "first", "--no-plot", "--fill", fill)
    second = train(tmp_path, "second", "--no-plot", "--fill", fill, csv=tmp_path / "changed.csv")
    (model_a, scaler_a, saved_a), (model_b, scaler_b, saved_b) = (
        restore(str(first / "model.pt")), restore(str(second / "model.pt")))
    np.testing.assert_array_equal(scaler_a.mean, scaler_b.mean)
    np.testing.assert_array_equal(scaler_a.scale, scaler_b.scale)
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    assert saved_a["histories"] == saved_b["histories"]
    assert [row["MASE"] / row["MAE"] for row in saved_a["results"]] == pytest.approx(
        [row["MASE"] / row["MAE"] for row in saved_b["results"]])  # the same MASE scale
    assert [row["method"] for row in saved_a["results"]] == [
        row["method"] for row in saved_b["results"]]  # the same ETS and ARIMA chosen
    # ... while the evaluation sees the new tail (the comparison above can fail).
    assert saved_a["results"][0]["MAE"] != saved_b["results"][0]["MAE"]


def test_predict_continues_a_monthly_series_on_the_calendar(tmp_path, capsys):
    frame = write_series(tmp_path / "daily.csv")
    frame["day"] = pd.date_range("2000-01-31", periods=len(frame), freq="ME")  # month ends
    frame.drop(index=50).to_csv(tmp_path / "series.csv", index=False)  # one month missing
    out = train(tmp_path, "monthly", "--no-plot")
    assert "1 irregular time steps" in capsys.readouterr().out
    assert cli.main(["forecast", "predict", str(out / "model.pt"), "--csv",
                     str(tmp_path / "series.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    assert predicted["time"].tolist() == ["2013-05-31", "2013-06-30", "2013-07-31", "2013-08-31"]


def test_features_and_recursive_strategy_run(tmp_path):
    write_series(tmp_path / "series.csv")
    out = train(tmp_path, "features", "--features", "price", "--cell", "gru", "--no-plot")
    assert restore(str(out / "model.pt"))[2]["columns"] == ["sales", "price"]
    train(tmp_path, "recursive", "--strategy", "recursive", "--season", "0", "--no-plot")
    assert "SeasonalNaive" not in (tmp_path / "recursive" / "metrics.csv").read_text()


def bad_files(tmp_path):
    write_series(tmp_path / "series.csv")
    frame = pd.read_csv(tmp_path / "series.csv")
    frame.assign(sales=frame["sales"].astype(object).where(frame.index != 5, "twelve")).to_csv(
        tmp_path / "text.csv", index=False)
    frame.iloc[:30].to_csv(tmp_path / "short.csv", index=False)
    frame.assign(sales=4.0).to_csv(tmp_path / "constant.csv", index=False)
    frame.assign(sales=frame["sales"].where(frame.index != 9)).to_csv(tmp_path / "gap.csv",
                                                                      index=False)
    frame.assign(sales=0.1).to_csv(tmp_path / "constant01.csv", index=False)
    frame.assign(sales=np.nan).to_csv(tmp_path / "nothing.csv", index=False)
    frame.assign(sales=frame["sales"].where(frame.index != 3, np.inf),
                 price=frame["price"].where(frame.index != 7, -np.inf)).to_csv(
        tmp_path / "infinite.csv", index=False)
    frame.assign(day=frame["day"].where(frame.index != 5, frame["day"][4])).to_csv(
        tmp_path / "repeated.csv", index=False)
    (tmp_path / "binary.csv").write_bytes(b"\x00\xff\xfe\x00" * 50)
    (tmp_path / "latin1.csv").write_bytes("day,sales\n2024-01-01,d\xe9j\xe0\n".encode("latin-1"))


USAGE_ERRORS = {"--target COL is required with --csv", "use --strategy direct with --features",
                "--time and --features go with --csv",
                "--peephole is for --cell lstm only, got --cell gru",
                "--time and --target both name column 'sales'"}


@pytest.mark.parametrize("arguments, message", [
    (["--csv", "{}/missing.csv", "--target", "sales"], "CSV file '.*missing.csv' does not exist"),
    (["--csv", "{}/series.csv", "--target", "revenue"],
     "column\\(s\\) 'revenue' not in the data; it has 'day', 'sales', 'price'"),
    (["--csv", "{}/series.csv"], "--target COL is required with --csv"),
    (["--csv", "{}/text.csv", "--target", "sales"],
     "column 'sales' is not numeric: data row 5 holds \\['twelve'\\]"),
    (["--csv", "{}/short.csv", "--target", "sales", "--lookback", "24"],
     "too few rows: 30, but lookback 24 \\+ 1 training target \\+ validation 3 \\+ test 3 = 31"),
    (["--csv", "{}/constant.csv", "--target", "sales"], "'sales' are constant over the training"),
    (["--csv", "{}/constant01.csv", "--target", "sales"], "'sales' are constant over the training"),
    (["--csv", "{}/gap.csv", "--target", "sales", "--fill", "error"],
     "1 missing or infinite values \\(column 'sales': 1 at data row 9\\) and --fill error"),
    (["--csv", "{}/infinite.csv", "--target", "sales", "--features", "price", "--fill", "error"],
     "2 missing or infinite values \\(column 'sales': 1 at data row 3; column 'price': 1 at data row 7\\)"),
    (["--csv", "{}/nothing.csv", "--target", "sales"],
     "column\\(s\\) 'sales' have no value before the test tail"),
    (["--csv", "{}/binary.csv", "--target", "sales"], "is binary \\(it holds NUL bytes\\), not CSV text"),
    (["--csv", "{}/latin1.csv", "--target", "sales"], "cannot be read as CSV: 'utf-8' codec can't decode"),
    (["--csv", "{}/repeated.csv", "--target", "sales", "--time", "day"],
     "time column 'day' repeats 2024-01-05 00:00:00 at data rows 4, 5"),
    (["--csv", "{}/series.csv", "--target", "sales", "--season", "150"],
     "the history before the test tail has 144 values, too few for the seasonal naive scale of MASE \\(season 150\\)"),
    (["--csv", "{}/series.csv", "--target", "sales", "--out", "{}/series.csv"],
     "--out '.*series.csv' is an existing file; give a folder"),
    (["--csv", "{}/series.csv", "--target", "sales", "--features", "price", "--strategy",
      "recursive"], "use --strategy direct with --features"),
    (["--dataset", "co2", "--features", "x"], "--time and --features go with --csv"),
    (["--csv", "{}/series.csv", "--target", "sales", "--time", "sales"],
     "--time and --target both name column 'sales'"),
    (["--csv", "{}/series.csv", "--target", "sales", "--cell", "gru", "--peephole"],
     "--peephole is for --cell lstm only, got --cell gru"),
])
def test_bad_training_input_is_one_line_naming_the_problem(tmp_path, capsys, arguments, message):
    bad_files(tmp_path)
    arguments = [a.format(tmp_path) for a in arguments]
    out = [] if "--out" in arguments else ["--out", str(tmp_path / "out")]
    argv = ["forecast", "train", *arguments, *out, "--steps", "1", "--no-plot"]
    # 2: the command line alone is wrong; 1: the files (data, --out) are.
    assert cli.main(argv) == (2 if message in USAGE_ERRORS else 1)
    error = capsys.readouterr().err.strip()
    # One line, and before any training (no progress bar, whose unit is the epoch).
    assert error.startswith("rnnkit forecast: error: ") and "\n" not in error
    assert "epoch" not in error
    assert __import__("re").search(message, error), error
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--horizon", "0", "expected a positive int (at most 2**63 - 1), got '0'"),
    ("--lookback", "-3", "expected a positive int (at most 2**63 - 1), got '-3'"),
    ("--season", "1", "--season takes a season length >= 2, or 0 for none"),
    ("--dataset", "gdp", "invalid choice: 'gdp'"),
    ("--fill", "zero", "invalid choice: 'zero'"),
])
def test_bad_options_are_refused_by_the_parser(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["forecast", "train", "--csv", "x.csv", "--target", "y", option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_earlier_run_is_not_overwritten_and_bad_checkpoints_are_named(tmp_path, capsys):
    write_series(tmp_path / "series.csv")
    out = train(tmp_path, "run", "--no-plot")
    before = (out / "model.pt").read_bytes()
    argv = ["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target", "sales",
            *FAST, "--out", str(out), "--no-plot"]
    assert cli.main(argv) == 1
    assert "exists and would be overwritten" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == before

    (tmp_path / "broken.pt").write_bytes(before[: len(before) // 2])
    saved = load_checkpoint(out / "model.pt", "forecast")
    save_checkpoint(tmp_path / "hollow.pt", "forecast", {"models": saved["models"]})
    saved["scaler"]["mean"] = [0.0, 0.0]  # a scaler for two columns, a network for one
    save_checkpoint(tmp_path / "mixed.pt", "forecast",
                    {k: v for k, v in saved.items() if k not in ("format", "kind", "version")})
    saved["model_config"]["recurrent"]["hidden_size"] = 9  # weights of 8 units no longer fit
    save_checkpoint(tmp_path / "misfit.pt", "forecast",
                    {k: v for k, v in saved.items() if k not in ("format", "kind", "version")})
    (tmp_path / "short.csv").write_text("day,sales,price\n2024-01-01,1.0,1.0\n")
    for argv, message in [
        (["forecast", "predict", str(tmp_path / "broken.pt"), "--csv",
          str(tmp_path / "series.csv")], "cannot be read (truncated or corrupted?)"),
        (["forecast", "predict", str(out / "model.pt"), "--csv", str(tmp_path / "short.csv")],
         "has 1 rows; the model reads the last 14 (its lookback)"),
        (["forecast", "predict", str(out / "model.pt"), "--dataset", "co2"],
         "the model was trained on columns ['sales']"),
        (["forecast", "predict", str(tmp_path / "hollow.pt"), "--csv",
          str(tmp_path / "series.csv")],
         "is not a complete, compatible 'rnnkit forecast' checkpoint (KeyError: 'model_config')"),
        (["forecast", "predict", str(tmp_path / "mixed.pt"), "--csv",
          str(tmp_path / "series.csv")],
         "is inconsistent: 1 columns, a scaler for 2 and a network reading 1"),
        (["forecast", "predict", str(tmp_path / "misfit.pt"), "--csv",
          str(tmp_path / "series.csv")],
         "is not a complete, compatible 'rnnkit forecast' checkpoint (RuntimeError: Error(s) in loading "
         "state_dict for Forecaster: size mismatch"),
    ]:
        assert cli.main(argv + ["--out", str(tmp_path / "f.csv")]) == 1
        assert message in capsys.readouterr().err
