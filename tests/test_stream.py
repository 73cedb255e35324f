"""The streamed step: the native step kernels, a cell's short way to them, and `LayerStream`.

Each is checked against the general path (a one-step sequence through `forward`, itself tested
against the reference and torch.nn elsewhere) and the reference engine, and each test also
checks which path ran, with a spy on the compiled step kernels themselves (`spy_on_kernels`):
a stream binds them once and keeps them, so a spy on a Python entry would miss its steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import rnnkit
from compare import assert_same_normwise
from rnnkit import engine
from rnnkit.engine import reference, scan
from rnnkit.engine.native import build
from rnnkit.engine.steps import CellKind, CellWeights, Family
from rnnkit.stream import kept_step_kernels

pytestmark = pytest.mark.skipif(build.kernels() is None, reason="needs the native kernels")

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-13}  # normwise: ||got - want|| / ||want||


def assert_close(got, want):
    """Each tensor of ``got`` within `TOLERANCE` of ``want``'s, normwise (a step sums hundreds
    of products of magnitude ~1: its elementwise rounding scales with the whole row)."""
    got, want = (list(s) if isinstance(s, tuple) else [s] for s in (got, want))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        error = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert error <= TOLERANCE[b.dtype], f"normwise error {error:.3g}"


def spy_on_kernels(monkeypatch, *names: str) -> list:
    """The shapes of ``x`` of each call of the compiled kernels ``names`` (each call: one
    layer, one step), recorded by wrappers set on the kernels' module for the test: the bound
    step kernels look their kernel up there when they are bound."""
    calls, kernels = [], build.kernels()
    for name in names:
        real = getattr(kernels, name)

        def spy(x, *arguments, real=real):
            calls.append(x.shape)
            return real(x, *arguments)
        monkeypatch.setattr(kernels, name, spy)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the step kernels of RNN, LSTM and GRU ran."""
    return spy_on_kernels(monkeypatch, "rnn_step", "lstm_step", "gru_step")


def _random_weights(kind: CellKind, input_size: int, hidden: int, dtype, *, bias=True,
                    proj=0, peephole=False, seed=0) -> CellWeights:
    generator = torch.Generator().manual_seed(seed)
    gates = {Family.RNN: 1, Family.LSTM: 4, Family.GRU: 3}[kind.family] * hidden
    out = proj or hidden

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype) * 0.4

    return CellWeights(draw(gates, input_size), draw(gates, out),
                       draw(gates) if bias else None, draw(gates) if bias else None,
                       draw(proj, hidden) if proj else None,
                       draw(3 * hidden) if peephole else None)


STEP_CASES = [  # (kind, batch, input, hidden, options): odd sizes, partial vector blocks,
    # more than one block, and sizes past the threshold where threads share the units
    (CellKind(Family.LSTM), 1, 5, 3, {}),
    (CellKind(Family.LSTM), 3, 17, 37, {"bias": False}),
    (CellKind(Family.LSTM), 4, 70, 130, {}),
    (CellKind(Family.LSTM), 2, 9, 20, {"peephole": True}),
    (CellKind(Family.LSTM), 5, 33, 40, {"proj": 7, "peephole": True}),
    (CellKind(Family.LSTM), 1, 200, 150, {"proj": 90}),
    (CellKind(Family.GRU), 1, 5, 3, {}),
    (CellKind(Family.GRU), 4, 70, 130, {}),
    (CellKind(Family.GRU, reset_after=False), 3, 17, 37, {}),
    (CellKind(Family.GRU, reset_after=False), 2, 100, 160, {"bias": False}),
    (CellKind(Family.RNN), 1, 5, 3, {}),
    (CellKind(Family.RNN, nonlinearity="relu"), 4, 70, 300, {}),
    (CellKind(Family.RNN), 3, 17, 37, {"bias": False}),
]


@pytest.fixture(params=["threads-by-size", "every-thread", "one-thread"])
def thread_split(request):
    """The kernels' threshold for sharing a step between threads: as built, as low as it goes
    (every product split), and out of reach (every product on the calling thread)."""
    kernels = build.kernels()
    built = kernels.thread_min_multiply_adds()
    kernels.set_thread_min_multiply_adds({"threads-by-size": built, "every-thread": 1,
                                          "one-thread": 1 << 62}[request.param])
    yield
    kernels.set_thread_min_multiply_adds(built)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0].family}-{c[1]}x{c[2]}x{c[3]}"
                         f"-{c[0].reset_after}-{c[0].nonlinearity}-{sorted(c[4].items())}")
def test_step_kernels_equal_the_reference_step(case, dtype, kernel_calls, thread_split):
    kind, batch, input_size, hidden, options = case
    weights = _random_weights(kind, input_size, hidden, dtype, **options)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(batch, input_size, generator=generator, dtype=dtype)
    out = options.get("proj") or hidden
    h = torch.randn(batch, out, generator=generator, dtype=dtype)
    state = (h, torch.randn(batch, hidden, generator=generator, dtype=dtype)) \
        if kind.family == Family.LSTM else h
    with torch.no_grad():  # the kernels themselves, at every batch (the policy aside)
        stepped = engine.native_functions.step_kernel(kind, weights)(x, state)
        _, expected = reference.run_direction(kind, x.unsqueeze(0), state, weights, None, False)
    assert len(kernel_calls) == 1
    assert_close(stepped, expected)


def _lstm_inputs(dtype=torch.float32):
    weights = _random_weights(CellKind(Family.LSTM), 6, 8, dtype)
    x, h, c = (torch.randn(2, size, dtype=dtype) for size in (6, 8, 8))
    return CellKind(Family.LSTM), x, (h, c), weights


def test_the_engine_declines_what_the_kernels_do_not_run(monkeypatch, kernel_calls):
    kind, x, state, weights = _lstm_inputs()
    with torch.no_grad():
        assert engine.inference_step(kind, x, state, weights) is not None
        assert engine.inference_step(kind, x, state, weights, "reference") is None
        assert engine.inference_step(kind, x, state, weights, "fused") is None
        monkeypatch.setenv("RNNKIT_BACKEND", "fused")
        assert engine.inference_step(kind, x, state, weights, "auto") is None
        monkeypatch.delenv("RNNKIT_BACKEND")
        wide = torch.randn(2, 12)[:, ::2]  # not contiguous
        assert engine.inference_step(kind, wide, state, weights) is None
        assert engine.inference_step(kind, x.double(), state, weights) is None
        assert engine.inference_step(kind, x.half(), state, weights) is None
        big = engine.STEP_KERNEL_MAX_BATCH + 1  # the sequence path is faster there
        big_state = tuple(s[:1].expand(big, -1).contiguous() for s in state)
        assert engine.inference_step(kind, x[:1].expand(big, -1).contiguous(), big_state,
                                     weights) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert engine.inference_step(kind, x, state, weights) is None
    grad_weights = weights._replace(weight_hh=weights.weight_hh.clone().requires_grad_())
    assert engine.inference_step(kind, x, state, grad_weights) is None  # to differentiate
    with torch.no_grad():
        assert engine.inference_step(kind, x, state, grad_weights) is not None
        normalised = weights._replace(layer_norm_hh=torch.ones(32), layer_norm_ih=torch.ones(32))
        assert engine.inference_step(kind, x, state, normalised) is None
    assert len(kernel_calls) == 2


# ---- cells -------------------------------------------------------------------------------

CELL_CASES = {
    "lstm": lambda: rnnkit.LSTMCell(6, 10),
    "lstm-peephole-proj": lambda: rnnkit.LSTMCell(6, 10, proj_size=4, peephole=True),
    "gru": lambda: rnnkit.GRUCell(6, 10),
    "gru-reset-before": lambda: rnnkit.GRUCell(6, 10, reset_after=False),
    "rnn-relu": lambda: rnnkit.RNNCell(6, 10, nonlinearity="relu"),
}


