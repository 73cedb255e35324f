"""Diagnostics against independent references: gradient flow against autograd's Jacobian of a
per-step loop written from the spec, gate traces against the spec's formulas, and the textbook
behaviour of vanishing and kept gradients."""

from __future__ import annotations

import math

import pytest
import torch

import rnnkit
from rnnkit.diagnostics import gate_trace, gradient_flow
from spec_equations import spec_gates

VARIANTS = {
    "rnn-tanh": (rnnkit.RNN, {}),
    "rnn-relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm-peephole": (rnnkit.LSTM, {"peephole": True}),
    "lstm-projection": (rnnkit.LSTM, {"proj_size": 3}),
    "gru": (rnnkit.GRU, {}),
    "gru-reset-before": (rnnkit.GRU, {"reset_after": False}),
}


def make_layer(name, hidden=5, **options):
    layer_class, variant = VARIANTS[name]
    torch.manual_seed(0)
    layer = layer_class(3, hidden, dtype=torch.float64, **(variant | options))
    with torch.no_grad():
        for parameter_name, parameter in layer.named_parameters():
            if parameter_name.startswith("weight_ch"):
                parameter.uniform_(-0.5, 0.5)  # peepholes start at zero: make them matter
    return layer


def spec_weights(layer, index, direction):
    suffix = f"_l{index}" + ("_reverse" if direction else "")
    get = lambda name: getattr(layer, name + suffix, None)  # noqa: E731
    return {"w_ih": get("weight_ih"), "w_hh": get("weight_hh"), "b_ih": get("bias_ih"),
            "b_hh": get("bias_hh"), "w_ch": get("weight_ch"), "w_hr": get("weight_hr")}


def spec_step(layer, weights, x, state):
    family = layer.family
    gates = spec_gates(family, x, state, weights, getattr(layer, "nonlinearity", "tanh"),
                       getattr(layer, "reset_after", True))
    return (gates["h"], gates["c"]) if family == "lstm" else gates["h"]


def reference_flow(layer, sequence, state, weights):
    """‖∂h_T/∂h_t‖ (and ‖∂h_T/∂c_t‖) per step and sample, from autograd's full Jacobian of the
    remaining steps of a per-step loop over the spec's equations; one sample at a time."""
    steps, batch = sequence.shape[:2]
    states = [state]
    for t in range(steps):
        states.append(spec_step(layer, weights, sequence[t], states[-1]))
    is_lstm = layer.family == "lstm"
    flow_h = torch.zeros(steps, batch, dtype=torch.float64)
    flow_c = torch.zeros(steps, batch, dtype=torch.float64)
    for n in range(batch):
        for t in range(steps):
            leaving = states[t + 1]  # the state after step t

            def run_on(h_t, c_t=None, n=n, t=t):
                current = (h_t[None], c_t[None]) if is_lstm else h_t[None]
                for k in range(t + 1, steps):
                    current = spec_step(layer, weights, sequence[k, n : n + 1], current)
                return (current[0] if is_lstm else current)[0]

            if is_lstm:
                h_t, c_t = leaving[0][n].detach(), leaving[1][n].detach()
                flow_h[t, n] = torch.autograd.functional.jacobian(
                    lambda h, c_t=c_t: run_on(h, c_t), h_t).norm()
                flow_c[t, n] = torch.autograd.functional.jacobian(
                    lambda c, h_t=h_t: run_on(h_t, c), c_t).norm()
            else:
                flow_h[t, n] = torch.autograd.functional.jacobian(
                    run_on, leaving[n].detach()).norm()
    return flow_h, (flow_c if is_lstm else None)


