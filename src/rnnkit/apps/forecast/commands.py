"""What `rnnkit forecast train|predict` do, given their configurations.

train: load and prepare the series -> split in time -> scale on the train part -> window each
part -> fit the network (early stopping on validation) -> forecast every test origin with the
network and the baselines -> table, CSV/JSON, plot, checkpoint.
predict: a checkpoint and a series -> the next ``horizon`` values after its end, as CSV.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from rnnkit.apps.forecast.baselines import all_baselines, missing_statistical_baselines
from rnnkit.apps.forecast.data import (
    DataConfig,
    Scaler,
    Series,
    Split,
    fill_missing,
    future_times,
    load_frame,
    prepare_series,
    resolve_sizes,
    rolling_windows,
    split_series,
    window_origins,
    windows,
)
from rnnkit.apps.forecast.evaluate import (
    Evaluation,
    backtest_table,
    format_table,
    save_forecast_plot,
    write_results,
)
from rnnkit.apps.forecast.metrics import detect_season, level_name, mase_scale
from rnnkit.apps.forecast.model import ForecastEnsemble, Forecaster, ForecastModelConfig
from rnnkit.apps.forecast.train import FitConfig, FitHistory, fit_ensemble, forecast_windows
from rnnkit.apps.outputs import not_an_input, output_directory, output_file
from rnnkit.configuration import config_from_dict
from rnnkit.engine.native import build
from rnnkit.training.checkpoint import load_checkpoint, restoring, save_checkpoint
from rnnkit.training.distributed import setup_distributed
from rnnkit.training.metrics import MetricsLog

KIND = "forecast"
CHECKPOINT_NAME = "model.pt"


def load_series(config: DataConfig) -> tuple[Series, str, str | None]:
    """The prepared series of ``config``'s source, a one-line description of it, and the name
    of its time column."""
    frame, target, time_column, season, description = load_frame(config)
    if config.season is not None:
        season = config.season or None  # 0: the user says there is none
    series = prepare_series(frame, target, time_column, config.features, config.fill, season)
    return series, description, time_column


def describe_missing(series: Series, fill: str, history_end: int | None = None) -> str:
    """How many missing values ``series`` has (before `fill_missing`) and how they are filled."""
    if not series.missing:
        return "no missing values"
    history_end = len(series.values) if history_end is None else history_end
    in_tail = int(np.isnan(series.values[history_end:]).sum())
    return f"{series.missing} missing values filled ({fill}" + (
        f"; the {in_tail} in the test tail by the last value before them" if in_tail else "") + ")"


def choose_season(series: Series, config: DataConfig, train_end: int) -> tuple[int | None, str]:
    """The season length and where it came from; detection reads the train part only."""
    if series.season:
        return series.season, "given" if config.season else "known for the dataset"
    if config.season == 0:
        return None, "none (--season 0)"
    detected = detect_season(series.values[:train_end, 0])
    return detected, "detected" if detected else "none detected"


def check_test_tail(series: Series, history_end: int) -> None:
    """``ValueError`` when the test tail has no target value at all: filled from the last value
    before it, every forecast would be scored against that constant (the naive forecast's
    error 0), which measures nothing."""
    tail = series.values[history_end:, 0]
    if len(tail) and bool(np.isnan(tail).all()):
        raise ValueError(
            f"the target {series.columns[0]!r} has no value in the test tail (rows "
            f"{history_end} to {len(series.values) - 1} of {len(series.values)}, counted from 0 "
            "in time order): nothing to score the forecasts against; give the data values "
            "there, or a smaller --test-size")


@dataclass
class FittedCut:
    """One cut of the series trained and scored: the networks, their scaler and training, and
    the evaluation of the network and the baselines on the cut's test tail."""

    data: DataConfig  # the sizes resolved
    model_config: ForecastModelConfig
    split: Split
    season: int | None
    season_source: str
    scaler: Scaler
    models: list[Forecaster]
    histories: list[FitHistory]
    evaluation: Evaluation
    validation_origins: int
    seconds: float

    def context(self) -> dict:
        """What metrics.json says about this cut besides the results."""
        return {"data": asdict(self.data), "model": asdict(self.model_config),
                "season": self.season, "season_source": self.season_source,
                "split": asdict(self.split), "origins": len(self.evaluation.origins),
                "validation_origins": self.validation_origins,
                "networks": [{"seed": h.seed, "steps": h.steps, "best_step": h.best_step,
                              "best_validation": h.best_validation} for h in self.histories],
                "training_seconds": round(self.seconds, 1)}