def _cell_state(cell, batch):
    h = torch.randn(batch, cell.output_size)
    return (h, torch.randn(batch, cell.hidden_size)) if isinstance(cell, rnnkit.LSTMCell) else h


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("name", list(CELL_CASES))
def test_a_cell_step_without_gradients_runs_the_kernels_and_equals_the_reference(
        name, with_state, kernel_calls):
    torch.manual_seed(0)
    cell = CELL_CASES[name]()
    x = torch.randn(3, 6)
    hx = _cell_state(cell, 3) if with_state else None
    with torch.no_grad():
        fast = cell(x, hx)
        assert len(kernel_calls) == 1
        cell.backend = "reference"
        slow = cell(x, hx)
    assert len(kernel_calls) == 1
    assert_close(fast, slow)


def test_a_cell_takes_the_general_way_when_the_kernels_do_not_apply(kernel_calls):
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    cell = rnnkit.LSTMCell(6, 10)
    h, c = cell(x)  # weights that require grad, grad mode on: the operators, with autograd
    assert h.requires_grad and not kernel_calls
    with torch.no_grad():
        cell(x.unsqueeze(0)[0])  # batched, fine
        assert len(kernel_calls) == 1
        cell(x[0])  # unbatched: the general way, whose one-step sequence takes the kernels
        assert len(kernel_calls) == 2
        cell(x, (h.detach().t().contiguous().t(), c.detach()))  # a strided h: the operators
    assert len(kernel_calls) == 2
    dropped = rnnkit.LSTMCell(6, 10, recurrent_dropout=0.5)
    zoned = rnnkit.LSTMCell(6, 10, zoneout=0.2).eval()
    normed = rnnkit.LSTMCell(6, 10, layer_norm=True)
    with torch.no_grad():
        dropped(x)  # training: a mask to draw
        zoned(x)  # zoneout's expectation in evaluation
        normed(x)
        assert len(kernel_calls) == 2
        dropped.eval()(x)  # recurrent dropout is the identity in evaluation
    assert len(kernel_calls) == 3


