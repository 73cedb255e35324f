"""Known future features (`--future-features`): the windows hold their values over the horizon
and nothing else after the origin, the network reads them as the module doc writes it, a
promotion known in advance is forecast, predict reads the future rows, bad input is named."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from rnnkit import cli
from rnnkit.apps.forecast.commands import restore
from rnnkit.apps.forecast.data import prepare_series, rolling_windows, window_inputs, windows
from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.apps.recurrent import RecurrentConfig

HORIZON = 4


def network(strategy="direct", input_size=3, future_size=1, levels=(), season=None):
    torch.manual_seed(0)
    config = ForecastModelConfig(input_size=input_size, horizon=HORIZON, strategy=strategy,
                                 levels=list(levels), season=season, future_size=future_size,
                                 recurrent=RecurrentConfig(hidden_size=6))
    model = Forecaster(config).double().eval()
    torch.nn.init.normal_(model.output.weight)  # not the zeros it starts from
    torch.nn.init.normal_(model.output.bias)
    return model


def test_windows_hold_the_past_then_the_known_future_columns_alone():
    values = np.arange(60, dtype=np.float64).reshape(20, 3)  # target, past feature, future
    origins = np.array([5, 9])
    inputs = window_inputs(values, origins, lookback=3, horizon=HORIZON, future=1)
    assert inputs.shape == (2, 3 + HORIZON, 3)
    for row, t in enumerate(origins):
        np.testing.assert_array_equal(inputs[row, :3], values[t - 3 : t])
        np.testing.assert_array_equal(inputs[row, 3:, 2], values[t : t + HORIZON, 2])
        assert np.isnan(inputs[row, 3:, :2]).all()  # no target or past feature after t
    past_only = window_inputs(values, origins, lookback=3, horizon=HORIZON)
    np.testing.assert_array_equal(past_only, inputs[:, :3])
    with pytest.raises(ValueError, match="known future features end at row 19, but the "
                                         "forecast from row 17 reads them up to row 20"):
        window_inputs(values, np.array([17]), 3, HORIZON, future=1)
    # Rolling validation and test windows carry them the same way; the targets are unchanged.
    rolled, targets = rolling_windows(values, 10, 14, 3, HORIZON, future=1)
    np.testing.assert_array_equal(targets, rolling_windows(values, 10, 14, 3, HORIZON)[1])
    np.testing.assert_array_equal(rolled[:, 3:, 2], np.stack(
        [values[t : t + HORIZON, 2] for t in range(7, 14)]))
    tested, _ = windows(values, 14, 20, 3, HORIZON, future=1)
    assert tested.shape == (3, 3 + HORIZON, 3) and np.isnan(tested[:, 3:, :2]).all()


@pytest.mark.parametrize("levels", [(), (80,)])
def test_direct_forecast_is_the_formula_of_the_module_doc(levels):
    model = network(levels=levels, season=2)
    past = torch.randn(5, 6, 3, dtype=torch.float64)
    future = torch.randn(5, HORIZON, 1, dtype=torch.float64)
    window = torch.cat([past, torch.cat([torch.full((5, HORIZON, 2), torch.nan,
                                                    dtype=torch.float64), future], 2)], 1)
    forecast = model(window, quantiles=True)
    assert torch.isfinite(forecast).all()  # the NaN after the origin is never read
    # Written out: h_L of the window relative to its last value, then W [h_L; f_0..f_3] + c on
    # seasonal naive (season 2: steps k = 0..3 read back 2, 1, 2, 1... of the last season).
    relative = past.clone()
    relative[..., 0] -= past[:, -1:, 0]
    hidden = model.recurrent(relative)[0][:, -1]
    raw = model.output(torch.cat([hidden, future[..., 0]], 1)).unflatten(1, (HORIZON, -1))
    naive = past[:, [4, 5, 4, 5], 0]
    median = naive + raw[..., model.median]
    torch.testing.assert_close(forecast[..., model.median], median, rtol=0, atol=1e-12)
    if levels:  # ordered quantiles stacked on the median
        assert (forecast[..., 0] < forecast[..., 1]).all()
        assert (forecast[..., 1] < forecast[..., 2]).all()
    # Each step's future feature moves the forecast (through its own column of W).
    moved = window.clone()
    moved[:, 6 + 2, 2] += 1.0
    change = model(moved) - model(window)
    torch.testing.assert_close(change, model.output.weight[model.median::len(model.quantiles),
                                                           6 + 2].expand(5, -1),
                               rtol=0, atol=1e-12)


def test_recursive_forecast_slides_over_the_forecast_and_the_known_future_row():
    model = network("recursive", input_size=2)
    past = torch.randn(3, 5, 2, dtype=torch.float64)
    future = torch.randn(3, HORIZON, 1, dtype=torch.float64)
    window = torch.cat([past, torch.cat([torch.full((3, HORIZON, 1), torch.nan,
                                                    dtype=torch.float64), future], 2)], 1)
    expected, sliding = [], past
    for k in range(HORIZON):  # the loop written out, one step at a time
        rows = torch.full((3, HORIZON, 2), torch.nan, dtype=torch.float64)
        rows[:, 0, 1] = future[:, k, 0]  # a one-step forecast reads the first future row only
        one = torch.cat([sliding, rows], 1)
        value = model.step(one)  # reads the first future row only
        expected.append(value)
        sliding = torch.cat([sliding[:, 1:], torch.cat([value[:, :, None],
                                                        future[:, k : k + 1]], 2)], 1)
    torch.testing.assert_close(model(window), torch.cat(expected, 1), rtol=0, atol=1e-12)


def test_recursive_with_a_past_only_feature_is_still_refused():
    with pytest.raises(ValueError, match="use --strategy direct"):
        network("recursive", input_size=3, future_size=1)
    with pytest.raises(ValueError, match=r"future_size must lie in \[0, input_size = 1\)"):
        network(input_size=1, future_size=1)


def promotion_frame(length=330, seed=0):
    """Daily sales with a weekly season and promotions known in advance that add 12 units."""
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    promo = (rng.random(length) < 0.2).astype(float)
    sales = 40 + 6 * np.sin(2 * np.pi * time / 7) + 12 * promo + rng.normal(0, 0.5, length)
    return pd.DataFrame({"day": pd.date_range("2024-01-01", periods=length, freq="D"),
                         "sales": sales, "promo": promo})


FAST = ["--target", "sales", "--time", "day", "--horizon", str(HORIZON), "--test-size", "28",
        "--validation-size", "28", "--hidden", "16", "--steps", "600", "--min-steps", "300",
        "--lr", "1e-2",
        "--eval-every", "25", "--quiet", "--no-plot", "--season", "7"]


def mae(out):
    results = json.loads((out / "metrics.json").read_text())["results"]
    return {row["method"]: row["MAE"] for row in results}


def test_a_promotion_known_in_advance_is_forecast_and_predict_reads_the_future_rows(tmp_path,
                                                                                    capsys):
    frame = promotion_frame()
    future = frame.tail(HORIZON).assign(sales=np.nan)  # the promotions planned, sales unknown
    pd.concat([frame, future.assign(day=future["day"] + pd.Timedelta(days=HORIZON))]).to_csv(
        tmp_path / "with-future.csv", index=False)
    frame.to_csv(tmp_path / "sales.csv", index=False)
    runs = {}
    for name, extra in (("past", []), ("known", ["--future-features", "promo"])):
        runs[name] = tmp_path / name
        assert cli.main(["forecast", "train", "--csv", str(tmp_path / "sales.csv"), *FAST,
                         "--out", str(runs[name]), *extra]) == 0
    printed = capsys.readouterr().out
    assert "known future features ['promo']" in printed
    known, past = mae(runs["known"]), mae(runs["past"])
    # Without the promotions their 12 units are unforecastable (6 promotion days in the test
    # tail); with them most of the effect is forecast (measured on five series of this kind:
    # mean absolute error 0.8-1.8 known, 5.2-6.9 past-only when the tail holds 4-9
    # promotions, the noise's own 0.4). The bounds are loose.
    assert frame["promo"].tail(28).sum() == 6
    assert known["rnnkit"] < 3 and known["rnnkit"] < 0.5 * min(past["rnnkit"],
                                                                known["SeasonalNaive"])

    # The same file with the future rows appended trains the same network: those rows are
    # dropped (and said), not trained or scored on.
    again = tmp_path / "again"
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "with-future.csv"), *FAST,
                     "--out", str(again), "--future-features", "promo"]) == 0
    assert f"the last {HORIZON} rows have no 'sales' value" in capsys.readouterr().out
    for first, second in zip(restore(str(runs["known"] / "model.pt"))[0].state_dict().values(),
                             restore(str(again / "model.pt"))[0].state_dict().values(),
                             strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)

    # predict = the evaluation's forecast at a test origin, from the rows before it plus the
    # next HORIZON rows' promotions (their sales left empty).
    forecasts = pd.read_csv(runs["known"] / "forecasts.csv")
    mine = forecasts[forecasts["model"] == "rnnkit"]
    cutoff = mine["cutoff"].iloc[5 * HORIZON]
    expected = mine[mine["cutoff"] == cutoff]
    origin = int(np.flatnonzero(frame["day"].astype(str) == cutoff)[0]) + 1
    known_future = frame.iloc[origin : origin + HORIZON].assign(sales=np.nan)
    pd.concat([frame.iloc[:origin], known_future]).to_csv(tmp_path / "cut.csv", index=False)
    assert cli.main(["forecast", "predict", str(runs["known"] / "model.pt"), "--csv",
                     str(tmp_path / "cut.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    np.testing.assert_allclose(predicted["sales"], expected["value"], rtol=1e-6)
    assert list(predicted["time"]) == list(expected["ds"])  # the future rows' own stamps

    # Bad input: no future rows, too few, or a promotion left empty on one of them.
    for name, rows, message in (
            ("none", frame.iloc[:origin], "found 0 such rows"),
            ("few", pd.concat([frame.iloc[:origin], known_future.head(2)]), "found 2 such rows"),
            ("empty", pd.concat([frame.iloc[:origin],
                                 known_future.assign(promo=[1, np.nan, 0, 0])]),
             "found 4 such rows, with 'promo' empty on some")):
        rows.to_csv(tmp_path / f"{name}.csv", index=False)
        assert cli.main(["forecast", "predict", str(runs["known"] / "model.pt"), "--csv",
                         str(tmp_path / f"{name}.csv"), "--out",
                         str(tmp_path / f"{name}-out.csv")]) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error
        assert "known future features ['promo'] over the 4 steps it forecasts" in error[0]
        assert not (tmp_path / f"{name}-out.csv").exists()


def test_future_features_export_to_onnx(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    from rnnkit.apps.forecast.data import DataConfig
    from rnnkit.training.checkpoint import save_checkpoint

    monkeypatch.setenv("RNNKIT_BACKEND", "reference")
    config = ForecastModelConfig(input_size=2, horizon=3, future_size=1, season=4,
                                 recurrent=RecurrentConfig("lstm", hidden_size=6))
    torch.manual_seed(0)
    model = Forecaster(config)
    torch.nn.init.normal_(model.output.weight)
    save_checkpoint(tmp_path / "model.pt", "forecast", {
        "data_config": asdict(DataConfig(csv="x.csv", target="y", future_features=["promo"])),
        "model_config": asdict(config), "columns": ["y", "promo"], "time_column": None,
        "scaler": {"mean": [0.0, 0.0], "scale": [1.0, 1.0]}, "models": [model.state_dict()]})
    assert cli.main(["export", str(tmp_path / "model.pt"), "--onnx",
                     str(tmp_path / "f.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "1 known future feature(s)" in printed
    reported = re.search(r"= (\d\.\d+e[-+]\d+) \(forecast\)", printed)
    assert reported and float(reported.group(1)) < 1e-5


def test_a_column_in_two_roles_and_future_features_of_a_builtin_dataset_are_named(capsys):
    frame = promotion_frame(30)
    with pytest.raises(ValueError, match="column 'promo' is given twice \\(--features and "
                                         "--future-features\\)"):
        prepare_series(frame, "sales", "day", ["promo"], future_features=["promo"])
    with pytest.raises(ValueError, match="column 'sales' is given twice \\(the target and "
                                         "--future-features\\)"):
        prepare_series(frame, "sales", "day", [], future_features=["sales"])
    assert cli.main(["forecast", "train", "--dataset", "co2", "--future-features", "x"]) == 2
    assert "--future-features go with --csv" in capsys.readouterr().err
