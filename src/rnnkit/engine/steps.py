r"""The spec's step equations (shared/spec/cells.md), one place: one time step of each cell
family in PyTorch ops, and the types every engine and layer speaks (`Family`, `CellKind`,
`CellWeights`, `State`).

Notation: ``x`` the input at step t, ``h``, ``c`` the state from step t-1, primes the new state,
``σ`` the logistic sigmoid, ``⊙`` the elementwise product; two biases per gate, as torch.nn keeps
them.

Elman RNN (`rnn_step`)::

    h' = act(W_ih x + b_ih + W_hh h + b_hh)            act = tanh or relu

LSTM (`lstm_gates`, `lstm_step`), gate order i, f, g, o; peephole ``p`` (``weight_ch``, order
i, f, o) and projection ``W_hr`` only when the weights have them::

    i  = σ(W_ii x + b_ii + W_hi h + b_hi + p_i ⊙ c)
    f  = σ(W_if x + b_if + W_hf h + b_hf + p_f ⊙ c)
    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)
    c' = f ⊙ c + i ⊙ g
    o  = σ(W_io x + b_io + W_ho h + b_ho + p_o ⊙ c')
    h' = W_hr (o ⊙ tanh(c'))

GRU (`gru_gates`, `gru_step`), gate order r, z, n; ``z`` weighs the old state::

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     reset_after=True (torch.nn's)
    n  = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)     reset_after=False (Cho et al. 2014)
    h' = (1 - z) ⊙ n + z ⊙ h

The reference engine runs these functions step by step on autograd; every faster engine is
tested against it. Nothing here imports the layers or cells: they import this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Family(str, enum.Enum):
    """The three cell families. A ``str`` mixin, so ``Family.LSTM == "lstm"`` and it formats,
    hashes and serialises (JSON) as its value: code that compared strings keeps working."""

    RNN = "rnn"
    LSTM = "lstm"
    GRU = "gru"

    def __str__(self) -> str:
        return self.value


FAMILIES = tuple(family.value for family in Family)

State = Tensor | tuple[Tensor, Tensor]
"""A cell's state: ``h`` for RNN and GRU, ``(h, c)`` for LSTM."""

NONLINEARITIES = ("tanh", "relu")


class CellWeights(NamedTuple):
    """The parameters of one cell (one layer and direction of a stack).

    ``G`` is the number of gates (1 RNN, 4 LSTM, 3 GRU), ``H`` the hidden size, ``H_out`` the
    size of ``h`` (``P`` with a projection, else ``H``), ``I`` the input size.
    """

    weight_ih: Tensor  # (G*H, I)
    weight_hh: Tensor  # (G*H, H_out)
    bias_ih: Tensor | None = None  # (G*H,)
    bias_hh: Tensor | None = None  # (G*H,)
    weight_hr: Tensor | None = None  # (P, H): LSTM projection
    weight_ch: Tensor | None = None  # (3H,): LSTM peephole weights, order i, f, o


@dataclass(frozen=True)
class CellKind:
    """Which equations a step runs: the family and its switches that carry no parameters.

    Variants that have parameters (projection, peephole) are told by ``CellWeights`` instead.
    ``family`` may be given as a `Family` or its value (``"lstm"``); it is stored as a `Family`.
    """

    family: Family  # Family.RNN | Family.LSTM | Family.GRU
    nonlinearity: str = "tanh"  # RNN only: "tanh" | "relu"
    reset_after: bool = True  # GRU only: reset gate after (True) or before (False) W_hn

    def __post_init__(self) -> None:
        # Layers pass a Family already: one type test, so a streamed step pays nothing more.
        if type(self.family) is not Family:
            object.__setattr__(self, "family", family_of("CellKind family", self.family))
        if self.nonlinearity not in NONLINEARITIES:
            accepted = ", ".join(repr(n) for n in NONLINEARITIES)
            raise ValueError(f"CellKind nonlinearity must be one of {accepted}, got "
                             f"{self.nonlinearity!r}")
        if not isinstance(self.reset_after, bool):
            raise TypeError(f"CellKind reset_after must be True or False, got "
                            f"{self.reset_after!r} ({type(self.reset_after).__name__})")


