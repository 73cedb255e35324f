"""rnnkit.RNN/LSTM/GRU: parity with torch.nn, lengths and packing, variants, and bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from compare import assert_same, outputs_and_gradients
from spec_equations import gru_reset_before_step, lstm_peephole_step

INPUT, HIDDEN, PROJ, STEPS = 3, 5, 2, 6
LENGTHS = [4, 6, 1, 3]  # unsorted, one full-length sequence, one of length 1

# (torch class, rnnkit class, extra constructor arguments) per mode of the parity grid.
MODES = {
    "rnn_tanh": (nn.RNN, rnnkit.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTM, rnnkit.LSTM, {}),
    "lstm_proj": (nn.LSTM, rnnkit.LSTM, {"proj_size": PROJ}),
    "gru": (nn.GRU, rnnkit.GRU, {}),
}
INPUT_KINDS = ("batched", "unbatched", "packed", "lengths")


def make_pair(mode, dtype, **arguments):
    """A torch.nn layer and its rnnkit twin with identical weights."""
    torch_class, _, extra = MODES[mode]
    torch.manual_seed(0)
    reference = torch_class(INPUT, HIDDEN, **extra, **arguments, dtype=dtype)
    return reference, rnnkit.from_torch(reference)


def make_state(layer, batch, dtype, generator):
    """A random initial state for ``layer`` (unbatched when ``batch`` is None), requiring grad."""
    lead = (layer.num_layers * (2 if layer.bidirectional else 1),) + (() if batch is None else (batch,))
    out_size = layer.proj_size if getattr(layer, "proj_size", 0) else layer.hidden_size

    def leaf(size):
        return torch.randn(lead + (size,), generator=generator, dtype=dtype).requires_grad_()

    if isinstance(layer, nn.LSTM | rnnkit.LSTM):
        return {"h0": leaf(out_size), "c0": leaf(layer.hidden_size)}
    return {"h0": leaf(out_size)}


def hx_of(state):
    return (state["h0"], state["c0"]) if "c0" in state else state["h0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_with_torch_nn(mode, num_layers, bidirectional, batch_first, bias, kind, dtype):
    reference, layer = make_pair(
        mode, dtype, num_layers=num_layers, bidirectional=bidirectional,
        batch_first=batch_first, bias=bias,
    )
    generator = torch.Generator().manual_seed(1)
    batch = None if kind == "unbatched" else len(LENGTHS)
    shape = (STEPS, INPUT) if batch is None else (
        (batch, STEPS, INPUT) if batch_first else (STEPS, batch, INPUT))
    x = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    state = make_state(reference, batch, dtype, generator)
    inputs = {"x": x} | state
    lengths = torch.tensor(LENGTHS)

    if kind in ("batched", "unbatched"):
        def run_reference(module):
            return module(x, hx_of(state))
        run_layer = run_reference
    elif kind == "packed":
        def run_reference(module):
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            output, final = module(packed, hx_of(state))
            assert torch.equal(output.batch_sizes, packed.batch_sizes)
            assert torch.equal(output.sorted_indices, packed.sorted_indices)
            return output, final
        run_layer = run_reference
    else:
        def run_reference(module):
            packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
            output, final = module(packed, hx_of(state))
            padded, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=STEPS)
            return padded, final

        def run_layer(module):
            return module(x, hx_of(state), lengths=lengths)

    expected = outputs_and_gradients(reference, run_reference, inputs)
    actual = outputs_and_gradients(layer, run_layer, inputs)
    assert_same(actual, expected, dtype, group="layers")


@pytest.mark.parametrize("mode", list(MODES))
def test_default_state_is_zeros_and_batch_first_states_stay_layer_major(mode):
    reference, layer = make_pair(mode, torch.float64, num_layers=2, batch_first=True)
    x = torch.randn(4, STEPS, INPUT, dtype=torch.float64)
    expected = outputs_and_gradients(reference, lambda m: m(x), {})
    actual = outputs_and_gradients(layer, lambda m: m(x), {})
    assert_same(actual, expected, torch.float64)
    h_n = layer(x)[1]
    assert (h_n[0] if mode.startswith("lstm") else h_n).shape[:2] == (2, 4)


def test_same_seed_gives_torch_nn_initial_weights():
    for mode, (torch_class, rnnkit_class, extra) in MODES.items():
        torch.manual_seed(7)
        reference = torch_class(INPUT, HIDDEN, num_layers=2, bidirectional=True, **extra)
        torch.manual_seed(7)
        layer = rnnkit_class(INPUT, HIDDEN, num_layers=2, bidirectional=True, **extra)
        expected = reference.state_dict()
        assert list(layer.state_dict()) == list(expected), mode
        for name, value in layer.state_dict().items():
            assert torch.equal(value, expected[name]), (mode, name)


def test_all_weights_match_torch_layout():
    reference, layer = make_pair("lstm_proj", torch.float32, num_layers=2, bidirectional=True)
    assert [[p.shape for p in group] for group in layer.all_weights] == [
        [p.shape for p in group] for group in reference.all_weights
    ]


# ---- lengths and packing ------------------------------------------------------------------

VARIANT_LAYERS = {
    "rnn": lambda: rnnkit.RNN(INPUT, HIDDEN, num_layers=2, bidirectional=True),
    "lstm_peephole_proj": lambda: rnnkit.LSTM(
        INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ, peephole=True),
    "gru_reset_before": lambda: rnnkit.GRU(
        INPUT, HIDDEN, num_layers=2, bidirectional=True, reset_after=False),
    "gru_learned_state": lambda: rnnkit.GRU(
        INPUT, HIDDEN, num_layers=2, bidirectional=True, learn_initial_state=True),
}


def randomize(layer):
    """Give every parameter (peepholes and learned states included) a nonzero random value."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return layer


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", list(VARIANT_LAYERS))
def test_padded_with_lengths_equals_each_sequence_alone(name, batch_first):
    layer = randomize(VARIANT_LAYERS[name]().double())
    layer.batch_first = batch_first
    x = torch.randn(len(LENGTHS), STEPS, INPUT, dtype=torch.float64)
    output, final = layer(x if batch_first else x.transpose(0, 1), lengths=LENGTHS)
    if not batch_first:
        output = output.transpose(0, 1)
    finals = final if isinstance(final, tuple) else (final,)
    for n, length in enumerate(LENGTHS):
        alone, alone_final = layer(x[n : n + 1, :length] if batch_first
                                   else x[n : n + 1, :length].transpose(0, 1))
        if not batch_first:
            alone = alone.transpose(0, 1)
        torch.testing.assert_close(output[n, :length], alone[0], rtol=1e-12, atol=1e-12)
        assert torch.all(output[n, length:] == 0)
        alone_finals = alone_final if isinstance(alone_final, tuple) else (alone_final,)
        for got, want in zip(finals, alone_finals, strict=True):
            torch.testing.assert_close(got[:, n], want[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(VARIANT_LAYERS))
def test_packed_equals_padded_with_lengths(name):
    layer = randomize(VARIANT_LAYERS[name]().double())
    x = torch.randn(STEPS, len(LENGTHS), INPUT, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor(LENGTHS)

    def run_packed(module):
        output, final = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(output, total_length=STEPS)[0], final

    expected = outputs_and_gradients(layer, lambda m: m(x, lengths=lengths), {"x": x})
    actual = outputs_and_gradients(layer, run_packed, {"x": x})
    assert_same(actual, expected, torch.float64)


def test_lengths_shorter_than_input_pad_with_zeros_and_accept_lists():
    layer = rnnkit.GRU(INPUT, HIDDEN, bidirectional=True)
    x = torch.randn(STEPS + 3, 2, INPUT)
    output, h_n = layer(x, lengths=[2, 5])
    trimmed, trimmed_h = layer(x[:5], lengths=torch.tensor([2, 5]))
    torch.testing.assert_close(output[:5], trimmed)
    torch.testing.assert_close(h_n, trimmed_h)
    assert torch.all(output[5:] == 0)


# ---- variants -----------------------------------------------------------------------------

def test_peephole_with_zero_weights_equals_plain_lstm():
    torch.manual_seed(0)
    plain = rnnkit.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=torch.float64)
    peephole = rnnkit.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, peephole=True,
                           dtype=torch.float64)
    assert all(torch.all(p == 0) for n, p in peephole.named_parameters() if "weight_ch" in n)
    peephole.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64, requires_grad=True)
    expected = outputs_and_gradients(plain, lambda m: m(x), {"x": x})
    actual = outputs_and_gradients(peephole, lambda m: m(x), {"x": x})
    actual = {k: v for k, v in actual.items() if "weight_ch" not in k}
    assert_same(actual, expected, torch.float64)


