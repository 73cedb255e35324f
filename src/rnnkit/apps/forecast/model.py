"""The forecasting network: a recurrent stack reads the lookback window, a linear layer corrects
a naive forecast.

With a scaled window ``x (N, L, C)`` (column 0 the target, then the features), its last target
value ``x_last = x[:, L-1, 0]`` and a season ``m`` (when one is known and ``m <= L``):

    z          = x with z[..., 0] = x[..., 0] - x_last      (the window relative to its end)
    h_L        = RNN(z)[:, L-1]                             (the last hidden state, (N, H))
    b_k        = x[:, L + k - m (⌊k/m⌋ + 1), 0]             (seasonal naive: the same point of
                                                             the last full season), or x_last
                                                             without a season
    direct:    ŷ_k = b_k + (W h_L + c)_k,  k = 0..horizon-1  (N, horizon): one output per step
    recursive: ŷ_0 = b_0 + W h_L + c                        (N, 1), then the window slides over
               ŷ_0 and the step repeats, horizon times

Known future features (``future_size`` F > 0, calendar columns or promotions, the last F of the
C columns): the window is ``(N, L + horizon, C)``, the L past rows followed by the ``horizon``
rows after the origin, of which only those F columns are read (`window_inputs`), and the
linear layer also reads their values over the steps it forecasts:

    direct:    ŷ = b + W [h_L; f_0; ...; f_{horizon-1}] + c  (f_k: the (F,) future features of
                                                             step k)
    recursive: ŷ_0 = b_0 + W [h_L; f_0] + c; the window then slides over the row (ŷ_0, f_0)

Prediction intervals (``levels``, e.g. 80 and 95 percent): the layer gives ``Q`` outputs per step
for the quantiles ``τ_1 < ... < τ_Q`` of `quantiles_of_levels` (the median in the middle, index
``c``); ``ŷ_{k,c}`` is the point forecast above and the others are stacked on it with positive
gaps, so that the quantiles never cross:

    ŷ_{k,j} = ŷ_{k,j-1} + softplus(o_{k,j})  (j > c)
    ŷ_{k,j} = ŷ_{k,j+1} - softplus(o_{k,j})  (j < c)

and training minimises the pinball loss ``mean_{n,k,j} max(τ_j e, (τ_j - 1) e)``, ``e = y - ŷ_j``.

``W`` and ``c`` start at zero, so an untrained network *is* the naive forecast (seasonal naive
when the season is known) and training learns what to add to it; the validation at step 0
(`fit_forecaster`) keeps it when nothing learned does better. Working relative to the window's
last value lets a trending series leave the range it was scaled on without pushing the
network's inputs out of the range it was trained on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.forecast.metrics import parse_levels, quantiles_of_levels
from rnnkit.apps.recurrent import RecurrentConfig, build_recurrent

STRATEGIES = ("direct", "recursive")


def _parse_levels(text: str) -> list[float]:
    try:  # floats, as a config file gives them
        return [float(level) for level in parse_levels(text)]
    except ValueError as error:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(error)) from None


def check_levels(levels: list[float], strategy: str = "direct") -> None:
    """``ValueError`` unless every level lies strictly inside (0, 100), each once, with the
    direct strategy."""
    if levels and strategy == "recursive":
        raise ValueError("--levels needs --strategy direct: a recursive forecast feeds one "
                         "value back, not a distribution")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, (int, float)) or \
                not 0 < level < 100:
            raise ValueError(f"levels must be percentages strictly between 0 and 100, got "
                             f"{level!r} in {list(levels)}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels repeat a level: {list(levels)}; give each once")


LEVELS = {"parse": _parse_levels, "metavar": "L,..."}


@dataclass
class ForecastModelConfig:
    """What the network is; every field maps one to one onto an `rnnkit forecast train` option."""

    input_size: int = field(metadata={"cli": False})  # columns per step: the target, then the
        # features
    horizon: int = field(metadata={"cli": False})  # steps forecast from each origin
    strategy: str = field(default="direct", metadata={"choices": STRATEGIES})
        # direct: one output per step | recursive: one step, fed back
    levels: list[float] = field(default_factory=list, metadata=LEVELS)  # prediction interval
        # levels in percent (80,95); the network then forecasts their quantiles (direct only)
    season: int | None = field(default=None, metadata={"cli": False})  # the season of the
        # seasonal naive forecast the network corrects (None: the last value)
    future_size: int = field(default=0, metadata={"cli": False})  # the known future features:
        # the last future_size input columns, read over the horizon too
    recurrent: RecurrentConfig = field(default_factory=lambda: RecurrentConfig(hidden_size=64))

    def check(self) -> None:
        check_levels(self.levels, self.strategy)


# Chrono initialisation's T_max when the model is built without its lookback (to load
# weights, which replace the drawn ones).
CHRONO_SPAN = 100


class Forecaster(nn.Module):
    """Scaled windows ``(N, L, C)`` -> scaled forecasts ``(N, horizon)``; see the module doc."""

    def __init__(self, config: ForecastModelConfig, chrono_span: int = CHRONO_SPAN) -> None:
        """``chrono_span``: chrono initialisation's T_max, the lookback the network reads."""
        super().__init__()
        if config.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got "
                             f"{config.strategy!r}")
        if not 0 <= config.future_size < config.input_size:
            raise ValueError(f"future_size must lie in [0, input_size = {config.input_size}) "
                             f"(the target is not known in advance), got {config.future_size}")
        if config.strategy == "recursive" and config.input_size != 1 + config.future_size:
            raise ValueError("recursive forecasts feed the forecast back as the next input, so "
                             "they need the future of every feature too; use --strategy direct "
                             "with --features, or drop --features")
        check_levels(config.levels, config.strategy)
        self.config = config
        self.quantiles = quantiles_of_levels(config.levels) if config.levels else [0.5]
        self.median = self.quantiles.index(0.5)
        self.recurrent = build_recurrent(config.recurrent, config.input_size, batch_first=True,
                                         chrono_max_length=chrono_span)
        outputs = config.horizon if config.strategy == "direct" else 1
        # Rows after the past in a window: the horizon's known future features, when there are.
        self.ahead = config.horizon if config.future_size else 0
        self.output = nn.Linear(config.recurrent.output_size + outputs * config.future_size,
                                outputs * len(self.quantiles))
        nn.init.zeros_(self.output.weight)  # the untrained network is the naive forecast
        nn.init.zeros_(self.output.bias)
        steps = torch.arange(outputs)
        # Where step k's naive value lies, counted from the window's end (L + offset):
        # k - m (⌊k/m⌋ + 1), the same point of the last full season; or -1, the last value.
        offset = steps - config.season * (steps // config.season + 1) if config.season else \
            torch.full((outputs,), -1)
        self.register_buffer("naive_offset", offset, persistent=False)

    def split_window(self, window: Tensor) -> tuple[Tensor, Tensor | None]:
        """``window`` as its past ``(N, L, C)`` and the known future features ``(N, horizon,
        F)`` after it (None without future features)."""
        if not self.ahead:
            return window, None
        if window.shape[1] <= self.ahead:
            raise ValueError(f"the window has {window.shape[1]} steps; with known future "
                             f"features it holds the past and then the {self.ahead} steps "
                             "forecast")
        return window[:, : -self.ahead], window[:, -self.ahead :, -self.config.future_size :]

    def naive(self, past: Tensor) -> Tensor:
        """The forecast the network corrects ``(N, outputs)``: each step's value one season
        back (or the last value), from ``past (N, L, C)``'s target column."""
        if self.config.season and past.shape[1] < self.config.season:
            raise ValueError(f"the window has {past.shape[1]} steps, fewer than the season "
                             f"{self.config.season} its seasonal naive forecast reads")
        return past[:, past.shape[1] + self.naive_offset, 0]

    def step(self, window: Tensor) -> Tensor:
        """One pass over ``window (N, L, C)`` (``(N, L + horizon, C)`` with future features):
        ``(N, horizon)`` direct, ``(N, 1)`` recursive (the median with ``levels``)."""
        return self.quantile_step(window)[..., self.median]

    def quantile_step(self, window: Tensor) -> Tensor:
        """One pass over ``window (N, L, C)`` (``(N, L + horizon, C)`` with future features):
        the quantiles ``(N, outputs, Q)`` (``Q = 1`` without levels) of ``horizon`` steps
        (direct) or one (recursive); module doc."""
        past, future = self.split_window(window)
        return self._quantiles(past, None if future is None else
                               future[:, : self.naive_offset.shape[0]])

    def _quantiles(self, past: Tensor, future: Tensor | None) -> Tensor:
        """`quantile_step` of the ``past (N, L, C)`` and the future features of the steps
        forecast ``(N, outputs, F)`` (None without)."""
        last = past[:, -1:, 0]  # (N, 1)
        relative = past.clone()
        relative[..., 0] -= last
        hidden, _ = self.recurrent(relative)  # (N, L, H)
        summary = hidden[:, -1] if future is None else \
            torch.cat([hidden[:, -1], future.flatten(1)], dim=1)
        raw = self.output(summary).unflatten(1, (-1, len(self.quantiles)))
        median = self.naive(past) + raw[..., self.median]  # (N, outputs)
        if len(self.quantiles) == 1:
            return median[..., None]
        gaps = F.softplus(raw)
        above = median[..., None] + gaps[..., self.median + 1 :].cumsum(-1)
        below = median[..., None] - gaps[..., : self.median].flip(-1).cumsum(-1).flip(-1)
        return torch.cat([below, median[..., None], above], dim=-1)

    def forward(self, window: Tensor, one_step: bool = False,
                quantiles: bool = False) -> Tensor:
        """The point forecast ``(N, horizon)`` of every window (the median with ``levels``);
        with ``quantiles``, every quantile ``(N, horizon, Q)``; with ``one_step``, `step`'s
        first output alone (what training fits: for a recursive forecast the next value from
        true values)."""
        if one_step or self.config.strategy == "direct":
            return self.quantile_step(window) if quantiles else self.step(window)
        past, future = self.split_window(window)
        forecasts = []
        for k in range(self.config.horizon):
            ahead = None if future is None else future[:, k : k + 1]  # (N, 1, F)
            next_value = self._quantiles(past, ahead)[..., self.median]  # (N, 1)
            forecasts.append(next_value)
            row = next_value[:, :, None] if ahead is None else \
                torch.cat([next_value[:, :, None], ahead], dim=2)  # (N, 1, C)
            past = torch.cat([past[:, 1:], row], dim=1)
        forecast = torch.cat(forecasts, dim=1)
        return forecast[..., None] if quantiles else forecast


def interval_bounds(quantiles: np.ndarray, levels: list[float]) -> dict[float, tuple]:
    """``{level: (lo, hi)}`` from quantile forecasts ``(..., Q)`` in the order of
    `quantiles_of_levels` (the median in the middle; the k-th narrowest level k + 1 places on
    either side of it)."""
    middle = quantiles.shape[-1] // 2
    return {level: (quantiles[..., middle - 1 - k], quantiles[..., middle + 1 + k])
            for k, level in enumerate(sorted(levels))}


class ForecastEnsemble(nn.Module):
    """Networks of one configuration trained from different seeds; the forecast is their mean,
    ``ŷ = (1/K) Σ_k ŷ_k`` (of each quantile: the averaged quantiles stay ordered), a single
    network's own output when ``K = 1``."""

    def __init__(self, members: list[Forecaster]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self.quantiles = members[0].quantiles

    def forward(self, window: Tensor, one_step: bool = False,
                quantiles: bool = False) -> Tensor:
        if len(self.members) == 1:
            return self.members[0](window, one_step, quantiles)
        return torch.stack([member(window, one_step, quantiles)
                            for member in self.members]).mean(0)
