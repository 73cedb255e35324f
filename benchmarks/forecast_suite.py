"""The offline forecasting benchmark of issue 17: rnnkit against statsforecast's AutoETS,
AutoARIMA, AutoTheta and SeasonalNaive on every bundled seasonal series (forecast_series.py).

For a series ``x`` of length ``L`` with season ``m``, the test tail is the last ``2m`` values and
the history ``x[:L-2m]`` (what every method may fit on). Two protocols:

- ``one-origin``: one forecast of horizon ``H = 2m`` made at the start of the test tail;
- ``rolling``: forecasts of horizon ``m`` from every origin ``t = L-2m, ..., L-m`` of the test
  tail (``m + 1`` origins, each forecast's targets inside the tail), from the past ``x[:t]``
  only, as `rnnkit forecast` scores its test tail. The statistical models are fitted once on
  the history and run forward (statsforecast's ``forward``: the fitted parameters on ``x[:t]``),
  so no origin sees a value at or after itself.

Score: MASE = mean over (origin, step) of ``|x - x̂|`` divided by the in-sample seasonal naive
error of the history, ``mean_t |x_t - x_{t-m}|`` over ``x[:L-2m]`` (rnnkit's
`rnnkit.apps.forecast.metrics.mase_scale`, so both sides share one denominator).

rnnkit runs as a user runs it, in a subprocess per series, protocol and configuration:
``python -m rnnkit forecast train --csv F --target y --time ds --season m --horizon H
--test-size 2m --validation-size 2m --out DIR --quiet --no-plot`` plus the configuration's
``--rnnkit-args``; its MASE is the ``rnnkit`` row of ``DIR/metrics.json``. (The one-origin
horizon equals the test size, so both protocols keep the same train/validation/test split.)

``--global`` fits one network per protocol and season group instead (monthly, quarterly: one
run uses one season for all its series), as forecasting users do with many short series: the
group's series go into one long CSV ``series/global-m<m>.csv`` (``unique_id, ds, y``, each
series with its own dates) and ``rnnkit forecast train --csv F --id unique_id ...`` (the same
flags as above) runs once; rnnkit splits each series in time and scales it on its own train
part, so no series' test tail reaches the training. Each series' MASE is read from metrics.json's
``series`` tables, after checking that rnnkit divided by the suite's scale. rnnkit resolves its
default lookback on the group's shortest series (the ``lookback`` column), and every series
must be long enough for that split. The rows are labelled ``rnnkit-global``; ``seconds`` is
each series' share of the group run's wall time (``group_seconds``).

``--reuse CSV`` takes the statistical rows (and any other method's rows, such as per-series
rnnkit runs, for comparison) of the chosen series from earlier runs' per_series.csv files
instead of fitting statsforecast again.

Usage: ``python benchmarks/forecast_suite.py [--limit N] [--order length] [--out DIR]
[--protocols one-origin,rolling] [--rnnkit-args "--seed 1" --label seed1 ...] [--skip-rnnkit]
[--global] [--reuse CSV ...]``.
Writes ``per_series.csv`` (rewritten after every series, so a stopped run keeps what it did),
``summary.csv``, ``summary.md`` and ``mase_vs_seasonal_naive.png`` in ``--out``; progress on
stderr. ``--summarize A.csv B.csv ...`` writes the summary and plot of earlier runs'
per_series.csv files (for instance one run per protocol, run side by side) without running
anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # forecast_series beside this file

from forecast_series import TEST_SEASONS, SeasonalSeries, load_series  # noqa: E402

from rnnkit.apps.forecast.metrics import mase_scale  # noqa: E402

PROTOCOLS = ("one-origin", "rolling")
STATISTICAL = ("AutoETS", "AutoARIMA", "AutoTheta", "SeasonalNaive")
REFERENCE = "SeasonalNaive"


@dataclass(frozen=True)
class Protocol:
    """Where the forecasts start and how far they reach, for one series."""

    name: str
    history_end: int  # L - 2m: the test tail starts here
    horizon: int  # steps from each origin
    origins: np.ndarray  # (n,) index of each origin's first forecast step


def protocol(name: str, length: int, season: int) -> Protocol:
    """The origins and horizon of protocol ``name`` for a series of ``length`` values."""
    history_end = length - TEST_SEASONS * season
    if name == "one-origin":
        return Protocol(name, history_end, TEST_SEASONS * season, np.array([history_end]))
    if name == "rolling":
        return Protocol(name, history_end, season,
                        np.arange(history_end, length - season + 1))
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")


def actual_windows(values: np.ndarray, plan: Protocol) -> np.ndarray:
    """(origins, horizon) true values ``values[t : t + horizon]`` of every origin."""
    return np.stack([values[t : t + plan.horizon] for t in plan.origins])


def statistical_model(name: str, season: int):
    try:
        from statsforecast import models
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the forecasting benchmark compares with statsforecast, which "
                                  "is not installed: pip install statsforecast") from None
    if name not in STATISTICAL:
        raise ValueError(f"statistical method must be one of {', '.join(STATISTICAL)}, "
                         f"got {name!r}")
    return getattr(models, name)(season_length=season)


def statistical_forecasts(name: str, values: np.ndarray, season: int,
                          plan: Protocol) -> np.ndarray:
    """(origins, horizon) forecasts of statsforecast's ``name``: fitted on the history
    ``values[:history_end]``, run forward over ``values[:t]`` from each origin ``t``."""
    model = statistical_model(name, season).fit(values[: plan.history_end])
    rows = []
    for t in plan.origins:
        if t == plan.history_end:
            rows.append(model.predict(h=plan.horizon)["mean"])
        else:
            rows.append(model.forward(y=values[:t], h=plan.horizon)["mean"])
    return np.asarray(rows, dtype=np.float64)


def mase(actual: np.ndarray, forecast: np.ndarray, history: np.ndarray, season: int) -> float:
    """Mean absolute error over every (origin, step), over the history's seasonal naive scale."""
    return float(np.mean(np.abs(actual - forecast)) / mase_scale(history, season))


