"""The model and its baselines scored on the same test-tail origins, in the series' units.

Results: a table (one row per method: MAE, RMSE, sMAPE, MASE and the skill score against the
best baseline), written as CSV and JSON; every forecast as a long CSV; and a PNG plot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rnnkit.apps.forecast.baselines import BaselineForecast
from rnnkit.apps.forecast.metrics import (
    METRICS,
    coverage,
    level_name,
    owa,
    quantile_forecasts,
    scaled_pinball_loss,
    score,
    skill,
)

MODEL_NAME = "rnnkit"


@dataclass
class Evaluation:
    origins: np.ndarray  # (n,) index of each origin's first forecast step
    actual: np.ndarray  # (n, horizon) true values, series units
    model: np.ndarray  # (n, horizon) the network's forecasts
    baselines: list[BaselineForecast]
    scale: float  # MASE's denominator
    season: int | None
    members: list[np.ndarray] = field(default_factory=list)  # an ensemble's networks' forecasts
        # (each (n, horizon)), when there are several; ``model`` is their mean
    seeds: list[int] = field(default_factory=list)  # the seed of each member
    model_intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
        # the network's prediction intervals by level: (lo, hi), each (n, horizon)

    def member_scores(self) -> list[dict]:
        """Each network of the ensemble scored alone: its seed and metrics."""
        return [{"seed": seed, **score(self.actual, forecast, self.scale)}
                for seed, forecast in zip(self.seeds, self.members, strict=True)]

    def describe_spread(self) -> str:
        """One line: each seed's MASE alone, their spread, and the ensemble's."""
        scores = [row["MASE"] for row in self.member_scores()]
        ensemble = score(self.actual, self.model, self.scale)["MASE"]
        each = ", ".join(f"seed {seed} {mase:.4g}" for seed, mase in zip(self.seeds, scores,
                                                                          strict=True))
        return (f"{MODEL_NAME} ensemble of {len(scores)} seeds: MASE {ensemble:.4g}; each alone "
                f"{each} (mean {np.mean(scores):.4g}, spread max - min {np.ptp(scores):.4g})")

    def forecasts(self) -> dict[str, np.ndarray]:
        return {MODEL_NAME: self.model} | {b.name: b.forecasts for b in self.baselines}

    def intervals(self) -> dict[str, dict[float, tuple[np.ndarray, np.ndarray]]]:
        """Each method's prediction intervals by level (lo, hi), for those that have them."""
        found = {b.name: b.intervals for b in self.baselines}
        return {name: levels for name, levels in
                ({MODEL_NAME: self.model_intervals} | found).items() if levels}

    def best_baseline(self) -> BaselineForecast:
        """The baseline with the lowest MAE on the test tail."""
        return min(self.baselines, key=lambda b: score(self.actual, b.forecasts, 1)["MAE"])

    def table(self) -> list[dict]:
        """One row per method (the model first): metrics, skill against the best baseline, and
        for methods with prediction intervals the empirical coverage of each level
        (``coverage-80``: the fraction of actual values inside) and the scaled pinball loss
        ``SPL`` of their quantiles (the median and the bounds, divided by MASE's scale)."""
        best = self.best_baseline()
        best_error = score(self.actual, best.forecasts, self.scale)["MAE"]
        intervals = self.intervals()
        rows = []
        for name, forecast in self.forecasts().items():
            metrics = score(self.actual, forecast, self.scale)
            row = {"method": name, **metrics, "skill": skill(metrics["MAE"], best_error),
                   "best_baseline": name == best.name}
            for level, (lo, hi) in sorted(intervals.get(name, {}).items()):
                row[f"coverage-{level_name(level)}"] = coverage(self.actual, lo, hi)
            if name in intervals:
                row["SPL"] = scaled_pinball_loss(
                    self.actual, quantile_forecasts(forecast, intervals[name]), self.scale)
            rows.append(row)
        return rows