def family_of(name: str, value: object) -> Family:
    """``value`` as a `Family` (a member or its value, ``"rnn"``, ``"lstm"``, ``"gru"``);
    ``ValueError`` naming ``name``, the value and the accepted ones otherwise."""
    if isinstance(value, Family):
        return value
    if isinstance(value, str):
        try:
            return Family(value)
        except ValueError:
            pass
    accepted = ", ".join(repr(f) for f in FAMILIES)
    raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def rnn_step(x: Tensor, h: Tensor, w: CellWeights, nonlinearity: str = "tanh") -> Tensor:
    """Elman step: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``.  x (N, I), h (N, H) -> (N, H)."""
    pre = F.linear(x, w.weight_ih, w.bias_ih) + F.linear(h, w.weight_hh, w.bias_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_gates(x: Tensor, state: tuple[Tensor, Tensor], w: CellWeights) -> dict[str, Tensor]:
    """An LSTM step's gates and new state, with the optional peephole (``w.weight_ch``) and
    projection (``w.weight_hr``): ``i, f, g, o`` and ``c`` (N, H), ``h`` (N, H_out).

    x (N, I), h (N, H_out), c (N, H).
    """
    h, c = state
    gates = F.linear(x, w.weight_ih, w.bias_ih) + F.linear(h, w.weight_hh, w.bias_hh)  # (N, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)
    if w.weight_ch is not None:
        p_i, p_f, p_o = w.weight_ch.chunk(3)
        # Input and forget gates look at the previous cell, the output gate at the new one.
        i = i + p_i * c
        f = f + p_f * c
    i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
    c_new = f * c + i * g
    if w.weight_ch is not None:
        o = o + p_o * c_new
    o = torch.sigmoid(o)
    h_new = o * torch.tanh(c_new)
    if w.weight_hr is not None:
        h_new = F.linear(h_new, w.weight_hr)  # (N, P)
    return {"i": i, "f": f, "g": g, "o": o, "c": c_new, "h": h_new}


def lstm_step(x: Tensor, state: tuple[Tensor, Tensor], w: CellWeights) -> tuple[Tensor, Tensor]:
    """LSTM step: ``(h', c')`` of `lstm_gates`.  x (N, I), h (N, H_out), c (N, H)."""
    gates = lstm_gates(x, state, w)
    return gates["h"], gates["c"]


def gru_gates(x: Tensor, h: Tensor, w: CellWeights, reset_after: bool = True) -> dict[str, Tensor]:
    """A GRU step's gates ``r, z, n`` and new state ``h`` (each (N, H)); ``z`` weighs the old
    state: ``h' = (1 - z) ⊙ n + z ⊙ h``.  x (N, I), h (N, H)."""
    hidden = h.shape[-1]
    x_r, x_z, x_n = F.linear(x, w.weight_ih, w.bias_ih).chunk(3, dim=-1)  # 3 x (N, H)
    if reset_after:
        h_r, h_z, h_n = F.linear(h, w.weight_hh, w.bias_hh).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
    else:
        # The reset gate scales the state before W_hn, so W_hn's product waits for r.
        b_hh = w.bias_hh
        h_r, h_z = F.linear(
            h, w.weight_hh[: 2 * hidden], None if b_hh is None else b_hh[: 2 * hidden]
        ).chunk(2, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        b_hn = None if b_hh is None else b_hh[2 * hidden :]
        n = torch.tanh(x_n + F.linear(r * h, w.weight_hh[2 * hidden :], b_hn))
    return {"r": r, "z": z, "n": n, "h": (1 - z) * n + z * h}


def gru_step(x: Tensor, h: Tensor, w: CellWeights, reset_after: bool = True) -> Tensor:
    """GRU step: ``h'`` of `gru_gates`.  x (N, I), h (N, H) -> (N, H)."""
    return gru_gates(x, h, w, reset_after)["h"]


def cell_step(kind: CellKind, x: Tensor, state: State, w: CellWeights) -> State:
    """One step of any family: the function every engine's reference is written against."""
    if kind.family == Family.LSTM:
        return lstm_step(x, state, w)  # type: ignore[arg-type]
    if kind.family == Family.GRU:
        return gru_step(x, state, w, kind.reset_after)  # type: ignore[arg-type]
    return rnn_step(x, state, w, kind.nonlinearity)  # type: ignore[arg-type]


def cell_gates(kind: CellKind, x: Tensor, state: State, w: CellWeights) -> dict[str, Tensor]:
    """One step of any family with its gates: LSTM ``i, f, g, o, c, h``; GRU ``r, z, n, h``;
    RNN ``h``. What diagnostics read; `cell_step` returns only the new state."""
    if kind.family == Family.LSTM:
        return lstm_gates(x, state, w)  # type: ignore[arg-type]
    if kind.family == Family.GRU:
        return gru_gates(x, state, w, kind.reset_after)  # type: ignore[arg-type]
    return {"h": rnn_step(x, state, w, kind.nonlinearity)}  # type: ignore[arg-type]


def state_of(kind: CellKind, gates: dict[str, Tensor]) -> State:
    """The new state among a step's gates: ``(h, c)`` for LSTM, ``h`` otherwise."""
    return (gates["h"], gates["c"]) if kind.family == Family.LSTM else gates["h"]


def output_of(state: State) -> Tensor:
    """The part of a state that is the cell's output: ``h``."""
    return state[0] if isinstance(state, tuple) else state


__all__ = [
    "FAMILIES",
    "NONLINEARITIES",
    "CellKind",
    "CellWeights",
    "Family",
    "State",
    "cell_gates",
    "cell_step",
    "family_of",
    "gru_gates",
    "gru_step",
    "lstm_gates",
    "lstm_step",
    "output_of",
    "rnn_step",
    "state_of",
]
