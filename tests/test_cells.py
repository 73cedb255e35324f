"""rnnkit cells: parity with torch.nn cells, the variants' equations, gradcheck, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from compare import assert_same, outputs_and_gradients
from spec_equations import gru_reset_before_step, lstm_peephole_step

INPUT, HIDDEN = 3, 5

CELLS = {
    "rnn_tanh": (nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, {}),
    "gru": (nn.GRUCell, {}),
}


def randomize(cell):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return cell


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(CELLS))
def test_parity_with_torch_nn_cells(name, bias, batched, with_state, dtype):
    torch_class, extra = CELLS[name]
    torch.manual_seed(0)
    reference = torch_class(INPUT, HIDDEN, bias=bias, **extra, dtype=dtype)
    cell = rnnkit.from_torch(reference)
    generator = torch.Generator().manual_seed(1)
    lead = (4,) if batched else ()

    def leaf(size):
        return torch.randn(lead + (size,), generator=generator, dtype=dtype).requires_grad_()

    inputs = {"x": leaf(INPUT)}
    if with_state:
        inputs |= {"h": leaf(HIDDEN)} | ({"c": leaf(HIDDEN)} if name == "lstm" else {})

    def run(module):
        if not with_state:
            return module(inputs["x"])
        hx = (inputs["h"], inputs["c"]) if name == "lstm" else inputs["h"]
        return module(inputs["x"], hx)

    assert_same(outputs_and_gradients(cell, run, inputs),
                outputs_and_gradients(reference, run, inputs), dtype, group="cells")


def test_same_seed_gives_torch_nn_initial_weights():
    for name, (torch_class, extra) in CELLS.items():
        torch.manual_seed(11)
        reference = torch_class(INPUT, HIDDEN, **extra)
        torch.manual_seed(11)
        cell = getattr(rnnkit, torch_class.__name__)(INPUT, HIDDEN, **extra)
        for key, value in reference.state_dict().items():
            assert torch.equal(cell.state_dict()[key], value), (name, key)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_peephole_cell_matches_spec_equation(proj_size):
    cell = randomize(rnnkit.LSTMCell(INPUT, HIDDEN, proj_size=proj_size, peephole=True,
                                     dtype=torch.float64))
    x = torch.randn(4, INPUT, dtype=torch.float64)
    h = torch.randn(4, proj_size or HIDDEN, dtype=torch.float64)
    c = torch.randn(4, HIDDEN, dtype=torch.float64)
    expected = lstm_peephole_step(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                  cell.bias_hh, cell.weight_ch,
                                  cell.weight_hr if proj_size else None)
    torch.testing.assert_close(cell(x, (h, c)), expected, rtol=1e-12, atol=1e-12)


def test_reset_before_cell_matches_spec_equation():
    cell = randomize(rnnkit.GRUCell(INPUT, HIDDEN, reset_after=False, dtype=torch.float64))
    x = torch.randn(4, INPUT, dtype=torch.float64)
    h = torch.randn(4, HIDDEN, dtype=torch.float64)
    expected = gru_reset_before_step(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                     cell.bias_hh)
    torch.testing.assert_close(cell(x, h), expected, rtol=1e-12, atol=1e-12)


def test_peephole_cell_with_zero_weights_equals_plain_cell():
    torch.manual_seed(0)
    plain = rnnkit.LSTMCell(INPUT, HIDDEN, dtype=torch.float64)
    torch.manual_seed(0)
    peephole = rnnkit.LSTMCell(INPUT, HIDDEN, peephole=True, dtype=torch.float64)
    assert torch.all(peephole.weight_ch == 0)
    x = torch.randn(4, INPUT, dtype=torch.float64)
    torch.testing.assert_close(peephole(x), plain(x), rtol=0, atol=0)


GRADCHECK_CELLS = {
    "rnn_tanh": lambda: rnnkit.RNNCell(2, 3, dtype=torch.float64),
    "rnn_relu": lambda: rnnkit.RNNCell(2, 3, nonlinearity="relu", dtype=torch.float64),
    "lstm": lambda: rnnkit.LSTMCell(2, 3, dtype=torch.float64),
    "lstm_peephole": lambda: rnnkit.LSTMCell(2, 3, peephole=True, dtype=torch.float64),
    "lstm_projection": lambda: rnnkit.LSTMCell(2, 3, proj_size=2, dtype=torch.float64),
    "lstm_peephole_projection": lambda: rnnkit.LSTMCell(2, 3, proj_size=1, peephole=True,
                                                        dtype=torch.float64),
    "gru": lambda: rnnkit.GRUCell(2, 3, dtype=torch.float64),
    "gru_reset_before": lambda: rnnkit.GRUCell(2, 3, reset_after=False, dtype=torch.float64),
    "gru_nobias": lambda: rnnkit.GRUCell(2, 3, bias=False, reset_after=False, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CELLS))
def test_gradcheck_cells(name):
    cell = randomize(GRADCHECK_CELLS[name]())
    names = [n for n, _ in cell.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, cell.output_size, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    is_lstm = isinstance(cell, rnnkit.LSTMCell)

    def run(x, h, c, *params):
        hx = (h, c) if is_lstm else h
        out = torch.func.functional_call(cell, dict(zip(names, params, strict=True)), (x, hx))
        return out if is_lstm else (out,)

    assert torch.autograd.gradcheck(run, (x, h, c, *params))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rnnkit.LSTMCell(3, 4)(torch.randn(2, 5)), ValueError,
         r"LSTMCell input must have shape \(N, 3\) or \(3,\) \(input_size=3\), got \(2, 5\)"),
        (lambda: rnnkit.GRUCell(3, 4)(torch.randn(2, 2, 3)), ValueError, r"GRUCell input must have shape"),
        (lambda: rnnkit.GRUCell(3, 4)(torch.ones(2, 3, dtype=torch.int32)), TypeError,
         r"GRUCell input must be a floating-point tensor"),
        (lambda: rnnkit.GRUCell(3, 4)(torch.ones(2, 3), torch.zeros(2, 5)), ValueError,
         r"GRUCell hx must have shape \(N, H_out\) = \(2, 4\), got \(2, 5\)"),
        (lambda: rnnkit.GRUCell(3, 4)(torch.ones(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),
         TypeError, r"GRUCell hx must be a Tensor of shape \(2, 4\), got a tuple .* is for LSTMCell"),
        (lambda: rnnkit.LSTMCell(3, 4)(torch.ones(2, 3), torch.zeros(2, 4)), TypeError,
         r"LSTMCell hx must be a tuple \(h, c\)"),
        (lambda: rnnkit.LSTMCell(3, 4, proj_size=2)(torch.ones(3), (torch.zeros(2), torch.zeros(2))),
         ValueError, r"LSTMCell hx\[1\] \(c\) must have shape \(H,\) = \(4,\), got \(2,\)"),
        (lambda: rnnkit.RNNCell(3, 4)(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.float64)),
         TypeError, r"RNNCell hx has dtype torch.float64"),
        (lambda: rnnkit.RNNCell(3, 4, nonlinearity="gelu"), ValueError, r"nonlinearity must be one of"),
        (lambda: rnnkit.LSTMCell(3, 4, proj_size=5), ValueError, r"proj_size must be smaller than hidden_size"),
        (lambda: rnnkit.LSTMCell(0, 4), ValueError, r"LSTMCell input_size must be an int >= 1, got 0"),
        (lambda: rnnkit.LSTMCell(3, 4, forget_bias=float("nan")), ValueError, r"forget_bias must be a finite number"),
    ],
)
def test_bad_cell_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unbatched_cell_equals_batch_of_one():
    cell = randomize(rnnkit.LSTMCell(INPUT, HIDDEN, proj_size=2, peephole=True))
    x, h, c = torch.randn(INPUT), torch.randn(2), torch.randn(HIDDEN)
    h1, c1 = cell(x, (h, c))
    h2, c2 = cell(x[None], (h[None], c[None]))
    assert h1.shape == (2,) and c1.shape == (HIDDEN,)
    torch.testing.assert_close(h1, h2[0], rtol=0, atol=0)
    torch.testing.assert_close(c1, c2[0], rtol=0, atol=0)


@pytest.mark.parametrize("cell_class, torch_class", [(rnnkit.LSTMCell, nn.LSTMCell),
                                                     (rnnkit.GRUCell, nn.GRUCell)])
def test_a_parametrized_weight_is_the_one_the_step_uses(cell_class, torch_class):
    # weight_norm turns weight_hh into a computed attribute: the step must read that, not a
    # stale entry of the parameter dict.
    torch.manual_seed(0)
    cell = cell_class(4, 6, dtype=torch.float64)
    nn.utils.parametrizations.weight_norm(cell, "weight_hh")
    with torch.no_grad():
        cell.parametrizations.weight_hh.original0.mul_(3.0)  # the norms: the weight changes
    reference = torch_class(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, name).copy_(getattr(cell, name))
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(cell(x), reference(x), rtol=0, atol=1e-12)