def format_table(rows: list[dict]) -> str:
    extra = list(dict.fromkeys(key for row in rows for key in row
                               if key not in (*METRICS, "method", "skill", "best_baseline")))
    columns = (*METRICS, "skill", *extra)
    header = f"{'method':<22}" + "".join(f"{m:>12}" for m in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row["method"] + (" *" if row["best_baseline"] else "")
        lines.append(f"{name:<22}" + "".join(
            f"{row[m]:>12.4g}" if m in row else f"{'-':>12}" for m in columns))
    panel = any("OWA" in row for row in rows)
    lines.append("* best baseline (lowest " + ("mean MASE" if panel else "MAE") + "); skill = 1 - "
                 + ("MASE / MASE" if panel else "MAE / MAE") + " of the best baseline"
                 + ("; coverage-L: share of actual values inside the L % interval; SPL: "
                    "scaled pinball loss" if any(k.startswith("coverage-") for k in extra)
                    else "")
                 + ("; means over the series; OWA against SeasonalNaive (Naive without a "
                    "season); wins: series where it is best; below_ref: series where it beats "
                    "that reference" if panel else ""))
    return "\n".join(lines)


def long_forecasts(evaluation: Evaluation, series_id: str,
                   time: pd.Index | None) -> pd.DataFrame:
    """Every forecast in long format, one row per (origin, step, model), the columns
    statsforecast and neuralforecast use: ``unique_id``, ``cutoff`` (the last value known at the
    origin: its time stamp, or its row), ``ds`` (the target's time stamp, or its row), ``step``
    (1..horizon), ``y`` (the actual value), ``model`` (a stable name: ``rnnkit`` and the
    baselines' names) and ``value``; ``lo-L``/``hi-L`` columns for each level ``L`` of a method's
    prediction intervals (empty for methods without them)."""
    n, horizon = evaluation.actual.shape
    target_rows = (evaluation.origins[:, None] + np.arange(horizon)).ravel()
    cutoff_rows = np.repeat(evaluation.origins - 1, horizon)
    stamps = np.asarray(time) if time is not None else None
    common = {"unique_id": series_id,
              "cutoff": stamps[cutoff_rows] if stamps is not None else cutoff_rows,
              "ds": stamps[target_rows] if stamps is not None else target_rows,
              "step": np.tile(np.arange(1, horizon + 1), n),
              "y": evaluation.actual.ravel()}
    parts = []
    for name, forecast in evaluation.forecasts().items():
        part = pd.DataFrame({**common, "model": name, "value": forecast.ravel()})
        for level, (lo, hi) in sorted(evaluation.intervals().get(name, {}).items()):
            name_of_level = level_name(level)
            part[f"lo-{name_of_level}"], part[f"hi-{name_of_level}"] = lo.ravel(), hi.ravel()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def backtest_table(tables: list[list[dict]]) -> list[dict]:
    """The mean of each metric over the windows of a backtest, per method (every window's
    table lists the same methods); skill and the best baseline from the mean MAE."""
    methods = [row["method"] for row in tables[0]]
    rows = []
    for method in methods:
        found = [next(row for row in table if row["method"] == method) for table in tables]
        metrics = [key for key in found[0] if key not in ("method", "best_baseline", "skill")]
        rows.append({"method": method, **{key: float(np.mean([row[key] for row in found]))
                                          for key in metrics}})
    # Many series' aggregates have no MAE (their units differ): their skill is in MASE.
    key = "MAE" if "MAE" in rows[0] else "MASE"
    baselines = [row for row in rows if row["method"] != MODEL_NAME]
    best = min(baselines, key=lambda row: row[key])
    for row in rows:
        row["skill"] = skill(row[key], best[key])
        row["best_baseline"] = row is best
    return rows


def panel_table(evaluations: list[Evaluation]) -> list[dict]:
    """The aggregate over many series, per method (each series' table lists the same methods):
    mean and median MASE, mean sMAPE, OWA (M4's ``(sMAPE / sMAPE_ref + MASE / MASE_ref) / 2`` of
    the means, against SeasonalNaive, or Naive without a season), ``wins`` (series where the
    method has the lowest MASE of all), ``below_ref`` (series where its MASE is below the
    reference's), and the mean coverage and SPL of methods with intervals. ``skill`` and the
    best baseline come from the mean MASE."""
    tables = [evaluation.table() for evaluation in evaluations]
    methods = [row["method"] for row in tables[0]]
    by_method = {m: [next(r for r in table if r["method"] == m) for table in tables]
                 for m in methods}
    reference = "SeasonalNaive" if "SeasonalNaive" in by_method else "Naive"
    best_of_series = [min(table, key=lambda row: row["MASE"])["method"] for table in tables]
    ref_mase = np.mean([row["MASE"] for row in by_method[reference]])
    ref_smape = np.mean([row["sMAPE"] for row in by_method[reference]])
    rows = []
    for method, found in by_method.items():
        mase = [row["MASE"] for row in found]
        smape_mean = float(np.mean([row["sMAPE"] for row in found]))
        row = {"method": method, "sMAPE": smape_mean, "MASE": float(np.mean(mase)),
               "median MASE": float(np.median(mase)),
               "OWA": float(owa(smape_mean, float(np.mean(mase)), ref_smape, ref_mase)),
               "wins": best_of_series.count(method),
               "below_ref": int(sum(m < r["MASE"] for m, r in
                                    zip(mase, by_method[reference], strict=True)))}
        for key in found[0]:
            if key.startswith("coverage-") or key == "SPL":
                row[key] = float(np.mean([r[key] for r in found]))
        rows.append(row)
    best = min((row for row in rows if row["method"] != MODEL_NAME), key=lambda r: r["MASE"])
    for row in rows:
        row["skill"] = skill(row["MASE"], best["MASE"])
        row["best_baseline"] = row is best
    return rows


def write_results(out: Path, windows: list[dict[str, Evaluation]], context: dict,
                  times: dict[str, pd.Index | None], overall: list[dict]) -> list[Path]:
    """metrics.csv, metrics.json (with ``context``) and forecasts.csv (`long_forecasts`) in
    ``out``, from each backtest window's evaluations by series id (one window without
    ``--windows``; one series without ``--id``). metrics.json's ``results`` are ``overall``
    (the one series' table, the aggregate over the series, or the mean over the windows);
    metrics.csv holds the table of each series and window (``unique_id`` and ``window``
    columns when there are several) and then ``overall``; forecasts.csv every forecast."""
    paths = [out / "metrics.csv", out / "metrics.json", out / "forecasts.csv"]
    several_series, several_windows = len(windows[-1]) > 1, len(windows) > 1
    rows, parts = [], []
    for k, evaluations in enumerate(windows):
        for series_id, evaluation in evaluations.items():
            labels = ({"window": k} if several_windows else {}) | \
                ({"unique_id": series_id} if several_series else {})
            rows += [labels | row for row in evaluation.table()]
            forecast = long_forecasts(evaluation, series_id, times[series_id])
            parts.append(forecast.assign(window=k) if several_windows else forecast)
    if several_series or several_windows:
        labels = ({"window": "mean"} if several_windows else {}) | \
            ({"unique_id": "all"} if several_series else {})
        rows += [labels | row for row in overall]
    pd.DataFrame(rows).to_csv(paths[0], index=False)
    summary = {**context, "results": overall}
    last = list(windows[-1].values())
    if several_series:
        summary["series"] = {series_id: evaluation.table()
                             for series_id, evaluation in windows[-1].items()}
    elif last[0].members:
        summary["members"] = last[0].member_scores()
    paths[1].write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    pd.concat(parts, ignore_index=True).to_csv(paths[2], index=False)
    return paths


def save_forecast_plot(path: Path, values: np.ndarray, time: pd.Index | None,
                       evaluation: Evaluation, test_start: int, title: str) -> None:
    """History, the actual test tail, and the forecasts of rnnkit and the best baseline from
    every horizon-th origin and the last (so that the drawn forecasts cover the test tail)."""
    from rnnkit.training.plots import pyplot

    plt = pyplot()
    axis = np.asarray(time) if time is not None else np.arange(len(values))
    test_length = len(values) - test_start
    first = max(0, test_start - 3 * test_length)  # enough history to see the pattern
    figure, axes = plt.subplots(figsize=(10, 4.5))
    axes.plot(axis[first:test_start], values[first:test_start], color="0.35", linewidth=1,
              label="history")
    axes.plot(axis[test_start:], values[test_start:], color="black", linewidth=1.4,
              label="actual (test tail)")
    horizon = evaluation.actual.shape[1]
    best = evaluation.best_baseline()
    shown = list(range(0, len(evaluation.origins), horizon))
    if shown[-1] != len(evaluation.origins) - 1:
        shown.append(len(evaluation.origins) - 1)  # reach the end of the test tail
    for k in shown:
        span = axis[evaluation.origins[k] : evaluation.origins[k] + horizon]
        for level, (lo, hi) in sorted(evaluation.model_intervals.items(), reverse=True):
            axes.fill_between(span, lo[k], hi[k], color="tab:red", alpha=0.12 if level > 85
                              else 0.22, linewidth=0,
                              label=f"{MODEL_NAME} {level:g} % interval" if k == 0 else None)
        axes.plot(span, evaluation.model[k], color="tab:red", linewidth=1.4,
                  label=f"{MODEL_NAME} (from origins {horizon} steps apart)" if k == 0
                  else None)
        axes.plot(span, best.forecasts[k], color="tab:blue", linewidth=1.2, linestyle="--",
                  label=f"best baseline: {best.name}" if k == 0 else None)
    axes.axvline(axis[test_start], color="0.6", linestyle=":", linewidth=1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
