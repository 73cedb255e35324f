"""Forecasting that holds up on short series (issue 17): rolling validation, a step budget with
a minimum, the robust scaler, the seasonal naive starting point, ensembles over seeds, quantile
intervals, and the long-format forecasts; each against an independent computation, and the
leak tests extended to all of them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnkit import cli
from rnnkit.apps.forecast.baselines import last_value, seasonal_naive
from rnnkit.apps.forecast.commands import restore
from rnnkit.apps.forecast.data import Scaler, rolling_windows, split_series, windows
from rnnkit.apps.forecast.metrics import coverage, pinball_loss, quantiles_of_levels
from rnnkit.apps.forecast.model import ForecastEnsemble, Forecaster, ForecastModelConfig
from rnnkit.apps.forecast.train import (
    FitConfig,
    fit_ensemble,
    fit_forecaster,
    refit_forecaster,
    validation_loss,
)
from rnnkit.apps.forecast.train import pinball_loss as training_pinball_loss
from rnnkit.apps.recurrent import RecurrentConfig

# --- rolling validation -----------------------------------------------------------------------

def test_rolling_validation_scores_every_value_at_every_lead_once_and_reads_nothing_after():
    values = np.arange(100.0)[:, None] * 3 + 1
    start, end, lookback, horizon = 60, 75, 10, 6
    inputs, targets = rolling_windows(values, start, end, lookback, horizon)
    origins = np.arange(start - horizon + 1, end)
    assert len(inputs) == len(origins)
    scored = [(origin + k, k) for origin, row in zip(origins, targets, strict=True)
              for k in range(horizon) if not np.isnan(row[k])]
    # Each value of the part at each lead time 1..horizon, once.
    assert sorted(scored) == sorted((t, k) for t in range(start, end) for k in range(horizon))
    for origin, row, window in zip(origins, targets, inputs, strict=True):
        np.testing.assert_array_equal(window[:, 0], values[origin - lookback : origin, 0])
        for k in range(horizon):
            if not np.isnan(row[k]):
                assert row[k] == values[origin + k, 0]
    changed = values.copy()
    changed[end:] = -1e9  # after the part: never read
    again = rolling_windows(changed, start, end, lookback, horizon)
    np.testing.assert_array_equal(again[0], inputs)
    np.testing.assert_array_equal(again[1], targets)


def test_rolling_validation_starts_where_the_lookback_allows():
    values = np.arange(30.0)[:, None]
    inputs, _ = rolling_windows(values, 12, 20, lookback=10, horizon=5)
    assert len(inputs) == 20 - 10  # origins 10..19: 8 and 9 would need rows before 0
    with pytest.raises(ValueError, match="no origin forecasts into rows 0 to 2"):
        rolling_windows(values, 0, 3, lookback=5, horizon=2)


# --- the robust scaler ------------------------------------------------------------------------

def test_the_robust_scaler_is_the_median_and_mean_absolute_step_change():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(size=50).cumsum(), rng.normal(size=50)])
    scaler = Scaler.fit(train, ["y", "x"], method="robust")
    assert scaler.mean[0] == np.median(train[:, 0])
    assert scaler.scale[0] == pytest.approx(np.abs(train[1:, 0] - train[:-1, 0]).mean())
    # Features are standardised by either method.
    assert scaler.mean[1] == pytest.approx(train[:, 1].mean())
    assert scaler.scale[1] == pytest.approx(train[:, 1].std())
    with pytest.raises(ValueError, match="scaler must be one of robust, standard, got 'minmax'"):
        Scaler.fit(train, ["y", "x"], method="minmax")


def test_a_level_shift_barely_moves_the_robust_scale_and_inflates_the_standard_one():
    rng = np.random.default_rng(1)
    series = np.sin(np.arange(200) * 2 * np.pi / 12) + 0.1 * rng.normal(size=200)
    shifted = series + np.where(np.arange(200) >= 100, 20.0, 0.0)
    scales = {method: [Scaler.fit(v[:, None], ["y"], method).scale[0] for v in (series, shifted)]
              for method in ("robust", "standard")}
    robust, standard = scales["robust"], scales["standard"]
    assert robust[1] / robust[0] < 1.4  # one step of 20 among 199 changes
    assert standard[1] / standard[0] > 8  # the shift dominates the deviation


# --- the network starts as the naive forecast ---------------------------------------------------

@pytest.mark.parametrize("strategy, horizon", [("direct", 30), ("recursive", 30), ("direct", 5)])
def test_an_untrained_network_is_exactly_the_seasonal_naive_forecast(strategy, horizon):
    rng = np.random.default_rng(2)
    values = 10 + np.sin(np.arange(200) * 2 * np.pi / 12) + rng.normal(size=200)
    torch.manual_seed(0)
    model = Forecaster(ForecastModelConfig(1, horizon, strategy=strategy, season=12)).double()
    origins = np.arange(40, 160, 7)
    window = torch.as_tensor(np.stack([values[t - 24 : t] for t in origins])[..., None])
    with torch.no_grad():
        forecast = model(window).numpy()
    np.testing.assert_allclose(forecast, seasonal_naive(values, origins, horizon, 12).forecasts,
                               rtol=0, atol=1e-12)
    no_season = Forecaster(ForecastModelConfig(1, horizon, strategy=strategy)).double()
    with torch.no_grad():
        np.testing.assert_allclose(no_season(window).numpy(),
                                   last_value(values, origins, horizon).forecasts, atol=1e-12)


def test_a_window_shorter_than_the_season_is_refused():
    model = Forecaster(ForecastModelConfig(1, 3, season=12))
    with pytest.raises(ValueError, match="fewer than the season 12"):
        model(torch.zeros(2, 8, 1))


# --- the step budget and its minimum ----------------------------------------------------------

def short_parts(length=150, lookback=12, horizon=6, held_out=24, seed=0):
    rng = np.random.default_rng(seed)
    values = (5 + np.sin(2 * np.pi * np.arange(length) / 12)
              + 0.3 * rng.normal(size=length))[:, None]
    split = split_series(length, lookback, horizon, held_out, held_out)
    scaled = Scaler.fit(values[: split.train_end], ["y"], "robust").transform(values)
    train = windows(scaled, 0, split.train_end, lookback, horizon)
    validation = rolling_windows(scaled, split.train_end, split.validation_end, lookback,
                                 horizon)
    return values, split, scaled, train, validation


def test_early_stopping_waits_for_min_steps():
    _, _, _, train, validation = short_parts()
    model_config = ForecastModelConfig(1, 6, season=12, recurrent=RecurrentConfig(hidden_size=4))
    quick = FitConfig(steps=200, eval_every=2, patience=1, min_steps=0, lr=0.05)
    _, stopped = fit_forecaster(model_config, quick, train, validation, show_progress=False)
    assert stopped.steps < 40  # patience 1 ends it early (so the bound below can fail)
    _, waited = fit_forecaster(model_config, FitConfig(steps=200, eval_every=2, patience=1,
                                                       min_steps=40, lr=0.05),
                               train, validation, show_progress=False)
    assert 40 <= waited.steps < 200
    # Validated at step 0 too: the naive starting point is a candidate for the kept weights.
    assert waited.validation_steps[0] == 0 and waited.train[0] is None
    best = waited.validation_steps[int(np.argmin(waited.validation))]
    assert waited.best_step == best


def test_refit_trains_afresh_on_train_and_validation_for_the_steps_chosen():
    values, split, scaled, train, validation = short_parts()
    history = rolling_windows(scaled, 0, split.validation_end, 12, 6)
    model_config = ForecastModelConfig(1, 6, season=12, recurrent=RecurrentConfig(hidden_size=4))
    config = FitConfig(steps=80, eval_every=5, patience=4, min_steps=0, lr=0.02, refit=True,
                       seed=3)
    [(model, record)] = fit_ensemble(model_config, config, train, validation, history,
                                     show_progress=False)
    assert record.best_step > 0  # else nothing is refitted and the check below is empty
    assert record.refit_steps == round(record.best_step * len(history[0]) / len(train[0]))
    assert len(history[0]) > len(train[0])  # the validation part's origins too
    again = refit_forecaster(model_config, config, history, record.refit_steps, seed=3,
                             show_progress=False)
    stopped, _ = fit_forecaster(model_config, config, train, validation, show_progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(model.output.weight, stopped.output.weight)
    # The refit learnt from the windows it was given: it fits them better than the network
    # early-stopped without the validation part's values did.
    assert validation_loss(model, *history) < validation_loss(stopped, *history)


def test_bad_step_settings_are_named():
    _, _, _, train, validation = short_parts()
    for config, message in [(FitConfig(min_steps=-1), "min-steps must be a non-negative integer"),
                            (FitConfig(eval_every=0), "eval-every must be a positive integer"),
                            (FitConfig(seeds=[1, 1]), "--seeds repeats a seed")]:
        with pytest.raises(ValueError, match=message):
            fit_forecaster(ForecastModelConfig(1, 6), config, train, validation,
                           show_progress=False)


# --- quantiles --------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), levels=st.lists(st.sampled_from([50, 80, 90, 95, 99]),
                                                   min_size=1, max_size=4, unique=True))
def test_quantile_outputs_never_cross(seed, levels):
    torch.manual_seed(seed)
    model = Forecaster(ForecastModelConfig(1, 4, levels=sorted(levels),
                                           recurrent=RecurrentConfig(hidden_size=5))).double()
    torch.nn.init.normal_(model.output.weight, std=3.0)
    torch.nn.init.normal_(model.output.bias, std=3.0)
    window = torch.randn(6, 9, 1, dtype=torch.float64) * 10
    with torch.no_grad():
        quantiles = model(window, quantiles=True)
        point = model(window)
    assert quantiles.shape == (6, 4, len(quantiles_of_levels(levels)))
    assert bool((quantiles.diff(dim=-1) > 0).all())
    torch.testing.assert_close(point, quantiles[..., model.median], rtol=0, atol=0)


def test_the_training_pinball_loss_equals_the_metric():
    rng = np.random.default_rng(3)
    forecast, target = rng.normal(size=(7, 3, 5)), rng.normal(size=(7, 3))
    quantiles = quantiles_of_levels([80, 95])
    expected = np.mean([pinball_loss(target, forecast[..., j], q)
                        for j, q in enumerate(quantiles)])
    loss = training_pinball_loss(torch.as_tensor(forecast), torch.as_tensor(target), quantiles)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_levels_go_with_the_direct_strategy_only():
    with pytest.raises(ValueError, match="--levels needs --strategy direct"):
        Forecaster(ForecastModelConfig(1, 3, strategy="recursive", levels=[80]))


def test_intervals_cover_a_known_noise_near_their_level():
    """y = a known season + N(0, 1) noise, independent: the true 80 % interval is the season
    ± 1.2816; the learnt one must cover about 80 % of new values."""
    rng = np.random.default_rng(4)
    length, lookback, horizon = 900, 24, 4
    season = 3 * np.sin(2 * np.pi * np.arange(length) / 12)
    values = (season + rng.normal(size=length))[:, None]
    split = split_series(length, lookback, horizon, 300, 100)
    scaler = Scaler.fit(values[: split.train_end], ["y"], "standard")
    scaled = scaler.transform(values)
    train = windows(scaled, 0, split.train_end, lookback, horizon)
    validation = rolling_windows(scaled, split.train_end, split.validation_end, lookback,
                                 horizon)
    model, _ = fit_forecaster(
        ForecastModelConfig(1, horizon, levels=[80], recurrent=RecurrentConfig(hidden_size=16)),
        FitConfig(steps=600, eval_every=50, patience=4, min_steps=300, lr=5e-3),
        train, validation, show_progress=False)
    test_inputs, test_targets = windows(scaled, split.validation_end, length, lookback, horizon)
    with torch.no_grad():
        quantiles = model(torch.as_tensor(test_inputs, dtype=torch.float32), quantiles=True)
    lo, hi = (scaler.inverse_target(quantiles[..., j].double().numpy()) for j in (0, 2))
    actual = scaler.inverse_target(test_targets)
    assert abs(coverage(actual, lo, hi) - 0.8) < 0.1
    width = np.mean(hi - lo)  # the true interval is 2 x 1.2816 wide
    assert 0.7 * 2.563 < width < 1.4 * 2.563


# --- the command: ensembles, intervals, long format, leaks, bad input -------------------------

FAST = ["--hidden", "6", "--steps", "16", "--eval-every", "4", "--min-steps", "8",
        "--patience", "2", "--lookback", "14", "--horizon", "4", "--test-size", "20",
        "--validation-size", "20", "--season", "7", "--no-plot"]


def write_series(path, length=160, seed=0, tail=None):
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    values = 20 + 0.05 * time + 3 * np.sin(2 * np.pi * time / 7) + 0.3 * rng.normal(size=length)
    if tail is not None:
        values[-len(tail):] = tail
    frame = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=length, freq="D"),
                          "sales": values})
    frame.to_csv(path, index=False)
    return frame


def run(tmp_path, name, *extra, csv="series.csv"):
    out = tmp_path / name
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / csv), "--target", "sales",
                     "--time", "day", *FAST, "--out", str(out), "--quiet", *extra]) == 0
    return out


def test_an_ensemble_forecasts_the_mean_of_its_seeds_with_intervals_in_long_format(
        tmp_path, capsys):
    frame = write_series(tmp_path / "series.csv")
    out = run(tmp_path, "ensemble", "--seeds", "0,1,2", "--levels", "80,95")
    printed = capsys.readouterr().out
    assert "ensemble of 3 seeds" in printed and "coverage-80" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert [member["seed"] for member in summary["members"]] == [0, 1, 2]
    assert [network["seed"] for network in summary["networks"]] == [0, 1, 2]

    forecasts = pd.read_csv(out / "forecasts.csv")
    assert list(forecasts.columns) == ["unique_id", "cutoff", "ds", "step", "y", "model",
                                       "value", "lo-80", "hi-80", "lo-95", "hi-95"]
    assert set(forecasts["model"]) >= {"rnnkit", "Naive", "SeasonalNaive"}
    assert (forecasts["unique_id"] == "sales").all()
    ours = forecasts[forecasts["model"] == "rnnkit"]
    assert (ours["lo-95"] <= ours["lo-80"]).all() and (ours["lo-80"] <= ours["value"]).all()
    assert (ours["value"] <= ours["hi-80"]).all() and (ours["hi-80"] <= ours["hi-95"]).all()
    # Round trip: the table's MAE and coverage recomputed from the long file.
    rows = {row["method"]: row for row in summary["results"]}
    for name, part in forecasts.groupby("model"):
        assert np.mean(np.abs(part["y"] - part["value"])) == pytest.approx(rows[name]["MAE"])
    inside = ((ours["lo-80"] <= ours["y"]) & (ours["y"] <= ours["hi-80"])).mean()
    assert inside == pytest.approx(rows["rnnkit"]["coverage-80"])
    assert np.all(np.diff(pd.to_datetime(ours["ds"]).to_numpy()[:4]) > np.timedelta64(0))

    # The ensemble is the mean of its networks, and predict uses all of them.
    model, scaler, _ = restore(str(out / "model.pt"))
    assert isinstance(model, ForecastEnsemble) and len(model.members) == 3
    window = torch.as_tensor(scaler.transform(frame[["sales"]].to_numpy()[-14:])[None],
                             dtype=torch.float32)
    with torch.no_grad():
        each = torch.stack([member(window) for member in model.members])
        torch.testing.assert_close(model(window), each.mean(0))
    cutoff = ours["cutoff"].iloc[0]
    origin = int(np.flatnonzero(frame["day"].astype(str) == cutoff)[0]) + 1
    frame.iloc[:origin].to_csv(tmp_path / "past.csv", index=False)
    assert cli.main(["forecast", "predict", str(out / "model.pt"), "--csv",
                     str(tmp_path / "past.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    np.testing.assert_allclose(predicted["sales"], ours["value"].iloc[:4], rtol=1e-6)


@pytest.mark.parametrize("refit", [[], ["--refit"]])
def test_no_test_value_reaches_an_ensemble_with_intervals(tmp_path, refit):
    write_series(tmp_path / "series.csv")
    write_series(tmp_path / "changed.csv", tail=np.full(20, 1e4))
    options = ["--seeds", "0,1", "--levels", "80", *refit]
    first = run(tmp_path, "first", *options)
    second = run(tmp_path, "second", *options, csv="changed.csv")
    (model_a, scaler_a, saved_a), (model_b, scaler_b, saved_b) = (
        restore(str(first / "model.pt")), restore(str(second / "model.pt")))
    np.testing.assert_array_equal(scaler_a.scale, scaler_b.scale)
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    # The rolling validation (every origin up to the test tail) saw the same values.
    assert saved_a["histories"] == saved_b["histories"]
    if refit:  # refitted on train + validation (so the check covers the refit's windows too)
        assert all(h["refit_steps"] > 0 for h in saved_a["histories"])
    assert saved_a["results"][0]["MAE"] != saved_b["results"][0]["MAE"]


@pytest.mark.parametrize("extra, message", [
    (["--levels", "80,100"], "--levels '80,100': '100' is not a level"),
    (["--levels", "0"], "--levels '0': '0' is not a level"),
    (["--levels", "80,80"], "80 is given twice"),
    (["--levels", "wide"], "'wide' is not a level"),
    (["--seeds", "1,x"], "--seeds takes comma-separated integers"),
    (["--scaler", "minmax"], "invalid choice: 'minmax'"),
])
def test_bad_interval_and_ensemble_options_are_usage_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["forecast", "train", "--csv", "x.csv", "--target", "y", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_levels_with_a_recursive_forecast_are_refused_before_training(tmp_path, capsys):
    write_series(tmp_path / "series.csv")
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "sales", *FAST, "--strategy", "recursive", "--levels", "80", "--out",
                     str(tmp_path / "out")]) == 2
    assert "--levels needs --strategy direct" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.pt").exists()


def test_seeds_repeated_are_refused(tmp_path, capsys):
    write_series(tmp_path / "series.csv")
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "sales", *FAST, "--seeds", "3,3", "--out", str(tmp_path / "out")]) == 2
    assert "--seeds repeats a seed: [3, 3]" in capsys.readouterr().err


# --- backtesting ------------------------------------------------------------------------------

def test_each_backtest_window_is_the_run_on_the_series_cut_at_its_end(tmp_path):
    frame = write_series(tmp_path / "series.csv", length=180)
    out = run(tmp_path, "backtest", "--windows", "2")
    frame.iloc[:-20].to_csv(tmp_path / "cut.csv", index=False)  # window 0 ends 20 rows earlier
    alone = run(tmp_path, "alone", csv="cut.csv")
    summary = json.loads((out / "metrics.json").read_text())
    first = summary["backtest"][0]["results"]
    expected = json.loads((alone / "metrics.json").read_text())["results"]
    assert [row["method"] for row in first] == [row["method"] for row in expected]
    for got, want in zip(first, expected, strict=True):
        assert got["MAE"] == pytest.approx(want["MAE"], rel=1e-6), got["method"]
    # The overall row is the mean of the windows'; metrics.csv holds both windows and the mean.
    second = summary["backtest"][1]["results"]
    for row, a, b in zip(summary["results"], first, second, strict=True):
        assert row["MASE"] == pytest.approx((a["MASE"] + b["MASE"]) / 2)
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["window"].astype(str).unique()) == ["0", "1", "mean"]
    forecasts = pd.read_csv(out / "forecasts.csv")
    assert sorted(forecasts["window"].unique()) == [0, 1]
    last_cutoff_0 = pd.to_datetime(forecasts[forecasts["window"] == 0]["cutoff"]).max()
    first_cutoff_1 = pd.to_datetime(forecasts[forecasts["window"] == 1]["cutoff"]).min()
    assert last_cutoff_0 < first_cutoff_1


def test_a_backtest_default_lookback_fits_its_first_and_shortest_cut(tmp_path):
    # 60 rows, 3 windows of 12: the first cut holds 36 rows, room for a lookback of
    # (36 - 12 - 12 - 1) // 2 = 5; the default computed on all 60 rows (17) would not fit it.
    write_series(tmp_path / "series.csv", length=60)
    options = [a for a in FAST if a not in ("--lookback", "14")]
    sizes = {"--test-size": "12", "--validation-size": "12", "--season": "0"}
    options = [sizes.get(previous, a) for previous, a in zip([None, *options[:-1]], options,
                                                            strict=True)]
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "sales", *options, "--windows", "3", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [window["data"]["lookback"] for window in summary["backtest"]] == [5, 5, 5]


def test_a_backtest_too_long_for_the_series_is_refused_before_training(tmp_path, capsys):
    write_series(tmp_path / "series.csv")
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target",
                     "sales", *FAST, "--windows", "7", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr()
    assert "too few rows: 40, but lookback 14 + 1 training target" in error.err
    assert "trained" not in error.out and not (tmp_path / "out" / "model.pt").exists()


# --- many series (long format) ----------------------------------------------------------------

def write_panel(path, lengths=(90, 110, 100), changed=None, seed=0):
    """Long format: unique_id, ds, y; series k at its own level and amplitude; ``changed``
    (an id) gets a test tail of 1e4."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, length in enumerate(lengths):
        time = np.arange(length)
        values = (10 * (k + 1) + (k + 1) * np.sin(2 * np.pi * time / 7)
                  + 0.2 * rng.normal(size=length))
        if changed == f"S{k}":
            values[-20:] = 1e4
        rows.append(pd.DataFrame({"unique_id": f"S{k}", "ds": pd.date_range(
            "2024-01-01", periods=length, freq="D"), "y": values}))
    frame = pd.concat(rows, ignore_index=True).sample(frac=1.0, random_state=1)  # any order
    frame.to_csv(path, index=False)
    return frame