def score_statistical(values: np.ndarray, season: int, plan: Protocol,
                      methods: tuple[str, ...] = STATISTICAL) -> list[dict]:
    """One row per method: MASE and the seconds its fit and forecasts took."""
    actual = actual_windows(values, plan)
    history = values[: plan.history_end]
    rows = []
    for name in methods:
        started = time.perf_counter()
        try:
            forecasts = statistical_forecasts(name, values, season, plan)
            score, error = mase(actual, forecasts, history, season), ""
        except Exception as failure:  # noqa: BLE001 - one failed fit is a result, not the end
            score, error = float("nan"), f"{type(failure).__name__}: {failure}"
        rows.append({"method": name, "MASE": score,
                     "seconds": time.perf_counter() - started, "error": error})
    return rows


def rnnkit_command(csv: Path, season: int, plan: Protocol, out: Path,
                   extra: list[str]) -> list[str]:
    test_size = TEST_SEASONS * season
    return [sys.executable, "-m", "rnnkit", "forecast", "train", "--csv", str(csv),
            "--target", "y", "--time", "ds", "--season", str(season),
            "--horizon", str(plan.horizon), "--test-size", str(test_size),
            "--validation-size", str(test_size), "--out", str(out), "--quiet", "--no-plot",
            *extra]


def run_command(command: list[str], out: Path, timeout: float) -> tuple[float, str]:
    """Run one `rnnkit forecast train` into the fresh folder ``out``: its wall seconds, and
    an error line ("" on success: ``out/metrics.json`` is then written)."""
    if out.exists():
        shutil.rmtree(out)  # this run's own folder: a rerun replaces it
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return seconds, lines[-1] if lines else f"exit status {done.returncode}"
    return seconds, ""


def run_rnnkit(csv: Path, season: int, plan: Protocol, out: Path, extra: list[str],
               timeout: float) -> dict:
    """MASE of rnnkit's row in ``out/metrics.json``, the wall and training seconds, and the
    seasonal naive MASE rnnkit computed itself (a check on the shared test tail and scale)."""
    seconds, error = run_command(rnnkit_command(csv, season, plan, out, extra), out, timeout)
    if error:
        return {"MASE": float("nan"), "seconds": seconds, "error": error}
    return {**read_rnnkit_metrics(out, plan), "seconds": seconds}


