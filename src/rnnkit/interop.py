"""Conversions between rnnkit and torch.nn modules (and Keras 3 layers), weights included.

``from_torch(module)`` builds the rnnkit twin of a torch.nn RNN, LSTM, GRU or cell;
``to_torch(module)`` (also each class's ``.to_torch()`` method) goes back, for plain configurations.
``from_keras(layer)`` / ``to_keras(module)`` do the same with Keras 3 layers; they live in
`rnnkit.keras_interop` (Keras is optional) and are re-exported here.
"""

from __future__ import annotations

from torch import nn

from rnnkit._checks import describe
from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.keras_interop import from_keras, to_keras
from rnnkit.layers import GRU, LSTM, RNN

__all__ = ["from_keras", "from_torch", "to_keras", "to_torch"]

_LAYERS = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU}
_CELLS = {nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
_ACCEPTED = "torch.nn.RNN, LSTM, GRU, RNNCell, LSTMCell or GRUCell"


def from_torch(module: nn.Module) -> nn.Module:
    """The rnnkit module equivalent to a torch.nn recurrent module, with a copy of its weights.

    The result is on the same device, with the same dtype and training mode; its outputs and
    gradients equal the original's to float precision.

    Example::

        >>> lstm = rnnkit.from_torch(torch.nn.LSTM(10, 20, num_layers=2))
    """
    param = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    if param is None or type(module) not in _LAYERS | _CELLS:
        raise TypeError(f"from_torch expects a {_ACCEPTED} module, got {describe(module)}")
    factory = {"device": param.device, "dtype": param.dtype}
    if type(module) in _CELLS:
        extra = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNNCell) else {}
        twin = _CELLS[type(module)](
            module.input_size, module.hidden_size, module.bias, **extra, **factory
        )
    else:
        arguments = {
            "num_layers": module.num_layers,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "bidirectional": module.bidirectional,
        }
        if isinstance(module, nn.LSTM):
            arguments["proj_size"] = module.proj_size
        if isinstance(module, nn.RNN):
            arguments["nonlinearity"] = module.nonlinearity
        twin = _LAYERS[type(module)](module.input_size, module.hidden_size, **arguments, **factory)
    twin.load_state_dict(module.state_dict())
    return twin.train(module.training)


def to_torch(module: nn.Module) -> nn.Module:
    """The torch.nn module equivalent to an rnnkit one (plain configurations only)."""
    if not isinstance(module, RNN | LSTM | GRU | RNNCell | LSTMCell | GRUCell):
        raise TypeError(
            f"to_torch expects an rnnkit RNN, LSTM, GRU or cell, got {describe(module)}"
        )
    return module.to_torch().train(module.training)