PANEL = ["--id", "unique_id", "--target", "y", "--time", "ds", *FAST]


def test_one_network_over_many_series_scores_each_and_the_aggregate(tmp_path):
    frame = write_panel(tmp_path / "panel.csv")
    out = tmp_path / "panel"
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "panel.csv"), *PANEL,
                     "--levels", "80", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["series"]) == {"S0", "S1", "S2"}
    rows = {row["method"]: row for row in summary["results"]}
    for method in ("rnnkit", "SeasonalNaive", "AutoETS"):
        each = [next(r for r in summary["series"][s] if r["method"] == method)["MASE"]
                for s in ("S0", "S1", "S2")]
        assert rows[method]["MASE"] == pytest.approx(np.mean(each))
        assert rows[method]["median MASE"] == pytest.approx(np.median(each))
    assert rows["SeasonalNaive"]["OWA"] == pytest.approx(1.0)
    assert sum(row["wins"] for row in rows.values()) == 3
    forecasts = pd.read_csv(out / "forecasts.csv")
    assert set(forecasts["unique_id"]) == {"S0", "S1", "S2"}
    # Long format round trip: each series' actual values are its own test tail.
    for series_id, part in forecasts[forecasts["model"] == "rnnkit"].groupby("unique_id"):
        own = frame[frame["unique_id"] == series_id].sort_values("ds")
        first = part[part["step"] == 1]
        np.testing.assert_allclose(first["y"], own["y"].to_numpy()[-20:][: len(first)])
        mae = np.mean(np.abs(part["y"] - part["value"]))
        table = {r["method"]: r for r in summary["series"][series_id]}
        assert mae == pytest.approx(table["rnnkit"]["MAE"])
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["unique_id"].unique()) == ["S0", "S1", "S2", "all"]
    # predict forecasts every series, each with its own scaler.
    assert cli.main(["forecast", "predict", str(out / "model.pt"), "--csv",
                     str(tmp_path / "panel.csv"), "--out", str(tmp_path / "next.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "next.csv")
    assert list(predicted.columns) == ["unique_id", "step", "time", "y", "lo-80", "hi-80"]
    assert predicted.groupby("unique_id").size().to_dict() == {"S0": 4, "S1": 4, "S2": 4}
    means = predicted.groupby("unique_id")["y"].mean()
    assert means["S0"] < means["S1"] < means["S2"]  # each at its own level


def test_plot_series_chooses_which_series_are_drawn(tmp_path, capsys, monkeypatch):
    from rnnkit.apps.forecast import commands

    write_panel(tmp_path / "panel.csv", lengths=(90, 110, 100, 95))
    drawn = []
    monkeypatch.setattr(commands, "save_forecast_plot",
                        lambda path, values, *rest: drawn.append((path.name, len(values))))
    options = [a for a in PANEL if a != "--no-plot"]
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "panel.csv"), *options,
                     "--plot-series", "S3,S1", "--out", str(tmp_path / "chosen"), "--quiet"]) == 0
    assert drawn == [("forecast.png", 95), ("forecast-S1.png", 110)]  # in the order given
    drawn.clear()
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "panel.csv"), *options,
                     "--out", str(tmp_path / "default"), "--quiet"]) == 0
    assert [name for name, _ in drawn] == ["forecast.png", "forecast-S1.png", "forecast-S2.png"]
    capsys.readouterr()
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "panel.csv"), *options,
                     "--plot-series", "S1,S9", "--out", str(tmp_path / "bad")]) == 1
    printed = capsys.readouterr()
    assert "--plot-series names series the data does not have: ['S9']; it has ['S0', 'S1', " \
           "'S2', 'S3']" in printed.err and "trained" not in printed.out
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "panel.csv"), "--target", "y",
                     "--plot-series", "S1"]) == 2
    assert "--plot-series goes with --id" in capsys.readouterr().err