def read_rnnkit_metrics(out: Path, plan: Protocol) -> dict:
    """rnnkit's MASE, steps (per network) and training seconds from ``out/metrics.json``, and
    the seasonal naive MASE it computed itself; ``RuntimeError`` when it scored other origins
    than ``plan``."""
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    by_method = {row["method"]: row for row in metrics["results"]}
    naive = [row["MASE"] for name, row in by_method.items() if name == "SeasonalNaive"]
    if metrics["origins"] != len(plan.origins):
        raise RuntimeError(f"rnnkit scored {metrics['origins']} origins in {out}, the suite "
                           f"{len(plan.origins)}: the test tails differ")
    return {"MASE": by_method["rnnkit"]["MASE"], "error": "",
            "training_seconds": metrics["training_seconds"],
            "steps": ";".join(str(n["steps"]) for n in metrics["networks"]),
            "best_step": ";".join(str(n["best_step"]) for n in metrics["networks"]),
            "rnnkit_seasonal_naive_MASE": naive[0] if naive else float("nan")}


GLOBAL_ID = "unique_id"  # the long-format CSV's series column, as statsforecast names it


def season_groups(records: list[SeasonalSeries]) -> list[tuple[int, list[SeasonalSeries]]]:
    """The series by season, each season in the order it first appears: one global network per
    group, since one rnnkit run uses one season (its seasonal naive, SeasonalNaive, MASE) for
    all of its series."""
    groups: dict[int, list[SeasonalSeries]] = {}
    for record in records:
        groups.setdefault(record.season, []).append(record)
    return list(groups.items())


def write_long_csv(records: list[SeasonalSeries], path: Path) -> None:
    """Every series of one season in long format (``unique_id, ds, y``), one after another,
    each with its own dates: what `rnnkit forecast train --id unique_id` reads."""
    names = [record.name for record in records]
    if len(set(names)) != len(names):
        raise ValueError(f"series names must be unique in one long CSV, got {names}")
    seasons = sorted({record.season for record in records})
    if len(seasons) != 1:
        raise ValueError(f"one long CSV holds series of one season (rnnkit fits one season per "
                         f"run), got seasons {seasons}")
    pd.concat([pd.DataFrame({GLOBAL_ID: record.name, "ds": record.series.index,
                             "y": record.series.to_numpy(dtype=np.float64)})
               for record in records], ignore_index=True).to_csv(path, index=False)


def rnnkit_scale(table: list[dict], where: str) -> float:
    """The MASE denominator rnnkit divided by for one series: ``MAE / MASE`` of a row of its
    table (each row shares the series' scale), from the first row with a non-zero MASE."""
    for row in table:
        if row["MASE"] and np.isfinite(row["MASE"]):
            return row["MAE"] / row["MASE"]
    raise RuntimeError(f"{where}: every MASE is 0 or not finite, so rnnkit's scale is unknown")