def spec_loop(layer, x, step):
    """A single-layer, forward-only per-step loop of the spec equations, independent of rnnkit."""
    outputs, state = [], None
    for t in range(x.shape[0]):
        state = step(x[t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs), state


def test_gru_reset_before_matches_spec_equation():
    layer = randomize(rnnkit.GRU(INPUT, HIDDEN, reset_after=False, dtype=torch.float64))
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64)
    h0 = torch.randn(1, 2, HIDDEN, dtype=torch.float64)
    w = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]

    def step(x_t, h):
        return gru_reset_before_step(x_t, h0[0] if h is None else h, *w)

    expected, expected_h = spec_loop(layer, x, step)
    output, h_n = layer(x, h0)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n[0], expected_h, rtol=1e-12, atol=1e-12)
    # And it is a different model from reset_after=True with the same weights.
    layer.reset_after = True
    assert not torch.allclose(layer(x, h0)[0], expected)


@pytest.mark.parametrize("proj_size", [0, PROJ])
def test_peephole_lstm_matches_spec_equation(proj_size):
    layer = randomize(rnnkit.LSTM(INPUT, HIDDEN, proj_size=proj_size, peephole=True,
                                  dtype=torch.float64))
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64)
    h0 = torch.randn(1, 2, proj_size or HIDDEN, dtype=torch.float64)
    c0 = torch.randn(1, 2, HIDDEN, dtype=torch.float64)
    w = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0,
         layer.weight_ch_l0, getattr(layer, "weight_hr_l0", None)]

    def step(x_t, state):
        h, c = (h0[0], c0[0]) if state is None else state
        return lstm_peephole_step(x_t, h, c, *w)

    expected, (expected_h, expected_c) = spec_loop(layer, x, step)
    output, (h_n, c_n) = layer(x, (h0, c0))
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n[0], expected_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_n[0], expected_c, rtol=1e-12, atol=1e-12)


