"""from_torch / to_torch and state-dict compatibility with torch.nn, both directions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit

TORCH_MODULES = [
    lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bias=False, batch_first=True),
    lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dropout=0.25),
    lambda: nn.GRU(3, 4, num_layers=3, bidirectional=True, dtype=torch.float64),
    lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
    lambda: nn.LSTMCell(3, 4, bias=False),
    lambda: nn.GRUCell(3, 4, dtype=torch.float64),
]


@pytest.mark.parametrize("make", TORCH_MODULES)
def test_round_trip_keeps_configuration_weights_and_outputs(make):
    torch.manual_seed(0)
    original = make().eval()
    twin = rnnkit.from_torch(original)
    assert type(twin).__name__ == type(original).__name__
    assert not twin.training
    back = rnnkit.to_torch(twin)
    assert type(back) is type(original)
    assert repr(back) == repr(original)
    for key, value in original.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value)
        assert torch.equal(back.state_dict()[key], value)
    param = next(original.parameters())
    batch_first = getattr(original, "batch_first", False)
    is_layer = hasattr(original, "num_layers")
    shape = ((2, 5, 3) if batch_first else (5, 2, 3)) if is_layer else (2, 3)
    x = torch.randn(shape, dtype=param.dtype)
    expected, actual = original(x), twin(x)
    flat = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    flat_actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    torch.testing.assert_close(flat_actual, flat)


def test_plain_state_dict_loads_both_ways():
    torch.manual_seed(0)
    source = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    target = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    target.load_state_dict(source.state_dict())  # strict: same names and shapes
    back = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    back.load_state_dict(target.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(back(x)[0], target(x)[0])


@pytest.mark.parametrize(
    "module, match",
    [
        (rnnkit.LSTM(3, 4, peephole=True), r"no equivalent of peephole=True"),
        (rnnkit.GRU(3, 4, reset_after=False), r"no equivalent of reset_after=False"),
        (rnnkit.RNN(3, 4, learn_initial_state=True), r"no equivalent of learn_initial_state=True"),
        (rnnkit.LSTMCell(3, 4, proj_size=2), r"proj_size=2, peephole=False"),
        (rnnkit.GRUCell(3, 4, reset_after=False), r"no reset_after=False form"),
    ],
)
def test_variants_refuse_to_convert_to_torch(module, match):
    with pytest.raises(ValueError, match=match):
        module.to_torch()


def test_forget_bias_converts_because_it_is_only_an_initial_value():
    layer = rnnkit.LSTM(3, 4, forget_bias=1.0)
    assert torch.equal(layer.to_torch().bias_ih_l0, layer.bias_ih_l0)


@pytest.mark.parametrize("value", [nn.Linear(3, 4), "lstm", None])
def test_conversions_reject_other_objects(value):
    with pytest.raises(TypeError, match="from_torch expects a torch.nn.RNN, LSTM, GRU"):
        rnnkit.from_torch(value)
    with pytest.raises(TypeError, match="to_torch expects an rnnkit RNN, LSTM, GRU or cell"):
        rnnkit.to_torch(value)