def test_wrong_input_on_the_short_way_still_gets_the_named_error():
    cell = rnnkit.LSTMCell(6, 10)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"LSTMCell hx\[0\] \(h\) must have shape"):
            cell(torch.randn(3, 6), (torch.randn(3, 9), torch.randn(3, 10)))
        with pytest.raises(TypeError, match="LSTMCell input has dtype torch.float64"):
            cell(torch.randn(3, 6, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"LSTMCell input must have shape \(N, 6\)"):
            cell(torch.randn(3, 7))


def test_a_parametrized_weight_is_the_one_the_short_way_uses(kernel_calls):
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(4, 6, dtype=torch.float64)
    nn.utils.parametrizations.weight_norm(cell, "weight_hh")
    with torch.no_grad():
        cell.parametrizations.weight_hh.original0.mul_(3.0)
    reference_cell = nn.LSTMCell(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference_cell, name).copy_(getattr(cell, name))
        x = torch.randn(3, 4, dtype=torch.float64)
        for got, want in zip(cell(x), reference_cell(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert len(kernel_calls) == 1


# ---- layers ------------------------------------------------------------------------------

LAYER_CASES = {
    "lstm-2": lambda: rnnkit.LSTM(5, 12, num_layers=2),
    "lstm-proj-peephole": lambda: rnnkit.LSTM(5, 12, proj_size=6, peephole=True),
    "lstm-batch-first": lambda: rnnkit.LSTM(5, 12, batch_first=True),
    "gru-2": lambda: rnnkit.GRU(5, 12, num_layers=2),
    "gru-reset-before": lambda: rnnkit.GRU(5, 12, reset_after=False),
    "rnn-relu-3": lambda: rnnkit.RNN(5, 12, num_layers=3, nonlinearity="relu"),
}


def _layer_state(layer, batch, generator):
    h = torch.randn(layer.num_layers, batch, layer.output_size, generator=generator)
    if isinstance(layer, rnnkit.LSTM):
        return h, torch.randn(layer.num_layers, batch, layer.hidden_size, generator=generator)
    return h


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_a_stream_equals_forward_on_the_whole_sequence(name, with_state, kernel_calls):
    torch.manual_seed(0)
    layer = LAYER_CASES[name]().eval()
    generator = torch.Generator().manual_seed(2)
    steps = torch.randn(7, 3, 5, generator=generator)  # (T, N, I)
    hx = _layer_state(layer, 3, generator) if with_state else None
    sequence = steps.transpose(0, 1) if layer.batch_first else steps
    with torch.no_grad():
        expected, expected_state = layer(sequence, hx)
        stream = layer.stream(hx)
        assert stream.state is None
        outputs = torch.stack([stream(x) for x in steps], dim=1 if layer.batch_first else 0)
    assert_close(outputs, expected)
    assert_close(stream.state, expected_state)
    # every step is one kernel call per layer (the first through forward's checks)
    assert len(kernel_calls) == 7 * layer.num_layers


def test_an_unbatched_stream_and_a_learned_initial_state():
    torch.manual_seed(0)
    layer = rnnkit.GRU(5, 8, num_layers=2, learn_initial_state=True).eval()
    with torch.no_grad():
        layer.h0.normal_()
        steps = torch.randn(4, 5)  # (T, I) unbatched
        expected, expected_state = layer(steps)
        stream = layer.stream()
        outputs = torch.stack([stream(x) for x in steps])
    assert outputs.shape == (4, 8) and stream.state.shape == (2, 8)
    assert_close(outputs, expected)
    assert_close(stream.state, expected_state)


def test_a_stream_with_gradients_or_in_training_runs_forward_and_differentiates(kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 8, num_layers=2, dropout=0.5)
    steps = torch.randn(4, 2, 5)
    layer.eval()
    expected, _ = layer(steps)
    stream = layer.stream()
    outputs = torch.stack([stream(x) for x in steps])  # grad mode: forward, recorded
    torch.testing.assert_close(outputs, expected, rtol=2e-6, atol=2e-6)
    (grad_stream,) = torch.autograd.grad(outputs.sum(), layer.weight_hh_l0)
    (grad_forward,) = torch.autograd.grad(expected.sum(), layer.weight_hh_l0)
    torch.testing.assert_close(grad_stream, grad_forward, rtol=1e-5, atol=1e-6)
    layer.train()  # dropout between layers: forward draws a mask per call, as the stream does
    with torch.no_grad():
        stream, state = layer.stream(), None
        for seed, x in enumerate(steps):
            torch.manual_seed(seed)
            streamed = stream(x)
            torch.manual_seed(seed)
            output, new_state = layer(x.unsqueeze(0), state)
            torch.testing.assert_close(streamed, output[0], rtol=0, atol=0)
            evaluated = layer.eval()(x.unsqueeze(0), state)[0][0]
            assert not torch.equal(output[0], evaluated)  # the dropout did act
            layer.train()
            state = new_state


def test_the_output_is_not_the_state_the_stream_keeps():
    layer = rnnkit.RNN(3, 4).eval()
    with torch.no_grad():
        stream = layer.stream()
        stream(torch.randn(1, 3))
        y = stream(torch.randn(1, 3))
        kept = stream.state.clone()
        y.zero_()
        torch.testing.assert_close(stream.state, kept, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_a_one_step_layer_call_with_a_state_takes_the_short_way(name, kernel_calls,
                                                                   monkeypatch):
    # forward on a one-step sequence from a given state, nothing to differentiate: the stack
    # on the step kernels (`kept_step_kernels`), none of the general path's preparation.
    torch.manual_seed(0)
    layer = LAYER_CASES[name]().eval()
    generator = torch.Generator().manual_seed(3)
    hx = _layer_state(layer, 3, generator)
    x = torch.randn(3, 1, 5, generator=generator)
    x = x if layer.batch_first else x.transpose(0, 1)
    with torch.no_grad():
        expected = reference_layer(layer)(x, hx)
        general = layer(x, hx, [1, 1, 1])  # lengths: the general path
        calls_before = len(kernel_calls)
        monkeypatch.setattr(layer, "_prepare_input", None)  # the short way never calls it
        output, state = layer(x, hx)
    assert len(kernel_calls) - calls_before == layer.num_layers
    assert output.shape == expected[0].shape
    assert_close((output, *state) if isinstance(state, tuple) else (output, state),
                 (expected[0], *expected[1]) if isinstance(state, tuple)
                 else (expected[0], expected[1]))
    torch.testing.assert_close((output, state), general, rtol=0, atol=0)
    kept = [s.clone() for s in (state if isinstance(state, tuple) else (state,))]
    output.zero_()  # the output is not the returned state
    torch.testing.assert_close(list(state if isinstance(state, tuple) else (state,)), kept,
                               rtol=0, atol=0)


def reference_layer(layer):
    """A copy of ``layer`` on the reference engine."""
    twin = copy.deepcopy(layer)
    twin.backend = "reference"
    return twin


def test_a_one_step_layer_call_off_the_short_way_is_the_general_path(kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 8, num_layers=2).eval()
    x, h, c = torch.randn(1, 2, 5), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    with torch.no_grad():
        expected = reference_layer(layer)(x, (h, c))
        for hx in ([h, c], (h, c)):  # a list: the general path, the same numbers
            assert_close(layer(x, hx)[1], expected[1])
        # a wrong state keeps the general path's named error
        with pytest.raises(ValueError, match=r"LSTM hx\[1\] \(c_0\) must have shape"):
            layer(x, (h, c[:, :1]))
        with pytest.raises(TypeError, match=r"LSTM hx must be a tuple \(h_0, c_0\)"):
            layer(x, h)
        with pytest.raises(ValueError, match=r"LSTM input must have"):
            layer(torch.randn(1, 2, 6), (h, c))
    calls = len(kernel_calls)
    output, _ = layer(x, (h, c))  # gradients to record: forward's operators, differentiable
    assert output.grad_fn is not None and len(kernel_calls) == calls
    assert_close(output, expected[0])


def test_stream_errors_name_the_argument_and_value():
    layer = rnnkit.LSTM(5, 8)
    with pytest.raises(ValueError, match="LSTM.stream needs a unidirectional layer"):
        rnnkit.LSTM(5, 8, bidirectional=True).stream()
    stream = layer.eval().stream()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"LSTM stream input must have shape .*got \(2, 6\)"):
            stream(torch.randn(2, 6))
        with pytest.raises(TypeError, match="LSTM stream input must be a"):
            stream([1.0] * 5)
        stream(torch.randn(2, 5))
        with pytest.raises(ValueError, match=r"keep the shape of the stream's first step, "
                                             r"\(2, 5\); got \(3, 5\)"):
            stream(torch.randn(3, 5))
        with pytest.raises(ValueError, match=r"LSTM hx\[0\] \(h_0\) must have shape"):
            layer.stream((torch.zeros(1, 3, 8), torch.zeros(1, 2, 8)))(torch.randn(2, 5))


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
def test_a_compiled_cell_step_traces_whole_and_equals_eager(with_state, kernel_calls):
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(4, 6)
    compiled = torch.compile(cell, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4)
    hx = (torch.randn(2, 6), torch.randn(2, 6)) if with_state else None
    with torch.no_grad():
        got = compiled(x, hx)
        assert not kernel_calls  # compiled: the operators, not the eager short way
        want = cell(x, hx)
    assert_close(got, want)


# ---- sLSTM: the cell, a one-step layer call and SLSTM.stream() on its step kernel ---------

@pytest.fixture
def slstm_kernel_calls(monkeypatch):
    """How many times the sLSTM step kernel ran (each call: one layer, one step)."""
    return spy_on_kernels(monkeypatch, "slstm_step")


SLSTM_LAYER_CASES = {
    "one-head": lambda dtype: rnnkit.SLSTM(5, 12, dtype=dtype),
    "four-heads-2-layers": lambda dtype: rnnkit.SLSTM(5, 12, num_layers=2, num_heads=4,
                                                      dtype=dtype),
    "exp-forget-batch-first": lambda dtype: rnnkit.SLSTM(5, 12, num_heads=3, batch_first=True,
                                                         forget_gate="exp", dtype=dtype),
    "no-bias-3-layers": lambda dtype: rnnkit.SLSTM(5, 12, num_layers=3, num_heads=2,
                                                   bias=False, dtype=dtype),
}


def _slstm_state(layer, batch, generator, dtype):
    """A reachable state (|c| <= n, n >= 1), one row without normaliser mass (n = 0: m is taken
    as -inf there, whatever it holds)."""
    shape = (layer.num_layers, batch, layer.hidden_size)
    n = 1 + torch.rand(shape, generator=generator, dtype=dtype)
    c = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * n
    h = torch.randn(shape, generator=generator, dtype=dtype).tanh() * 0.5
    m = torch.randn(shape, generator=generator, dtype=dtype)
    n[:, 0], c[:, 0], h[:, 0] = 0.0, 0.0, 0.0
    return h, c, n, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("name", list(SLSTM_LAYER_CASES))
def test_an_slstm_stream_equals_forward_on_the_whole_sequence(name, with_state, dtype,
                                                              slstm_kernel_calls):
    torch.manual_seed(0)
    layer = SLSTM_LAYER_CASES[name](dtype).eval()
    generator = torch.Generator().manual_seed(2)
    steps = torch.randn(9, 3, 5, generator=generator, dtype=dtype)  # (T, N, I)
    hx = _slstm_state(layer, 3, generator, dtype) if with_state else None
    sequence = steps.transpose(0, 1) if layer.batch_first else steps
    with torch.no_grad():
        expected, expected_state = layer(sequence, hx)  # the native sequence loop
        assert not slstm_kernel_calls
        stream = layer.stream(hx)
        assert stream.state is None
        outputs = torch.stack([stream(x) for x in steps], dim=1 if layer.batch_first else 0)
    assert_close(outputs, expected)
    assert_close(stream.state, expected_state)
    # every step is one kernel call per layer (the first through forward's checks)
    assert len(slstm_kernel_calls) == 9 * layer.num_layers


def test_an_unbatched_slstm_stream_and_a_one_step_layer_call(slstm_kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.SLSTM(5, 8, num_layers=2, num_heads=2).eval()
    steps = torch.randn(4, 5)  # (T, I) unbatched
    with torch.no_grad():
        expected, expected_state = layer(steps)
        stream = layer.stream()
        outputs = torch.stack([stream(x) for x in steps])
        assert len(slstm_kernel_calls) == 4 * 2
        assert outputs.shape == (4, 8) and all(s.shape == (2, 8) for s in stream.state)
        assert_close(outputs, expected)
        assert_close(stream.state, expected_state)
        state = None
        for t, x in enumerate(steps):  # forward on one step at a time, the state carried
            output, state = layer(x.unsqueeze(0), state)
            assert_close(output[0], expected[t])
        assert len(slstm_kernel_calls) == 2 * 4 * 2
        assert_close(state, expected_state)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_an_slstm_cell_step_without_gradients_runs_the_kernel(forget_gate, slstm_kernel_calls):
    """The cell's short way (batched input, state None or of its shapes) and its general way
    (unbatched; a list for hx) take the kernel; each equals the reference step."""
    torch.manual_seed(0)
    cell = rnnkit.SLSTMCell(6, 12, num_heads=4, forget_gate=forget_gate, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih)
    exp_forget = forget_gate == "exp"
    with torch.no_grad():
        state = cell(x)
        empty = (torch.zeros(3, 12, dtype=torch.float64),) * 3 + (
            torch.full((3, 12), float("-inf"), dtype=torch.float64),)
        assert_close(state, rnnkit.engine.slstm.step(x, empty, *weights, exp_forget))
        again = cell(x, state)
        assert_close(again, rnnkit.engine.slstm.step(x, state, *weights, exp_forget))
        assert_close(cell(x, list(state)), again)
        assert_close(cell(x[1], tuple(s[1] for s in state)), tuple(s[1] for s in again))
    assert len(slstm_kernel_calls) == 4


def test_the_slstm_step_kernel_is_declined_where_it_does_not_apply(monkeypatch,
                                                                   slstm_kernel_calls):
    torch.manual_seed(0)
    cell = rnnkit.SLSTMCell(6, 8, num_heads=2)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih)
    x = torch.randn(2, 6)
    state = tuple(part.detach() for part in cell(x))  # grad mode, weights needing grad
    assert state[0].requires_grad is False and not slstm_kernel_calls
    step = rnnkit.engine.slstm_inference_step
    with torch.no_grad():
        assert step(x, state, *weights, False) is not None
        assert step(x, state, *weights, False, "reference") is None
        assert step(x, state, *weights, False, "fused") is None
        monkeypatch.setenv("RNNKIT_BACKEND", "fused")
        assert step(x, state, *weights, False, "auto") is None
        cell(x, state)  # the cell follows the environment too: its autograd step
        monkeypatch.delenv("RNNKIT_BACKEND")
        assert step(torch.randn(2, 12)[:, ::2], state, *weights, False) is None  # strided
        assert step(x.double(), state, *weights, False) is None  # dtypes differ
        big = rnnkit.engine.SLSTM_STEP_KERNEL_MAX_BATCH + 1
        big_state = tuple(s[:1].expand(big, -1).contiguous() for s in state)
        assert step(x[:1].expand(big, -1).contiguous(), big_state, *weights, False) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert step(x, state, *weights, False) is None
    assert step(x, state, *weights, False) is None  # grad mode: weights to differentiate
    assert len(slstm_kernel_calls) == 1
    layer = rnnkit.SLSTM(6, 8, num_layers=2, dropout=0.5, backend="fused")
    with torch.no_grad():
        layer(x.unsqueeze(0))  # backend="fused": its operator
        assert len(slstm_kernel_calls) == 1
        layer.backend = "auto"
        # Training with dropout between layers: each stream step is forward's (a mask drawn
        # per call, as forward draws it), whose one-step layers then take the kernel.
        stream, state = layer.stream(), None
        for seed in range(3):
            torch.manual_seed(seed)
            streamed = stream(x)
            torch.manual_seed(seed)
            output, new_state = layer(x.unsqueeze(0), state)
            torch.testing.assert_close(streamed, output[0], rtol=0, atol=0)
            assert not torch.equal(output[0], layer.eval()(x.unsqueeze(0), state)[0][0])
            layer.train()
            state = new_state
    assert len(slstm_kernel_calls) == 1 + 3 * 3 * 2


@pytest.mark.parametrize("name", list(SLSTM_LAYER_CASES))
def test_a_one_step_slstm_call_takes_the_short_way(name, slstm_kernel_calls, monkeypatch):
    # forward on a one-step sequence, nothing to differentiate: the stack on the step kernel
    # (`kept_step_kernels`), none of the general path's preparation; the same numbers as
    # the general path (full lengths, which forward drops: its streamed step).
    torch.manual_seed(0)
    layer = SLSTM_LAYER_CASES[name](torch.float64).eval()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 5, generator=generator, dtype=torch.float64)
    x = x if layer.batch_first else x.transpose(0, 1)
    for hx in (_slstm_state(layer, 3, generator, torch.float64), None):
        with torch.no_grad():
            reference = copy.deepcopy(layer)
            reference.backend = "reference"
            expected = reference(x, hx)
            general = layer(x, hx, [1, 1, 1])
            calls_before = len(slstm_kernel_calls)
            with monkeypatch.context() as patch:
                patch.setattr(layer, "_prepare", None)  # the short way never calls it
                output, state = layer(x, hx)
        assert len(slstm_kernel_calls) - calls_before == layer.num_layers
        assert output.shape == expected[0].shape
        assert_close((output, *state), (expected[0], *expected[1]))
        torch.testing.assert_close((output, state), general, rtol=0, atol=0)
        kept = [part.clone() for part in state]
        output.zero_()  # the output is not the returned state
        torch.testing.assert_close(list(state), kept, rtol=0, atol=0)


def test_a_one_step_slstm_call_off_the_short_way_is_the_general_path(slstm_kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.SLSTM(5, 8, num_layers=2, num_heads=2).eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5)
    hx = _slstm_state(layer, 2, generator, torch.float32)
    with torch.no_grad():
        expected = layer(x, hx)
        # a list: the general path (whose one-step layers take the kernel), the same numbers
        torch.testing.assert_close(layer(x, list(hx)), expected, rtol=0, atol=0)
        # a wrong state keeps the general path's named error
        with pytest.raises(ValueError, match=r"SLSTM hx \(c_0\) must have shape"):
            layer(x, (hx[0], hx[1][:, :1], hx[2], hx[3]))
        with pytest.raises(TypeError, match=r"SLSTM hx must be a tuple \(h_0, c_0, n_0, m_0\)"):
            layer(x, hx[0])
        with pytest.raises(TypeError, match=r"SLSTM hx \(m_0\) has dtype torch.float64"):
            layer(x, (*hx[:3], hx[3].double()))
        with pytest.raises(ValueError, match=r"SLSTM input must have"):
            layer(torch.randn(1, 2, 6), hx)
    calls = len(slstm_kernel_calls)
    output, _ = layer(x, hx)  # gradients to record: forward's operators, differentiable
    assert output.grad_fn is not None and len(slstm_kernel_calls) == calls
    assert_close(output.detach(), expected[0])


def test_an_slstm_stream_with_gradients_runs_forward_and_differentiates(slstm_kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.SLSTM(5, 8, num_layers=2, num_heads=2).eval()
    steps = torch.randn(4, 2, 5)
    expected, _ = layer(steps)
    stream = layer.stream()
    outputs = torch.stack([stream(x) for x in steps])  # grad mode: forward, recorded
    assert not slstm_kernel_calls
    torch.testing.assert_close(outputs, expected, rtol=2e-6, atol=2e-6)
    (grad_stream,) = torch.autograd.grad(outputs.sum(), layer.weight_hh_l1)
    (grad_forward,) = torch.autograd.grad(expected.sum(), layer.weight_hh_l1)
    torch.testing.assert_close(grad_stream, grad_forward, rtol=1e-5, atol=1e-6)


def test_slstm_stream_and_cell_errors_name_the_argument():
    with pytest.raises(ValueError, match="SLSTM.stream needs a unidirectional layer"):
        rnnkit.SLSTM(5, 8, bidirectional=True).stream()
    layer = rnnkit.SLSTM(5, 8).eval()
    cell = rnnkit.SLSTMCell(5, 8)
    stream = layer.stream()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"SLSTM stream input must have shape .*got \(2, 6\)"):
            stream(torch.randn(2, 6))
        stream(torch.randn(2, 5))
        with pytest.raises(ValueError, match=r"keep the shape of the stream's first step"):
            stream(torch.randn(3, 5))
        with pytest.raises(ValueError, match=r"SLSTM hx \(c_0\) must have shape"):
            layer.stream((torch.zeros(1, 2, 8), torch.zeros(1, 3, 8), torch.zeros(1, 2, 8),
                          torch.zeros(1, 2, 8)))(torch.randn(2, 5))
        # the cell's short way declines a wrong input; the general way names it
        with pytest.raises(ValueError, match=r"SLSTMCell input must have shape \(N, 5\)"):
            cell(torch.randn(3, 7))
        with pytest.raises(ValueError, match=r"SLSTMCell hx \(m_0\) must have shape"):
            cell(torch.randn(3, 5), (torch.zeros(3, 8),) * 3 + (torch.zeros(2, 8),))
        with pytest.raises(TypeError, match="SLSTMCell input has dtype torch.float64"):
            cell(torch.randn(3, 5, dtype=torch.float64))


# ---- minGRU and minLSTM: the cells, a one-step layer call and stream() on their step kernel --

@pytest.fixture
def min_kernel_calls(monkeypatch):
    """How many times the minimal step kernel ran (each call: one layer, one step)."""
    return spy_on_kernels(monkeypatch, "min_step")


MIN_CELLS = {"mingru": rnnkit.MinGRUCell, "minlstm": rnnkit.MinLSTMCell}


def _min_cell(family, log_space, dtype, bias=True):
    """A cell of odd sizes (I = 7, H = 37: a partial vector and block) with weights x3, so the
    gates reach well into their tails."""
    torch.manual_seed(1)
    cell = MIN_CELLS[family](7, 37, bias=bias, log_space=log_space, dtype=dtype)
    with torch.no_grad():
        for parameter in cell.parameters():
            parameter.mul_(3.0)
    return cell


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MIN_CELLS))
def test_a_minimal_cell_step_without_gradients_runs_the_kernel(family, log_space, dtype,
                                                                 min_kernel_calls):
    """The cell's short way (batched, hx None or of its shape) and its general way (unbatched;
    a strided hx) take the kernel once per call, and equal the reference step (`scan.step`)
    within 1e-5 (float32) / 1e-10 (float64) of the largest entry, batches 1-5, with and
    without a bias."""
    generator = torch.Generator().manual_seed(2)
    for bias in (True, False):
        cell = _min_cell(family, log_space, dtype, bias)
        weights = (cell.weight_ih, cell.bias_ih)
        for batch in range(1, 6):
            x = torch.randn(batch, 7, generator=generator, dtype=dtype)
            h = torch.rand(batch, 37, generator=generator, dtype=dtype) * 4 - (
                0 if log_space else 2)
            calls = len(min_kernel_calls)
            with torch.no_grad():
                got = {"nohx": cell(x), "hx": cell(x, h),
                       "strided": cell(x, h.t().contiguous().t()),
                       "unbatched": cell(x[0], h[0]).unsqueeze(0)}
                want = {"nohx": scan.step(cell.family, x, torch.zeros_like(h), *weights,
                                          log_space),
                        "hx": scan.step(cell.family, x, h, *weights, log_space)}
            want["strided"], want["unbatched"] = want["hx"], want["hx"][:1]
            assert len(min_kernel_calls) - calls == 4
            assert_same_normwise(got, want, dtype, group="minimal cell step")