def read_global_metrics(out: Path, records: list[SeasonalSeries],
                        plans: dict[str, Protocol]) -> dict[str, dict]:
    """Each series' rnnkit MASE from ``out/metrics.json`` of one global run (its ``series``
    tables; the ``results`` table when the run had one series), with the run's lookback, the
    networks' steps and training seconds (shared by the series) and rnnkit's own SeasonalNaive
    MASE. ``RuntimeError`` when rnnkit scored other series or other origins than ``plans``, or
    divided a series' errors by another scale than the suite's `mase_scale` of its history (the
    two sides' MASE would not be comparable)."""
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    tables = metrics.get("series") or {}
    if not tables and len(records) == 1:  # one series: rnnkit writes its table as the results
        tables = {records[0].name: metrics["results"]}
    names = [record.name for record in records]
    if sorted(tables) != sorted(names):
        raise RuntimeError(f"rnnkit scored the series {sorted(tables)} in {out}, the suite "
                           f"gave it {sorted(names)}")
    origins = {len(plan.origins) for plan in plans.values()}
    if origins != {metrics["origins"]}:
        raise RuntimeError(f"rnnkit scored {metrics['origins']} origins per series in {out}, "
                           f"the suite {sorted(origins)}: the test tails differ")
    shared = {"training_seconds": metrics["training_seconds"],
              "lookback": metrics["data"]["lookback"],
              "steps": ";".join(str(n["steps"]) for n in metrics["networks"]),
              "best_step": ";".join(str(n["best_step"]) for n in metrics["networks"])}
    found = {}
    for record in records:
        table, plan = tables[record.name], plans[record.name]
        by_method = {row["method"]: row for row in table}
        history = record.series.to_numpy(dtype=np.float64)[: plan.history_end]
        ours = mase_scale(history, record.season)
        theirs = rnnkit_scale(table, f"series {record.name!r} in {out}")
        if not np.isclose(theirs, ours, rtol=1e-9, atol=0):
            raise RuntimeError(f"series {record.name!r}: rnnkit's MASE scale is {theirs!r}, the "
                               f"suite's {ours!r} (in {out}): the histories or seasons differ")
        naive = by_method.get("SeasonalNaive", {}).get("MASE", float("nan"))
        found[record.name] = {"MASE": by_method["rnnkit"]["MASE"], "error": "", **shared,
                              "rnnkit_seasonal_naive_MASE": naive}
    return found