def test_no_series_test_tail_reaches_the_shared_weights_or_another_series(tmp_path):
    write_panel(tmp_path / "panel.csv")
    write_panel(tmp_path / "changed.csv", changed="S1")
    runs = []
    for name in ("panel", "changed"):
        out = tmp_path / f"run-{name}"
        assert cli.main(["forecast", "train", "--csv", str(tmp_path / f"{name}.csv"), *PANEL,
                         "--out", str(out), "--quiet"]) == 0
        runs.append(restore(str(out / "model.pt")))
    (model_a, _, saved_a), (model_b, _, saved_b) = runs
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    for series_id in ("S0", "S1", "S2"):
        np.testing.assert_array_equal(saved_a["scalers"][series_id].scale,
                                      saved_b["scalers"][series_id].scale)
    assert saved_a["histories"] == saved_b["histories"]
    assert saved_a["results"] != saved_b["results"]  # S1's test tail is scored (can fail)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="unique_id"), "--id column 'unique_id' not in the data"),
    (lambda f: f.assign(unique_id=f["unique_id"].where(f.index != f.index[3])),
     "--id column 'unique_id' is empty at data row 3"),
    (lambda f: f[(f["unique_id"] != "S2") | (f["ds"] < "2024-01-31")],
     "series 'S2': too few rows: 30, but lookback 14 \\+ 1 training target"),
    (lambda f: f.assign(y=f["y"].astype(object).where(
        f.index != f.index[f["unique_id"] == "S0"][0], "x")),
     "series 'S0' \\(--id unique_id\\): column 'y' is not numeric"),
])
def test_bad_long_format_input_is_named(tmp_path, capsys, change, message):
    frame = write_panel(tmp_path / "panel.csv").reset_index(drop=True)
    change(frame).to_csv(tmp_path / "bad.csv", index=False)
    assert cli.main(["forecast", "train", "--csv", str(tmp_path / "bad.csv"), *PANEL,
                     "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert __import__("re").search(message, error), error
    assert not (tmp_path / "out" / "model.pt").exists()


def test_id_with_a_dataset_or_naming_the_target_is_a_usage_error(capsys):
    for argv, message in [(["--dataset", "co2", "--id", "k"], "--id goes with --csv"),
                          (["--csv", "x.csv", "--target", "y", "--id", "y"],
                           "--id names column 'y', which is also the target")]:
        assert cli.main(["forecast", "train", *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_network_that_learns_nothing_better_says_it_is_the_naive_forecast(tmp_path, capsys):
    write_series(tmp_path / "series.csv")
    # lr 0 cannot move the weights: every validation ties step 0's, which is kept.
    run(tmp_path, "frozen", "--lr", "1e-30")
    printed = capsys.readouterr().out
    assert "kept step 0" in printed
    assert "no trained weights validated better than the untrained network, which is seasonal " \
           "naive (season 7)" in printed
    rows = {row["method"]: row for row in
            json.loads((tmp_path / "frozen" / "metrics.json").read_text())["results"]}
    assert rows["rnnkit"]["MAE"] == pytest.approx(rows["SeasonalNaive"]["MAE"], rel=1e-5)
