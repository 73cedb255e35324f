"""rnnkit: recurrent networks for PyTorch, drop-in for torch.nn, with the variants it lacks."""

from rnnkit import diagnostics, tasks  # submodules on the public surface
from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.engine.onnx import export_onnx
from rnnkit.engine.steps import Family
from rnnkit.interop import from_keras, from_torch, to_keras, to_torch
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
from rnnkit.slstm import SLSTM, SLSTMCell

__version__ = "0.1.0"

__all__ = [
    "Family",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "MinGRU",
    "MinGRUCell",
    "MinLSTM",
    "MinLSTMCell",
    "RNN",
    "RNNCell",
    "SLSTM",
    "SLSTMCell",
    "diagnostics",
    "export_onnx",
    "from_keras",
    "from_torch",
    "tasks",
    "to_keras",
    "to_torch",
    "__version__",
]
