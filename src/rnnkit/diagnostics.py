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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit import engine
from rnnkit.engine import scan
from rnnkit.engine.scan import MinFamily
from rnnkit.engine.steps import CellKind, Family, cell_gates, output_of, state_of, zoneout
from rnnkit.layers import PreparedInput, RecurrentLayer, prepare_sequence
from rnnkit.minimal import MinGRU, MinLSTM

DIRECTIONS = ("forward", "reverse")
SIGMOID_GATES = {Family.LSTM: ("i", "f", "o"), Family.GRU: ("r", "z"), Family.RNN: ()}
TANH_UNITS = {Family.LSTM: ("g",), Family.GRU: ("n",), Family.RNN: ("h",)}
SATURATION_LOW, SATURATION_HIGH, TANH_SATURATION = 0.05, 0.95, 0.95
MINIMAL_GATES = {MinFamily.GRU: ("z",), MinFamily.LSTM: ("f'", "i'")}
MinimalLayer = MinGRU | MinLSTM
DIAGNOSED = (RecurrentLayer, MinGRU, MinLSTM)
"""The layers `gradient_flow` and `gate_trace` read (`diagnosable`)."""


class GradientFlow(NamedTuple):
    """``h (T, N)``: ‖∂h_T/∂h_t‖_F; ``c (T, N)`` the same through the LSTM cell, else None.
    Row t is the state leaving step t in processing order; the last row is distance 0."""

    h: Tensor
    c: Tensor | None


def diagnosable(layer: object) -> bool:
    """Whether `gradient_flow` and `gate_trace` read ``layer`` (an rnnkit RNN, LSTM, GRU,
    MinGRU or MinLSTM)."""
    return isinstance(layer, DIAGNOSED)


def _check_layer(layer: object, function: str) -> RecurrentLayer | MinimalLayer:
    if not diagnosable(layer):
        raise TypeError(f"{function} takes an rnnkit RNN, LSTM, GRU, MinGRU or MinLSTM layer, "
                        f"got {type(layer).__name__}")
    return layer


def _choose(layer: RecurrentLayer, layer_index: int | None,
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


def gradient_flow(layer: RecurrentLayer, input: Tensor, hx=None, *,
                  layer_index: int | None = None, direction: str | None = None) -> GradientFlow:
    """Per-step Frobenius norms of ∂h_T/∂(state leaving step t); see the module docstring.

    Args:
        layer: an rnnkit ``RNN``, ``LSTM``, ``GRU``, ``MinGRU`` or ``MinLSTM`` (any variant,
            any backend).
        input: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, or unbatched
            ``(L, H_in)`` (then N = 1). No lengths: every sequence runs all L steps.
        hx: the initial state, as the layer takes it (default zeros or the learned state).
        layer_index: which layer of the stack (default the last).
        direction: ``"forward"`` or ``"reverse"``; required for a bidirectional layer. The
            reverse direction's steps are in its processing order (row 0 is the last time step).

    Returns:
        ``GradientFlow(h, c)``, each ``(L, N)`` (``c`` None but for LSTM).
    """
    layer = _check_layer(layer, "gradient_flow")
    if not isinstance(input, Tensor):
        raise TypeError(f"gradient_flow input must be a Tensor (a padded batch), got "
                        f"{type(input).__name__}; PackedSequence and lengths are not supported")
    if isinstance(layer, MinimalLayer):
        return _minimal_gradient_flow(layer, input, hx, layer_index, direction)
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
        last = output_of(state)  # (N, H_out)
        targets = [push_h, push_c] if is_lstm else [push_h]
        squares = [torch.zeros(steps, batch, dtype=x.dtype, device=x.device) for _ in targets]
        for unit in range(h_size):
            # Samples are independent, so one product per unit serves the whole batch.
            rows = torch.autograd.grad(last[:, unit].sum(), targets, retain_graph=True)
            for total, row in zip(squares, rows, strict=True):
                total += row.pow(2).sum(-1)
    norms = [total.sqrt() for total in squares]
    return GradientFlow(norms[0], norms[1] if is_lstm else None)


def _minimal_inputs(layer: MinimalLayer, input: Tensor, hx, lengths=None
                    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """A minimal layer's ``forward`` input, checked as it checks it: ``x (T, N, I)``,
    ``lengths`` and the initial state of each layer and direction."""
    x, lengths, batched = prepare_sequence(
        type(layer).__name__, input, lengths, input_size=layer.input_size,
        batch_first=layer.batch_first, parameter=layer.weight_ih_l0)
    return x, lengths, layer._initial_states(hx, x, batched)


def _minimal_direction(layer: MinimalLayer, sequence: Tensor, index: int, direction: int,
                       initial: list[Tensor], lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(a, output)`` of one layer and direction, ``(T, N, H)`` each in time order: the decay
    of ``h_t = a_t ⊙ h_{t-1} + b_t`` and the layer's output (its own engine)."""
    weight, bias = layer.weights(index, direction)
    a, _ = scan.coefficients(layer.family, F.linear(sequence, weight, bias), layer.log_space)
    output, _ = scan.run_direction(
        layer.family, sequence, initial[index * layer.num_directions + direction], weight,
        bias, lengths, direction == 1, layer.log_space, layer.backend)
    return a, output


def _minimal_gradient_flow(layer: MinimalLayer, input: Tensor, hx, layer_index: int | None,
                           direction: str | None) -> GradientFlow:
    """`gradient_flow` of a MinGRU or MinLSTM: ``‖Π_{k>t} a_k‖`` per step (module doc)."""
    x, _, initial = _minimal_inputs(layer, input, hx)
    index, d = _choose(layer, layer_index, direction)
    sequence = x
    with torch.no_grad():
        for below in range(index):  # the layers below, as in evaluation (no dropout)
            outputs = [_minimal_direction(layer, sequence, below, other, initial, None)[1]
                       for other in range(layer.num_directions)]
            sequence = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
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
    x, lengths, initial = _minimal_inputs(layer, input, hx, lengths)
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

    family: Family | MinFamily
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


def gate_trace(layer: RecurrentLayer, input: Tensor, hx=None, lengths=None) -> GateTrace:
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
