"""Why gates matter, measured on any rnnkit layer: gradient flow through time and gate traces.

Both read a layer and never change it; dropout between layers is not applied (they look at the
layer as in evaluation), and the layer's own engine (``layer.backend``) runs every step.

**Gradient flow.** For one layer and direction of a stack, with ``s_t`` the state handed from
step t to step t+1 (t = 0 … T-1, in the order the direction processes the sequence) and
``h_T`` the last hidden output,

    flow_h[t, n] = ‖∂h_T / ∂h_t‖_F        flow_c[t, n] = ‖∂h_T / ∂c_t‖_F   (LSTM)

per sample n: the Frobenius norm of the Jacobian, exact (one vector-Jacobian product per unit
of ``h_T``, all samples and all steps at once), not estimated. For LSTM the two parts of the
state are perturbed separately, each with the other held fixed. At the last step (distance
``T-1-t = 0``) the Jacobian through h is the identity, norm ``sqrt(H_out)``, and through c it is
zero. In a plain RNN ``∂h_T/∂h_t = Π_k diag(act'(·_k)) W_hh`` over the steps in between: its norm
shrinks (or grows) geometrically with the distance; the LSTM's cell path multiplies by the
forget gates instead, which can keep it near 1.

**Gate trace.** Every gate's activation per step, layer and direction, recomputed with the
spec's equations (`rnnkit.engine.steps.cell_gates`) from the layer's weights: ``i, f, g, o, c,
h`` for LSTM, ``r, z, n, h`` for GRU, ``h`` for RNN; and how saturated they are: the fraction of
sigmoid gate values below 0.05 or above 0.95, and of tanh units (LSTM g, GRU n, tanh-RNN h)
beyond ±0.95, over the valid steps.

**minGRU and minLSTM** (`rnnkit.MinGRU`, `rnnkit.MinLSTM`): the gates read the input only, so
``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t`` independent of ``h`` and ``∂h_T/∂h_t = diag(Π_{k>t}
a_k)``: the flow is the norm of that product, exact, in closed form (no perturbation loop). The
traced gates are the minGRU's ``z = 1 - a`` and the minLSTM's normalised ``f' = a`` and
``i' = 1 - a`` (`rnnkit.engine.scan.coefficients`), with ``h``; all three count as sigmoid
gates for saturation, and ``h̃`` (linear, or ``g``) has no saturating unit.

**sLSTM** (`rnnkit.SLSTM`; spec "sLSTM (Beck et al. 2024)"). Its normalised cell ``h̃_t = c_t /
n_t`` (``h_t = o_t ⊙ h̃_t``) is a running average: with ``w_t = i'_t / n_t``,

    h̃_t = (1 - w_t) ⊙ h̃_{t-1} + w_t ⊙ z_t        1 - w_t = f'_t ⊙ n_{t-1} / n_t

where ``i'_t = exp(ĩ_t - m_t)`` and ``f'_t = exp(log f_t + m_{t-1} - m_t)`` are the stabilised
input and forget factors, in ``[0, 1]``, the factors that carry the gradient along ``c`` and
``n``. Unstabilised, ``w_t = i_t / (f_t N_{t-1} + i_t) = σ(ĩ_t - log f_t - log N_{t-1})`` with
``N`` the unstabilised normaliser: a sigmoid gate, which ``i_t = exp(ĩ_t)`` itself is not.

*Gradient flow*: ``flow.h`` as for the other families, and ``flow.c = ‖∂h_T/∂h̃_t‖_F``, through
the normalised cell: ``c_t`` perturbed by ``n_t ⊙ δ`` with ``h_t, n_t, m_t`` held. That is the
sLSTM's cell path (with ``h`` held, one step multiplies it by ``diag(1 - w_k)``; distance 1 is
``diag(o_T ⊙ (1 - w_T))``), and unlike ``∂h_T/∂c_t`` it does not depend on the scale ``exp(m_t)``
the stabiliser divides ``c_t`` by. There is no cheap closed form (``h_{t-1}`` enters every gate
through the recurrent matrix ``R``, as in an LSTM), so the flow is autograd's, exact, as for the
classic families: the layer's own engine runs each step, one vector-Jacobian product per unit.

*Gate trace*: ``i = exp(ĩ)`` and ``f`` (σ or exp: the paper's unstabilised gates; in float32
``exp`` overflows to ``inf`` above 88.7), ``z``, ``o``, the factors ``i'`` and ``f'``, the write
weight ``i'/n`` (``w`` above), the state ``c, n, m`` as the layer stores it (stabilised) and
``h``. *Saturation*: the sigmoid rule (below 0.05 or above 0.95) for ``o``, for ``f`` with
``forget_gate="sigmoid"`` and for ``i'/n``, whose derivative ``∂w/∂ĩ = w (1 - w)`` vanishes at
both ends (near 0 the step's input is ignored, near 1 it overwrites the memory), counted over
the steps that have a memory to weigh (``n_{t-1} > 0``: the first step from the empty state has
``i'/n = 1`` by definition; NaN where no step has one, as in a one-step sequence); the tanh rule
(``|z| > 0.95``) for ``z``. The exponentials ``i``, ``f = exp(f̃)`` do not saturate (their
derivative is their value), and ``i'``, ``f'`` have no saturation either: by construction
``max(i', f') = 1`` at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit import engine
from rnnkit.engine import scan, slstm
from rnnkit.engine.scan import MinFamily
from rnnkit.engine.steps import CellKind, Family, cell_gates, output_of, state_of, zoneout
from rnnkit.layers import PreparedInput, RecurrentLayer
from rnnkit.minimal import MinGRU, MinLSTM
from rnnkit.slstm import SLSTM

DIRECTIONS = ("forward", "reverse")
SIGMOID_GATES = {Family.LSTM: ("i", "f", "o"), Family.GRU: ("r", "z"), Family.RNN: ()}
TANH_UNITS = {Family.LSTM: ("g",), Family.GRU: ("n",), Family.RNN: ("h",)}
SATURATION_LOW, SATURATION_HIGH, TANH_SATURATION = 0.05, 0.95, 0.95
MINIMAL_GATES = {MinFamily.GRU: ("z",), MinFamily.LSTM: ("f'", "i'")}
MinimalLayer = MinGRU | MinLSTM
SLSTM_FAMILY = "slstm"  # `GateTrace.family` of an sLSTM (`rnnkit.SLSTM` has no family enum)
SLSTM_WRITE = "i'/n"  # the sLSTM's write weight w_t = i'_t / n_t (module doc)
DIAGNOSED = (RecurrentLayer, MinGRU, MinLSTM, SLSTM)
"""The layers `gradient_flow` and `gate_trace` read (`diagnosable`)."""


class GradientFlow(NamedTuple):
    """``h (T, N)``: ‖∂h_T/∂h_t‖_F; ``c (T, N)`` the same through the LSTM cell ``c_t`` or the
    sLSTM's normalised cell ``c_t / n_t`` (module doc), else None. Row t is the state leaving
    step t in processing order; the last row is distance 0."""

    h: Tensor
    c: Tensor | None


def diagnosable(layer: object) -> bool:
    """Whether `gradient_flow` and `gate_trace` read ``layer`` (an rnnkit RNN, LSTM, GRU,
    MinGRU, MinLSTM or SLSTM)."""
    return isinstance(layer, DIAGNOSED)


def _check_layer(layer: object, function: str) -> RecurrentLayer | MinimalLayer | SLSTM:
    if not diagnosable(layer):
        raise TypeError(f"{function} takes an rnnkit RNN, LSTM, GRU, MinGRU, MinLSTM or SLSTM "
                        f"layer, got {type(layer).__name__}")
    return layer


def _choose(layer: RecurrentLayer | MinimalLayer | SLSTM, layer_index: int | None,
            direction: str | None) -> tuple[int, int]:
    """(layer index, direction index) to diagnose, validated."""
    index = layer.num_layers - 1 if layer_index is None else layer_index
    if not isinstance(index, int) or not 0 <= index < layer.num_layers:
        raise ValueError(f"layer_index must be an int in [0, {layer.num_layers - 1}] for this "
                         f"{layer.num_layers}-layer stack, got {layer_index!r}")
    if direction is None:
        if layer.bidirectional:
            raise ValueError("the layer is bidirectional: choose direction='forward' or "
                             "direction='reverse'")
        return index, 0
    if direction not in DIRECTIONS or (direction == "reverse" and not layer.bidirectional):
        accepted = "'forward' or 'reverse'" if layer.bidirectional else "'forward' (or None)"
        raise ValueError(f"direction must be {accepted} for this layer, got {direction!r}")
    return index, DIRECTIONS.index(direction)


def _layer_inputs(layer: RecurrentLayer, prepared: PreparedInput, upto: int) -> Tensor:
    """The input sequence of layer ``upto`` (T, N, I_upto): the outputs of the layers below,
    run by the engine without dropout and without gradients."""
    with torch.no_grad():
        sequence, _ = layer.run_stack(prepared, upto=upto, apply_dropout=False)
    return sequence.detach()


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def gradient_flow(layer: RecurrentLayer | MinimalLayer | SLSTM, input: Tensor, hx=None, *,
                  layer_index: int | None = None, direction: str | None = None) -> GradientFlow:
    """Per-step Frobenius norms of ∂h_T/∂(state leaving step t); see the module docstring.

    Args:
        layer: an rnnkit ``RNN``, ``LSTM``, ``GRU``, ``MinGRU``, ``MinLSTM`` or ``SLSTM`` (any
            variant, any backend).
        input: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, or unbatched
            ``(L, H_in)`` (then N = 1). No lengths: every sequence runs all L steps.
        hx: the initial state, as the layer takes it (default zeros or the learned state).
        layer_index: which layer of the stack (default the last).
        direction: ``"forward"`` or ``"reverse"``; required for a bidirectional layer. The
            reverse direction's steps are in its processing order (row 0 is the last time step).

    Returns:
        ``GradientFlow(h, c)``, each ``(L, N)`` (``c`` None but for LSTM and SLSTM).
    """
    layer = _check_layer(layer, "gradient_flow")
    if not isinstance(input, Tensor):
        raise TypeError(f"gradient_flow input must be a Tensor (a padded batch), got "
                        f"{type(input).__name__}; PackedSequence and lengths are not supported")
    if isinstance(layer, MinimalLayer):
        return _minimal_gradient_flow(layer, input, hx, layer_index, direction)
    if isinstance(layer, SLSTM):
        return _slstm_gradient_flow(layer, input, hx, layer_index, direction)
    prepared = layer.prepare(input, hx)
    x = prepared.x
    index, d = _choose(layer, layer_index, direction)
    sequence = _layer_inputs(layer, prepared, index)
    if d == 1:
        sequence = sequence.flip(0)  # processing order; a one-step run is the same both ways
    kind = layer.cell_kind()
    steps, batch = sequence.shape[:2]
    state = _detach(prepared.initial[index * layer.num_directions + d])
    is_lstm = kind.family == Family.LSTM
    h_size = output_of(state).shape[-1]
    # Zero perturbations added to the state leaving each step: the gradient with respect to
    # them is the gradient with respect to that state, the rest of the run held as it is.
    push_h = torch.zeros(steps, batch, h_size, dtype=x.dtype, device=x.device,
                         requires_grad=True)
    push_c = (torch.zeros(steps, batch, layer.hidden_size, dtype=x.dtype, device=x.device,
                          requires_grad=True) if is_lstm else None)
    with torch.enable_grad():
        for t in range(steps):
            # As in evaluation whatever the layer's mode: no dropout masks drawn per step,
            # zoneout as its expectation (the module doc).
            step_input = sequence[t : t + 1]
            weights, masks = layer._direction_inputs(index, d, step_input, training=False)
            _, state = engine.run_direction(kind, step_input, state, weights, None,
                                            reverse=d == 1, backend=layer.backend, masks=masks)
            state = (state[0] + push_h[t], state[1] + push_c[t]) if is_lstm else state + push_h[t]
        norms = _jacobian_norms(output_of(state), [push_h, push_c] if is_lstm else [push_h])
    return GradientFlow(norms[0], norms[1] if is_lstm else None)


def _jacobian_norms(last: Tensor, pushes: list[Tensor]) -> list[Tensor]:
    """``‖∂last/∂push[t]‖_F`` per step and sample, ``(T, N)`` for each of ``pushes (T, N, ·)``:
    one vector-Jacobian product per unit of ``last (N, H_out)``, inside ``enable_grad``."""
    steps, batch = pushes[0].shape[:2]
    squares = [torch.zeros(steps, batch, dtype=last.dtype, device=last.device) for _ in pushes]
    for unit in range(last.shape[-1]):
        # Samples are independent, so one product per unit serves the whole batch.
        rows = torch.autograd.grad(last[:, unit].sum(), pushes, retain_graph=True)
        for total, row in zip(squares, rows, strict=True):
            total += row.pow(2).sum(-1)
    return [total.sqrt() for total in squares]


def _minimal_direction(layer: MinimalLayer, sequence: Tensor, index: int, direction: int,
                       initial: list[Tensor], lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(a, output)`` of one layer and direction, ``(T, N, H)`` each in time order: the decay
    of ``h_t = a_t ⊙ h_{t-1} + b_t`` and the layer's output (its own engine)."""
    a, _ = scan.coefficients(layer.family, F.linear(sequence, *layer.weights(index, direction)),
                             layer.log_space)
    output, _ = layer._run_direction(sequence, initial[index * layer.num_directions + direction],
                                     index, direction, lengths)
    return a, output


