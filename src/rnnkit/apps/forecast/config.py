"""The settings of `rnnkit forecast train` (data, model and fit configs plus the output folder)
and `rnnkit forecast predict`; options, config files and ``--print-config`` are generated from
these dataclasses (`rnnkit.configuration`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rnnkit.apps.forecast.data import DATASETS, FEATURES, DataConfig
from rnnkit.apps.forecast.model import ForecastModelConfig
from rnnkit.apps.forecast.train import FitConfig

# Columns per step and the horizon follow from the data settings.
FORECAST_EXCLUDE = frozenset({"model.input_size", "model.horizon", "model.season",
                              "model.future_size"})


@dataclass
class ForecastTrainCommand:
    """`rnnkit forecast train`: train on a CSV column or a built-in series, score it against
    baselines."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ForecastModelConfig = field(
        default_factory=lambda: ForecastModelConfig(input_size=1, horizon=1))
    fit: FitConfig = field(default_factory=FitConfig)
    out: str | None = field(default=None, metadata={"metavar": "DIR"})
        # folder for model.pt, metrics.csv/json, forecasts.csv, forecast.png (none:
        # forecast-<dataset or CSV name>)
    overwrite: bool = False  # replace the results of an earlier run in --out (refused otherwise)
    plot: bool = True  # write forecast.png
    plot_series: list[str] = field(default_factory=list, metadata=FEATURES)  # with --id: the
        # ids of the series to plot (none: the first three)
    quiet: bool = False  # no progress bar


@dataclass
class ForecastPredictCommand:
    """`rnnkit forecast predict`: forecast past the end of a series."""

    checkpoint: str | None = field(default=None, metadata={"positional": True,
                                                           "metavar": "CKPT"})
        # model.pt written by forecast train
    csv: str | None = field(default=None, metadata={"metavar": "FILE"})
        # the series, with the trained columns
    dataset: str | None = field(default=None, metadata={"choices": DATASETS})
        # a built-in series instead of --csv
    out: str = "forecast.csv"  # CSV to write
