"""The forecasting network: shapes, the recursive loop, and forecasts relative to the window."""

from __future__ import annotations

import pytest
import torch

from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
from rnnkit.apps.recurrent import RecurrentConfig


def network(**options) -> Forecaster:
    torch.manual_seed(0)
    settings = dict(input_size=1, horizon=3) | options
    recurrent = {key: settings.pop(key) for key in ("cell", "hidden_size", "peephole")
                 if key in settings}
    recurrent = RecurrentConfig(**({"hidden_size": 8} | recurrent))
    model = Forecaster(ForecastModelConfig(**settings, recurrent=recurrent)).double()
    torch.nn.init.normal_(model.output.weight)  # not the zeros it starts from: a naive forecast
    return model


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_direct_forecast_has_one_output_per_step(cell):
    model = network(cell=cell, input_size=2)
    assert model(torch.randn(5, 7, 2, dtype=torch.float64)).shape == (5, 3)


def test_recursive_forecast_feeds_each_step_back_into_the_window():
    model = network(strategy="recursive")
    window = torch.randn(4, 6, 1, dtype=torch.float64)
    expected, sliding = [], window
    for _ in range(3):  # the loop written out
        value = model.step(sliding)
        expected.append(value)
        sliding = torch.cat([sliding[:, 1:], value[:, :, None]], dim=1)
    torch.testing.assert_close(model(window), torch.cat(expected, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_shifting_the_window_shifts_the_forecast_by_the_same_amount(strategy):
    model = network(strategy=strategy)
    window = torch.randn(4, 6, 1, dtype=torch.float64)
    torch.testing.assert_close(model(window + 2.5), model(window) + 2.5, rtol=0, atol=1e-12)


def test_recursive_with_features_is_refused():
    with pytest.raises(ValueError, match="use --strategy direct"):
        network(strategy="recursive", input_size=2)


def test_unknown_strategy_or_mismatched_variant_is_refused():
    with pytest.raises(ValueError, match="strategy must be one of direct, recursive"):
        network(strategy="sideways")
    with pytest.raises(ValueError, match="peephole connections exist for the lstm cell only"):
        network(cell="gru", peephole=True)
