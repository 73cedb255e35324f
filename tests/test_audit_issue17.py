"""A hostile audit of `rnnkit forecast` after issue 17's first changes: each test is a bug found
by using the CLI as a user would (an input, what went wrong), checked against an independent
computation or the file system."""

from __future__ import annotations

import re
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from rnnkit import cli
from rnnkit.apps.forecast.commands import restore
from rnnkit.apps.forecast.data import DataConfig
from rnnkit.apps.forecast.metrics import quantiles_of_levels
from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.apps.recurrent import RecurrentConfig
from rnnkit.training.checkpoint import save_checkpoint

LOOKBACK, HORIZON, SEASON = 8, 3, 4
MEAN, SCALE = 50.0, 2.5


def ensemble_checkpoint(path, levels=(), seeds=(0, 1)):
    """A checkpoint with the keys `forecast train` writes: an ensemble of ``seeds`` networks
    correcting seasonal naive (season 4), with output layers drawn (not the zero start), so
    that members, quantiles and the naive part all show in the forecast."""
    config = ForecastModelConfig(input_size=1, horizon=HORIZON, levels=list(levels),
                                 season=SEASON, recurrent=RecurrentConfig(hidden_size=5))
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        member = Forecaster(config)
        torch.nn.init.normal_(member.output.weight, std=0.5)
        torch.nn.init.normal_(member.output.bias, std=0.5)
        members.append(member.state_dict())
    save_checkpoint(path, "forecast", {
        "data_config": asdict(DataConfig(csv="x.csv", target="y", lookback=LOOKBACK,
                                         horizon=HORIZON)),
        "model_config": asdict(config), "columns": ["y"], "time_column": None,
        "season": SEASON, "scaler": {"mean": [MEAN], "scale": [SCALE]}, "models": members})
    return path


def write_csv(path, length=40):
    time = np.arange(length)
    values = MEAN + 3 * np.sin(2 * np.pi * time / SEASON) + 0.1 * time
    pd.DataFrame({"y": values}).to_csv(path, index=False)
    return values