def test_a_minimal_cell_falls_back_to_autograd_with_the_same_results(min_kernel_calls):
    """With something to differentiate, and wherever the kernel does not apply (bfloat16,
    more rows than `MIN_STEP_KERNEL_MAX_BATCH`), the step is the reference's on autograd:
    exactly `scan.step`'s values, its gradients, and the kernel's values within the
    tolerance. Under autocast a float32 cell computes in float32 (the families' rule), there
    on the kernel."""
    for family in MIN_CELLS:
        cell = _min_cell(family, True, torch.float64)
        x = torch.randn(3, 7, dtype=torch.float64)
        h = torch.rand(3, 37, dtype=torch.float64)
        recorded = cell(x, h)  # grad mode, weights requiring grad
        assert recorded.grad_fn is not None and not min_kernel_calls
        want = scan.step(cell.family, x, h, cell.weight_ih, cell.bias_ih, True)
        torch.testing.assert_close(recorded, want, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(recorded.sum(), cell.weight_ih)
        (want_grad,) = torch.autograd.grad(want.sum(), cell.weight_ih)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
        with torch.no_grad():
            kernel = cell(x, h)
            assert len(min_kernel_calls) == 1
        assert_same_normwise({"h": kernel}, {"h": recorded.detach()}, torch.float64)
        min_kernel_calls.clear()
    cell = rnnkit.MinGRUCell(7, 37)
    big = engine.MIN_STEP_KERNEL_MAX_BATCH + 1
    with torch.no_grad():
        x = torch.randn(big, 7)
        torch.testing.assert_close(cell(x), scan.step(cell.family, x, torch.zeros(big, 37),
                                                      cell.weight_ih, cell.bias_ih, False),
                                   rtol=0, atol=0)
        low = rnnkit.MinGRUCell(7, 37, dtype=torch.bfloat16)
        low(x[:2].bfloat16())
        assert not min_kernel_calls
        plain = cell(x[:2])
        assert len(min_kernel_calls) == 1
        # autocast: the families' rule (float32 parameters compute in float32, autocast off),
        # then the kernel: the same float32 result
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(cell(x[:2].bfloat16()), cell(x[:2].bfloat16().float()),
                                       rtol=0, atol=0)
        assert len(min_kernel_calls) == 3
    assert not torch.equal(plain, cell(x[:2].bfloat16().float()))  # rounded input: a check


def test_minimal_cell_errors_keep_their_names_on_the_short_way(min_kernel_calls):
    cell = rnnkit.MinLSTMCell(5, 8, log_space=True)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"MinLSTMCell input must have shape \(N, 5\)"):
            cell(torch.randn(3, 7))
        with pytest.raises(ValueError, match=r"MinLSTMCell hx must have shape \(N, H\) = "
                                             r"\(3, 8\), got \(2, 8\)"):
            cell(torch.randn(3, 5), torch.zeros(2, 8))
        with pytest.raises(TypeError, match=r"MinLSTMCell hx has dtype torch.float64"):
            cell(torch.randn(3, 5), torch.zeros(3, 8, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"MinLSTMCell hx must be a Tensor"):
            cell(torch.randn(3, 5), [torch.zeros(3, 8)])
        negative = torch.zeros(3, 8)
        negative[2, 7] = -0.5
        # the kernel declines a negative log-space state; the general way names it
        with pytest.raises(ValueError, match=r"MinLSTMCell hx must be >= 0 everywhere "
                                             r"\(log_space=True keeps h >= 0.*minimum of -0.5"):
            cell(torch.randn(3, 5), negative)
    assert len(min_kernel_calls) == 1  # the declined call


MIN_LAYER_CASES = {
    "mingru": lambda dtype: rnnkit.MinGRU(5, 12, dtype=dtype),
    "minlstm-2-layers": lambda dtype: rnnkit.MinLSTM(5, 12, num_layers=2, dtype=dtype),
    "mingru-log-space-batch-first": lambda dtype: rnnkit.MinGRU(
        5, 12, num_layers=2, batch_first=True, log_space=True, dtype=dtype),
    "minlstm-log-space-no-bias-3-layers": lambda dtype: rnnkit.MinLSTM(
        5, 12, num_layers=3, bias=False, log_space=True, dtype=dtype),
}


def _min_layer_state(layer, batch, generator, dtype):
    h = torch.randn(layer.num_layers, batch, layer.hidden_size, generator=generator, dtype=dtype)
    return h.abs() if layer.log_space else h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("name", list(MIN_LAYER_CASES))
def test_a_minimal_stream_equals_forward_on_the_whole_sequence(name, with_state, dtype,
                                                               min_kernel_calls):
    torch.manual_seed(0)
    layer = MIN_LAYER_CASES[name](dtype).eval()
    generator = torch.Generator().manual_seed(2)
    steps = torch.randn(9, 3, 5, generator=generator, dtype=dtype)  # (T, N, I)
    hx = _min_layer_state(layer, 3, generator, dtype) if with_state else None
    sequence = steps.transpose(0, 1) if layer.batch_first else steps
    with torch.no_grad():
        expected, expected_state = layer(sequence, hx)  # the native sequence loop
        assert not min_kernel_calls
        stream = layer.stream(hx)
        assert stream.state is None
        outputs = torch.stack([stream(x) for x in steps], dim=1 if layer.batch_first else 0)
    assert_close(outputs, expected)
    assert_close(stream.state, expected_state)
    assert stream.state.shape == (layer.num_layers, 3, 12)
    # every step is one kernel call per layer (the first through forward's checks)
    assert len(min_kernel_calls) == 9 * layer.num_layers


def test_an_unbatched_minimal_stream_and_one_step_layer_calls(min_kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.MinLSTM(5, 8, num_layers=2, log_space=True).eval()
    steps = torch.randn(4, 5)  # (T, I) unbatched
    with torch.no_grad():
        expected, expected_state = layer(steps)
        stream = layer.stream()
        outputs = torch.stack([stream(x) for x in steps])
        assert len(min_kernel_calls) == 4 * 2
        assert outputs.shape == (4, 8) and stream.state.shape == (2, 8)
        assert_close(outputs, expected)
        assert_close(stream.state, expected_state)
        state = None
        for t, x in enumerate(steps):  # forward on one step at a time, the state carried
            output, state = layer(x.unsqueeze(0), state)
            assert_close(output[0], expected[t])
        assert len(min_kernel_calls) == 2 * 4 * 2
        assert_close(state, expected_state)
        kept = stream.state.clone()
        stream(steps[0]).zero_()  # the output is not the state the stream keeps
        assert torch.equal(stream.state[0], layer(steps[:1], kept)[1][0])


@pytest.mark.parametrize("name", list(MIN_LAYER_CASES))
def test_a_one_step_minimal_layer_call_takes_the_short_way(name, min_kernel_calls,
                                                          monkeypatch):
    # forward on a one-step sequence, nothing to differentiate: the stack on the step kernel
    # (`kept_step_kernels`), none of the general path's preparation; the same numbers as
    # the general path (lengths: full, which forward drops, so its streamed step).
    torch.manual_seed(0)
    layer = MIN_LAYER_CASES[name](torch.float64).eval()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 5, generator=generator, dtype=torch.float64)
    x = x if layer.batch_first else x.transpose(0, 1)
    for hx in (_min_layer_state(layer, 3, generator, torch.float64), None):
        with torch.no_grad():
            reference = copy.deepcopy(layer)
            reference.backend = "reference"
            expected = reference(x, hx)
            general = layer(x, hx, [1, 1, 1])
            calls_before = len(min_kernel_calls)
            with monkeypatch.context() as patch:
                patch.setattr(layer, "_prepare", None)  # the short way never calls it
                output, state = layer(x, hx)
        assert len(min_kernel_calls) - calls_before == layer.num_layers
        assert_close((output, state), expected)
        torch.testing.assert_close((output, state), general, rtol=0, atol=0)
        kept = state.clone()
        output.zero_()  # the output is not the returned state
        torch.testing.assert_close(state, kept, rtol=0, atol=0)


def test_minimal_streams_and_one_step_calls_fall_back_and_keep_their_errors(min_kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.MinGRU(5, 8, num_layers=2, log_space=True).eval()
    x, h = torch.randn(1, 2, 5), torch.rand(2, 2, 8)
    with torch.no_grad():
        expected = layer(x, h)
    calls = len(min_kernel_calls)
    output, state = layer(x, h)  # grad mode: forward's operators, differentiable
    assert output.grad_fn is not None and len(min_kernel_calls) == calls
    assert_close((output.detach(), state.detach()), expected)
    stream = layer.stream(h)
    streamed = stream(x[0])
    assert streamed.grad_fn is not None and len(min_kernel_calls) == calls
    (grad,) = torch.autograd.grad(streamed.sum(), layer.weight_ih_l1)
    (want,) = torch.autograd.grad(output.sum(), layer.weight_ih_l1)
    torch.testing.assert_close(grad, want)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"MinGRU hx \(h_0\) must be >= 0 everywhere"):
            layer(x, -h)  # the kernel declines it, the general path names it
        with pytest.raises(ValueError, match=r"MinGRU hx \(h_0\) must be >= 0 everywhere"):
            layer.stream(-h)(x[0])
        with pytest.raises(ValueError, match=r"MinGRU hx \(h_0\) must have shape "
                                             r"\(D\*num_layers, N, H\) = \(2, 2, 8\)"):
            layer(x, h[:1])
        with pytest.raises(TypeError, match=r"MinGRU hx \(h_0\) has dtype torch.float64"):
            layer(x, h.double())
        with pytest.raises(ValueError, match=r"MinGRU input must have shape"):
            layer(torch.randn(1, 2, 6), h)
        with pytest.raises(ValueError, match=r"MinGRU stream input must have shape .*got "
                                             r"\(2, 6\)"):
            layer.stream()(torch.randn(2, 6))
        with pytest.raises(ValueError, match="MinGRU.stream needs a unidirectional layer"):
            rnnkit.MinGRU(5, 8, bidirectional=True).stream()
        # training with dropout between layers: forward's step, its mask drawn per call
        dropped = rnnkit.MinLSTM(5, 8, num_layers=2, dropout=0.5)
        calls = len(min_kernel_calls)
        torch.manual_seed(0)
        streamed = dropped.stream()(x[0])
        torch.manual_seed(0)
        torch.testing.assert_close(streamed, dropped(x)[0][0], rtol=0, atol=0)
        assert not torch.equal(streamed, dropped.eval()(x)[0][0])
    # in training the stack is forward's (a mask between layers), whose one-step layers each
    # take the kernel: two calls of two layers; in evaluation the short way's two
    assert len(min_kernel_calls) - calls == 2 * 2 + 2


# ---- a stream's kept kernels (`LayerStream._kernel_step`): bound once, dropped when stale ------

KEPT_KERNEL_LAYERS = {
    "lstm-2-layers": lambda: rnnkit.LSTM(5, 12, num_layers=2, dropout=0.3),
    "gru": lambda: rnnkit.GRU(5, 12),
    "rnn-relu": lambda: rnnkit.RNN(5, 12, nonlinearity="relu"),
    "slstm-2-layers": lambda: rnnkit.SLSTM(5, 12, num_layers=2, num_heads=3, dropout=0.3),
    "minlstm-2-layers": lambda: rnnkit.MinLSTM(5, 12, num_layers=2, dropout=0.3),
}


def _first_matrix_name(layer: nn.Module) -> str:
    return next(name for name, p in layer.named_parameters() if p.dim() == 2)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _replace_a_parameter(layer, monkeypatch):
    name = _first_matrix_name(layer)
    setattr(layer, name, nn.Parameter(torch.randn_like(getattr(layer, name))))


def _change_in_place(layer, monkeypatch):
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(-0.5)  # what an optimiser step does between two streamed steps


def _parametrize(layer, monkeypatch):
    nn.utils.parametrize.register_parametrization(layer, _first_matrix_name(layer), _Doubled())


def _train_mode(layer, monkeypatch):
    layer.train()  # dropout between the layers (where there are two)


def _force_fused(layer, monkeypatch):
    monkeypatch.setenv("RNNKIT_BACKEND", "fused")


LAYER_CHANGES = {"parameter-replaced": _replace_a_parameter, "changed-in-place": _change_in_place,
                 "parametrized": _parametrize, "train-mode": _train_mode,
                 "backend-forced": _force_fused}


@pytest.mark.parametrize("change", list(LAYER_CHANGES))
@pytest.mark.parametrize("name", list(KEPT_KERNEL_LAYERS))
def test_a_stream_follows_its_layer_changed_between_steps(name, change, monkeypatch):
    # Every step equals forward on the one-step sequence from the stream's state, before and
    # after the layer changes under a stream whose kernels are kept.
    torch.manual_seed(0)
    layer = KEPT_KERNEL_LAYERS[name]().eval()
    xs = torch.randn(7, 3, 5)
    stream = layer.stream()
    with torch.no_grad():
        for step, x in enumerate(xs):
            if step == 3:
                LAYER_CHANGES[change](layer, monkeypatch)
            state = stream.state
            torch.manual_seed(step)  # the same dropout masks for both, in training
            want = (reference_layer(layer)(x.unsqueeze(0), state)[0][0] if state is not None
                    else None)
            torch.manual_seed(step)
            got = stream(x)
            if want is not None:
                assert_close(got, want)


def _count_binds(layer: nn.Module, monkeypatch) -> list:
    """A list that grows by one each time ``layer`` binds its step kernels."""
    bound = []
    real = type(layer)._step_kernels

    def counted(self, *arguments):
        if self is layer:  # not its copies
            bound.append(1)
        return real(self, *arguments)
    monkeypatch.setattr(type(layer), "_step_kernels", counted)
    return bound


def test_a_stream_binds_its_kernels_once_and_calls_them_every_step(monkeypatch, kernel_calls):
    layer = rnnkit.LSTM(5, 12, num_layers=2).eval()
    bound = _count_binds(layer, monkeypatch)
    stream = layer.stream()
    with torch.no_grad():
        for step, x in enumerate(torch.randn(10, 3, 5)):
            stream(x)
            if step == 1:  # the first step through the stream's own way: bound there
                binds = len(bound)
    # Every step on the kernels, two layers each; after the second, nothing bound again.
    assert len(kernel_calls) == 2 * 10 and 1 <= binds <= 2 and len(bound) == binds


def _three_steps_streamed(layer: nn.Module, steps: int = 6):
    """A stream of ``layer`` that has taken three steps (its kernels bound and kept), and the
    ``(steps, 3, 5)`` inputs, of which it took the first three."""
    xs = torch.randn(steps, 3, 5)
    stream = layer.stream()
    with torch.no_grad():
        for x in xs[:3]:
            stream(x)
    return stream, xs


def test_a_stream_under_a_forced_backend_leaves_its_kept_kernels(monkeypatch, kernel_calls):
    stream, xs = _three_steps_streamed(rnnkit.LSTM(5, 12, num_layers=2).eval())
    with torch.no_grad():
        calls = len(kernel_calls)
        monkeypatch.setenv("RNNKIT_BACKEND", "fused")
        for x in xs[3:]:
            stream(x)
    assert calls == 2 * 3 and len(kernel_calls) == calls


def test_a_stream_whose_layer_changed_dtype_under_it_gives_forwards_error():
    layer = rnnkit.LSTM(5, 12).eval()
    xs = torch.randn(3, 2, 5)
    stream = layer.stream()
    with torch.no_grad():
        stream(xs[0])
        stream(xs[1])  # kernels kept for float32
        state = stream.state
        layer.double()  # the same Parameter objects, their data now float64
        with pytest.raises(Exception) as by_forward:
            layer(xs[2].unsqueeze(0), state)
        with pytest.raises(Exception) as by_stream:
            stream(xs[2])
    # forward's own check, not the kernel's refusal of the weights: the same words
    assert type(by_stream.value) is type(by_forward.value) is TypeError
    assert str(by_stream.value) == str(by_forward.value).replace("LSTM input", "LSTM stream input")


def test_a_stream_under_gradients_after_kept_steps_runs_forward(kernel_calls):
    layer = rnnkit.GRU(5, 12, num_layers=2).eval()
    stream, xs = _three_steps_streamed(layer)
    calls, state = len(kernel_calls), stream.state
    got = stream(xs[3])  # gradients on: forward, recorded
    want = layer(xs[3].unsqueeze(0), state)[0][0]
    assert got.grad_fn is not None and len(kernel_calls) == calls
    assert_close(got.detach(), want.detach())


@pytest.mark.parametrize("name", ["lstm-2-layers", "slstm-2-layers", "minlstm-2-layers"])
def test_a_stream_in_training_follows_dropout_switched_on_between_steps(name):
    torch.manual_seed(0)
    layer = KEPT_KERNEL_LAYERS[name]().train()
    layer.dropout = 0.0  # training mode with nothing to draw: the kernels run, and are kept
    xs = torch.randn(6, 3, 5)
    stream = layer.stream()
    with torch.no_grad():
        for step, x in enumerate(xs):
            if step == 3:
                layer.dropout = 0.5
            state = stream.state
            torch.manual_seed(step)
            want = layer(x.unsqueeze(0), state)[0][0] if state is not None else None
            torch.manual_seed(step)
            got = stream(x)
            if step == 2:
                assert stream._kept.plan is not None  # kept in training mode
            if want is not None:
                assert_close(got, want)
    assert stream._kept.plan is None


def test_a_copied_or_pickled_stream_steps_with_its_own_layer():
    import io
    import pickle

    torch.manual_seed(0)
    for make in (lambda: rnnkit.LSTM(5, 12, num_layers=2).eval(),
                 lambda: rnnkit.SLSTM(5, 12, num_heads=3).eval(),
                 lambda: rnnkit.MinGRU(5, 12).eval()):
        stream, xs = _three_steps_streamed(make())
        buffer = io.BytesIO()
        torch.save(stream, buffer)  # whole objects: pickle, as torch.save(model) does
        copies = [copy.deepcopy(stream), pickle.loads(pickle.dumps(stream))]
        with torch.no_grad():
            for p in stream.layer.parameters():
                p.mul_(-0.5)  # the original changes; each copy keeps its own weights
            for twin in copies:
                for x in xs[3:]:
                    want = twin.layer(x.unsqueeze(0), twin.state)[0][0]
                    assert_close(twin(x), want)


def _toggle(attribute, values):
    def change(layer):
        setattr(layer, attribute, values[1] if getattr(layer, attribute) == values[0]
                else values[0])
    return change


CELL_SETTING_CHANGES = {
    "rnn-nonlinearity": (lambda: rnnkit.RNN(5, 12), _toggle("nonlinearity", ("tanh", "relu"))),
    "gru-reset-after": (lambda: rnnkit.GRU(5, 12), _toggle("reset_after", (True, False))),
    "slstm-forget-gate": (lambda: rnnkit.SLSTM(5, 12, num_heads=3),
                          _toggle("forget_gate", ("sigmoid", "exp"))),
}


@pytest.mark.parametrize("name", list(CELL_SETTING_CHANGES))
def test_a_stream_follows_a_cell_setting_changed_between_steps(name):
    make, change = CELL_SETTING_CHANGES[name]
    torch.manual_seed(0)
    stream, xs = _three_steps_streamed(make().eval())
    change(stream.layer)
    with torch.no_grad():
        for x in xs[3:]:
            want = stream.layer(x.unsqueeze(0), stream.state)[0][0]
            assert_close(stream(x), want)


def test_a_minimal_stream_switched_to_log_space_under_a_negative_state_gives_forwards_error():
    torch.manual_seed(0)
    stream, xs = _three_steps_streamed(rnnkit.MinGRU(5, 12).eval())
    assert bool((stream.state < 0).any())  # linear space: states of both signs
    stream.layer.log_space = True
    with torch.no_grad():
        with pytest.raises(ValueError) as by_forward:
            stream.layer(xs[3].unsqueeze(0), stream.state)
        with pytest.raises(ValueError) as by_stream:
            stream(xs[3])
    assert str(by_stream.value) == str(by_forward.value)


def test_a_stream_runs_its_layers_forward_hooks(kernel_calls):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 12).eval()
    stream, xs = _three_steps_streamed(layer)
    calls = len(kernel_calls)
    handle = layer.register_forward_pre_hook(lambda module, args: (3 * args[0], *args[1:]))
    with torch.no_grad():
        for x in xs[3:5]:
            want = layer(x.unsqueeze(0), stream.state)[0][0]  # through the hook
            assert_close(stream(x), want)
        handle.remove()
        hooked_calls = len(kernel_calls)
        want = layer(xs[5].unsqueeze(0), stream.state)[0][0]
        assert_close(stream(xs[5]), want)
    # The hooked steps ran through the layer's call (whose one-step way is the kernels too);
    # without the hook the stream's own kernel step again.
    assert len(kernel_calls) - hooked_calls == 2 and hooked_calls > calls