def test_forget_bias_is_added_once_to_the_forget_gate_bias():
    torch.manual_seed(5)
    plain = rnnkit.LSTM(INPUT, HIDDEN, num_layers=2)
    torch.manual_seed(5)
    shifted = rnnkit.LSTM(INPUT, HIDDEN, num_layers=2, forget_bias=1.0)
    for name, value in shifted.state_dict().items():
        difference = value - plain.state_dict()[name]
        expected = torch.zeros_like(difference)
        if name.startswith("bias_ih"):
            expected[HIDDEN : 2 * HIDDEN] = 1.0
        torch.testing.assert_close(difference, expected, rtol=0, atol=1e-6)
    # A run-time constant would break torch.nn loading: the state dict must stay plain.
    nn.LSTM(INPUT, HIDDEN, num_layers=2).load_state_dict(shifted.state_dict())


@pytest.mark.parametrize("family", ["rnn", "lstm", "gru"])
def test_learned_initial_state_is_used_and_trained(family):
    layer_class = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[family]
    layer = randomize(layer_class(INPUT, HIDDEN, num_layers=2, bidirectional=True,
                                  learn_initial_state=True, dtype=torch.float64))
    assert layer.h0.shape == (4, 1, HIDDEN)
    x = torch.randn(STEPS, 3, INPUT, dtype=torch.float64)
    learned = (layer.h0.expand(-1, 3, -1),) + ((layer.c0.expand(-1, 3, -1),)
                                               if family == "lstm" else ())
    hx = learned if family == "lstm" else learned[0]
    torch.testing.assert_close(layer(x)[0], layer(x, hx)[0], rtol=0, atol=0)
    # Unbatched input broadcasts the same learned state.
    torch.testing.assert_close(layer(x[:, 0])[0], layer(x)[0][:, 0], rtol=1e-12, atol=1e-12)
    layer(x)[0].sum().backward()
    assert layer.h0.grad is not None and layer.h0.grad.abs().sum() > 0