def run_rnnkit_global(csv: Path, records: list[SeasonalSeries], season: int,
                      plans: dict[str, Protocol], out: Path, extra: list[str],
                      timeout: float) -> dict[str, dict]:
    """One `rnnkit forecast train --id unique_id` over every series of ``csv``
    (`write_long_csv`): per series its result (`read_global_metrics`), ``group_seconds`` (the
    run's wall seconds) and ``seconds`` (its share of them: summed over the series, the run's
    wall time); every series gets the run's error when it fails."""
    any_plan = plans[records[0].name]  # horizon and test tail: the same for every series
    command = rnnkit_command(csv, season, any_plan, out, ["--id", GLOBAL_ID, *extra])
    seconds, error = run_command(command, out, timeout)
    found = {record.name: {"MASE": float("nan"), "error": error} for record in records} \
        if error else read_global_metrics(out, records, plans)
    timing = {"seconds": seconds / len(records), "group_seconds": seconds,
              "group_series": len(records)}
    return {name: {**result, **timing} for name, result in found.items()}


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per protocol and method: mean and median MASE over the series where every method has a
    score, wins (lowest MASE on a series; ties count for each), series below seasonal naive,
    total seconds over those series, and failures (series without a score) over all series."""
    summary = []
    for name, part in rows.groupby("protocol", sort=False):
        table = part.pivot(index="series", columns="method", values="MASE")
        complete = table.dropna()
        best = complete.min(axis=1)
        for method in part["method"].unique():
            scores = complete[method]
            below = (complete[method] < complete[REFERENCE]).sum() if method != REFERENCE else 0
            summary.append({
                "protocol": name, "method": method, "series": len(complete),
                "mean MASE": scores.mean(), "median MASE": scores.median(),
                "wins": int((scores == best).sum()),
                "below seasonal naive": int(below) if method != REFERENCE else np.nan,
                "failed": int(table[method].isna().sum()),
                "seconds": part.loc[(part["method"] == method)
                                    & part["series"].isin(complete.index), "seconds"].sum()})
    return pd.DataFrame(summary)


def markdown_table(summary: pd.DataFrame) -> str:
    lines = []
    for name, part in summary.groupby("protocol", sort=False):
        count = int(part["series"].iloc[0])
        lines += [f"**{name}** ({count} series where every method ran)", "",
                  "| method | mean MASE | median MASE | wins | below seasonal naive | failed "
                  "| total seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in part.sort_values("mean MASE").to_dict("records"):
            below = row["below seasonal naive"]
            below = "-" if np.isnan(below) else f"{int(below)}/{count}"
            lines.append(f"| {row['method']} | {row['mean MASE']:.3f} | {row['median MASE']:.3f} "
                         f"| {row['wins']} | {below} | {row['failed']} | {row['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def save_plot(rows: pd.DataFrame, path: Path) -> None:
    """Each method's MASE against SeasonalNaive's, per series, one panel per protocol: points
    under the diagonal beat seasonal naive."""
    from rnnkit.training.plots import pyplot

    plt = pyplot()
    protocols = list(rows["protocol"].unique())
    figure, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 5.5),
                                squeeze=False)
    for axis, name in zip(axes[0], protocols, strict=True):
        table = rows[rows["protocol"] == name].pivot(index="series", columns="method",
                                                     values="MASE")
        reference = table[REFERENCE]
        for method in table.columns.drop(REFERENCE):
            axis.scatter(reference, table[method], s=18, alpha=0.75, label=method)
        scores = table.to_numpy()
        scores = scores[np.isfinite(scores) & (scores > 0)]
        low, top = scores.min() / 1.2, scores.max() * 1.2
        axis.plot([low, top], [low, top], color="0.5", linestyle=":", linewidth=1)
        # Log axes: MASE spans two orders of magnitude across series.
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(low, top)
        axis.set_ylim(low, top)
        axis.set_xlabel("SeasonalNaive MASE (log)")
        axis.set_ylabel("method MASE (log)")
        axis.set_title(f"{name}: {len(table)} series (below the diagonal: better)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="forecast-suite", help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="the first N series only")
    parser.add_argument("--series", default=None,
                        help="comma-separated series names (see forecast_series.py)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        help="comma-separated, of " + ", ".join(PROTOCOLS))
    parser.add_argument("--rnnkit-args", action="append", default=None,
                        help="extra flags for `rnnkit forecast train`, one configuration each "
                             "time it is given (default: one configuration, no extra flags)")
    parser.add_argument("--label", action="append", default=None,
                        help="a method name per --rnnkit-args, in order (default: rnnkit, or "
                             "rnnkit plus the flags)")
    parser.add_argument("--skip-rnnkit", action="store_true",
                        help="score the statistical methods only")
    parser.add_argument("--order", choices=("source", "length"), default="source",
                        help="run the series in the loader's order, or shortest first (so that "
                             "a run stopped early has covered the most series)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds one rnnkit run may take")
    parser.add_argument("--global", dest="global_model", action="store_true",
                        help="one rnnkit network per protocol and season group over all of its "
                             "series (--id: each series split in time and scaled on its own), "
                             "instead of one per series; rows labelled rnnkit-global")
    parser.add_argument("--reuse", action="append", default=None, metavar="CSV",
                        help="take the statistical rows (and any other method's) of the chosen "
                             "series from an earlier run's per_series.csv instead of fitting "
                             "them again; may be given several times")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="CSV",
                        help="summarize these per_series.csv files of earlier runs into --out "
                             "instead of running")
    arguments = parser.parse_args(argv)
    if arguments.limit is not None and arguments.limit <= 0:
        parser.error(f"--limit must be a positive integer, got {arguments.limit}")
    arguments.protocols = [p.strip() for p in arguments.protocols.split(",") if p.strip()]
    unknown = [p for p in arguments.protocols if p not in PROTOCOLS]
    if unknown or not arguments.protocols:
        parser.error(f"--protocols must be a comma-separated list of {', '.join(PROTOCOLS)}, "
                     f"got {unknown or 'nothing'}")
    configurations = arguments.rnnkit_args or [""]
    labels = arguments.label or []
    if len(labels) > len(configurations):
        parser.error(f"--label is given {len(labels)} times for {len(configurations)} "
                     "--rnnkit-args configurations: at most one label each")
    base = "rnnkit-global" if arguments.global_model else "rnnkit"
    labels += [f"{base} {flags}".strip() for flags in configurations[len(labels):]]
    if len(set(labels)) != len(labels) or set(labels) & set(STATISTICAL):
        parser.error(f"--label names must differ from each other and from {STATISTICAL}, "
                     f"got {labels}")
    arguments.configurations = [] if arguments.skip_rnnkit else list(
        zip(labels, [shlex.split(flags) for flags in configurations], strict=True))
    return arguments


def choose_series(arguments: argparse.Namespace) -> list[SeasonalSeries]:
    records = load_series()
    if arguments.series:
        wanted = [n.strip() for n in arguments.series.split(",") if n.strip()]
        known = {r.name for r in records}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise SystemExit(f"--series: unknown name(s) {missing}; known: {sorted(known)}")
        records = [r for r in records if r.name in wanted]
    if arguments.order == "length":
        records = sorted(records, key=lambda r: len(r.series))  # stable: ties keep their order
    return records[: arguments.limit]


def combine(paths: list[str], option: str = "--summarize") -> pd.DataFrame:
    """The rows of earlier runs' per_series.csv files; a (series, protocol, method) given twice
    is refused (which run's score would count?)."""
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"{option}: {path!r} is not a file")
    table = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    table["error"] = table["error"].fillna("")
    repeated = table.duplicated(["series", "protocol", "method"], keep=False)
    if repeated.any():
        first = table[repeated].iloc[0]
        raise SystemExit(f"{option}: {first['series']} / {first['protocol']} / "
                         f"{first['method']} is in more than one row of {paths}")
    return table


