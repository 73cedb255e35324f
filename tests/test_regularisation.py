"""Layer norm, recurrent dropout, zoneout and weight drop (spec: "Normalisation and
regularisation"): each against a formula written here, with torch.nn's cells as the plain step;
the masks' keep rates; p = 0 is the plain layer; engines agree; bad values are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.engine import reference
from rnnkit.engine.steps import CellKind, Family, Masks

LAYERS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}
TORCH_CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}


def layer(family, **options):
    torch.manual_seed(0)
    return LAYERS[family](3, 5, **options).double()


def torch_cell(model, family):
    """torch.nn's cell with layer 0's weights: the plain step of the formulas below."""
    cell = TORCH_CELLS[family](3, 5).double()
    cell.load_state_dict({name: getattr(model, f"{name}_l0") for name in
                          ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    return cell


def normalised(v):
    """LN with gain 1 and no shift, written out: biased variance, eps 1e-5."""
    mean = v.mean(-1, keepdim=True)
    variance = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(variance + 1e-5)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_layer_norm_with_unit_gain_is_the_formula(family):
    model = layer(family, layer_norm=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    output, _ = model(x)
    w_ih, w_hh, b_ih, b_hh = (getattr(model, f"{n}_l0") for n in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = torch.zeros(2, 5, dtype=torch.float64)
    c = torch.zeros(2, 5, dtype=torch.float64)
    expected = []
    for t in range(4):
        a, b = normalised(x[t] @ w_ih.T), normalised(h @ w_hh.T)
        if family == "lstm":
            i, f, g, o = (a + b + b_ih + b_hh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(normalised(c))
        elif family == "gru":
            x_r, x_z, x_n = (a + b_ih).chunk(3, -1)
            h_r, h_z, h_n = (b + b_hh).chunk(3, -1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        else:
            h = torch.tanh(a + b + b_ih + b_hh)
        expected.append(h)
    torch.testing.assert_close(output, torch.stack(expected), rtol=0, atol=1e-12)
    names = {"layer_norm_ih_l0", "layer_norm_hh_l0"} | (
        {"layer_norm_c_weight_l0", "layer_norm_c_bias_l0"} if family == "lstm" else set())
    assert names <= set(model.state_dict())
    with pytest.raises(ValueError, match="has no equivalent of layer_norm=True"):
        model.to_torch()


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_zoneout_in_evaluation_is_the_expectation(family):
    p_h, p_c = (0.3, 0.6) if family == "lstm" else (0.3, None)
    model = layer(family, zoneout=(p_h, p_c) if family == "lstm" else p_h).eval()
    cell = torch_cell(model, family)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    output, _ = model(x)
    h = c = torch.zeros(2, 5, dtype=torch.float64)
    expected = []
    with torch.no_grad():
        for t in range(6):
            if family == "lstm":
                h_new, c_new = cell(x[t], (h, c))
                h, c = p_h * h + (1 - p_h) * h_new, p_c * c + (1 - p_c) * c_new
            else:
                h = p_h * h + (1 - p_h) * cell(x[t], h)
            expected.append(h)
    torch.testing.assert_close(output.detach(), torch.stack(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_training_masks_act_as_the_formulas_say(family):
    """The reference with given masks against a loop on torch.nn's cell: recurrent dropout on
    the state entering W_hh only, zoneout mixing the old and new states per unit."""
    model = layer(family)
    cell = torch_cell(model, family)
    kind, weights = model.cell_kind(), model.cell_weights(0, 0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    mask = torch.bernoulli(torch.full((2, 5), 0.7, dtype=torch.float64),
                           generator=generator) / 0.7
    keep_h = torch.bernoulli(torch.full((5, 2, 5), 0.4, dtype=torch.float64),
                             generator=generator)
    keep_c = torch.bernoulli(torch.full((5, 2, 5), 0.2, dtype=torch.float64),
                             generator=generator) if family == "lstm" else None
    h = c = torch.zeros(2, 5, dtype=torch.float64)
    state = (h, c) if family == "lstm" else h
    output, _ = reference.run_direction(kind, x, state, weights, None, False,
                                        Masks(mask, keep_h, keep_c))
    # The recurrent product reads m ⊙ h; the rest of the step reads h itself (the input part
    # alone through the cell, plus W_hh's part on the masked state).
    w_hh, b_hh = weights.weight_hh, weights.bias_hh
    expected = []
    with torch.no_grad():
        for t in range(5):
            if family == "lstm":
                gates = F.linear(x[t], weights.weight_ih, weights.bias_ih) + \
                    F.linear(mask * h, w_hh, b_hh)
                i, f, g, o = gates.chunk(4, -1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                h = keep_h[t] * h + (1 - keep_h[t]) * h_new
                c = keep_c[t] * c + (1 - keep_c[t]) * c_new
            elif family == "gru":
                x_r, x_z, x_n = F.linear(x[t], weights.weight_ih, weights.bias_ih).chunk(3, -1)
                h_r, h_z, h_n = F.linear(mask * h, w_hh, b_hh).chunk(3, -1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                h_new = (1 - z) * torch.tanh(x_n + r * h_n) + z * h  # z weighs the unmasked h
                h = keep_h[t] * h + (1 - keep_h[t]) * h_new
            else:
                h_new = cell(x[t], mask * h)  # RNN: the state enters W_hh only
                h = keep_h[t] * h + (1 - keep_h[t]) * h_new
            expected.append(h)
    torch.testing.assert_close(output, torch.stack(expected), rtol=0, atol=1e-12)


def test_a_gru_without_reset_after_masks_the_state_inside_the_reset_product():
    torch.manual_seed(0)
    model = rnnkit.GRU(3, 4, reset_after=False).double()
    weights = model.cell_weights(0, 0)
    x, h = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[2.0, 0.0, 2.0, 2.0], [0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    output, _ = reference.run_direction(CellKind(Family.GRU, reset_after=False), x, h, weights,
                                        None, False, Masks(mask))
    w_hh, b_hh = weights.weight_hh, weights.bias_hh
    x_r, x_z, x_n = F.linear(x[0], weights.weight_ih, weights.bias_ih).chunk(3, -1)
    r = torch.sigmoid(x_r + (mask * h) @ w_hh[:4].T + b_hh[:4])
    z = torch.sigmoid(x_z + (mask * h) @ w_hh[4:8].T + b_hh[4:8])
    n = torch.tanh(x_n + (r * mask * h) @ w_hh[8:].T + b_hh[8:])
    torch.testing.assert_close(output[0], (1 - z) * n + z * h, rtol=0, atol=1e-12)


def test_mask_keep_rates_over_many_draws():
    torch.manual_seed(0)
    model = rnnkit.LSTM(3, 50, recurrent_dropout=0.25, zoneout=(0.1, 0.4), weight_drop=0.5)
    x = torch.zeros(40, 30, 3)
    weights, masks = model._direction_inputs(0, 0, x, training=True)
    recurrent = masks.recurrent
    assert set(recurrent.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((recurrent == 0).float().mean().item() - 0.25) < 0.03  # 1500 draws
    assert abs(masks.zoneout_h.mean().item() - 0.1) < 0.01  # 60,000 draws each
    assert abs(masks.zoneout_c.mean().item() - 0.4) < 0.01
    dropped = weights.weight_hh == 0
    assert abs(dropped.float().mean().item() - 0.5) < 0.02  # 10,000 weights
    torch.testing.assert_close(weights.weight_hh[~dropped], 2 * model.weight_hh_l0[~dropped])
    # Evaluation: nothing is dropped, zoneout is its probability.
    weights, masks = model._direction_inputs(0, 0, x, training=False)
    assert weights.weight_hh is model.weight_hh_l0 and masks.recurrent is None
    assert masks.zoneout_h.item() == pytest.approx(0.1)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_every_probability_at_zero_is_the_plain_layer(family):
    model = layer(family, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0,
                  num_layers=2, bidirectional=True).train()
    plain = model.to_torch().train()  # a plain configuration: it converts
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_seeded_training_runs_are_reproducible_and_engines_agree_on_weight_drop(family):
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    results = {}
    for backend in ("reference", "fused", "native"):
        model = layer(family, weight_drop=0.4, num_layers=2, bidirectional=True,
                      backend=backend).train()
        torch.manual_seed(5)
        output, _ = model(x)
        output.square().sum().backward()
        results[backend] = (output.detach(), [p.grad for p in model.parameters()])
    for backend in ("fused", "native"):
        torch.testing.assert_close(results[backend][0], results["reference"][0], rtol=0,
                                   atol=1e-10)
        for got, want in zip(results[backend][1], results["reference"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    model = layer(family, layer_norm=True, recurrent_dropout=0.3, zoneout=0.2).train()
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        runs.append(model(x)[0])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_the_switches_combine_with_lengths_directions_and_stacking(family):
    model = layer(family, layer_norm=True, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.2,
                  num_layers=2, bidirectional=True, learn_initial_state=True).train()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    torch.manual_seed(3)
    padded, state = model(x, lengths=lengths)
    torch.manual_seed(3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    from_packed, packed_state = model(packed)
    unpacked, _ = torch.nn.utils.rnn.pad_packed_sequence(from_packed)
    torch.testing.assert_close(unpacked, padded, rtol=0, atol=1e-12)
    assert (padded[2:, 1] == 0).all()  # nothing past a sequence's end
    (padded.sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))
     ).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_gradcheck_float64_through_every_switch(family):
    model = layer(family, layer_norm=True, zoneout=0.3).eval()  # deterministic: zoneout's p
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *params: torch.func.functional_call(
            model, dict(zip(names, params, strict=True)), (x,))[0],
        (x, *[p.detach().clone().requires_grad_() for p in model.parameters()]))
    kind, w = model.cell_kind(), model.cell_weights(0, 0)
    mask = torch.full((2, 5), 2.0, dtype=torch.float64)
    state = (torch.zeros(2, 5, dtype=torch.float64),) * 2 if family == "lstm" else \
        torch.zeros(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: reference.run_direction(kind, x, state, w, None, False, Masks(mask))[0], (x,))


def test_every_backend_runs_the_switches_without_falling_back(recwarn):
    """The fused and native engines have the switches (the recurrence operators): asking for
    one runs it, with no warning, and gives the reference's results."""
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    outputs = {}
    for backend in ("reference", "fused", "native"):
        model = layer("lstm", layer_norm=True, zoneout=0.3, backend=backend).eval()
        outputs[backend] = model(x)[0]
    for backend in ("fused", "native"):
        torch.testing.assert_close(outputs[backend], outputs["reference"], rtol=1e-12,
                                   atol=1e-12)
    assert not [w for w in recwarn.list if "rnnkit" in str(w.message)]


