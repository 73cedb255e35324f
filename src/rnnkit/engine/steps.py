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

Normalisation and regularisation (the spec's section of that name; ``LN(v; γ, β)`` is layer
normalisation over the feature dimension, biased variance, eps 1e-5, `F.layer_norm`):

- layer norm (``w.layer_norm_ih``, ``w.layer_norm_hh`` (G·H,) gains, no shift; LSTM also
  ``w.layer_norm_c_weight``, ``w.layer_norm_c_bias`` (H,)): each product normalised on its own,
  over all gates jointly, before the biases; LSTM ``h' = W_hr (o ⊙ tanh(LN(c'; γ_c, β_c)))``,
  peepholes added after the normalisation, read from the un-normalised ``c``;
- recurrent dropout (``recurrent_mask`` m (N, H_out), the same every step): the state enters
  the recurrent product as ``m ⊙ h`` (GRU reset_after=False: ``W_hn (r ⊙ m ⊙ h)``); the state
  carried on is not masked;
- zoneout (`zoneout`, applied by the loop after each step): ``h_t = d ⊙ h_{t-1} + (1 - d) ⊙
  h̃_t`` with ``d`` a per-step 0/1 mask in training or the probability ``p`` in evaluation.

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

from rnnkit.engine.products import project_all_steps


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

    weight_ih: Tensor | None  # (G*H, I); None: ``x`` is W_ih x (or the input side) (`input_side`)
    weight_hh: Tensor  # (G*H, H_out)
    bias_ih: Tensor | None = None  # (G*H,)
    bias_hh: Tensor | None = None  # (G*H,)
    weight_hr: Tensor | None = None  # (P, H): LSTM projection
    weight_ch: Tensor | None = None  # (3H,): LSTM peephole weights, order i, f, o
    layer_norm_ih: Tensor | None = None  # (G*H,): gain of LN(W_ih x)
    layer_norm_hh: Tensor | None = None  # (G*H,): gain of LN(W_hh h)
    layer_norm_c_weight: Tensor | None = None  # (H,): LSTM gain of LN(c')
    layer_norm_c_bias: Tensor | None = None  # (H,): LSTM shift of LN(c')

    @property
    def layer_norm(self) -> bool:
        """Whether the step normalises its products (the spec's ``layer_norm=True``)."""
        return self.layer_norm_hh is not None


class Masks(NamedTuple):
    """The random parts of a training step, drawn by the layer once per forward call (torch's
    default generator) and handed to every engine alike, so engines can be compared exactly.

    ``recurrent`` is the inverted recurrent-dropout mask (entries 0 or ``1 / (1 - p)``); the
    zoneout ``d`` are 0/1 masks ``(T, N, ·)`` in training (1: the unit keeps its old value at
    that step) or 0-dim tensors holding ``p`` in evaluation (the expectation).
    """

    recurrent: Tensor | None = None  # (N, H_out), the same at every step
    zoneout_h: Tensor | None = None  # (T, N, H_out) or ()
    zoneout_c: Tensor | None = None  # LSTM: (T, N, H) or ()

    @property
    def empty(self) -> bool:
        return self.recurrent is None and self.zoneout_h is None and self.zoneout_c is None

    def zoneout_at(self, t: int) -> tuple[Tensor | None, Tensor | None]:
        """The zoneout ``d`` of step ``t`` for h and c (None where that zoneout is off)."""
        return tuple(None if d is None else d if d.dim() == 0 else d[t]
                     for d in (self.zoneout_h, self.zoneout_c))  # type: ignore[return-value]


def _normalised(v: Tensor, gain: Tensor | None, shift: Tensor | None = None) -> Tensor:
    """``LN(v; γ, β)`` over the last dimension (biased variance, eps 1e-5); ``v`` itself when
    there is no gain (layer norm off)."""
    if gain is None:
        return v
    return F.layer_norm(v, v.shape[-1:], gain, shift, eps=1e-5)


def _input_part(x: Tensor, w: CellWeights) -> Tensor:
    """``LN(W_ih x) + b_ih`` (without layer norm ``W_ih x + b_ih``). When the weights hold no
    ``W_ih``, x is that product already (see `input_side`): ``LN(x) + b_ih`` with a
    ``layer_norm_ih``, else ``x + b_ih`` (``x`` itself without a bias)."""
    if w.weight_ih is None:
        normalised = _normalised(x, w.layer_norm_ih)
        return normalised if w.bias_ih is None else normalised + w.bias_ih
    if w.layer_norm_ih is None:
        return F.linear(x, w.weight_ih, w.bias_ih)
    normalised = _normalised(F.linear(x, w.weight_ih), w.layer_norm_ih)
    return normalised if w.bias_ih is None else normalised + w.bias_ih