@pytest.mark.parametrize("make", [lambda: rnnkit.LSTM(3, 4, num_layers=2),
                                  lambda: rnnkit.GRU(3, 4), lambda: rnnkit.SLSTM(3, 4),
                                  lambda: rnnkit.MinGRU(3, 4)],
                         ids=["lstm", "gru", "slstm", "mingru"])
def test_an_input_s_gradient_through_frozen_weights_is_recorded_in_one_step(make):
    # Parameters frozen, the input requiring a gradient (saliency, adversarial inputs): a
    # one-step call and a stream step record the graph, the gradient the reference's.
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    x = torch.randn(1, 2, 3, requires_grad=True)
    output = layer(x)[0]
    assert output.grad_fn is not None
    (got,) = torch.autograd.grad(output.square().sum(), x)
    reference_layer = copy.deepcopy(layer)
    reference_layer.backend = "reference"
    (want,) = torch.autograd.grad(reference_layer(x)[0].square().sum(), x)
    assert_close(got, want)
    stream = layer.stream()
    with torch.no_grad():
        stream(x[0].detach())
    streamed = stream(x[0])
    assert streamed.grad_fn is not None


# ---- a layer's one-step calls keep their kernels too (`rnnkit.stream.kept_step_kernels`) -------

def _parts(state) -> tuple:
    return state if isinstance(state, tuple) else (state,)