@pytest.mark.parametrize(("options", "message"), [
    ({"recurrent_dropout": 1.0}, r"LSTM recurrent_dropout must be a number in \[0, 1\), got 1.0"),
    ({"recurrent_dropout": -0.1}, r"LSTM recurrent_dropout must be a number in \[0, 1\], got -0.1"),
    ({"weight_drop": 1.5}, r"LSTM weight_drop must be a number in \[0, 1\], got 1.5"),
    ({"zoneout": 1}, r"LSTM zoneout must be a number in \[0, 1\), got 1"),
    ({"zoneout": (0.1, 1.0)}, r"LSTM zoneout p_c must be a number in \[0, 1\), got 1.0"),
    ({"zoneout": (0.1, 0.2, 0.3)}, r"LSTM zoneout must be a number or a pair \(p_h, p_c\)"),
    ({"layer_norm": 1}, "LSTM layer_norm must be"),
])
def test_bad_values_are_named(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        rnnkit.LSTM(3, 5, **options)


def test_gru_rules_for_the_switches():
    with pytest.raises(ValueError, match="GRU layer_norm=True needs reset_after=True"):
        rnnkit.GRU(3, 5, layer_norm=True, reset_after=False)
    with pytest.raises(ValueError, match=r"GRU zoneout must be a number \(a pair \(p_h, p_c\) "
                                         "is for LSTM's two states\\)"):
        rnnkit.GRU(3, 5, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="has no equivalent of recurrent_dropout=0.2, "
                                         "zoneout=0.1, weight_drop=0.3"):
        rnnkit.GRU(3, 5, recurrent_dropout=0.2, zoneout=0.1, weight_drop=0.3).to_torch()


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_cells_equal_one_step_of_the_layer_with_the_same_switches(family):
    cells = {"lstm": rnnkit.LSTMCell, "gru": rnnkit.GRUCell, "rnn": rnnkit.RNNCell}
    torch.manual_seed(0)
    cell = cells[family](3, 5, layer_norm=True, zoneout=0.25).double()
    model = layer(family, layer_norm=True, zoneout=0.25)
    model.load_state_dict({f"{name}_l0": value for name, value in cell.state_dict().items()})
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    cell.eval(), model.eval()
    state = None
    for t in range(4):  # evaluation: deterministic, so the two step the same way
        state = cell(x[t], state)
    final = model(x)[1]
    torch.testing.assert_close(state[0] if family == "lstm" else state,
                               (final[0] if family == "lstm" else final)[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="has no equivalent of layer_norm=True, zoneout=0.25"):
        cell.to_torch()


def test_a_cell_s_variational_mask_is_the_one_passed_every_step():
    torch.manual_seed(0)
    cell = rnnkit.GRUCell(3, 4, recurrent_dropout=0.5).double().train()
    mask = cell.recurrent_dropout_mask(2)
    assert mask.shape == (2, 4) and set(mask.unique().tolist()) <= {0.0, 2.0}
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    plain = torch.nn.GRUCell(3, 4).double()
    plain.load_state_dict(cell.state_dict())
    # W_hh reads m ⊙ h; z still weighs the unmasked h: h' = (1 - z) n + z h.
    x_r, x_z, x_n = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(mask * h, cell.weight_hh, cell.bias_hh).chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    expected = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
    torch.testing.assert_close(cell(x, h, recurrent_mask=mask), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"GRUCell recurrent_mask must have shape \(N, 4\)"):
        cell(x, h, recurrent_mask=torch.ones(2, 5, dtype=torch.float64))
    cell.eval()  # evaluation without a mask: no dropout
    torch.testing.assert_close(cell(x, h), plain(x, h), rtol=0, atol=1e-12)