def _run_below(layer: MinimalLayer | SLSTM, x: Tensor, upto: int, initial: list) -> Tensor:
    """The input sequence of layer ``upto``: the layers below on the layer's own engine, from
    ``initial`` (per layer and direction), both directions concatenated, as in evaluation (no
    dropout)."""
    sequence = x
    for below in range(upto):
        outputs = [layer._run_direction(sequence, initial[below * layer.num_directions + other],
                                        below, other, None)[0]
                   for other in range(layer.num_directions)]
        sequence = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return sequence


def _minimal_gradient_flow(layer: MinimalLayer, input: Tensor, hx, layer_index: int | None,
                           direction: str | None) -> GradientFlow:
    """`gradient_flow` of a MinGRU or MinLSTM: ``‖Π_{k>t} a_k‖`` per step (module doc)."""
    x, _, initial, _ = layer._prepare(input, hx, None)
    index, d = _choose(layer, layer_index, direction)
    with torch.no_grad():
        sequence = _run_below(layer, x, index, initial)
        a, _ = _minimal_direction(layer, sequence, index, d, initial, None)  # (T, N, H)
    if d == 1:
        a = a.flip(0)  # processing order
    # ∂h_last/∂h_t = diag(a_{t+1} ⊙ … ⊙ a_last): the products from each step to the end,
    # shifted by one; the identity at the last step.
    from_step = torch.cumprod(a.flip(0), dim=0).flip(0)  # (T, N, H): Π_{k >= t} a_k
    products = torch.cat([from_step[1:], torch.ones_like(a[:1])])
    return GradientFlow(torch.linalg.vector_norm(products, dim=-1), None)


