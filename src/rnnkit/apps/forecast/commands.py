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
    series_frames,
    split_series,
    window_origins,
    windows,
)
from rnnkit.apps.forecast.evaluate import (
    Evaluation,
    backtest_table,
    format_table,
    panel_table,
    save_forecast_plot,
    write_results,
)
from rnnkit.apps.forecast.metrics import detect_season, level_name, mase_scale
from rnnkit.apps.forecast.model import (
    ForecastEnsemble,
    Forecaster,
    ForecastModelConfig,
    interval_bounds,
)
from rnnkit.apps.forecast.train import FitConfig, FitHistory, fit_ensemble, forecast_windows
from rnnkit.apps.outputs import not_an_input, output_directory, output_file
from rnnkit.configuration import config_from_dict
from rnnkit.engine.native import build
from rnnkit.training.checkpoint import load_checkpoint, restoring, save_checkpoint
from rnnkit.training.distributed import setup_distributed
from rnnkit.training.metrics import MetricsLog

KIND = "forecast"
CHECKPOINT_NAME = "model.pt"


def load_panel(config: DataConfig) -> tuple[list[tuple[str, Series]], str, str | None]:
    """The prepared series of ``config``'s source by id (one, named by the dataset or the target
    column, without ``--id``), a one-line description, and the name of the time column."""
    frame, target, time_column, season, description = load_frame(config)
    if config.season is not None:
        season = config.season or None  # 0: the user says there is none
    if not config.id:
        return ([(config.dataset or target, prepare_series(
            frame, target, time_column, config.features, config.fill, season,
            config.future_features))], description, time_column)
    panel = []
    for series_id, part in series_frames(frame, config.id):
        try:
            panel.append((series_id, prepare_series(part, target, time_column, config.features,
                                                    config.fill, season,
                                                    config.future_features)))
        except ValueError as error:
            raise ValueError(f"series {series_id!r} (--id {config.id}): {error}") from None
    return panel, description, time_column


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
class PreparedSeries:
    """One series of a cut, split, filled and scaled, with its windows."""

    series_id: str
    series: Series  # filled
    split: Split
    scaler: Scaler
    scaled: np.ndarray  # (L, C)
    missing: str  # how many values were missing and how they were filled
    train: tuple[np.ndarray, np.ndarray]  # rolling windows of the train part
    validation: tuple[np.ndarray, np.ndarray]  # rolling windows of the validation part
    history: tuple[np.ndarray, np.ndarray]  # rolling windows of train + validation (--refit)
    scale: float = float("nan")  # MASE's denominator, once the season is chosen


@dataclass
class FittedCut:
    """One cut of the series trained and scored: the networks, each series' scaler, the
    training, and each series' evaluation (the network and the baselines on its test tail)."""

    data: DataConfig  # the sizes resolved
    model_config: ForecastModelConfig
    season: int | None
    season_source: str
    prepared: list[PreparedSeries]
    models: list[Forecaster]
    histories: list[FitHistory]
    evaluations: dict[str, Evaluation]  # by series id, in the order of ``prepared``
    seconds: float

    def context(self) -> dict:
        """What metrics.json says about this cut besides the results."""
        first = self.prepared[0]
        context = {"data": asdict(self.data), "model": asdict(self.model_config),
                   "season": self.season, "season_source": self.season_source,
                   "split": asdict(first.split),
                   "origins": len(self.evaluations[first.series_id].origins),
                   "validation_origins": sum(len(p.validation[0]) for p in self.prepared),
                   "networks": [{"seed": h.seed, "steps": h.steps, "best_step": h.best_step,
                                 "best_validation": h.best_validation,
                                 "refit_steps": h.refit_steps}
                                for h in self.histories],
                   "training_seconds": round(self.seconds, 1)}
        if len(self.prepared) > 1:
            context["series_count"] = len(self.prepared)
        return context