def reused_results(table: pd.DataFrame, record: SeasonalSeries, protocol_name: str,
                   labels: list[str]) -> list[dict]:
    """The rows of earlier runs (`combine` of ``--reuse``) for one series and protocol, as
    results (method, MASE, seconds, error, ...): every statistical method must be there, read
    from a series of the same length and season, and no method may be one of this run's
    ``labels`` (which score would count?)."""
    part = table[(table["series"] == record.name) & (table["protocol"] == protocol_name)]
    missing = [name for name in STATISTICAL if name not in set(part["method"])]
    if missing:
        raise SystemExit(f"--reuse: no {', '.join(missing)} row for {record.name} / "
                         f"{protocol_name}; run without --reuse to fit them")
    if ((part["length"] != len(record.series)) | (part["season"] != record.season)).any():
        raise SystemExit(f"--reuse: {record.name} / {protocol_name} was scored on "
                         f"{sorted(set(part['length']))} values of season "
                         f"{sorted(set(part['season']))}, this run reads {len(record.series)} "
                         f"of season {record.season}")
    clash = sorted(set(part["method"]) & set(labels))
    if clash:
        raise SystemExit(f"--reuse: the earlier rows already score {clash} on {record.name} / "
                         f"{protocol_name}; give this run's configurations other --label names")
    results = []
    for row in part.drop(columns=["series", "season", "length", "protocol"]).to_dict("records"):
        # A column of another method (an rnnkit run's steps) is NaN on this row: not its own.
        results.append({key: value for key, value in row.items()
                        if key in ("MASE", "error") or not pd.isna(value)})
    return results


def statistical_results(values: np.ndarray, record: SeasonalSeries, plan: Protocol,
                        reused: pd.DataFrame | None, labels: list[str]) -> list[dict]:
    """The statistical methods' rows of one series and protocol: fitted now, or reused."""
    if reused is None:
        return score_statistical(values, record.season, plan)
    return reused_results(reused, record, plan.name, labels)


def show(results: list[dict], heading: str) -> None:
    shown = "  ".join(f"{r['method']} {r['MASE']:.3f} ({r['seconds']:.1f} s)" for r in results)
    print(f"{heading}: {shown}", file=sys.stderr, flush=True)
    for r in results:
        if r["error"]:
            print(f"    {r['method']} failed: {r['error']}", file=sys.stderr, flush=True)