def _minimal_gate_trace(layer: MinimalLayer, input: Tensor, hx, lengths) -> GateTrace:
    """`gate_trace` of a MinGRU or MinLSTM: ``z`` or ``f', i'``, and ``h`` (module doc)."""
    x, lengths, initial, _ = layer._prepare(input, hx, lengths)
    steps, batch = x.shape[:2]
    time = torch.arange(steps, device=x.device)[:, None]
    valid = (time < lengths[None, :]) if lengths is not None else torch.ones(
        steps, batch, dtype=torch.bool, device=x.device)  # (T, N)
    trace = GateTrace(layer.family)
    sequence = x
    with torch.no_grad():
        for index in range(layer.num_layers):
            outputs = []
            for d in range(layer.num_directions):
                a, output = _minimal_direction(layer, sequence, index, d, initial, lengths)
                gates = ({"z": 1 - a} if layer.family == MinFamily.GRU
                         else {"f'": a, "i'": 1 - a}) | {"h": output}
                trace.gates[(index, d)] = {
                    name: value.masked_fill(~valid[:, :, None], float("nan"))
                    for name, value in gates.items()}
                trace.saturation[(index, d)] = {
                    name: _saturated(gates[name][valid]) for name in MINIMAL_GATES[layer.family]}
                outputs.append(output)
            sequence = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return trace