def prepare_cut(series_id: str, series: Series, data: DataConfig) -> PreparedSeries:
    """Split one series in time, fill it from its history, scale it on its train part, and
    cut its rolling training and validation windows."""
    split = split_series(len(series.values), data.lookback, data.horizon, data.test_size,
                         data.validation_size)
    missing = describe_missing(series, data.fill, split.validation_end)
    filled = fill_missing(series, data.fill, split.validation_end)  # an empty history first
    check_test_tail(series, split.validation_end)  # on the values before the fill
    scaler = Scaler.fit(filled.values[: split.train_end], filled.columns, data.scaler)
    scaled = scaler.transform(filled.values)
    future = len(data.future_features)
    return PreparedSeries(
        series_id, filled, split, scaler, scaled, missing,
        rolling_windows(scaled, 0, split.train_end, data.lookback, data.horizon, future),
        rolling_windows(scaled, split.train_end, split.validation_end, data.lookback,
                        data.horizon, future),
        rolling_windows(scaled, 0, split.validation_end, data.lookback, data.horizon, future))


def panel_season(prepared: list[PreparedSeries], data: DataConfig) -> tuple[int | None, str]:
    """One season for every series (the naive forecast the network corrects, SeasonalNaive,
    MASE): given, known, or the most common one detected on the series' train parts."""
    found = [choose_season(p.series, data, p.split.train_end) for p in prepared]
    if len(prepared) == 1:
        return found[0]
    seasons = [season for season, _ in found if season]
    if not seasons:
        return None, found[0][1]
    counts = pd.Series(seasons).value_counts()
    season = int(min(counts.index[counts == counts.max()]))
    source = found[0][1] if found[0][1] != "detected" else \
        f"the most common detected, in {int(counts.max())} of {len(prepared)} series"
    return season, source


def fit_and_score(panel: list[tuple[str, Series]], data: DataConfig,
                  model_config: ForecastModelConfig, fit: FitConfig, source: str,
                  log: MetricsLog, distributed, quiet: bool = False,
                  window: int | None = None) -> FittedCut | None:
    """Split every series in time (its last ``test_size`` rows the test tail), fill, scale
    each on its own train part, fit one network (per seed) on the rolling windows of all train
    parts (early-stopped on all validation parts'), and forecast every test origin of every
    series with it and the baselines (fitted on that series' history before its tail). None
    on the processes other than rank 0."""
    prepared = [prepare_cut(series_id, series, data) for series_id, series in panel]
    season, season_source = panel_season(prepared, data)
    for p in prepared:  # now: a season too long for the history is said before training
        p.scale = mase_scale(p.series.values[: p.split.validation_end, 0], season)
    first = prepared[0]
    if len(prepared) == 1:
        print(f"{source}: {len(first.series.values):,} rows, target {first.series.columns[0]!r}"
              + (f", features {data.features}" if data.features else "")
              + (f", known future features {data.future_features}" if data.future_features
                 else "")
              + f"; {first.missing}; {first.series.irregular_steps} irregular time steps; "
              f"season: {season or '-'} ({season_source})", flush=True)
        split = first.split
        print(f"split in time: train {split.train_end}, validation "
              f"{split.validation_end - split.train_end}, test "
              f"{split.length - split.validation_end} rows; lookback {data.lookback}, horizon "
              f"{data.horizon} ({model_config.strategy})", flush=True)
    else:
        lengths = [len(p.series.values) for p in prepared]
        print(f"{source}: {len(prepared)} series of {min(lengths):,} to {max(lengths):,} rows, "
              f"target {first.series.columns[0]!r}; season: {season or '-'} ({season_source});"
              f" each split in time with validation {data.validation_size} and test "
              f"{data.test_size} rows and scaled on its own train part; lookback "
              f"{data.lookback}, horizon {data.horizon} ({model_config.strategy})", flush=True)
    train_windows = tuple(np.concatenate([p.train[k] for p in prepared])
                          for k in range(2))
    validation_windows = tuple(np.concatenate([p.validation[k] for p in prepared])
                               for k in range(2))
    print(f"{len(train_windows[0])} training windows ({-(-len(train_windows[0]) // fit.batch_size)}"
          f" mini-batches an epoch); rolling validation from {len(validation_windows[0])} origins",
          flush=True)
    # The network corrects seasonal naive when the window holds a whole season.
    naive_season = season if season and season <= data.lookback else None
    model_config = replace(model_config, input_size=len(first.series.columns),
                           horizon=data.horizon, season=naive_season)
    print("the network corrects " + (f"the seasonal naive forecast (season {season})"
          if naive_season else "the last value" + (
              f" (the season {season} is longer than the lookback {data.lookback})"
              if season else "")), flush=True)
    # The test windows and the baselines first: a baseline that cannot be fitted on a series
    # (statsforecast's "tiny datasets") is said before any time is spent training.
    tests, baselines = {}, {}
    for p in prepared:
        origins = window_origins(p.split.validation_end, p.split.length, data.lookback,
                                 data.horizon, data.stride)
        tests[p.series_id] = (origins, *windows(p.scaled, p.split.validation_end,
                                                p.split.length, data.lookback, data.horizon,
                                                data.stride, len(data.future_features)))
        if distributed.is_main:
            print(f"forecasting {len(origins)} test origins"
                  + (f" of series {p.series_id!r}" if len(prepared) > 1 else "")
                  + " with the baselines ...", file=sys.stderr, flush=True)
            baselines[p.series_id] = all_baselines(p.series.values[:, 0], p.split.validation_end,
                                                   origins, data.horizon, season,
                                                   model_config.levels)
    started = time.perf_counter()
    history_windows = tuple(np.concatenate([p.history[k] for p in prepared]) for k in range(2))
    fitted = fit_ensemble(model_config, fit, train_windows, validation_windows, history_windows,
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
              "units)" + (f"; refitted on train + validation for {history.refit_steps} steps"
                          if history.refit_steps else ""), flush=True)
    print(f"trained {len(models)} network{'s' if len(models) > 1 else ''} in {seconds:.1f} s",
          flush=True)
    untrained = [h.seed for h in histories if h.best_step == 0]
    if untrained:  # said plainly: the table's "rnnkit" row is then the naive forecast
        print(f"note: for seed{'s' if len(untrained) > 1 else ''} "
              f"{', '.join(map(str, untrained))} no trained weights validated better than the "
              "untrained network, which is " + (f"seasonal naive (season {naive_season})"
                                                if naive_season else "the last value")
              + ": that is the forecast kept", flush=True)
    evaluations = {p.series_id: evaluate_series(p, models, *tests[p.series_id], season,
                                                model_config.levels,
                                                [h.seed for h in histories],
                                                baselines[p.series_id])
                   for p in prepared}
    if len(prepared) == 1:
        evaluation = evaluations[first.series_id]
        print(format_table(evaluation.table()))
        if evaluation.members:
            print(evaluation.describe_spread())
    else:
        print(format_table(panel_table(list(evaluations.values()))))
    return FittedCut(data, model_config, season, season_source, prepared, models, histories,
                     evaluations, seconds)