def _zeros(layer, batch):
    h = torch.zeros(batch, getattr(layer, "proj_size", 0) or layer.hidden_size,
                    dtype=torch.float64)
    return (h, torch.zeros(batch, layer.hidden_size, dtype=torch.float64)) \
        if layer.family == "lstm" else h


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradient_flow_equals_the_jacobian_of_a_spec_loop(name, backend):
    layer = make_layer(name, backend=backend)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x)
    expected_h, expected_c = reference_flow(layer, x, _zeros(layer, 2), spec_weights(layer, 0, 0))
    torch.testing.assert_close(flow.h, expected_h, rtol=0, atol=1e-8)
    if layer.family == "lstm":
        torch.testing.assert_close(flow.c, expected_c, rtol=0, atol=1e-8)
    else:
        assert flow.c is None


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
@pytest.mark.parametrize("name", ["lstm-peephole", "gru-reset-before", "rnn-tanh"])
def test_gradient_flow_of_an_upper_layer_and_the_reverse_direction_with_a_given_state(name,
                                                                                      backend):
    layer = make_layer(name, num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    shapes = layer._state_shapes(2)
    hx = tuple(torch.randn(shape, dtype=torch.float64) for shape, _ in shapes)
    hx = hx if layer.family == "lstm" else hx[0]
    flow = gradient_flow(layer, x, hx, layer_index=1, direction="reverse")
    # The reference: layer 0's output by the layer itself (a 1-layer copy), then layer 1's
    # reverse direction over the reversed sequence from its slice of hx.
    lower = type(layer)(3, 5, bidirectional=True, dtype=torch.float64,
                        **VARIANTS[name][1])
    lower.load_state_dict({k: v for k, v in layer.state_dict().items() if "_l0" in k})
    states = hx if isinstance(hx, tuple) else (hx,)
    with torch.no_grad():
        below, _ = lower(x, tuple(s[:2] for s in states) if layer.family == "lstm"
                         else states[0][:2])
    start = tuple(s[3] for s in states) if layer.family == "lstm" else states[0][3]
    expected_h, expected_c = reference_flow(layer, below.flip(0), start, spec_weights(layer, 1, 1))
    torch.testing.assert_close(flow.h, expected_h, rtol=0, atol=1e-8)
    if layer.family == "lstm":
        torch.testing.assert_close(flow.c, expected_c, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
@pytest.mark.parametrize("name", ["lstm-projection", "gru", "rnn-relu"])
def test_gradient_flow_of_the_first_layer_of_a_stack_ignores_the_layers_above(name, backend):
    layer = make_layer(name, num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x, layer_index=0, direction="forward")
    expected_h, expected_c = reference_flow(layer, x, _zeros(layer, 2), spec_weights(layer, 0, 0))
    torch.testing.assert_close(flow.h, expected_h, rtol=0, atol=1e-8)
    if layer.family == "lstm":
        torch.testing.assert_close(flow.c, expected_c, rtol=0, atol=1e-8)


def test_at_distance_zero_the_flow_is_the_identitys_norm():
    for name in ("rnn-tanh", "lstm", "gru", "lstm-projection"):
        layer = make_layer(name, hidden=7)
        flow = gradient_flow(layer, torch.randn(4, 3, 3, dtype=torch.float64))
        size = 3 if name == "lstm-projection" else 7
        torch.testing.assert_close(flow.h[-1], torch.full((3,), math.sqrt(size),
                                                          dtype=torch.float64))
        if flow.c is not None:
            assert (flow.c[-1] == 0).all()  # h_T does not depend on c_T with h_T held


def rnn_with_spectral_radius(radius, hidden=32):
    torch.manual_seed(0)
    layer = rnnkit.RNN(1, hidden, dtype=torch.float64)
    with torch.no_grad():
        weight = layer.weight_hh_l0
        weight *= radius / torch.linalg.eigvals(weight).abs().max()
        layer.bias_hh_l0.zero_()
        layer.bias_ih_l0.zero_()
    return layer


def test_a_tanh_rnn_vanishes_below_radius_one_and_grows_above():
    x = 0.01 * torch.randn(40, 2, 1, dtype=torch.float64)
    identity = math.sqrt(32)
    small = gradient_flow(rnn_with_spectral_radius(0.5), x).h  # row -1: distance 0
    assert (small[-1 - 20] < 1e-5 * identity).all()
    large = gradient_flow(rnn_with_spectral_radius(3.0), x[:12]).h
    assert (large[-1 - 10] > 10 * identity).all()


@pytest.mark.parametrize("forget_bias, kept", [(5.0, True), (0.0, False)])
def test_the_lstm_cell_path_keeps_the_gradient_only_with_a_large_forget_bias(forget_bias, kept):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(4, 32, forget_bias=forget_bias, dtype=torch.float64)
    flow = gradient_flow(layer, torch.randn(52, 3, 4, dtype=torch.float64)).c
    ratio = flow[: -2] / flow[-2]  # against distance 1, over distances 2 ... 51
    if kept:
        assert (ratio > 0.1).all()
    else:
        assert (ratio[:2] < 1e-4).all()  # distances 51 and 50


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gate_trace_equals_the_spec_formulas_with_the_layers_weights(name):
    layer = make_layer(name, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    trace = gate_trace(layer, x, lengths=lengths)
    sequence = x
    for index in range(2):
        outputs = []
        for direction in range(2):
            weights = spec_weights(layer, index, direction)
            for n in range(3):
                state = _zeros(layer, 1)
                steps = range(int(lengths[n]))
                for t in (reversed(steps) if direction else steps):
                    gates = spec_gates(layer.family, sequence[t, n : n + 1], state, weights,
                                       getattr(layer, "nonlinearity", "tanh"),
                                       getattr(layer, "reset_after", True))
                    for gate_name, value in gates.items():
                        torch.testing.assert_close(
                            trace.gate(gate_name, index, direction)[t, n], value[0],
                            rtol=0, atol=1e-12)
                    state = (gates["h"], gates["c"]) if layer.family == "lstm" else gates["h"]
                assert trace.gate("h", index, direction)[int(lengths[n]):, n].isnan().all()
            outputs.append(torch.nan_to_num(trace.gate("h", index, direction)))
        sequence = torch.cat(outputs, dim=2)
    output, _ = layer(x, lengths=lengths)
    torch.testing.assert_close(sequence, output, rtol=0, atol=1e-12)


def test_saturation_counts_the_gate_values_beyond_the_thresholds():
    torch.manual_seed(0)
    layer = rnnkit.GRU(2, 6, dtype=torch.float64)
    x = 3 * torch.randn(10, 4, 2, dtype=torch.float64)
    trace = gate_trace(layer, x)
    z = trace.gate("z")
    expected = float(((z < 0.05) | (z > 0.95)).double().mean())
    assert trace.saturation[(0, 0)]["z"] == pytest.approx(expected)
    n = trace.gate("n")
    assert trace.saturation[(0, 0)]["n"] == pytest.approx(float((n.abs() > 0.95).double().mean()))
    with torch.no_grad():
        layer.bias_ih_l0[6:12] = 50.0  # z pinned at 1: fully saturated
    assert gate_trace(layer, x).saturation[(0, 0)]["z"] == 1.0


@pytest.mark.parametrize("nonlinearity, counted", [("tanh", True), ("relu", False)])
def test_the_rnn_output_counts_as_saturated_only_for_tanh(nonlinearity, counted):
    layer = rnnkit.RNN(2, 6, nonlinearity=nonlinearity, dtype=torch.float64)
    with torch.no_grad():
        layer.bias_ih_l0.fill_(5.0)  # tanh at ~1 (saturated); relu at ~5 (not a saturation)
    saturation = gate_trace(layer, torch.randn(8, 3, 2, dtype=torch.float64)).saturation[(0, 0)]
    assert saturation == ({"h": 1.0} if counted else {})


def test_bad_diagnostic_input_is_named():
    lstm = rnnkit.LSTM(3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="bidirectional: choose direction='forward' or "
                                         "direction='reverse'"):
        gradient_flow(lstm, x)
    with pytest.raises(ValueError, match="LSTM input must have shape"):
        gradient_flow(lstm, torch.randn(5, 2, 7), direction="forward")
    with pytest.raises(ValueError, match=r"layer_index must be an int in \[0, 0\]"):
        gradient_flow(lstm, x, layer_index=1, direction="forward")
    with pytest.raises(ValueError, match="direction must be 'forward' \\(or None\\)"):
        gradient_flow(rnnkit.GRU(3, 4), x, direction="reverse")
    with pytest.raises(TypeError, match="takes an rnnkit RNN, LSTM, GRU, MinGRU, MinLSTM or "
                                        "SLSTM layer, got LSTM"):
        gradient_flow(torch.nn.LSTM(3, 4), x)
    with pytest.raises(KeyError, match="no gate 'z'"):
        gate_trace(rnnkit.LSTM(3, 4), x).gate("z")


# minGRU and minLSTM -----------------------------------------------------------------------------

def _minimal_layer(layer_class, bidirectional, log_space):
    torch.manual_seed(0)
    return layer_class(3, 5, num_layers=2, bidirectional=bidirectional, log_space=log_space,
                       dtype=torch.float64)


@pytest.mark.parametrize("layer_class", [rnnkit.MinGRU, rnnkit.MinLSTM])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_minimal_gradient_flow_is_the_norm_of_autograds_jacobian(layer_class, direction):
    """The closed form ‖Π a‖ against autograd through the layer itself: the top layer alone,
    fed the stack's lower output, run on from each state h_t to the end."""
    bidirectional = direction == "reverse"
    layer = _minimal_layer(layer_class, bidirectional, log_space=bidirectional)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x, direction=direction if bidirectional else None)
    assert flow.c is None and flow.h.shape == (6, 2)
    lower = layer_class(3, 5, bidirectional=bidirectional, log_space=bidirectional,
                        dtype=torch.float64)
    lower.load_state_dict({k: v for k, v in layer.state_dict().items() if "_l0" in k})
    top = layer_class(lower.num_directions * 5, 5, log_space=bidirectional, dtype=torch.float64)
    suffix = "_l1_reverse" if bidirectional else "_l1"
    top.load_state_dict({"weight_ih_l0": getattr(layer, "weight_ih" + suffix),
                         "bias_ih_l0": getattr(layer, "bias_ih" + suffix)})
    with torch.no_grad():
        sequence = lower(x)[0]
    if bidirectional:
        sequence = sequence.flip(0)  # the reverse direction's processing order
    for n in range(2):
        for t in range(6):
            h_t = top(sequence[: t + 1, n : n + 1])[1][0, 0]  # the state leaving step t
            rest = sequence[t + 1 :, n : n + 1]

            def run_on(h, rest=rest):  # the top layer from h_t to the last step
                return top(rest, h.view(1, 1, 5))[1].view(5)

            jacobian = (torch.autograd.functional.jacobian(run_on, h_t) if t < 5
                        else torch.eye(5, dtype=torch.float64))
            assert float(flow.h[t, n]) == pytest.approx(float(jacobian.norm()), rel=1e-10)


@pytest.mark.parametrize("layer_class, gates", [(rnnkit.MinGRU, ("z", "h")),
                                                (rnnkit.MinLSTM, ("f'", "i'", "h"))])
def test_minimal_gate_trace_holds_the_spec_gates_and_the_layers_output(layer_class, gates):
    layer = _minimal_layer(layer_class, bidirectional=True, log_space=False)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = [6, 2, 4]
    trace = gate_trace(layer, x, lengths=lengths)
    output, _ = layer(x, lengths=lengths)
    top = torch.cat([trace.gate("h", 1, 0), trace.gate("h", 1, 1)], dim=2)
    valid = torch.arange(6)[:, None] < torch.tensor(lengths)  # (T, N)
    torch.testing.assert_close(top[valid], output[valid])
    assert bool(top[~valid].isnan().all())
    # Layer 0 reads x: its gates from the spec's formulas (docs/spec-minimal.md).
    projected = torch.nn.functional.linear(x, layer.weight_ih_l0, layer.bias_ih_l0)
    if layer_class is rnnkit.MinGRU:
        expected = {"z": torch.sigmoid(projected[..., :5])}
    else:
        f, i = torch.sigmoid(projected[..., :5]), torch.sigmoid(projected[..., 5:10])
        expected = {"f'": f / (f + i), "i'": i / (f + i)}
    for name, value in expected.items():
        torch.testing.assert_close(trace.gate(name)[valid], value[valid])
    assert set(trace.gates[(0, 0)]) == set(gates)
    assert set(trace.saturation[(0, 0)]) == set(gates) - {"h"}


def test_minimal_saturation_counts_pinned_gates():
    layer = rnnkit.MinGRU(2, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.bias_ih_l0[:4] = 50.0  # z pinned at 1
    assert gate_trace(layer, torch.randn(7, 2, 2, dtype=torch.float64)).saturation[(0, 0)] \
        == {"z": 1.0}
    layer = rnnkit.MinLSTM(2, 4, dtype=torch.float64)
    assert gate_trace(layer, torch.zeros(7, 2, 2, dtype=torch.float64)).saturation[(0, 0)] \
        == {"f'": 0.0, "i'": 0.0}


# sLSTM ------------------------------------------------------------------------------------------

SLSTM_VARIANTS = {"sigmoid": {}, "exp": {"forget_gate": "exp"}, "heads2": {"num_heads": 2}}


def _slstm_layer(variant, backend="reference", **options):
    torch.manual_seed(0)
    return rnnkit.SLSTM(3, 4, dtype=torch.float64, backend=backend,
                        **(SLSTM_VARIANTS[variant] | options))


def _slstm_top(layer, index, direction):
    """A one-layer SLSTM (reference loop) holding one layer and direction of ``layer``."""
    top = rnnkit.SLSTM(layer.weights(index, direction)[0].shape[1], layer.hidden_size,
                       num_heads=layer.num_heads, forget_gate=layer.forget_gate,
                       backend="reference", dtype=torch.float64)
    top.load_state_dict(dict(zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0"),
                                 layer.weights(index, direction), strict=True)))
    return top


def slstm_reference_flow(top, sequence, hx=None):
    """‖∂h_T/∂h_t‖ and ‖∂h_T/∂(c_t/n_t)‖ per step and sample: autograd's full Jacobian of
    ``top``'s own forward (the reference loop), run on from the state leaving step t, which a
    forward over the first t + 1 steps gives; one sample at a time."""
    steps, batch = sequence.shape[:2]
    flow_h = torch.zeros(steps, batch, dtype=torch.float64)
    flow_c = torch.zeros(steps, batch, dtype=torch.float64)
    size = top.hidden_size
    for n in range(batch):
        start = None if hx is None else tuple(s[:, n : n + 1] for s in hx)
        for t in range(steps - 1):  # the last step: the identity and zero, asserted elsewhere
            with torch.no_grad():
                h, c, norm, m = (s.view(size) for s in
                                 top(sequence[: t + 1, n : n + 1], start)[1])
            rest = sequence[t + 1 :, n : n + 1]

            def run_on(h_t, cell_t, rest=rest, norm=norm, m=m):  # cell_t = c_t / n_t
                state = tuple(s.view(1, 1, size) for s in (h_t, cell_t * norm, norm, m))
                return top(rest, state)[1][0].view(size)

            jacobian_h, jacobian_cell = torch.autograd.functional.jacobian(run_on, (h, c / norm))
            flow_h[t, n], flow_c[t, n] = jacobian_h.norm(), jacobian_cell.norm()
    flow_h[-1] = math.sqrt(size)
    return flow_h, flow_c


@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
@pytest.mark.parametrize("variant", list(SLSTM_VARIANTS))
def test_slstm_gradient_flow_is_the_norm_of_autograds_jacobian_of_the_reference_loop(variant,
                                                                                    backend):
    layer = _slstm_layer(variant, backend)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x)
    expected_h, expected_c = slstm_reference_flow(_slstm_top(layer, 0, 0), x)
    torch.testing.assert_close(flow.h, expected_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flow.c, expected_c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_slstm_gradient_flow_of_an_upper_reverse_direction_with_a_given_state(backend):
    torch.manual_seed(1)
    layer = rnnkit.SLSTM(3, 4, num_layers=2, bidirectional=True, num_heads=2,
                         forget_gate="exp", backend=backend, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h, c = torch.randn(2, 4, 2, 4, dtype=torch.float64).unbind(0)
    hx = (h, c, torch.rand(4, 2, 4, dtype=torch.float64) + 0.5,
          torch.randn(4, 2, 4, dtype=torch.float64))
    flow = gradient_flow(layer, x, hx, layer_index=1, direction="reverse")
    lower = rnnkit.SLSTM(3, 4, bidirectional=True, num_heads=2, forget_gate="exp",
                         dtype=torch.float64)
    lower.load_state_dict({k: v for k, v in layer.state_dict().items() if "_l0" in k})
    with torch.no_grad():
        below, _ = lower(x, tuple(s[:2] for s in hx))
    expected_h, expected_c = slstm_reference_flow(_slstm_top(layer, 1, 1), below.flip(0),
                                                  tuple(s[3:4] for s in hx))
    torch.testing.assert_close(flow.h, expected_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flow.c, expected_c, rtol=1e-10, atol=1e-12)


def test_slstm_gradient_flow_agrees_with_finite_differences_through_the_native_kernel():
    """Independent of autograd: central differences of the layer's own forward (native)."""
    layer = _slstm_layer("exp", backend="native")
    x = torch.randn(5, 1, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x)
    t, step = 1, 1e-6
    with torch.no_grad():
        h, c, n, m = layer(x[: t + 1])[1]
        columns_h, columns_c = [], []
        for unit in range(4):
            push = torch.zeros(1, 1, 4, dtype=torch.float64)
            push[..., unit] = step
            ends = [layer(x[t + 1 :], state)[1][0] for state in
                    ((h + push, c, n, m), (h - push, c, n, m))]
            columns_h.append((ends[0] - ends[1]) / (2 * step))
            ends = [layer(x[t + 1 :], state)[1][0] for state in
                    ((h, c + n * push, n, m), (h, c - n * push, n, m))]
            columns_c.append((ends[0] - ends[1]) / (2 * step))
    assert float(flow.h[t, 0]) == pytest.approx(float(torch.stack(columns_h).norm()), rel=1e-6)
    assert float(flow.c[t, 0]) == pytest.approx(float(torch.stack(columns_c).norm()), rel=1e-6)


@pytest.mark.parametrize("variant", list(SLSTM_VARIANTS))
def test_slstm_flow_at_distances_zero_and_one_is_the_closed_form(variant):
    # Distance 0: the identity through h, nothing through c/n (h_T is held). Distance 1
    # through c/n, with h_{T-1} held: h_T = o_T ⊙ ((1 - w_T) ⊙ h̃_{T-1} + w_T ⊙ z_T).
    layer = _slstm_layer(variant)
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    flow = gradient_flow(layer, x)
    trace = gate_trace(layer, x)
    torch.testing.assert_close(flow.h[-1], torch.full((3,), 2.0, dtype=torch.float64))
    assert (flow.c[-1] == 0).all()
    last_o, last_w = trace.gate("o")[-1], trace.gate("i'/n")[-1]
    torch.testing.assert_close(flow.c[-2], (last_o * (1 - last_w)).norm(dim=-1))


def _unstabilised_loop(layer, sequence, index, direction, length):
    """The paper's unstabilised step (no m) for one sample, in float64 from the layer's weights:
    ``i = exp(ĩ)``, ``C_t = f C + i z``, ``N_t = f N + i``, ``h = o C / N``, and the stabiliser's
    definition ``m_t = max(log f_t + m_{t-1}, ĩ_t)`` alongside; one dict per step."""
    weight_ih, weight_hh, bias_ih = layer.weights(index, direction)
    width = layer.hidden_size // layer.num_heads
    recurrent = torch.cat([torch.block_diag(*(head[g * width : (g + 1) * width]
                                              for head in weight_hh)) for g in range(4)])
    size = layer.hidden_size
    h, big_c, big_n = (torch.zeros(size, dtype=torch.float64) for _ in range(3))
    m = torch.full((size,), float("-inf"), dtype=torch.float64)
    steps = range(length)
    rows = {}
    for t in (reversed(steps) if direction else steps):
        i_pre, f_pre, z_pre, o_pre = (weight_ih @ sequence[t] + bias_ih + recurrent @ h).chunk(4)
        i = torch.exp(i_pre)
        f = torch.exp(f_pre) if layer.forget_gate == "exp" else torch.sigmoid(f_pre)
        z, o = torch.tanh(z_pre), torch.sigmoid(o_pre)
        m_new = torch.maximum(torch.log(f) + m, i_pre)
        old_n = big_n
        big_c, big_n = f * big_c + i * z, f * big_n + i
        h = o * big_c / big_n
        scale = torch.exp(-m_new)
        rows[t] = {"i": i, "f": f, "z": z, "o": o, "i'": i * scale,
                   "f'": f * torch.exp(m - m_new), "i'/n": i / big_n, "c": big_c * scale,
                   "n": big_n * scale, "m": m_new, "h": h, "1 - i'/n": f * old_n / big_n}
        m = m_new
    return rows


@pytest.mark.parametrize("variant", list(SLSTM_VARIANTS))
def test_slstm_gate_trace_equals_the_unstabilised_formulas_and_stays_in_range(variant):
    layer = _slstm_layer(variant, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = [6, 2, 4]
    trace = gate_trace(layer, x, lengths=lengths)
    assert trace.family == "slstm"
    names = {"i", "f", "z", "o", "i'", "f'", "i'/n", "c", "n", "m", "h"}
    sequence = x
    for index in range(2):
        outputs = []
        for direction in range(2):
            assert set(trace.gates[(index, direction)]) == names
            for n, length in enumerate(lengths):
                rows = _unstabilised_loop(layer, sequence[:, n], index, direction, length)
                for t, row in rows.items():
                    for name in names:
                        torch.testing.assert_close(trace.gate(name, index, direction)[t, n],
                                                   row[name], rtol=1e-10, atol=1e-12)
                    # 1 - w_t = f'_t n_{t-1} / n_t: the normalised cell's keep factor
                    torch.testing.assert_close(1 - row["i'/n"], row["1 - i'/n"])
                assert trace.gate("h", index, direction)[length:, n].isnan().all()
            outputs.append(torch.nan_to_num(trace.gate("h", index, direction)))
        sequence = torch.cat(outputs, dim=2)
    output, _ = layer(x, lengths=lengths)
    torch.testing.assert_close(sequence, output, rtol=0, atol=1e-12)
    # The documented ranges, over the valid steps.
    valid = torch.arange(6)[:, None] < torch.tensor(lengths)
    gate = {name: trace.gate(name, 1, 1)[valid] for name in names}
    for name in ("i'", "f'", "i'/n"):
        assert bool(((gate[name] >= 0) & (gate[name] <= 1)).all()), name
    assert torch.equal(torch.maximum(gate["i'"], gate["f'"]), torch.ones_like(gate["i'"]))
    assert bool((gate["n"] >= 1).all() and (gate["h"].abs() < 1).all())
    assert bool(((gate["o"] > 0) & (gate["o"] < 1)).all() and (gate["z"].abs() < 1).all())
    assert bool((gate["i"] > 0).all() and (gate["f"] > 0).all())
    if variant != "exp":
        assert bool((gate["f"] < 1).all())


def test_slstm_gate_trace_of_a_float32_layer_stays_finite_with_huge_inputs():
    # exp(ĩ) overflows (i = inf, as documented), the stabilised factors and h do not.
    torch.manual_seed(0)
    layer = rnnkit.SLSTM(3, 4, forget_gate="exp")
    trace = gate_trace(layer, 1e3 * torch.randn(8, 2, 3))
    assert bool(trace.gate("i").isinf().any())
    for name in ("i'", "f'", "i'/n", "c", "n", "m", "h"):
        assert bool(trace.gate(name).isfinite().all()), name


def test_slstm_saturation_follows_its_documented_definition():
    x = torch.randn(10, 4, 3, dtype=torch.float64)
    layer = _slstm_layer("sigmoid")
    trace = gate_trace(layer, x)
    saturation = trace.saturation[(0, 0)]
    assert set(saturation) == {"f", "o", "i'/n", "z"}
    fraction = lambda v: float(((v < 0.05) | (v > 0.95)).double().mean())  # noqa: E731
    for name in ("f", "o"):
        assert saturation[name] == pytest.approx(fraction(trace.gate(name)))
    # i'/n over the steps with a memory: the first step from the empty state has i'/n = 1.
    assert bool((trace.gate("i'/n")[0] == 1).all())
    assert saturation["i'/n"] == pytest.approx(fraction(trace.gate("i'/n")[1:]))
    assert saturation["z"] == pytest.approx(float((trace.gate("z").abs() > 0.95).double().mean()))
    with torch.no_grad():  # the memory overwritten: f ≈ e^-50, so i'/n ≈ 1 at every step
        layer.bias_ih_l0[4:8] = -50.0
    assert gate_trace(layer, x).saturation[(0, 0)] | {"z": 0} == {
        "f": 1.0, "o": saturation["o"], "i'/n": 1.0, "z": 0}
    exp_layer = _slstm_layer("exp")
    with torch.no_grad():  # the input ignored: f = e^50, so i'/n ≈ 0 after the first step
        exp_layer.bias_ih_l0[4:8] = 50.0
    saturation = gate_trace(exp_layer, x).saturation[(0, 0)]
    assert set(saturation) == {"o", "i'/n", "z"} and saturation["i'/n"] == 1.0
    one_step = gate_trace(exp_layer, x[:1]).saturation[(0, 0)]  # nothing to weigh
    assert math.isnan(one_step["i'/n"])


def test_slstm_diagnostics_take_the_layers_input_forms_and_name_bad_requests():
    torch.manual_seed(0)
    layer = rnnkit.SLSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = gradient_flow(layer, x, direction="forward")
    layer.batch_first = True
    flow = gradient_flow(layer, x.transpose(0, 1), direction="forward")
    torch.testing.assert_close(flow.h, expected.h, rtol=0, atol=0)
    single = gradient_flow(layer, x[:, 1], direction="forward")  # unbatched: N = 1
    torch.testing.assert_close(single.c, expected.c[:, 1:], rtol=1e-12, atol=1e-14)
    trace = gate_trace(layer, x.transpose(0, 1))
    assert trace.gate("h", 1, 1).shape == (5, 2, 4)
    with pytest.raises(ValueError, match="the layer is bidirectional: choose direction"):
        gradient_flow(layer, x)
    with pytest.raises(ValueError, match=r"layer_index must be an int in \[0, 1\]"):
        gradient_flow(layer, x, layer_index=2, direction="forward")
    with pytest.raises(ValueError, match="SLSTM input must have shape"):
        gradient_flow(layer, torch.randn(2, 5, 7, dtype=torch.float64), direction="forward")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    with pytest.raises(TypeError, match="PackedSequence and lengths are not supported"):
        gradient_flow(layer, packed, direction="forward")
    with pytest.raises(KeyError, match=r"no gate 'f\(t\)'.* this slstm trace has i, f, z, o"):
        trace.gate("f(t)")