def _slstm_gradient_flow(layer: SLSTM, input: Tensor, hx, layer_index: int | None,
                         direction: str | None) -> GradientFlow:
    """`gradient_flow` of an SLSTM: through ``h`` and through ``c / n`` (module doc), by
    autograd through the layer's own engine, one step per call."""
    x, _, initial, _ = layer._prepare(input, hx, None)
    index, d = _choose(layer, layer_index, direction)
    with torch.no_grad():
        sequence = _run_below(layer, x, index, initial)
    if d == 1:
        sequence = sequence.flip(0)  # processing order; a one-step run is the same both ways
    weights = tuple(None if w is None else w.detach() for w in layer.weights(index, d))
    exp_forget = layer.forget_gate == "exp"
    state = _detach(initial[index * layer.num_directions + d])
    steps, batch = sequence.shape[:2]
    # Zero perturbations of the state leaving each step, as for the classic families; the
    # cell's is scaled by n_t, so that it moves c_t / n_t by push_c[t] (module doc).
    push_h, push_c = (torch.zeros(steps, batch, layer.hidden_size, dtype=x.dtype,
                                  device=x.device, requires_grad=True) for _ in range(2))
    with torch.enable_grad():
        for t in range(steps):
            _, (h, c, n, m) = engine.run_slstm_direction(
                sequence[t : t + 1], state, *weights, None, False, exp_forget, layer.backend)
            state = (h + push_h[t], c + n * push_c[t], n, m)
        norms = _jacobian_norms(state[0], [push_h, push_c])
    return GradientFlow(*norms)