# Bug 1. `rnnkit export` of any checkpoint whose network corrects seasonal naive (every
# seasonal series since issue 17) failed: traced at length 8, torch.export refused the season
# guard (season 4: "Suggested fixes: Dim('length', min=4)"; season 12: "the window has s6 steps,
# fewer than the season 12").
def test_a_seasonal_ensemble_checkpoint_exports_and_onnxruntime_agrees(tmp_path, capsys,
                                                                      monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")  # the onnx extra, as tests/test_onnx_export
    monkeypatch.setenv("RNNKIT_BACKEND", "reference")
    checkpoint = ensemble_checkpoint(tmp_path / "model.pt", levels=(80,))
    onnx_path = tmp_path / "f.onnx"
    assert cli.main(["export", str(checkpoint), "--onnx", str(onnx_path)]) == 0
    assert "recurrent layers as ONNX 2 LSTM" in capsys.readouterr().out
    model, _, _ = restore(str(checkpoint))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for length in (SEASON, 11):  # the shortest window the network reads, and a longer one
        window = torch.randn(3, length, 1, generator=torch.Generator().manual_seed(length))
        (got,) = session.run(None, {"window": window.numpy()})
        with torch.no_grad():
            members = torch.stack([member(window) for member in model.members])
        np.testing.assert_allclose(got, members.mean(0).numpy(), atol=1e-5)


# Bug 2. `forecast predict CKPT --out CKPT` overwrote the checkpoint with the forecast CSV
# (and `--out` equal to `--csv` the series itself); `export CKPT --onnx CKPT` likewise.
def test_predict_and_export_refuse_to_overwrite_the_file_they_read(tmp_path, capsys):
    checkpoint = ensemble_checkpoint(tmp_path / "model.pt")
    write_csv(tmp_path / "series.csv")
    saved, series = checkpoint.read_bytes(), (tmp_path / "series.csv").read_bytes()
    for argv, message in [
        (["forecast", "predict", str(checkpoint), "--csv", str(tmp_path / "series.csv"),
          "--out", str(checkpoint)], f"--out {str(checkpoint)!r} is the file given as CKPT"),
        (["forecast", "predict", str(checkpoint), "--csv", str(tmp_path / "series.csv"),
          "--out", str(tmp_path / "." / "series.csv")], "is the file given as --csv"),
        (["export", str(checkpoint), "--onnx", str(checkpoint)],
         f"--onnx {str(checkpoint)!r} is the file given as CKPT"),
    ]:
        assert cli.main(argv) == 1
        assert message in capsys.readouterr().err
        assert checkpoint.read_bytes() == saved
        assert (tmp_path / "series.csv").read_bytes() == series


# Bug 3. `forecast predict` on a checkpoint trained with --levels wrote the point forecast
# only: the intervals it was trained for were silently dropped.
def test_predict_writes_the_intervals_of_a_checkpoint_trained_with_levels(tmp_path):
    checkpoint = ensemble_checkpoint(tmp_path / "model.pt", levels=(80, 95))
    values = write_csv(tmp_path / "series.csv")
    out = tmp_path / "next.csv"
    assert cli.main(["forecast", "predict", str(checkpoint), "--csv",
                     str(tmp_path / "series.csv"), "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    assert list(predicted.columns) == ["step", "y", "lo-80", "hi-80", "lo-95", "hi-95"]
    # Independently: each member's quantiles of the last window, averaged, in series units.
    model, _, _ = restore(str(checkpoint))
    window = torch.as_tensor((values[-LOOKBACK:, None] - MEAN) / SCALE, dtype=torch.float32)
    with torch.no_grad():
        quantiles = torch.stack([member(window[None], quantiles=True)[0]
                                 for member in model.members]).mean(0).double().numpy()
    quantiles = quantiles * SCALE + MEAN  # (horizon, Q)
    order = quantiles_of_levels([80, 95])  # 0.025, 0.1, 0.5, 0.9, 0.975
    for column, q in [("lo-95", 0.025), ("lo-80", 0.1), ("y", 0.5), ("hi-80", 0.9),
                      ("hi-95", 0.975)]:
        np.testing.assert_allclose(predicted[column], quantiles[:, order.index(q)], rtol=1e-6)
    assert (predicted["lo-95"] < predicted["lo-80"]).all()
    assert (predicted["hi-80"] < predicted["hi-95"]).all()


def write_train_csv(path, length):
    rng = np.random.default_rng(0)
    pd.DataFrame({"y": 10 + rng.normal(size=length).cumsum()}).to_csv(path, index=False)


FAST = ["--hidden", "4", "--steps", "4", "--eval-every", "2", "--min-steps", "0", "--no-plot",
        "--quiet"]


# Bug 4. `--windows 20 --test-size 12` on 120 rows said "too few rows: -108, but lookback 24 +
# ..." (a negative row count, no word of --windows); `--windows 10` said "too few rows: 12"
# of a file with 120.
def test_a_backtest_too_long_names_windows_and_never_a_negative_row_count(tmp_path, capsys):
    write_train_csv(tmp_path / "series.csv", 120)
    for windows, rows in [("20", 0), ("10", 12)]:
        assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"),
                         "--target", "y", "--test-size", "12", "--windows", windows, *FAST,
                         "--out", str(tmp_path / "out")]) == 1
        error = capsys.readouterr().err
        assert f"--windows {windows} with --test-size 12: backtest window 1 is trained and " \
               f"scored on the first {rows} of the 120 rows" in error
        assert f"too few rows: {rows}, but" in error and "give fewer --windows" in error
        assert not re.search(r"too few rows: -", error)
        assert not (tmp_path / "out" / "model.pt").exists()


# Bug 5. A series whose history before the test tail is too short for statsforecast's ETS
# (6 rows: 5 values) ended in a traceback: NotImplementedError("tiny datasets").
def test_a_history_too_short_for_a_statistical_baseline_is_a_named_error(tmp_path, capsys):
    pytest.importorskip("statsforecast")  # without it these baselines are left out with a note
    write_train_csv(tmp_path / "series.csv", 6)
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "y", *FAST, "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr()
    error = printed.err
    assert "AutoETS cannot be fitted on the 5 values before the test tail (statsforecast: " \
           "tiny datasets); give a longer series" in error
    assert "Traceback" not in error
    assert "trained" not in printed.out  # said before training, not after it


# Bug 6. A statistical baseline fitted without its season (history shorter than two seasons)
# carried a note that no output showed: the table compared against a non-seasonal AutoARIMA
# under the seasonal one's name, silently.
def test_a_season_dropped_from_a_baseline_is_said(tmp_path, capsys):
    pytest.importorskip("statsforecast")
    write_train_csv(tmp_path / "series.csv", 40)
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "y", "--season", "12", "--horizon", "2", "--test-size", "18",
                     "--validation-size", "4", *FAST, "--out", str(tmp_path / "out")]) == 0
    error = capsys.readouterr().err
    for name in ("AutoARIMA", "AutoETS", "AutoTheta"):
        assert f"note: {name} fitted without a season: the history holds 22 values, fewer " \
               "than two seasons of 12" in error


# Bug 7. Level columns were named with ``{level:g}`` (6 digits): --levels 99.99999999 gave
# ``coverage-100`` (as if a 100 % interval), and 99.99999,99.999999 two levels in one column.
def test_close_levels_keep_their_own_columns():
    from rnnkit.apps.forecast.evaluate import Evaluation, long_forecasts

    actual = np.array([[1.0, 2.0]])
    intervals = {99.99999: (actual - 1, actual + 1), 99.999999: (actual - 3, actual - 2)}
    evaluation = Evaluation(origins=np.array([5]), actual=actual, model=actual.copy(),
                            baselines=[], scale=1.0, season=None, model_intervals=intervals)
    frame = long_forecasts(evaluation, "y", None)
    assert [c for c in frame.columns if c[:3] in ("lo-", "hi-")] == [
        "lo-99.99999", "hi-99.99999", "lo-99.999999", "hi-99.999999"]
    np.testing.assert_array_equal(frame["hi-99.999999"], (actual - 2).ravel())
    assert [f"{level:g}" for level in (80.0, 99.5)] == ["80", "99.5"]  # the usual names stay
