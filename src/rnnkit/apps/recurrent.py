"""The recurrent stack every app builds by name: rnnkit RNN/LSTM/GRU with a variant, or torch.nn."""

from __future__ import annotations

from torch import nn

from rnnkit.layers import GRU, LSTM, RNN

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def make_recurrent(cell: str, input_size: int, hidden_size: int, num_layers: int,
                   dropout: float = 0.0, peephole: bool = False, reset_after: bool = True,
                   backend: str = "auto", batch_first: bool = False, init: str = "default",
                   chrono_max_length: int | None = None, nonlinearity: str = "tanh",
                   forget_bias: float = 0.0, proj_size: int = 0) -> nn.Module:
    """A stack of ``num_layers`` recurrent layers of ``cell`` (lstm | gru | rnn).

    ``dropout`` applies between layers (torch.nn's convention); ``peephole`` and ``proj_size``
    (h projected to that size, as torch.nn) are for LSTM only and
    ``reset_after=False`` (the original GRU) for GRU only. ``backend`` is an rnnkit engine, or
    ``"torch.nn"`` for the plain torch.nn layer (comparisons; it has no variants).
    ``init="chrono"`` (LSTM, GRU) draws the gate biases of Tallec & Ollivier 2018 for
    dependencies up to ``chrono_max_length`` steps.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if peephole and cell != "lstm":
        raise ValueError(f"peephole connections exist for the lstm cell only, not {cell!r}")
    if not reset_after and cell != "gru":
        raise ValueError(f"the reset-before variant exists for the gru cell only, not {cell!r}")
    layer_dropout = dropout if num_layers > 1 else 0.0
    common = dict(num_layers=num_layers, dropout=layer_dropout, batch_first=batch_first)
    if nonlinearity != "tanh" and cell != "rnn":
        raise ValueError(f"nonlinearity={nonlinearity!r} is for the rnn cell only, not {cell!r}")
    if proj_size and cell != "lstm":
        raise ValueError(f"proj_size={proj_size} is for the lstm cell only, not {cell!r}")
    if forget_bias and cell != "lstm":
        raise ValueError(f"forget_bias={forget_bias} is for the lstm cell only, not {cell!r}")
    if init != "default" and cell == "rnn":
        raise ValueError(f"init={init!r} exists for the lstm and gru cells, not 'rnn'")
    if backend == "torch.nn":
        if peephole or not reset_after or init != "default" or forget_bias:
            raise ValueError("torch.nn has no peephole LSTM, reset-before GRU or chrono "
                             "initialisation; use an rnnkit backend for those")
        projection = {"proj_size": proj_size} if proj_size else {}
        return getattr(nn, cell.upper())(input_size, hidden_size, **common, **projection)
    variants = ({"peephole": peephole, "forget_bias": forget_bias, "proj_size": proj_size}
                if cell == "lstm" else {})
    if cell == "gru":
        variants["reset_after"] = reset_after
    if init != "default":
        variants |= {"init": init, "chrono_max_length": chrono_max_length}
    if cell == "rnn":
        variants["nonlinearity"] = nonlinearity
    return CELLS[cell](input_size, hidden_size, backend=backend, **common, **variants)