def test_learned_initial_state_starts_at_zero_state():
    torch.manual_seed(0)
    plain = rnnkit.LSTM(INPUT, HIDDEN, proj_size=PROJ)
    learned = rnnkit.LSTM(INPUT, HIDDEN, proj_size=PROJ, learn_initial_state=True)
    learned.load_state_dict(plain.state_dict(), strict=False)
    assert learned.h0.shape == (1, 1, PROJ) and learned.c0.shape == (1, 1, HIDDEN)
    x = torch.randn(STEPS, 2, INPUT)
    torch.testing.assert_close(learned(x)[0], plain(x)[0], rtol=0, atol=0)


def test_dropout_acts_between_layers_in_training_only():
    torch.manual_seed(0)
    layer = rnnkit.GRU(INPUT, HIDDEN, num_layers=2, dropout=1.0)
    x = torch.randn(STEPS, 2, INPUT)
    eval_output = layer.eval()(x)[0]
    no_dropout = rnnkit.GRU(INPUT, HIDDEN, num_layers=2)
    no_dropout.load_state_dict(layer.state_dict())
    torch.testing.assert_close(eval_output, no_dropout(x)[0], rtol=0, atol=0)
    # With p = 1 the second layer sees zeros: its output equals a top layer fed zeros.
    top = rnnkit.GRU(HIDDEN, HIDDEN)
    top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in layer.state_dict().items()
                         if k.endswith("_l1")})
    training_output = layer.train()(x)[0]
    torch.testing.assert_close(training_output, top(torch.zeros(STEPS, 2, HIDDEN))[0])


def test_gradcheck_layers_with_every_variant():
    layers = [
        rnnkit.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, peephole=True,
                    learn_initial_state=True, dtype=torch.float64),
        rnnkit.GRU(2, 3, num_layers=2, bidirectional=True, reset_after=False,
                   learn_initial_state=True, dtype=torch.float64),
        rnnkit.RNN(2, 3, num_layers=2, bidirectional=True, learn_initial_state=True,
                   dtype=torch.float64),
    ]
    for layer in layers:
        randomize(layer)
        names = [n for n, _ in layer.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
        x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

        def run(x, *params, layer=layer, names=names):
            output, final = torch.func.functional_call(
                layer, dict(zip(names, params, strict=True)), (x,), {"lengths": [4, 2, 3]})
            return output, *(final if isinstance(final, tuple) else (final,))

        assert torch.autograd.gradcheck(run, (x, *params))


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: rnnkit.LSTM(-1, 4), ValueError, r"input_size must be an int >= 1, got -1"),
        (lambda: rnnkit.LSTM(3, 0), ValueError, r"hidden_size must be an int >= 1, got 0"),
        (lambda: rnnkit.GRU(3, 4, num_layers=0), ValueError, r"num_layers .* got 0"),
        (lambda: rnnkit.RNN(3.0, 4), TypeError, r"input_size must be an int"),
        (lambda: rnnkit.RNN(3, 4, dropout=1.5), ValueError, r"dropout must be a number in \[0, 1\], got 1.5"),
        (lambda: rnnkit.RNN(3, 4, dropout=-0.1), ValueError, r"dropout .* got -0.1"),
        (lambda: rnnkit.RNN(3, 4, dropout="0.1"), TypeError, r"dropout must be a number"),
        (lambda: rnnkit.LSTM(3, 4, proj_size=4), ValueError, r"proj_size must be smaller than hidden_size \(4\), got 4"),
        (lambda: rnnkit.LSTM(3, 4, proj_size=-2), ValueError, r"proj_size must be an int >= 0, got -2"),
        (lambda: rnnkit.RNN(3, 4, nonlinearity="sigmoid"), ValueError, r"nonlinearity must be one of 'tanh', 'relu', got 'sigmoid'"),
        (lambda: rnnkit.LSTM(3, 4, bias=False, forget_bias=1.0), ValueError, r"forget_bias=1.0 needs bias=True"),
        (lambda: rnnkit.GRU(3, 4, bidirectional=1), TypeError, r"bidirectional must be True or False, got 1"),
        (lambda: rnnkit.GRU(3, 4, reset_after="no"), TypeError, r"reset_after must be True or False"),
    ],
)
def test_bad_constructor_arguments_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match="num_layers=1"):
        rnnkit.LSTM(3, 4, dropout=0.5)