def _one_step_calls(layer: nn.Module, xs: Tensor, change=None, at: int = 3):
    """``layer(x, state)`` for each one-step ``x`` of ``xs``, the state carried, asserting
    that each equals a copy of the layer on the reference engine made just before it;
    ``change(layer)`` before call ``at``. The first call (no state) takes the general way."""
    state = None
    with torch.no_grad():
        for step, x in enumerate(xs):
            if change is not None and step == at:
                change(layer)
            reference = reference_layer(layer)
            torch.manual_seed(step)  # the same dropout masks for both, in training
            want_output, want_state = reference(x, state)
            torch.manual_seed(step)
            output, state = layer(x, state)
            assert_close((output, *_parts(state)), (want_output, *_parts(want_state)))


@pytest.mark.parametrize("change", list(LAYER_CHANGES))
@pytest.mark.parametrize("name", list(KEPT_KERNEL_LAYERS))
def test_one_step_layer_calls_follow_their_layer_changed_between_calls(name, change,
                                                                       monkeypatch):
    torch.manual_seed(0)
    layer = KEPT_KERNEL_LAYERS[name]().eval()
    _one_step_calls(layer, torch.randn(7, 1, 3, 5),
                    lambda changed: LAYER_CHANGES[change](changed, monkeypatch))


