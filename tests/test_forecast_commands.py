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

FAST = ["--hidden", "8", "--epochs", "6", "--patience", "3", "--lookback", "14",
        "--horizon", "4", "--test-size", "20", "--validation-size", "20"]


def write_series(path, length=160, seed=0, tail=None):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    values = 20 + 0.05 * time + 3 * np.sin(2 * np.pi * time / 7) + 0.3 * rng.normal(size=length)
    if tail is not None:
        values[-len(tail):] = tail
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
    assert methods[0] == "rnnkit" and "last value" in methods and "seasonal naive (m=7)" in methods
    assert metrics["origins"] == 20 - 4 + 1 and metrics["split"]["validation_end"] == 140

    # The forecast made at a test origin, from a file that ends just before it.
    forecasts = pd.read_csv(out / "forecasts.csv")
    origin = int(forecasts["origin"].iloc[8])
    expected = forecasts[forecasts["origin"] == origin]
    frame.iloc[:origin].to_csv(tmp_path / "past.csv", index=False)
    assert cli.main(["forecast", "predict", str(out / "model.pt"), "--csv",
                     str(tmp_path / "past.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    assert list(predicted.columns) == ["step", "time", "sales"]
    np.testing.assert_allclose(predicted["sales"], expected["rnnkit"], rtol=1e-6)
    assert list(predicted["time"]) == list(expected["time"])
    assert predicted["step"].tolist() == [1, 2, 3, 4]


def test_no_test_tail_value_reaches_the_scaler_or_the_trained_weights(tmp_path):
    write_series(tmp_path / "series.csv")
    write_series(tmp_path / "changed.csv", tail=np.full(20, 1e4))  # only the test tail differs
    first = train(tmp_path, "first", "--no-plot")
    second = train(tmp_path, "second", "--no-plot", csv=tmp_path / "changed.csv")
    (model_a, scaler_a, saved_a), (model_b, scaler_b, saved_b) = (
        restore(str(first / "model.pt")), restore(str(second / "model.pt")))
    np.testing.assert_array_equal(scaler_a.mean, scaler_b.mean)
    np.testing.assert_array_equal(scaler_a.scale, scaler_b.scale)
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    assert saved_a["history"] == saved_b["history"]
    # ... while the evaluation sees the new tail (the comparison above can fail).
    assert saved_a["results"][0]["MAE"] != saved_b["results"][0]["MAE"]


def test_features_and_recursive_strategy_run(tmp_path):
    write_series(tmp_path / "series.csv")
    out = train(tmp_path, "features", "--features", "price", "--cell", "gru", "--no-plot")
    assert restore(str(out / "model.pt"))[2]["columns"] == ["sales", "price"]
    train(tmp_path, "recursive", "--strategy", "recursive", "--season", "0", "--no-plot")
    assert "seasonal naive" not in (tmp_path / "recursive" / "metrics.csv").read_text()


def bad_files(tmp_path):
    write_series(tmp_path / "series.csv")
    frame = pd.read_csv(tmp_path / "series.csv")
    frame.assign(sales=frame["sales"].astype(object).where(frame.index != 5, "twelve")).to_csv(
        tmp_path / "text.csv", index=False)
    frame.iloc[:30].to_csv(tmp_path / "short.csv", index=False)
    frame.assign(sales=4.0).to_csv(tmp_path / "constant.csv", index=False)
    frame.assign(sales=frame["sales"].where(frame.index != 9)).to_csv(tmp_path / "gap.csv",
                                                                      index=False)
    (tmp_path / "binary.csv").write_bytes(b"\x00\xff\xfe\x00" * 50)


@pytest.mark.parametrize("arguments, message", [
    (["--csv", "{}/missing.csv", "--target", "sales"], "CSV file '.*missing.csv' does not exist"),
    (["--csv", "{}/series.csv", "--target", "revenue"],
     "column\\(s\\) 'revenue' not in the data; it has 'day', 'sales', 'price'"),
    (["--csv", "{}/series.csv"], "--target COL is required with --csv"),
    (["--csv", "{}/text.csv", "--target", "sales"],
     "column 'sales' is not numeric: rows \\[5\\] hold \\['twelve'\\]"),
    (["--csv", "{}/short.csv", "--target", "sales"],
     "too few rows: 30, but lookback 24 \\+ horizon 1 \\+ validation 3 \\+ test 3 = 31"),
    (["--csv", "{}/constant.csv", "--target", "sales"], "'sales' are constant over the training"),
    (["--csv", "{}/gap.csv", "--target", "sales", "--fill", "error"],
     "1 missing or infinite values \\(rows \\[9\\], ...\\) and --fill error"),
    (["--csv", "{}/binary.csv", "--target", "sales"], "cannot be read as CSV|not in the data"),
    (["--csv", "{}/series.csv", "--target", "sales", "--features", "price", "--strategy",
      "recursive"], "use --strategy direct with --features"),
    (["--dataset", "co2", "--features", "x"], "--time and --features go with --csv"),
    (["--csv", "{}/series.csv", "--target", "sales", "--cell", "gru", "--peephole"],
     "peephole connections exist for the lstm cell only, not 'gru'"),
])
def test_bad_training_input_is_one_line_naming_the_problem(tmp_path, capsys, arguments, message):
    bad_files(tmp_path)
    argv = ["forecast", "train", *(a.format(tmp_path) for a in arguments),
            "--out", str(tmp_path / "out"), "--epochs", "1", "--no-plot"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("rnnkit forecast: error: ") and "\n" not in error
    assert __import__("re").search(message, error), error
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--horizon", "0", "expected a positive int, got '0'"),
    ("--lookback", "-3", "expected a positive int, got '-3'"),
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
    assert cli.main(argv) == 2
    assert "exists and would be overwritten" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == before

    (tmp_path / "broken.pt").write_bytes(before[: len(before) // 2])
    (tmp_path / "short.csv").write_text("day,sales,price\n2024-01-01,1.0,1.0\n")
    for argv, message in [
        (["forecast", "predict", str(tmp_path / "broken.pt"), "--csv",
          str(tmp_path / "series.csv")], "cannot be read (truncated or corrupted?)"),
        (["forecast", "predict", str(out / "model.pt"), "--csv", str(tmp_path / "short.csv")],
         "has 1 rows; the model reads the last 14 (its lookback)"),
        (["forecast", "predict", str(out / "model.pt"), "--dataset", "co2"],
         "the model was trained on columns ['sales']"),
    ]:
        assert cli.main(argv + ["--out", str(tmp_path / "f.csv")]) == 2
        assert message in capsys.readouterr().err