def evaluate_series(p: PreparedSeries, models: list[Forecaster], origins: np.ndarray,
                    test_inputs: np.ndarray, test_targets: np.ndarray, season: int | None,
                    levels: list[float], seeds: list[int],
                    baselines: list | None = None) -> Evaluation:
    """The network (each seed, and their mean) and the baselines (computed here unless given)
    from every test origin of one series, in its own units."""
    # (n, horizon, Q) quantiles per network, in the series' units; the point is the median.
    members = [p.scaler.inverse_target(forecast_windows(model, test_inputs, quantiles=True))
               for model in models]
    quantiles = np.mean(members, axis=0)  # the ensemble: each quantile averaged
    middle = models[0].median
    if baselines is None:
        baselines = all_baselines(p.series.values[:, 0], p.split.validation_end, origins,
                                  test_targets.shape[1], season, levels)
    for baseline in baselines:  # e.g. a season dropped: the table alone would not say
        if baseline.note:
            print(f"note: {baseline.note}", file=sys.stderr, flush=True)
    return Evaluation(
        origins=origins, actual=p.scaler.inverse_target(test_targets),
        model=quantiles[..., middle], baselines=baselines,
        scale=p.scale, season=season,
        members=[member[..., middle] for member in members] if len(members) > 1 else [],
        seeds=seeds,
        model_intervals=interval_bounds(quantiles, levels))


def cut(series: Series, end: int) -> Series:
    """The first ``end`` rows of ``series`` (what was known at that point)."""
    values = series.values[:end]
    return replace(series, values=values, time=None if series.time is None else
                   series.time[:end], missing=int(np.isnan(values).sum()))