@pytest.mark.parametrize("name", list(CELL_SETTING_CHANGES))
def test_one_step_layer_calls_follow_a_cell_setting_changed_between_calls(name):
    make, change = CELL_SETTING_CHANGES[name]
    torch.manual_seed(0)
    _one_step_calls(make().eval(), torch.randn(6, 1, 3, 5), change)


@pytest.mark.parametrize("name", list(KEPT_KERNEL_LAYERS))
def test_one_step_layer_calls_bind_their_kernels_once(name, monkeypatch):
    torch.manual_seed(0)
    layer = KEPT_KERNEL_LAYERS[name]().eval()
    bound = _count_binds(layer, monkeypatch)
    _one_step_calls(layer, torch.randn(8, 1, 3, 5))
    # the first call (no state) takes the general way for the classic layers
    assert len(bound) == 1
    assert kept_step_kernels(layer).plan is not None


def test_one_step_layer_calls_with_another_batch_state_or_gradient_are_rechecked(monkeypatch):
    # What the kept kernels do not cover goes to binding anew (another batch) or to forward
    # (a state of another dtype, a non-contiguous state, a state to differentiate): every call
    # as the reference's.
    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 12, num_layers=2).eval()
    bound = _count_binds(layer, monkeypatch)
    h, c = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    x = torch.randn(1, 3, 5)
    with torch.no_grad():
        for batch in (3, 2, 3):  # another batch: bound anew, then again for 3
            want = reference_layer(layer)(x[:, :batch], (h[:, :batch], c[:, :batch]))
            got = layer(x[:, :batch], (h[:, :batch].contiguous(), c[:, :batch].contiguous()))
            assert_close((got[0], *got[1]), (want[0], *want[1]))
        assert len(bound) == 3
        strided = (torch.randn(3, 2, 12).transpose(0, 1), torch.randn(3, 2, 12).transpose(0, 1))
        want = reference_layer(layer)(x, strided)
        got = layer(x, strided)
        assert_close((got[0], *got[1]), (want[0], *want[1]))
        with pytest.raises(TypeError, match="LSTM hx"):  # forward's check names it
            layer(x, (h.double(), c.double()))
    h_grad = h.clone().requires_grad_()
    output = layer(x, (h_grad, c))[0]
    assert output.grad_fn is not None
    (got_grad,) = torch.autograd.grad(output.sum(), h_grad)
    h_ref = h.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(reference_layer(layer)(x, (h_ref, c))[0].sum(), h_ref)
    assert_close(got_grad, want_grad)