def _slstm_gate_trace(layer: SLSTM, input: Tensor, hx, lengths) -> GateTrace:
    """`gate_trace` of an SLSTM: the spec's step (`rnnkit.engine.slstm.step_values`) with the
    layer's weights, every quantity of the module doc."""
    x, lengths, initial, _ = layer._prepare(input, hx, lengths)
    steps, batch = x.shape[:2]
    time = torch.arange(steps, device=x.device)[:, None]
    valid = (time < lengths[None, :]) if lengths is not None else torch.ones(
        steps, batch, dtype=torch.bool, device=x.device)  # (T, N)
    exp_forget = layer.forget_gate == "exp"
    trace = GateTrace(SLSTM_FAMILY)
    sequence = x
    with torch.no_grad():
        for index in range(layer.num_layers):
            outputs = []
            for d in range(layer.num_directions):
                weight_ih, weight_hh, bias_ih = layer.weights(index, d)
                projected = F.linear(sequence, weight_ih, bias_ih)  # (T, N, 4H)
                state = initial[index * layer.num_directions + d]
                per_step: dict[str, list[Tensor]] = {}
                weighed: list[Tensor] = []  # steps with a memory to weigh: n_{t-1} > 0
                for t in range(steps - 1, -1, -1) if d == 1 else range(steps):
                    pre = projected[t] + slstm.recurrent_product(state[0], weight_hh)
                    values = slstm.step_values(pre, state, exp_forget)
                    gates = {"i": values["log i"].exp(), "f": values["log f"].exp(),
                             "z": values["z"], "o": values["o"], "i'": values["i'"],
                             "f'": values["f'"], SLSTM_WRITE: values["i'"] / values["n"],
                             "c": values["c"], "n": values["n"], "m": values["m"],
                             "h": values["h"]}
                    mask = valid[t][:, None]  # (N, 1): past a sequence's end nothing happens
                    weighed.append(mask & (state[2] > 0))
                    new_state = (values["h"], values["c"], values["n"], values["m"])
                    state = tuple(torch.where(mask, new, old)
                                  for new, old in zip(new_state, state, strict=True))
                    for name, value in gates.items():
                        per_step.setdefault(name, []).append(
                            torch.where(mask, value, torch.full_like(value, float("nan"))))
                if d == 1:
                    per_step = {name: values[::-1] for name, values in per_step.items()}
                    weighed = weighed[::-1]
                gates_of_direction = {name: torch.stack(values) for name, values in
                                      per_step.items()}  # (T, N, H) each
                trace.gates[(index, d)] = gates_of_direction
                trace.saturation[(index, d)] = _slstm_saturation(
                    gates_of_direction, valid, torch.stack(weighed), exp_forget)
                outputs.append(torch.nan_to_num(gates_of_direction["h"], nan=0.0))
            sequence = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return trace