def history_and_future(series: Series) -> tuple[Series, np.ndarray, pd.Index | None]:
    """``series`` up to its target's last value, and the values ``(K, C)`` and times (None
    without) of the ``K`` rows after it: with known future features, the future those rows
    describe (the target empty there, the future features given)."""
    known = np.flatnonzero(~np.isnan(series.values[:, 0]))
    if not len(known):
        raise ValueError(f"the target {series.columns[0]!r} has no value at all")
    end = int(known[-1]) + 1
    return (cut(series, end), series.values[end:],
            None if series.time is None else series.time[end:])


def train(data: DataConfig, model_config: ForecastModelConfig, fit: FitConfig, out: str,
          overwrite: bool = False, plot: bool = True, quiet: bool = False,
          plot_series: list[str] | None = None) -> int:
    """Train and score on the test tail of the series (of each, with ``--id``: one network
    over all of them); with ``data.windows = K``, a rolling-origin backtest: K test tails of
    ``test_size`` rows ending ``test_size`` apart, the last at the series' end, each with
    everything refitted (networks, scalers, season, baselines) on the rows before it; metrics
    per window and their mean. The checkpoint and the plot are those of the last window (all
    of the series); ``plot_series``: the ids of the series to plot (default: the first
    three)."""
    out_dir = output_directory(out)  # a bad --out is said now, not after training
    checkpoint = output_file(out_dir / CHECKPOINT_NAME, "--out")
    if checkpoint.exists() and not overwrite:
        raise ValueError(f"{str(checkpoint)!r} exists and would be overwritten; choose another "
                         "--out folder or pass --overwrite")
    panel, source, time_column = load_panel(data)
    if data.future_features:  # rows after the target's end hold the future for predict
        trimmed = []
        for series_id, series in panel:
            history, after, _ = history_and_future(series)
            if len(after):
                print(("" if len(panel) == 1 else f"series {series_id!r}: ")
                      + f"the last {len(after)} rows have no {series.columns[0]!r} value: the "
                      "future of the known future features (what predict reads), not trained "
                      "or scored on", flush=True)
            trimmed.append((series_id, history))
        panel = trimmed
    ids = [series_id for series_id, _ in panel]
    unknown = [series_id for series_id in plot_series or [] if series_id not in ids]
    if unknown:
        raise ValueError(f"--plot-series names series the data does not have: {unknown}; it "
                         f"has {ids[:10]}" + (f" and {len(ids) - 10} more" if len(ids) > 10
                                              else ""))
    plotted = list(dict.fromkeys(plot_series)) if plot_series else ids[:PLOTTED_SERIES]
    shortest = min(len(series.values) for _, series in panel)
    given_lookback = data.lookback
    data = resolve_sizes(data, shortest)
    if data.windows > 1:  # the default lookback fits the first backtest cut, the shortest
        data = resolve_sizes(replace(data, lookback=given_lookback),
                             max(shortest - (data.windows - 1) * data.test_size, 1))
    # Every window's split of every series is checked before the first trains; the first
    # window's cut is the shortest, and a backtest's error says which window and why it is
    # short.
    for series_id, series in panel:
        named = f"series {series_id!r}: " if len(panel) > 1 else ""
        for k in range(data.windows):
            end = len(series.values) - (data.windows - 1 - k) * data.test_size
            try:
                split_series(max(end, 0), data.lookback, data.horizon, data.test_size,
                             data.validation_size)
            except ValueError as error:
                if data.windows == 1:
                    raise ValueError(f"{named}{error}") from None
                raise ValueError(
                    f"{named}--windows {data.windows} with --test-size {data.test_size}: "
                    f"backtest window {k + 1} is trained and scored on the first {max(end, 0)} "
                    f"of the {len(series.values)} rows ({data.windows - 1 - k} later test tails "
                    f"of {data.test_size} rows cut off); {error}; give fewer --windows or a "
                    "smaller --test-size") from None
    build.kernels()  # compile once, before the clock (a failed build warns; "fused" runs)
    note = missing_statistical_baselines()
    if note:
        print(f"note: {note}", file=sys.stderr)
    cuts = []
    with setup_distributed(fit.device) as distributed, \
            MetricsLog(out_dir / "metrics.jsonl", tensorboard_dir=out_dir / "tensorboard",
                       enabled=distributed.is_main) as log:
        for k in range(data.windows):
            back = (data.windows - 1 - k) * data.test_size
            if data.windows > 1:
                print(f"backtest window {k + 1} of {data.windows}: the test tail is the "
                      f"{data.test_size} rows ending {back} rows before the end", flush=True)
            cuts.append(fit_and_score(
                [(series_id, cut(series, len(series.values) - back))
                 for series_id, series in panel], data, model_config, fit, source, log,
                distributed, quiet, k if data.windows > 1 else None))
    if not distributed.is_main:
        return 0
    last = cuts[-1]
    context = {"source": source, "fit": asdict(fit), **last.context()}
    tables = [cut_table(c) for c in cuts]
    if data.windows > 1:
        context["backtest"] = [{"window": k, **c.context(), "results": table}
                               for k, (c, table) in enumerate(zip(cuts, tables, strict=True))]
        overall = backtest_table(tables)
        print(f"backtest over {data.windows} windows (everything refitted for each); the mean "
              "of each metric over the windows:")
        print(format_table(overall))
    else:
        overall = tables[0]
    written = [*write_results(out_dir, [c.evaluations for c in cuts], context,
                              {p.series_id: p.series.time for p in last.prepared}, overall),
               log.path]
    scalers = {p.series_id: {"mean": p.scaler.mean.tolist(), "scale": p.scaler.scale.tolist()}
               for p in last.prepared}
    save_checkpoint(checkpoint, KIND, {
        "data_config": asdict(last.data), "model_config": asdict(last.model_config),
        "fit_config": asdict(fit), "columns": last.prepared[0].series.columns,
        "time_column": time_column, "season": last.season,
        **({"scalers": scalers} if data.id else {"scaler": next(iter(scalers.values()))}),
        "models": [model.state_dict() for model in last.models],
        "histories": [asdict(history) for history in last.histories],
        "results": overall,
    })
    written.append(checkpoint)
    if plot:
        from rnnkit.training.plots import MissingPlotting

        try:
            chosen = [p for p in last.prepared if p.series_id in plotted]
            chosen.sort(key=lambda p: plotted.index(p.series_id))
            for number, p in enumerate(chosen):
                path = out_dir / ("forecast.png" if number == 0 else
                                  f"forecast-{safe_name(p.series_id)}.png")
                save_forecast_plot(path, p.series.values[:, 0], p.series.time,
                                   last.evaluations[p.series_id], p.split.validation_end,
                                   f"{source}" + (f", series {p.series_id!r}"
                                                  if len(last.prepared) > 1 else "")
                                   + f": {data.horizon}-step forecasts on the test tail")
                written.append(path)
        except MissingPlotting as error:
            print(f"note: {error}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


PLOTTED_SERIES = 3  # with many series, the first three are drawn


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:80]