def fit_and_score(series: Series, data: DataConfig, model_config: ForecastModelConfig,
                  fit: FitConfig, source: str, log: MetricsLog, distributed,
                  quiet: bool = False, window: int | None = None) -> FittedCut | None:
    """Split ``series`` in time (its last ``test_size`` rows the test tail), fill, scale on the
    train part, fit the networks on the rolling windows of the train part (early-stopped on
    the validation part's), and forecast every test origin with them and the baselines (fitted
    on the history before the tail). None on the processes other than rank 0."""
    split = split_series(len(series.values), data.lookback, data.horizon, data.test_size,
                         data.validation_size)
    missing = describe_missing(series, data.fill, split.validation_end)
    filled = fill_missing(series, data.fill, split.validation_end)  # an empty history first
    check_test_tail(series, split.validation_end)  # on the values before the fill
    series = filled
    season, season_source = choose_season(series, data, split.train_end)
    print(f"{source}: {len(series.values):,} rows, target {series.columns[0]!r}"
          + (f", features {series.columns[1:]}" if series.columns[1:] else "")
          + f"; {missing}; "
          f"{series.irregular_steps} irregular time steps; season: "
          f"{season or '-'} ({season_source})", flush=True)
    print(f"split in time: train {split.train_end}, validation "
          f"{split.validation_end - split.train_end}, test {split.length - split.validation_end}"
          f" rows; lookback {data.lookback}, horizon {data.horizon} ({model_config.strategy})",
          flush=True)

    scaler = Scaler.fit(series.values[: split.train_end], series.columns, data.scaler)
    target = series.values[:, 0]
    # MASE's scale now: a season too long for the history is said before training, not after.
    scale = mase_scale(target[: split.validation_end], season)
    scaled = scaler.transform(series.values)
    train_windows = rolling_windows(scaled, 0, split.train_end, data.lookback, data.horizon)
    validation_windows = rolling_windows(scaled, split.train_end, split.validation_end,
                                         data.lookback, data.horizon)
    print(f"{len(train_windows[0])} training windows ({-(-len(train_windows[0]) // fit.batch_size)}"
          f" mini-batches an epoch); rolling validation from {len(validation_windows[0])} origins",
          flush=True)
    # The network corrects seasonal naive when the window holds a whole season.
    naive_season = season if season and season <= data.lookback else None
    model_config = replace(model_config, input_size=len(series.columns), horizon=data.horizon,
                           season=naive_season)
    print("the network corrects " + (f"the seasonal naive forecast (season {season})"
          if naive_season else "the last value" + (
              f" (the season {season} is longer than the lookback {data.lookback})"
              if season else "")), flush=True)
    started = time.perf_counter()
    fitted = fit_ensemble(model_config, fit, train_windows, validation_windows,
                          distributed=distributed, metrics=log, quiet=quiet,
                          metrics_fields={} if window is None else {"window": window})
    seconds = time.perf_counter() - started
    if not distributed.is_main:  # rank 0 evaluates and writes; the others are done
        return None
    models = [model.cpu() for model, _ in fitted]  # forecasts, baselines, checkpoint on the host
    histories = [history for _, history in fitted]
    for history in histories:
        print(f"seed {history.seed}: trained {history.steps} steps; kept step "
              f"{history.best_step} (validation loss {history.best_validation:.4f}, scaled "
              "units)", flush=True)
    print(f"trained {len(models)} network{'s' if len(models) > 1 else ''} in {seconds:.1f} s",
          flush=True)

    origins = window_origins(split.validation_end, split.length, data.lookback, data.horizon,
                             data.stride)
    test_inputs, test_targets = windows(scaled, split.validation_end, split.length,
                                        data.lookback, data.horizon, data.stride)
    print(f"forecasting {len(origins)} test origins with the model and the baselines ...",
          file=sys.stderr, flush=True)
    # (n, horizon, Q) quantiles per network, in the series' units; the point is the median.
    members = [scaler.inverse_target(forecast_windows(model, test_inputs, quantiles=True))
               for model in models]
    quantiles = np.mean(members, axis=0)  # the ensemble: each quantile averaged
    middle = models[0].median
    levels = model_config.levels
    baselines = all_baselines(target, split.validation_end, origins, data.horizon, season,
                              levels)
    for baseline in baselines:  # e.g. a season dropped: the table alone would not say
        if baseline.note:
            print(f"note: {baseline.note}", file=sys.stderr, flush=True)
    evaluation = Evaluation(
        origins=origins, actual=scaler.inverse_target(test_targets),
        model=quantiles[..., middle], baselines=baselines,
        scale=scale, season=season,
        members=[member[..., middle] for member in members] if len(members) > 1 else [],
        seeds=[history.seed for history in histories],
        model_intervals={level: (quantiles[..., middle - 1 - k], quantiles[..., middle + 1 + k])
                         for k, level in enumerate(sorted(levels))})
    print(format_table(evaluation.table()))
    if evaluation.members:
        print(evaluation.describe_spread())
    return FittedCut(data, model_config, split, season, season_source, scaler, models,
                     histories, evaluation, len(validation_windows[0]), seconds)