LSTM_2 = dict(input_size=3, hidden_size=4, num_layers=2)
X = torch.randn(5, 2, 3)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rnnkit.LSTM(**LSTM_2)(torch.randn(5, 2, 7)), ValueError,
         r"input must have shape \(L, N, H_in\) .* input_size = 3; got \(5, 2, 7\)"),
        (lambda: rnnkit.LSTM(**LSTM_2)(torch.randn(5)), ValueError, r"input must have shape"),
        (lambda: rnnkit.LSTM(**LSTM_2)(torch.zeros(0, 2, 3)), ValueError, r"at least one time step"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X.long()), TypeError, r"input must be a floating-point tensor .* got dtype torch.int64"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X.double()), TypeError, r"input has dtype torch.float64 but the parameters have dtype torch.float32"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X.tolist()), TypeError, r"input must be a torch.Tensor, got a list of 5"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X, torch.zeros(2, 2, 4)), TypeError,
         r"hx must be a tuple \(h_0, c_0\) .* got a Tensor of shape \(2, 2, 4\)"),
        (lambda: rnnkit.GRU(**LSTM_2)(X, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))), TypeError,
         r"GRU hx must be a Tensor h_0 of shape \(2, 2, 4\), got a tuple .* is for LSTM"),
        (lambda: rnnkit.GRU(**LSTM_2)(X, torch.zeros(1, 2, 4)), ValueError,
         r"hx \(h_0\) must have shape \(D\*num_layers, N, H_out\) = \(2, 2, 4\), got \(1, 2, 4\)"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X, (torch.zeros(2, 2, 4), torch.zeros(2, 3, 4))), ValueError,
         r"hx\[1\] \(c_0\) must have shape .* = \(2, 2, 4\), got \(2, 3, 4\)"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4).long())), TypeError,
         r"c_0\) must be a floating-point tensor"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, torch.zeros(2, 2, 4).double()), TypeError, r"hx \(h_0\) has dtype torch.float64"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=[5, 6]), ValueError,
         r"lengths must lie in \[1, 5\] \(the input has 5 time steps\), got lengths\[1\] = 6"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=[0, 5]), ValueError, r"got lengths\[0\] = 0"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=torch.tensor([-1, 5])), ValueError, r"got lengths\[0\] = -1"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=[5, 5, 5]), ValueError,
         r"lengths must have one entry per sequence in the batch \(2\), got 3"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=torch.tensor([5.0, 2.0])), TypeError, r"lengths must be an integer tensor .* got dtype torch.float32"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=[5, 2.5]), TypeError, r"lengths must hold ints, got 2.5"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=torch.tensor([[5, 2]])), ValueError, r"lengths must be 1-D"),
        (lambda: rnnkit.RNN(**LSTM_2)(X, lengths=5), TypeError, r"lengths must be a 1-D integer tensor or a list of ints, got 5"),
        (lambda: rnnkit.RNN(**LSTM_2)(X[:, 0], lengths=[5]), ValueError, r"lengths applies to batched input only"),
        (lambda: rnnkit.RNN(**LSTM_2)(pack_padded_sequence(X, [5, 3]), lengths=[5, 3]), ValueError,
         r"lengths must be None when input is a PackedSequence"),
        (lambda: rnnkit.RNN(**LSTM_2, device="meta")(X), ValueError,
         r"input is on device cpu but the parameters are on meta"),
        (lambda: rnnkit.LSTM(**LSTM_2)(X, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, device="meta"))), ValueError,
         r"c_0\) is on device meta but the parameters are on cpu"),
    ],
)
def test_bad_forward_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_valid_unusual_inputs_still_work():
    """The boundary accepts what it promises: list hx for LSTM, lengths on any order, int64."""
    layer = rnnkit.LSTM(**LSTM_2)
    state = [torch.randn(2, 2, 4), torch.randn(2, 2, 4)]
    as_list, _ = layer(X, state, lengths=torch.tensor([2, 5]))
    as_tuple, _ = layer(X, tuple(state), lengths=[2, 5])
    torch.testing.assert_close(as_list, as_tuple, rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_unbatched_without_state_matches_torch_nn(mode):
    reference, layer = make_pair(mode, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(STEPS, INPUT, dtype=torch.float64, requires_grad=True)
    expected = outputs_and_gradients(reference, lambda m: m(x), {"x": x})
    actual = outputs_and_gradients(layer, lambda m: m(x), {"x": x})
    assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_chrono_init_draws_gate_biases_from_log_uniform(family):
    """Tallec & Ollivier 2018: b ~ log U(1, T_max - 1) per unit (LSTM forget gate, input gate
    its negative; GRU update gate z, which keeps the old state); recurrent biases of those gates
    zero; every other parameter as the default initialisation draws it."""
    hidden, t_max = 400, 50
    layer_class = rnnkit.LSTM if family == "lstm" else rnnkit.GRU
    torch.manual_seed(0)
    layer = layer_class(3, hidden, num_layers=2, bidirectional=True, init="chrono",
                        chrono_max_length=t_max)
    torch.manual_seed(0)
    default = layer_class(3, hidden, num_layers=2, bidirectional=True)
    gate = slice(hidden, 2 * hidden)  # LSTM f, GRU z: the second gate in both orders
    for suffix in ("_l0", "_l1", "_l0_reverse", "_l1_reverse"):
        bias = getattr(layer, "bias_ih" + suffix)[gate]
        assert bias.min() >= 0 and bias.max() <= math.log(t_max - 1)
        # U(1, T_max - 1) has median T_max / 2: about half the units lie below log of it.
        assert 0.4 < float((bias < math.log(t_max / 2)).double().mean()) < 0.6
        assert (getattr(layer, "bias_hh" + suffix)[gate] == 0).all()
        if family == "lstm":
            torch.testing.assert_close(getattr(layer, "bias_ih" + suffix)[:hidden], -bias)
            assert (getattr(layer, "bias_hh" + suffix)[:hidden] == 0).all()
        torch.testing.assert_close(getattr(layer, "weight_hh" + suffix),
                                   getattr(default, "weight_hh" + suffix))
    assert "init='chrono', chrono_max_length=50" in repr(layer)


@pytest.mark.parametrize("arguments, match", [
    ({"init": "chrono"}, "init='chrono' needs chrono_max_length"),
    ({"init": "glorot"}, "init must be one of 'default', 'chrono', got 'glorot'"),
    ({"chrono_max_length": 9}, "chrono_max_length=9 goes with init='chrono'"),
    ({"init": "chrono", "chrono_max_length": 2}, "chrono_max_length must be an int >= 3, got 2"),
    ({"init": "chrono", "chrono_max_length": 9, "bias": False}, "needs bias=True"),
    ({"init": "chrono", "chrono_max_length": 9, "forget_bias": 1.0}, "drop forget_bias=1.0"),
])
def test_bad_chrono_arguments_are_named(arguments, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        rnnkit.LSTM(3, 4, **arguments)


# ---- the public stack runner: prepare, run_stack, run_direction --------------------------
def _torch_twin_of_layer_0(layer):
    """torch.nn's one-layer LSTM holding ``layer``'s layer-0 weights: an independent reference."""
    twin = nn.LSTM(layer.input_size, layer.hidden_size, bidirectional=layer.bidirectional,
                   dtype=torch.float64)
    twin.load_state_dict({n: p for n, p in layer.state_dict().items() if "_l0" in n})
    return twin


def test_run_stack_is_forward_and_stops_at_any_layer():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                        dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)  # (N, L, H_in)
    lengths = torch.tensor([5, 3])
    prepared = layer.prepare(x, lengths=lengths)
    assert prepared.x.shape == (5, 2, 3) and prepared.batched  # time-major whatever the input
    assert prepared.lengths.tolist() == [5, 3] and len(prepared.initial) == 4
    output, finals = layer.run_stack(prepared)
    expected, (h_n, c_n) = layer(x, lengths=lengths)
    torch.testing.assert_close(output.transpose(0, 1), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([f[0] for f in finals]), h_n, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([f[1] for f in finals]), c_n, rtol=0, atol=0)
    # upto=1: the input of layer 1 is what torch.nn's one-layer LSTM makes of the sequence.
    below, finals_below = layer.run_stack(prepared, upto=1)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    reference, _ = pad_packed_sequence(_torch_twin_of_layer_0(layer)(packed)[0])
    torch.testing.assert_close(below, reference)
    assert len(finals_below) == 2
    same_input, no_finals = layer.run_stack(prepared, upto=0)
    assert same_input is prepared.x and no_finals == []


def test_run_direction_runs_one_direction_of_the_stack():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    state = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    expected, _ = _torch_twin_of_layer_0(layer)(x)
    forward, _ = layer.run_direction(0, 0, x, state)
    reverse, _ = layer.run_direction(0, 1, x, state)
    torch.testing.assert_close(forward, expected[..., :4])
    torch.testing.assert_close(reverse, expected[..., 4:])


def test_run_stack_dropout_follows_forward_unless_told():
    layer = rnnkit.GRU(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64).train()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    prepared = layer.prepare(x)
    torch.manual_seed(1)
    trained, _ = layer.run_stack(prepared)
    torch.manual_seed(1)
    torch.testing.assert_close(trained, layer(x)[0], rtol=0, atol=0)
    evaluated, _ = layer.run_stack(prepared, apply_dropout=False)
    torch.testing.assert_close(evaluated, layer.eval()(x)[0], rtol=0, atol=0)
    assert not torch.allclose(trained, evaluated)
    assert layer.run_stack(prepared, apply_dropout=True)[0].shape == evaluated.shape


def test_prepare_unbatched_input_and_learned_state():
    layer = rnnkit.RNN(3, 4, learn_initial_state=True)
    with torch.no_grad():
        layer.h0.fill_(0.5)
    prepared = layer.prepare(torch.randn(5, 3))
    assert prepared.x.shape == (5, 1, 3) and not prepared.batched and prepared.lengths is None
    assert torch.equal(prepared.initial[0], torch.full((1, 4), 0.5))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.run_stack((torch.zeros(2, 1, 3), None, [], True)), TypeError,
     "LSTM.run_stack prepared must be what LSTM.prepare returns (a PreparedInput), got a tuple"),
    (lambda m: m.run_stack(m.prepare(torch.zeros(2, 1, 3)), upto=3), ValueError,
     "LSTM.run_stack upto must be an int in [0, 2], got 3"),
    (lambda m: m.run_stack(m.prepare(torch.zeros(2, 1, 3)), upto=True), TypeError,
     "LSTM.run_stack upto must be an int in [0, 2], got True (bool)"),
    (lambda m: m.run_stack(m.prepare(torch.zeros(2, 1, 3)), apply_dropout=1), TypeError,
     "LSTM.run_stack apply_dropout must be True or False, got 1 (int)"),
    (lambda m: m.run_direction(0, 1, torch.zeros(2, 1, 3), None), ValueError,
     "LSTM.run_direction direction must be an int in [0, 0], got 1"),
    (lambda m: m.run_direction(-1, 0, torch.zeros(2, 1, 3), None), ValueError,
     "LSTM.run_direction layer must be an int in [0, 1], got -1"),
    (lambda m: m.prepare(torch.zeros(2, 1, 5)), ValueError, "H_in = input_size = 3; got (2, 1, 5)"),
])
def test_bad_stack_runner_arguments_are_named(call, error, match):
    with pytest.raises(error, match=re.escape(match)):
        call(rnnkit.LSTM(3, 4, num_layers=2))