def cut_table(fitted: FittedCut) -> list[dict]:
    """The results table of a cut: its series' table, or with many series the aggregate."""
    evaluations = list(fitted.evaluations.values())
    return evaluations[0].table() if len(evaluations) == 1 else panel_table(evaluations)


def restore(checkpoint: str) -> tuple[ForecastEnsemble, Scaler | None, dict]:
    """The networks (one per seed; their mean is the forecast), the scaler and the saved
    settings of a ``forecast train`` checkpoint; in evaluation mode. A checkpoint of many
    series (``--id``) has a scaler per series, in ``saved["scalers"]`` by id (and None
    returned for the scaler)."""
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
        saved_scalers = saved["scalers"] if "scalers" in saved else {None: saved["scaler"]}
        scalers = {series_id: Scaler(np.array(found["mean"]), np.array(found["scale"]))
                   for series_id, found in saved_scalers.items()}
        saved["data_config"] = DataConfig(**saved["data_config"])
        columns, _ = saved["columns"], saved["time_column"]
    if not members:
        raise ValueError(f"checkpoint {checkpoint!r} is inconsistent: it holds no network")
    for scaler in scalers.values():
        if not len(columns) == len(scaler.mean) == model_config.input_size:
            raise ValueError(f"checkpoint {checkpoint!r} is inconsistent: {len(columns)} "
                             f"columns, a scaler for {len(scaler.mean)} and a network reading "
                             f"{model_config.input_size}")
    if "scalers" in saved:
        saved["scalers"] = scalers
        return ForecastEnsemble(members).eval(), None, saved
    return ForecastEnsemble(members).eval(), scalers[None], saved