def test_a_layer_copied_or_pickled_after_one_step_calls_steps_with_its_own_weights():
    import pickle

    torch.manual_seed(0)
    for make in (lambda: rnnkit.LSTM(5, 12, num_layers=2).eval(),
                 lambda: rnnkit.SLSTM(5, 12, num_heads=3).eval(),
                 lambda: rnnkit.MinGRU(5, 12).eval()):
        layer = make()
        xs = torch.randn(6, 1, 3, 5)
        _one_step_calls(layer, xs[:3])
        assert kept_step_kernels(layer).plan is not None
        # the whole module pickled (as torch.save(model) does) and deep-copied
        copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
        assert all(kept_step_kernels(twin).plan is None for twin in copies)
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(-0.5)  # the original changes; each copy keeps its own weights
        for twin in copies:
            _one_step_calls(twin, xs[3:])


def test_a_stream_copied_shallowly_keeps_kernels_of_its_own():
    # copy.copy forks a stream over the same layer (a beam's branch). A kept plan holds only
    # while its stream's states are the kernels' own: a fork whose state came from forward
    # (it tracks a gradient of hx) must not step on the plan its original made since.
    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 12).eval().requires_grad_(False)
    h0 = torch.zeros(1, 2, 12, requires_grad=True)
    xs = torch.randn(2, 2, 5)
    stream = layer.stream((h0, torch.zeros(1, 2, 12)))
    assert stream(xs[0]).requires_grad  # through forward: the state tracks h0
    fork = copy.copy(stream)
    with torch.no_grad():
        stream(xs[1])  # the original binds and keeps its kernels
    want = layer(xs[1].unsqueeze(0), fork.state)[0][0]
    got = fork(xs[1])
    assert got.requires_grad
    assert_close(got, want)
    got.sum().backward()
    assert h0.grad is not None


@pytest.mark.parametrize("replace", ["load-state-dict-assign", "new-parameter", "to-float64"])
def test_a_layers_kept_kernels_do_not_keep_replaced_weights_alive(replace):
    # The kept plan holds the weights it was bound to; replacing them drops it at once (not
    # only at the next one-step call), so the old tensors are freed.
    import gc
    import weakref

    torch.manual_seed(0)
    layer = rnnkit.LSTM(5, 12).eval()
    _one_step_calls(layer, torch.randn(3, 1, 2, 5))
    assert kept_step_kernels(layer).plan is not None
    old = weakref.ref(layer.weight_hh_l0)
    if replace == "load-state-dict-assign":
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    elif replace == "new-parameter":
        layer.weight_hh_l0 = nn.Parameter(torch.randn_like(layer.weight_hh_l0))
    else:
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            layer.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    gc.collect()
    assert old() is None and kept_step_kernels(layer).plan is None
    dtype = layer.weight_hh_l0.dtype
    _one_step_calls(layer, torch.randn(3, 1, 2, 5, dtype=dtype))
