"""The forecasting network: a recurrent stack reads the lookback window, a linear layer forecasts.

With a scaled window ``x (N, L, C)`` (column 0 the target, then the features) and its last
target value ``x_last = x[:, L-1, 0]``:

    z          = x with z[..., 0] = x[..., 0] - x_last      (the window relative to its end)
    h_L        = RNN(z)[:, L-1]                             (the last hidden state, (N, H))
    direct:    ŷ = x_last + W h_L + b                       (N, horizon): one output per step
    recursive: ŷ_1 = x_last + W h_L + b                     (N, 1), then the window slides
               over ŷ_1 and the step repeats, horizon times

Working relative to the window's last value makes "repeat the last value" the network's
starting point, and lets a trending series leave the range it was scaled on without pushing the
network's inputs out of the range it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rnnkit.apps.recurrent import RecurrentConfig, build_recurrent

STRATEGIES = ("direct", "recursive")


@dataclass
class ForecastModelConfig:
    """What the network is; every field maps one to one onto an `rnnkit forecast train` option."""

    input_size: int = field(metadata={"cli": False})  # columns per step: the target, then the
        # features
    horizon: int = field(metadata={"cli": False})  # steps forecast from each origin
    strategy: str = field(default="direct", metadata={"choices": STRATEGIES})
        # direct: one output per step | recursive: one step, fed back
    recurrent: RecurrentConfig = field(default_factory=lambda: RecurrentConfig(hidden_size=64))


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
        if config.strategy == "recursive" and config.input_size != 1:
            raise ValueError("recursive forecasts feed the forecast back as the next input, so "
                             "they need the future of every feature too; use --strategy direct "
                             "with --features, or drop --features")
        self.config = config
        self.recurrent = build_recurrent(config.recurrent, config.input_size, batch_first=True,
                                         chrono_max_length=chrono_span)
        outputs = config.horizon if config.strategy == "direct" else 1
        self.output = nn.Linear(config.recurrent.output_size, outputs)

    def step(self, window: Tensor) -> Tensor:
        """One pass over ``window (N, L, C)``: ``(N, horizon)`` direct, ``(N, 1)`` recursive."""
        last = window[:, -1:, 0]  # (N, 1)
        relative = window.clone()
        relative[..., 0] -= last
        hidden, _ = self.recurrent(relative)  # (N, L, H)
        return last + self.output(hidden[:, -1])

    def forward(self, window: Tensor, one_step: bool = False) -> Tensor:
        """The full forecast ``(N, horizon)`` of every window; with ``one_step``, `step` alone
        (what training fits: for a recursive forecast the next value from true values)."""
        if one_step or self.config.strategy == "direct":
            return self.step(window)
        forecasts = []
        for _ in range(self.config.horizon):
            next_value = self.step(window)  # (N, 1)
            forecasts.append(next_value)
            window = torch.cat([window[:, 1:], next_value[:, :, None]], dim=1)
        return torch.cat(forecasts, dim=1)


class ForecastEnsemble(nn.Module):
    """Networks of one configuration trained from different seeds; the forecast is their mean,
    ``ŷ = (1/K) Σ_k ŷ_k`` ``(N, horizon)`` (a single network's own output when ``K = 1``)."""

    def __init__(self, members: list[Forecaster]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, window: Tensor, one_step: bool = False) -> Tensor:
        if len(self.members) == 1:
            return self.members[0](window, one_step)
        return torch.stack([member(window, one_step) for member in self.members]).mean(0)