def predict(checkpoint: str, csv: str | None, dataset: str | None, out: str) -> int:
    """Forecast the ``horizon`` values after the end of the series (of each series, for a
    checkpoint of many), with the checkpoint's columns, fill rule and scalers; write them to
    ``out`` as CSV."""
    output_file(out, "--out")  # before the checkpoint and the data are read
    not_an_input(out, "--out", {"CKPT": checkpoint, "--csv": csv})
    model, scaler, saved = restore(checkpoint)
    trained = saved["data_config"]
    columns = saved["columns"]
    if csv is not None:  # the columns the model was trained on, whatever the source was
        past_end = len(columns) - len(trained.future_features)
        source = replace(trained, csv=csv, dataset=None, target=columns[0],
                         features=columns[1:past_end], future_features=columns[past_end:],
                         time=saved["time_column"])
    else:
        if trained.id:
            raise ValueError(f"checkpoint {checkpoint!r} forecasts many series (--id "
                             f"{trained.id}); give them with --csv")
        source = replace(trained, csv=None, dataset=dataset, target=None)
    panel, description, _ = load_panel(source)
    scalers = saved["scalers"] if trained.id else {panel[0][0]: scaler}
    unknown = [series_id for series_id, _ in panel if series_id not in scalers]
    if unknown:
        raise ValueError(f"{description} has series the model was not trained on (no scaler "
                         f"for them): {unknown[:5]}; it knows {list(scalers)[:5]}")
    lookback, horizon = trained.lookback, trained.horizon
    future = model.config.future_size
    frames = []
    for series_id, series in panel:
        named = f"{description}" + (f", series {series_id!r}" if trained.id else "")
        if series.columns != columns:
            raise ValueError(f"the model was trained on columns {columns}; {description} "
                             f"gives {series.columns}")
        if future:
            series, ahead, ahead_times = history_and_future(series)
            ahead = ahead[:horizon, -future:]
            if len(ahead) < horizon or np.isnan(ahead).any():
                empty = [c for c, gap in zip(columns[-future:], np.isnan(ahead).any(0),
                                             strict=True) if gap]
                raise ValueError(
                    f"{named}: the model reads the known future features {columns[-future:]} "
                    f"over the {horizon} steps it forecasts; give them on the {horizon} rows "
                    f"after the last value of {columns[0]!r} (with {columns[0]!r} empty there)"
                    f": found {len(ahead)} such rows"
                    + (f", with {', '.join(map(repr, empty))} empty on some" if empty else ""))
        if len(series.values) < lookback:
            raise ValueError(f"{named} has {len(series.values)} rows; the model reads the "
                             f"last {lookback} (its lookback)")
        missing = describe_missing(series, trained.fill)
        series = fill_missing(series, trained.fill)  # all of it is history here
        by = scalers[series_id]
        window = by.transform(series.values[-lookback:])[None]  # (1, lookback, C)
        if future:  # (1, lookback + horizon, C): the future rows hold the future features
            rows = np.full((horizon, len(columns)), np.nan)
            rows[:, -future:] = ahead
            window = np.concatenate([window, by.transform(rows)[None]], axis=1)
        forecast = by.inverse_target(forecast_windows(model, window))[0]  # (horizon,)
        table = {"unique_id": series_id} if trained.id else {}
        table["step"] = np.arange(1, horizon + 1)
        times = future_times(series, horizon) if not future or ahead_times is None else \
            list(ahead_times[:horizon])  # the future rows' own stamps
        if times is not None:
            table["time"] = times
        table[series.columns[0]] = forecast
        levels = model.config.levels
        if levels:  # the intervals it was trained for, named as in forecasts.csv
            quantiles = by.inverse_target(forecast_windows(model, window, quantiles=True))[0]
            for level, (lo, hi) in interval_bounds(quantiles, levels).items():
                table[f"lo-{level_name(level)}"], table[f"hi-{level_name(level)}"] = lo, hi
        frames.append(pd.DataFrame(table))
        print(f"{named}: {len(series.values):,} rows; {missing}; {series.irregular_steps} "
              f"irregular time steps; forecast of the next {horizon} steps"
              + (":" if not trained.id else ""))
    frame = pd.concat(frames, ignore_index=True)
    frame.to_csv(out, index=False)
    if not trained.id:
        print(frame.to_string(index=False))
    print(f"wrote {out}")
    return 0