def _slstm_saturation(gates: dict[str, Tensor], valid: Tensor, weighed: Tensor,
                      exp_forget: bool) -> dict[str, float]:
    """The sLSTM's saturated fractions (module doc): ``o``, a sigmoid ``f`` and ``i'/n`` by the
    sigmoid rule, ``i'/n`` over the ``weighed (T, N, H)`` entries only; ``z`` by the tanh rule."""
    sigmoid_gates = ("f", "o") if not exp_forget else ("o",)
    result = {name: _saturated(gates[name][valid]) for name in sigmoid_gates}
    result[SLSTM_WRITE] = _saturated(gates[SLSTM_WRITE][weighed])
    result["z"] = float((gates["z"][valid].abs() > TANH_SATURATION).double().mean())
    return result


def _saturated(values: Tensor) -> float:
    """The fraction of sigmoid gate ``values`` below 0.05 or above 0.95."""
    return float(((values < SATURATION_LOW) | (values > SATURATION_HIGH)).double().mean())


@dataclass
class GateTrace:
    """Gate activations and their saturation, per (layer, direction).

    ``gates[(layer, direction)][name]`` is ``(T, N, H)`` in time order (the reverse direction
    too), ``NaN`` past each sequence's length; ``saturation[(layer, direction)][name]`` is the
    saturated fraction over valid steps, for the sigmoid gates and tanh units of the family.
    """

    family: Family | MinFamily | str  # str: `SLSTM_FAMILY`
    gates: dict[tuple[int, int], dict[str, Tensor]] = field(default_factory=dict)
    saturation: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)

    def gate(self, name: str, layer: int = 0, direction: int = 0) -> Tensor:
        try:
            return self.gates[(layer, direction)][name]
        except KeyError:
            names = ", ".join(next(iter(self.gates.values())))
            raise KeyError(f"no gate {name!r} at layer {layer}, direction {direction}; this "
                           f"{self.family} trace has {names} at {sorted(self.gates)}") from None