def _products(x: Tensor, h: Tensor, w: CellWeights,
              recurrent_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(LN(W_ih x) + b_ih, LN(W_hh (m ⊙ h)) + b_hh)`` (each (N, G·H)); without layer norm
    the plain products with their biases, without a mask ``m = 1``."""
    if recurrent_mask is not None:
        h = h * recurrent_mask
    if w.layer_norm_hh is None:
        return _input_part(x, w), F.linear(h, w.weight_hh, w.bias_hh)
    hidden_part = _normalised(F.linear(h, w.weight_hh), w.layer_norm_hh)
    return _input_part(x, w), hidden_part if w.bias_hh is None else hidden_part + w.bias_hh


def input_side(kind: CellKind, x: Tensor, w: CellWeights,
               fold_layer_norm: bool = False) -> tuple[Tensor, CellWeights]:
    """Split a layer direction into its input side, computed for every step at once, and the
    weights of what is left: the recurrence.

    ``pre_x (T, N, G·H)`` is ``LN(W_ih x; γ_ih)`` (or ``W_ih x``) plus every bias that sits
    outside a recurrent product (LSTM and RNN: ``b_ih + b_hh``; GRU reset after: ``b_ih``, as
    ``b_hn`` is multiplied by r; GRU reset before: both). The returned weights have no ``W_ih``,
    no ``γ_ih`` and only the biases left in the loop, so ``cell_step(kind, pre_x[t], state,
    recurrence)`` is the original step: what the recurrence operators compute
    (`rnnkit.engine.fused_recurrence`), and what their double backward differentiates.

    With ``fold_layer_norm`` and an input layer norm, the normalisation is left to the
    recurrence instead (the LSTM operators normalise each row in their loop): ``pre_x`` is the
    bare product ``W_ih x``, and the returned weights keep ``γ_ih`` as ``layer_norm_ih`` and
    the summed bias as ``bias_ih`` (``_input_part`` then computes ``LN(pre_x[t]; γ_ih) + b``,
    the same step).
    """
    keep_recurrent_bias = kind.family == Family.GRU and kind.reset_after
    bias = w.bias_ih
    if bias is not None and w.bias_hh is not None and not keep_recurrent_bias:
        bias = bias + w.bias_hh  # (G·H,): added once, by the product or LN's shift
    if fold_layer_norm and w.layer_norm_ih is not None:
        pre_x = x if w.weight_ih is None else project_all_steps(x, w.weight_ih, None)
        recurrence = w._replace(weight_ih=None, bias_ih=bias,
                                bias_hh=w.bias_hh if keep_recurrent_bias else None)
        return pre_x, recurrence
    if w.weight_ih is None:  # split already: x is the product W_ih x
        pre_x = _input_part(x, w._replace(bias_ih=bias))
    elif w.layer_norm_ih is None:
        pre_x = project_all_steps(x, w.weight_ih, bias)
    else:
        pre_x = _normalised(project_all_steps(x, w.weight_ih, None), w.layer_norm_ih, bias)
    recurrence = w._replace(weight_ih=None, bias_ih=None, layer_norm_ih=None,
                            bias_hh=w.bias_hh if keep_recurrent_bias else None)
    return pre_x, recurrence


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


def rnn_step(x: Tensor, h: Tensor, w: CellWeights, nonlinearity: str = "tanh",
             recurrent_mask: Tensor | None = None) -> Tensor:
    """Elman step: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` (layer norm: ``act(LN(W_ih x)
    + LN(W_hh h) + b_ih + b_hh)``).  x (N, I), h (N, H) -> (N, H)."""
    input_part, hidden_part = _products(x, h, w, recurrent_mask)
    pre = input_part + hidden_part
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_gates(x: Tensor, state: tuple[Tensor, Tensor], w: CellWeights,
               recurrent_mask: Tensor | None = None) -> dict[str, Tensor]:
    """An LSTM step's gates and new state, with the optional peephole (``w.weight_ch``),
    projection (``w.weight_hr``), layer norm and recurrent dropout mask (module doc): ``i, f,
    g, o`` and ``c`` (N, H), ``h`` (N, H_out).

    x (N, I), h (N, H_out), c (N, H).
    """
    h, c = state
    input_part, hidden_part = _products(x, h, w, recurrent_mask)
    gates = input_part + hidden_part  # (N, 4H)
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
    h_new = o * torch.tanh(_normalised(c_new, w.layer_norm_c_weight, w.layer_norm_c_bias))
    if w.weight_hr is not None:
        h_new = F.linear(h_new, w.weight_hr)  # (N, P)
    return {"i": i, "f": f, "g": g, "o": o, "c": c_new, "h": h_new}


def lstm_step(x: Tensor, state: tuple[Tensor, Tensor], w: CellWeights,
              recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LSTM step: ``(h', c')`` of `lstm_gates`.  x (N, I), h (N, H_out), c (N, H)."""
    gates = lstm_gates(x, state, w, recurrent_mask)
    return gates["h"], gates["c"]


def gru_gates(x: Tensor, h: Tensor, w: CellWeights, reset_after: bool = True,
              recurrent_mask: Tensor | None = None) -> dict[str, Tensor]:
    """A GRU step's gates ``r, z, n`` and new state ``h`` (each (N, H)); ``z`` weighs the old
    state: ``h' = (1 - z) ⊙ n + z ⊙ h``; layer norm and the recurrent dropout mask as in the
    module doc (layer norm with reset_after=True only).  x (N, I), h (N, H)."""
    hidden = h.shape[-1]
    if reset_after:
        input_part, hidden_part = _products(x, h, w, recurrent_mask)
        x_r, x_z, x_n = input_part.chunk(3, dim=-1)  # 3 x (N, H)
        h_r, h_z, h_n = hidden_part.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
    else:
        if w.layer_norm:
            raise ValueError("layer norm needs the GRU's reset_after=True: with the reset gate "
                             "before W_hn there is no whole W_hh h to normalise")
        x_r, x_z, x_n = _input_part(x, w).chunk(3, dim=-1)  # 3 x (N, H)
        # The reset gate scales the state before W_hn, so W_hn's product waits for r.
        entering = h if recurrent_mask is None else h * recurrent_mask
        b_hh = w.bias_hh
        h_r, h_z = F.linear(
            entering, w.weight_hh[: 2 * hidden], None if b_hh is None else b_hh[: 2 * hidden]
        ).chunk(2, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        b_hn = None if b_hh is None else b_hh[2 * hidden :]
        n = torch.tanh(x_n + F.linear(r * entering, w.weight_hh[2 * hidden :], b_hn))
    return {"r": r, "z": z, "n": n, "h": (1 - z) * n + z * h}


def gru_step(x: Tensor, h: Tensor, w: CellWeights, reset_after: bool = True,
             recurrent_mask: Tensor | None = None) -> Tensor:
    """GRU step: ``h'`` of `gru_gates`.  x (N, I), h (N, H) -> (N, H)."""
    return gru_gates(x, h, w, reset_after, recurrent_mask)["h"]


def cell_step(kind: CellKind, x: Tensor, state: State, w: CellWeights,
              recurrent_mask: Tensor | None = None) -> State:
    """One step of any family: the function every engine's reference is written against."""
    if kind.family == Family.LSTM:
        return lstm_step(x, state, w, recurrent_mask)  # type: ignore[arg-type]
    if kind.family == Family.GRU:
        return gru_step(x, state, w, kind.reset_after, recurrent_mask)  # type: ignore[arg-type]
    return rnn_step(x, state, w, kind.nonlinearity, recurrent_mask)  # type: ignore[arg-type]


def zoneout(new: State, old: State, keep_h: Tensor | None, keep_c: Tensor | None) -> State:
    """Zoneout of one step: ``d ⊙ old + (1 - d) ⊙ new`` for h with ``keep_h`` and for c with
    ``keep_c`` (each a 0/1 mask of the state's shape, or a 0-dim probability in evaluation;
    None: that part updates as usual)."""
    def zoned(updated: Tensor, previous: Tensor, keep: Tensor | None) -> Tensor:
        return updated if keep is None else keep * previous + (1 - keep) * updated

    if isinstance(new, tuple):
        return zoned(new[0], old[0], keep_h), zoned(new[1], old[1], keep_c)
    return zoned(new, old, keep_h)


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
    "Masks",
    "State",
    "cell_gates",
    "cell_step",
    "family_of",
    "gru_gates",
    "gru_step",
    "input_side",
    "lstm_gates",
    "lstm_step",
    "output_of",
    "rnn_step",
    "state_of",
    "zoneout",
]