def run_per_series(records: list[SeasonalSeries], arguments: argparse.Namespace, out: Path,
                   reused: pd.DataFrame | None) -> list[dict]:
    """Every series, protocol and configuration: the statistical methods and one rnnkit run
    per series (per_series.csv rewritten after each series)."""
    labels = [label for label, _ in arguments.configurations]
    rows = []
    for number, record in enumerate(records, 1):
        values = record.series.to_numpy(dtype=np.float64)
        csv = out / "series" / f"{safe_name(record.name)}.csv"
        pd.DataFrame({"ds": record.series.index, "y": values}).to_csv(csv, index=False)
        for name in arguments.protocols:
            plan = protocol(name, len(values), record.season)
            results = statistical_results(values, record, plan, reused, labels)
            for label, flags in arguments.configurations:
                run_dir = out / "runs" / safe_name(label) / name / safe_name(record.name)
                results.append({"method": label, **run_rnnkit(
                    csv, record.season, plan, run_dir, flags, arguments.timeout)})
            for result in results:
                rows.append({"series": record.name, "season": record.season,
                             "length": len(values), "protocol": name, **result})
            show(results, f"[{number}/{len(records)}] {record.name} (m={record.season}, "
                          f"{len(values)} values) {name}")
        pd.DataFrame(rows).to_csv(out / "per_series.csv", index=False)  # a stop keeps these
    return rows


def run_global(records: list[SeasonalSeries], arguments: argparse.Namespace, out: Path,
               reused: pd.DataFrame | None) -> list[dict]:
    """Per protocol and season group: the statistical methods on every series, then one rnnkit
    run per configuration over the group's long CSV (per_series.csv rewritten after each
    group). Every series must be long enough for rnnkit's split with the lookback it resolves
    on the group's shortest series; a run that refuses one fails the whole group."""
    labels = [label for label, _ in arguments.configurations]
    rows = []
    for season, group in season_groups(records):
        csv = out / "series" / f"global-m{season}.csv"
        write_long_csv(group, csv)
        lengths = [len(record.series) for record in group]
        for name in arguments.protocols:
            plans = {r.name: protocol(name, len(r.series), season) for r in group}
            results = {r.name: statistical_results(r.series.to_numpy(dtype=np.float64), r,
                                                   plans[r.name], reused, labels)
                       for r in group}
            for label, flags in arguments.configurations:
                run_dir = out / "runs" / safe_name(label) / name / f"global-m{season}"
                found = run_rnnkit_global(csv, group, season, plans, run_dir, flags,
                                          arguments.timeout)
                for record in group:
                    results[record.name].append({"method": label, **found[record.name]})
                result = found[group[0].name]
                scores = [found[r.name]["MASE"] for r in group]
                print(f"{name}, season {season}: {label} over {len(group)} series of "
                      f"{min(lengths)} to {max(lengths)} values in {result['group_seconds']:.1f}"
                      f" s" + (f" (lookback {result['lookback']}, steps {result['steps']}): "
                               f"mean MASE {np.mean(scores):.3f}" if not result["error"] else
                               f": failed: {result['error']}"), file=sys.stderr, flush=True)
            for number, record in enumerate(group, 1):
                rows += [{"series": record.name, "season": season, "length": len(record.series),
                          "protocol": name, **result} for result in results[record.name]]
                show(results[record.name], f"[{number}/{len(group)}] {record.name} "
                                           f"(m={season}, {len(record.series)} values) {name}")
            pd.DataFrame(rows).to_csv(out / "per_series.csv", index=False)  # a stop keeps these
    return rows


def write_summary(table: pd.DataFrame, out: Path) -> None:
    """summary.csv, summary.md and the plot of the per-series ``table``, in ``out``."""
    summary = summarize(table)
    summary.to_csv(out / "summary.csv", index=False)
    text = markdown_table(summary)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    written = [out / "summary.csv", out / "summary.md"]
    from rnnkit.training.plots import MissingPlotting

    try:
        save_plot(table, out / "mase_vs_seasonal_naive.png")
        written.append(out / "mase_vs_seasonal_naive.png")
    except MissingPlotting as error:
        print(f"note: {error}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    out = Path(arguments.out)
    if arguments.summarize:
        out.mkdir(parents=True, exist_ok=True)
        table = combine(arguments.summarize)
        table.to_csv(out / "per_series.csv", index=False)
        write_summary(table, out)
        return 0
    (out / "series").mkdir(parents=True, exist_ok=True)
    records = choose_series(arguments)
    reused = combine(arguments.reuse, "--reuse") if arguments.reuse else None
    rows = (run_global if arguments.global_model else run_per_series)(records, arguments, out,
                                                                      reused)
    write_summary(pd.DataFrame(rows), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