def saturation_of(kind: CellKind, gates: dict[str, Tensor], valid: Tensor) -> dict[str, float]:
    """Saturated fraction of each sigmoid gate and tanh unit of ``kind`` over ``valid``.

    A relu RNN has no saturating unit (relu does not saturate above): its dict is empty."""
    result = {}
    for name in SIGMOID_GATES[kind.family]:
        result[name] = _saturated(gates[name][valid])
    if kind.family == Family.RNN and kind.nonlinearity != "tanh":
        return result
    for name in TANH_UNITS[kind.family]:
        if name in gates:
            result[name] = float((gates[name][valid].abs() > TANH_SATURATION).double().mean())
    return result


def gate_trace(layer: RecurrentLayer | MinimalLayer | SLSTM, input: Tensor, hx=None,
               lengths=None) -> GateTrace:
    """Every gate of every layer and direction over ``input``; see `GateTrace`.

    ``input``, ``hx`` and ``lengths`` are as the layer's own ``forward`` takes them (padded
    tensor; unbatched input gives N = 1). With lengths, each direction runs over each sequence's
    valid steps only, as the layer does.
    """
    layer = _check_layer(layer, "gate_trace")
    if not isinstance(input, Tensor):
        raise TypeError(f"gate_trace input must be a Tensor (padded, with lengths if needed), "
                        f"got {type(input).__name__}")
    if isinstance(layer, MinimalLayer):
        return _minimal_gate_trace(layer, input, hx, lengths)
    if isinstance(layer, SLSTM):
        return _slstm_gate_trace(layer, input, hx, lengths)
    x, lengths, initial, _ = layer.prepare(input, hx, lengths=lengths)
    kind: CellKind = layer.cell_kind()
    steps, batch = x.shape[:2]
    time = torch.arange(steps, device=x.device)[:, None]
    valid = (time < lengths[None, :]) if lengths is not None else torch.ones(
        steps, batch, dtype=torch.bool, device=x.device)  # (T, N)
    trace = GateTrace(kind.family)
    sequence = x
    with torch.no_grad():
        for index in range(layer.num_layers):
            outputs = []
            for d in range(layer.num_directions):
                # Evaluation's weights and masks: zoneout is then its expectation, applied to
                # the step's new state as the layer's loop does.
                weights, masks = layer._direction_inputs(index, d, sequence, training=False)
                state = initial[index * layer.num_directions + d]
                per_step: dict[str, list[Tensor]] = {}
                order = range(steps - 1, -1, -1) if d == 1 else range(steps)
                for t in order:
                    gates = cell_gates(kind, sequence[t], state, weights)
                    mask = valid[t][:, None]  # (N, 1): past a sequence's end nothing happens
                    new_state = state_of(kind, gates)
                    if masks is not None:
                        new_state = zoneout(new_state, state, *masks.zoneout_at(t))
                        gates |= {"h": output_of(new_state)} | (
                            {"c": new_state[1]} if isinstance(new_state, tuple) else {})
                    state = (tuple(torch.where(mask, n, o) for n, o in zip(new_state, state,
                                                                           strict=True))
                             if isinstance(state, tuple) else torch.where(mask, new_state, state))
                    for name, value in gates.items():
                        per_step.setdefault(name, []).append(
                            torch.where(mask, value, torch.full_like(value, float("nan"))))
                if d == 1:
                    per_step = {name: values[::-1] for name, values in per_step.items()}
                gates_of_direction = {name: torch.stack(values) for name, values in
                                      per_step.items()}  # (T, N, H) each
                trace.gates[(index, d)] = gates_of_direction
                trace.saturation[(index, d)] = saturation_of(kind, gates_of_direction,
                                                             valid)
                outputs.append(torch.nan_to_num(gates_of_direction["h"], nan=0.0))
            sequence = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return trace


__all__ = ["GateTrace", "GradientFlow", "diagnosable", "gate_trace", "gradient_flow",
           "saturation_of"]