def cut(series: Series, end: int) -> Series:
    """The first ``end`` rows of ``series`` (what was known at that point)."""
    values = series.values[:end]
    return replace(series, values=values, time=None if series.time is None else
                   series.time[:end], missing=int(np.isnan(values).sum()))


def train(data: DataConfig, model_config: ForecastModelConfig, fit: FitConfig, out: str,
          overwrite: bool = False, plot: bool = True, quiet: bool = False) -> int:
    """Train and score on the series' test tail; with ``data.windows = K``, a rolling-origin
    backtest: K test tails of ``test_size`` rows ending ``test_size`` apart, the last at the
    series' end, each with everything refitted (networks, scaler, season, baselines) on the
    rows before it; metrics per window and their mean. The checkpoint and the plot are those
    of the last window (all of the series)."""
    out_dir = output_directory(out)  # a bad --out is said now, not after training
    checkpoint = output_file(out_dir / CHECKPOINT_NAME, "--out")
    if checkpoint.exists() and not overwrite:
        raise ValueError(f"{str(checkpoint)!r} exists and would be overwritten; choose another "
                         "--out folder or pass --overwrite")
    series, source, time_column = load_series(data)
    data = resolve_sizes(data, len(series.values))
    ends = [len(series.values) - (data.windows - 1 - k) * data.test_size
            for k in range(data.windows)]
    # Every window's split is checked before the first trains; the first window's cut is the
    # shortest, and a backtest's error says which window and why it is short.
    for k, end in enumerate(ends):
        try:
            split_series(max(end, 0), data.lookback, data.horizon, data.test_size,
                         data.validation_size)
        except ValueError as error:
            if data.windows == 1:
                raise
            raise ValueError(
                f"--windows {data.windows} with --test-size {data.test_size}: backtest window "
                f"{k + 1} is trained and scored on the first {max(end, 0)} of the "
                f"{len(series.values)} rows ({data.windows - 1 - k} later test tails of "
                f"{data.test_size} rows cut off); {error}; give fewer --windows or a smaller "
                "--test-size") from None
    series_id = data.dataset or series.columns[0]
    build.kernels()  # compile once, before the clock (a failed build warns; "fused" runs)
    note = missing_statistical_baselines()
    if note:
        print(f"note: {note}", file=sys.stderr)
    cuts = []
    with setup_distributed(fit.device) as distributed, \
            MetricsLog(out_dir / "metrics.jsonl", tensorboard_dir=out_dir / "tensorboard",
                       enabled=distributed.is_main) as log:
        for k, end in enumerate(ends):
            if data.windows > 1:
                print(f"backtest window {k + 1} of {data.windows}: the test tail is rows "
                      f"{end - data.test_size} to {end - 1}", flush=True)
            cuts.append(fit_and_score(cut(series, end), data, model_config, fit, source, log,
                                      distributed, quiet, k if data.windows > 1 else None))
    if not distributed.is_main:
        return 0
    last = cuts[-1]
    context = {"source": source, "fit": asdict(fit), **last.context()}
    if data.windows > 1:
        backtest = [{"window": k, "test_start": int(c.split.validation_end),
                     **c.context(), "results": c.evaluation.table()} for k, c in enumerate(cuts)]
        overall = backtest_table([c.evaluation.table() for c in cuts])
        print(f"backtest over {data.windows} windows (everything refitted for each); the mean "
              "of each metric over the windows:")
        print(format_table(overall))
        context |= {"backtest": backtest}
    else:
        overall = None
    written = [*write_results(out_dir, [c.evaluation for c in cuts], context, series.time,
                              series_id, overall), log.path]
    save_checkpoint(checkpoint, KIND, {
        "data_config": asdict(last.data), "model_config": asdict(last.model_config),
        "fit_config": asdict(fit), "columns": series.columns, "time_column": time_column,
        "season": last.season,
        "scaler": {"mean": last.scaler.mean.tolist(), "scale": last.scaler.scale.tolist()},
        "models": [model.state_dict() for model in last.models],
        "histories": [asdict(history) for history in last.histories],
        "results": last.evaluation.table(),
    })
    written.append(checkpoint)
    if plot:
        from rnnkit.training.plots import MissingPlotting

        try:
            path = out_dir / "forecast.png"
            save_forecast_plot(path, series.values[:, 0], series.time, last.evaluation,
                               last.split.validation_end,
                               f"{source}: {data.horizon}-step forecasts on the test tail")
            written.append(path)
        except MissingPlotting as error:
            print(f"note: {error}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def restore(checkpoint: str) -> tuple[ForecastEnsemble, Scaler, dict]:
    """The networks (one per seed; their mean is the forecast), the scaler and the saved
    settings of a ``forecast train`` checkpoint; in evaluation mode."""
    saved = load_checkpoint(checkpoint, KIND)
    with restoring(checkpoint, KIND):
        model_config = config_from_dict(ForecastModelConfig, saved["model_config"],
                                        f"checkpoint {checkpoint!r}")
        members = []
        # One network per seed; a checkpoint written before ensembles holds one, as "model".
        for weights in saved["models"] if "models" in saved else [saved["model"]]:
            member = Forecaster(model_config)
            member.load_state_dict(weights)
            members.append(member)
        scaler = Scaler(np.array(saved["scaler"]["mean"]), np.array(saved["scaler"]["scale"]))
        saved["data_config"] = DataConfig(**saved["data_config"])
        columns, _ = saved["columns"], saved["time_column"]
    if not members:
        raise ValueError(f"checkpoint {checkpoint!r} is inconsistent: it holds no network")
    if not len(columns) == len(scaler.mean) == model_config.input_size:
        raise ValueError(f"checkpoint {checkpoint!r} is inconsistent: {len(columns)} columns, a "
                         f"scaler for {len(scaler.mean)} and a network reading "
                         f"{model_config.input_size}")
    return ForecastEnsemble(members).eval(), scaler, saved


def predict(checkpoint: str, csv: str | None, dataset: str | None, out: str) -> int:
    """Forecast the ``horizon`` values after the end of the series, with the checkpoint's
    columns, fill rule and scaler; write them to ``out`` as CSV."""
    output_file(out, "--out")  # before the checkpoint and the data are read
    not_an_input(out, "--out", {"CKPT": checkpoint, "--csv": csv})
    model, scaler, saved = restore(checkpoint)
    trained = saved["data_config"]
    columns = saved["columns"]
    if csv is not None:  # the columns the model was trained on, whatever the source was
        source = replace(trained, csv=csv, dataset=None, target=columns[0], features=columns[1:],
                         time=saved["time_column"])
    else:
        source = replace(trained, csv=None, dataset=dataset, target=None)
    series, description, _ = load_series(source)
    if series.columns != columns:
        raise ValueError(f"the model was trained on columns {columns}; {description} gives "
                         f"{series.columns}")
    lookback, horizon = trained.lookback, trained.horizon
    if len(series.values) < lookback:
        raise ValueError(f"{description} has {len(series.values)} rows; the model reads the "
                         f"last {lookback} (its lookback)")
    missing = describe_missing(series, trained.fill)
    series = fill_missing(series, trained.fill)  # all of it is history here
    window = scaler.transform(series.values[-lookback:])[None]  # (1, lookback, C)
    forecast = scaler.inverse_target(forecast_windows(model, window))[0]  # (horizon,)
    table = {"step": np.arange(1, horizon + 1)}
    times = future_times(series, horizon)
    if times is not None:
        table["time"] = times
    table[series.columns[0]] = forecast
    levels = model.config.levels
    if levels:  # the intervals it was trained for, named as in forecasts.csv
        quantiles = scaler.inverse_target(forecast_windows(model, window, quantiles=True))[0]
        middle = model.quantiles.index(0.5)
        for k, level in enumerate(sorted(levels)):
            table[f"lo-{level_name(level)}"] = quantiles[:, middle - 1 - k]
            table[f"hi-{level_name(level)}"] = quantiles[:, middle + 1 + k]
    frame = pd.DataFrame(table)
    frame.to_csv(out, index=False)
    print(f"{description}: {len(series.values):,} rows; {missing}; {series.irregular_steps} "
          f"irregular time steps; forecast of the next {horizon} steps:")
    print(frame.to_string(index=False))
    print(f"wrote {out}")
    return 0
