"""Hard to break: padding that holds NaN, NaN through ReLU, empty batches, and bad arguments.

Every engine must give what torch.nn gives (or a named error where torch.nn has none), so each
case runs on every backend.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import signal

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from compare import assert_same, outputs_and_gradients

BACKENDS = ["reference", "fused", "native"]
INPUT, HIDDEN, PROJ, STEPS = 3, 5, 2, 6
LENGTHS = [4, 6, 1, 3]  # unsorted, one full-length sequence, one of length 1

# Every family and variant: (layer class, constructor arguments, torch.nn twin or None).
LAYERS = {
    "rnn_tanh": (rnnkit.RNN, {}, nn.RNN),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}, nn.RNN),
    "lstm": (rnnkit.LSTM, {}, nn.LSTM),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": PROJ}, nn.LSTM),
    "lstm_peephole_proj": (rnnkit.LSTM, {"peephole": True, "proj_size": PROJ}, None),
    "gru": (rnnkit.GRU, {}, nn.GRU),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}, None),
}


def make_layer(name, backend, **arguments):
    """A float64 layer with every parameter random and nonzero (peepholes included)."""
    layer_class, extra, _ = LAYERS[name]
    layer = layer_class(INPUT, HIDDEN, **extra, **arguments, dtype=torch.float64, backend=backend)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) - 0.5)
    return layer


def state_leaves(layer, batch):
    """A random initial state for ``layer`` at ``batch``, as named leaves that require grad."""
    generator = torch.Generator().manual_seed(5)
    lead = (layer.num_layers * layer.num_directions, batch)
    sizes = {"h0": layer.output_size} | ({"c0": layer.hidden_size} if layer.family == "lstm" else {})
    return {name: torch.randn(lead + (size,), generator=generator, dtype=torch.float64)
            .requires_grad_() for name, size in sizes.items()}


def hx_of(state):
    return (state["h0"], state["c0"]) if "c0" in state else state["h0"]


# ---- padding past a sequence's end reaches nothing ------------------------------------------

@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_padding_reaches_nothing(backend, name, fill):
    layer = make_layer(name, backend, num_layers=2, bidirectional=True)
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(STEPS, len(LENGTHS), INPUT, generator=generator, dtype=torch.float64)
    padded = torch.arange(STEPS).unsqueeze(1) >= torch.tensor(LENGTHS)  # (T, N)
    clean[padded] = 0.0
    dirty = clean.masked_fill(padded.unsqueeze(2), fill)
    state = state_leaves(layer, len(LENGTHS))

    def run(x):
        return outputs_and_gradients(
            layer, lambda m: m(x, hx_of(state), lengths=LENGTHS), {"x": x} | state)

    actual = run(dirty.requires_grad_())
    for key, value in actual.items():
        assert torch.isfinite(value).all(), key
    assert (actual["grad:x"][padded] == 0).all()  # as with a PackedSequence in torch.nn
    # The same input with zero padding: the same outputs, final states and every gradient.
    assert_same(actual, run(clean.requires_grad_()), torch.float64)

    torch_class = LAYERS[name][2]
    if torch_class is None:
        return
    reference = layer.to_torch()

    def run_packed(module):
        packed = pack_padded_sequence(dirty, LENGTHS, enforce_sorted=False)
        output, final = module(packed, hx_of(state))
        return pad_packed_sequence(output, total_length=STEPS)[0], final

    expected = outputs_and_gradients(reference, run_packed, {"x": dirty} | state)
    assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_padding_with_batch_first_and_learned_state(backend):
    layer = rnnkit.GRU(INPUT, HIDDEN, batch_first=True, learn_initial_state=True,
                       dtype=torch.float64, backend=backend)
    x = torch.randn(len(LENGTHS), STEPS, INPUT, dtype=torch.float64)
    padded = torch.arange(STEPS) >= torch.tensor(LENGTHS).unsqueeze(1)  # (N, T)
    x[padded] = float("nan")
    x.requires_grad_()
    output, h_n = layer(x, lengths=torch.tensor(LENGTHS))
    (output.sum() + h_n.sum()).backward()
    assert torch.isfinite(output).all() and torch.isfinite(h_n).all()
    assert torch.isfinite(x.grad).all() and (x.grad[padded] == 0).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# ---- NaN through a ReLU RNN ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
def test_relu_rnn_with_nan_input_has_torch_nn_gradients(backend):
    """Autograd's relu backward passes the gradient where the output is NaN (NaN <= 0 is
    false), so torch.nn's dx holds values there and its NaN reaches only the weight gradients
    that multiply the NaN state; every backend must agree, NaN for NaN."""
    torch.manual_seed(0)
    reference = nn.RNN(INPUT, HIDDEN, nonlinearity="relu", num_layers=2, dtype=torch.float64)
    layer = rnnkit.from_torch(reference)
    layer.backend = backend
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64)
    x[1, 0, 0] = float("nan")
    x.requires_grad_()
    expected = outputs_and_gradients(reference, lambda m: m(x), {"x": x})
    actual = outputs_and_gradients(layer, lambda m: m(x), {"x": x})
    assert expected["grad:x"].isfinite().all() and expected["grad:weight_hh_l0"].isnan().any()
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-10, atol=1e-10,
                                   equal_nan=True, msg=lambda m, k=key: f"{k}: {m}")


# ---- empty batches ---------------------------------------------------------------------------

CELLS = {
    "rnn_tanh": (rnnkit.RNNCell, {}, nn.RNNCell),
    "rnn_relu": (rnnkit.RNNCell, {"nonlinearity": "relu"}, nn.RNNCell),
    "lstm": (rnnkit.LSTMCell, {}, nn.LSTMCell),
    "lstm_peephole_proj": (rnnkit.LSTMCell, {"peephole": True, "proj_size": PROJ}, None),
    "gru": (rnnkit.GRUCell, {}, nn.GRUCell),
    "gru_reset_before": (rnnkit.GRUCell, {"reset_after": False}, None),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_with_an_empty_batch_gives_torch_nn_shapes_and_zero_gradients(
        backend, name, with_state):
    cell_class, extra, torch_class = CELLS[name]
    cell = cell_class(INPUT, HIDDEN, **extra)
    cell.backend = backend
    x = torch.randn(0, INPUT, requires_grad=True)
    state = {"h": torch.zeros(0, cell.output_size, requires_grad=True)}
    if cell.family == "lstm":
        state["c"] = torch.zeros(0, HIDDEN, requires_grad=True)
    hx = (tuple(state.values()) if len(state) == 2 else state["h"]) if with_state else None
    actual = outputs_and_gradients(cell, lambda m: m(x, hx), {"x": x} | state)
    if torch_class is not None:
        expected = outputs_and_gradients(cell.to_torch(), lambda m: m(x, hx), {"x": x} | state)
        assert_same(actual, expected, torch.float32)
    assert actual["out0"].shape == (0, cell.output_size)
    for key, value in actual.items():
        if key.startswith("grad:"):
            assert (value == 0).all(), key


@pytest.mark.parametrize("form", ["time_major", "batch_first", "hx", "lengths"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_with_an_empty_batch_gives_torch_nn_shapes_and_zero_gradients(backend, name, form):
    layer = make_layer(name, backend, num_layers=2, bidirectional=True,
                       batch_first=form == "batch_first")
    x = torch.randn((0, STEPS, INPUT) if form == "batch_first" else (STEPS, 0, INPUT),
                    dtype=torch.float64, requires_grad=True)
    state = state_leaves(layer, 0) if form == "hx" else {}
    keywords = {"lengths": torch.zeros(0, dtype=torch.int64)} if form == "lengths" else {}

    def run(module, **more):
        return module(x, hx_of(state) if state else None, **more)

    actual = outputs_and_gradients(layer, lambda m: run(m, **keywords), {"x": x} | state)
    width = 2 * layer.output_size
    assert actual["out0"].shape == ((0, STEPS, width) if form == "batch_first" else
                                    (STEPS, 0, width))
    for key, value in actual.items():
        if key.startswith("grad:"):
            assert (value == 0).all(), key
    if LAYERS[name][2] is not None:
        expected = outputs_and_gradients(layer.to_torch(), run, {"x": x} | state)
        assert_same(actual, expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_initial_state_with_an_empty_batch(backend):
    layer = rnnkit.LSTM(INPUT, HIDDEN, learn_initial_state=True, backend=backend)
    output, (h_n, c_n) = layer(torch.randn(STEPS, 0, INPUT))
    (output.sum() + h_n.sum() + c_n.sum()).backward()
    assert output.shape == (STEPS, 0, HIDDEN) and h_n.shape == c_n.shape == (1, 0, HIDDEN)
    assert (layer.h0.grad == 0).all() and (layer.c0.grad == 0).all()


# ---- bad arguments are named -----------------------------------------------------------------

@contextlib.contextmanager
def fails_within(seconds: int):
    """Turn a hang into a test failure (where the platform has SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def interrupt(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BIG = 2**63
X = torch.randn(4, 2, 3)


def set_backend(module, value):
    module.backend = value
    return module


@pytest.mark.parametrize(
    "call, error, match",
    [
        # sizes: int64 range, then what the parameters would need in memory
        (lambda: rnnkit.GRU(2, 3, num_layers=10**13), ValueError,
         r"GRU with input_size=2, hidden_size=3, num_layers=10000000000000 needs [\d,]+ parameters, [\d,]+ bytes as torch.float32: more than the [\d,]+ bytes of memory"),
        (lambda: rnnkit.LSTM(BIG, 3), ValueError, r"LSTM input_size must be an int >= 1 that fits in int64 \(at most 2\*\*63 - 1 = 9223372036854775807\), got 9223372036854775808"),
        (lambda: rnnkit.LSTM(2, BIG), ValueError, r"LSTM hidden_size must be an int >= 1 that fits in int64 .* got 9223372036854775808"),
        (lambda: rnnkit.LSTM(2, 3, proj_size=BIG), ValueError, r"LSTM proj_size must be an int >= 0 that fits in int64"),
        (lambda: rnnkit.RNN(2, 3, num_layers=BIG), ValueError, r"RNN num_layers must be an int >= 1 that fits in int64"),
        (lambda: rnnkit.LSTM(2**40, 2**20, dtype=torch.float64), ValueError,
         r"LSTM with input_size=1099511627776, hidden_size=1048576, num_layers=1 needs [\d,]+ parameters, [\d,]+ bytes as torch.float64"),
        (lambda: rnnkit.LSTM(2, 2**40, proj_size=2**39, bidirectional=True), ValueError,
         r"proj_size=549755813888, bidirectional=True needs [\d,]+ parameters"),
        (lambda: rnnkit.GRU(2**62, 2**62), ValueError, r"needs [\d,]+ parameters"),  # > int64 elements
        (lambda: rnnkit.GRU(2, 3, num_layers=10**13, device="meta"), ValueError, r"bytes of memory in this host"),
        # dtype and device
        (lambda: rnnkit.LSTM(2, 3, dtype=torch.complex64), ValueError,
         r"LSTM dtype must be None or one of torch.float16, torch.bfloat16, torch.float32, torch.float64, got torch.complex64"),
        (lambda: rnnkit.GRU(2, 3, dtype=torch.int64), ValueError, r"GRU dtype must be None or one of .* got torch.int64"),
        (lambda: rnnkit.RNN(2, 3, dtype=torch.float8_e4m3fn), ValueError, r"RNN dtype .* got torch.float8_e4m3fn"),
        (lambda: rnnkit.LSTM(2, 3, dtype="float32"), TypeError, r"LSTM dtype must be None or one of .* got 'float32' \(str\) \(did you mean torch.float32\?\)"),
        (lambda: rnnkit.LSTM(2, 3, dtype=float), TypeError, r"LSTM dtype must be None or one of"),
        (lambda: rnnkit.LSTM(2, 3, device="gpu"), ValueError, r"LSTM device must be a device torch can allocate on here, got 'gpu'"),
        (lambda: rnnkit.GRU(2, 3, device=3.5), TypeError, r"GRU device must be None, a torch.device, a device string .* got 3.5 \(float\)"),
        (lambda: rnnkit.GRU(2, 3, device=True), TypeError, r"GRU device must be None, a torch.device"),
        # backend, checked when set
        (lambda: rnnkit.LSTM(2, 3, backend="gpu"), ValueError, r"LSTM backend must be one of 'auto', 'native', 'fused', 'reference', got 'gpu'"),
        (lambda: set_backend(rnnkit.GRU(2, 3), "gpu"), ValueError, r"GRU backend must be one of 'auto', 'native', 'fused', 'reference', got 'gpu'"),
        (lambda: set_backend(rnnkit.RNN(2, 3), None), ValueError, r"RNN backend must be one of .* got None"),
        # lengths that hold no values, or are not integers
        (lambda: rnnkit.LSTM(3, 4)(X, lengths=torch.tensor([4, 2], device="meta")), ValueError,
         r"lengths must hold values: .* got a tensor on the meta device"),
        (lambda: rnnkit.LSTM(3, 4)(X, lengths=torch.tensor([4, 2]).to_sparse()), TypeError,
         r"lengths must be a dense \(strided\) integer tensor .* got layout torch.sparse_coo"),
        (lambda: rnnkit.GRU(3, 4)(X, lengths=torch.tensor([True, False])), TypeError, r"lengths must be an integer tensor .* got dtype torch.bool"),
        (lambda: rnnkit.GRU(3, 4)(X, lengths=torch.tensor([4.0, 2.0], dtype=torch.float64)), TypeError, r"got dtype torch.float64"),
        (lambda: rnnkit.GRU(3, 4)(X, lengths=torch.tensor([4, 2j])), TypeError, r"got dtype torch.complex64"),
        (lambda: rnnkit.GRU(3, 4)(X, lengths="42"), TypeError, r"lengths must be a 1-D integer tensor or a list of ints, got '42'"),
        # cells: the same checks
        (lambda: rnnkit.LSTMCell(BIG, 3), ValueError, r"LSTMCell input_size must be an int >= 1 that fits in int64"),
        (lambda: rnnkit.GRUCell(2, BIG), ValueError, r"GRUCell hidden_size must be an int >= 1 that fits in int64"),
        (lambda: rnnkit.LSTMCell(2, 3, proj_size=BIG), ValueError, r"LSTMCell proj_size must be an int >= 0 that fits in int64"),
        (lambda: rnnkit.RNNCell(2**40, 2**30), ValueError,
         r"RNNCell with input_size=1099511627776, hidden_size=1073741824 needs [\d,]+ parameters, [\d,]+ bytes as torch.float32: more than"),
        (lambda: rnnkit.LSTMCell(2, 2**40, proj_size=2**39), ValueError, r"LSTMCell with input_size=2, hidden_size=1099511627776, proj_size=549755813888 needs"),
        (lambda: rnnkit.LSTMCell(2, 3, dtype=torch.complex64), ValueError, r"LSTMCell dtype must be None or one of .* got torch.complex64"),
        (lambda: rnnkit.GRUCell(2, 3, dtype=torch.int32), ValueError, r"GRUCell dtype .* got torch.int32"),
        (lambda: rnnkit.RNNCell(2, 3, dtype="float64"), TypeError, r"RNNCell dtype .* \(did you mean torch.float64\?\)"),
        (lambda: rnnkit.RNNCell(2, 3, device="tpu"), ValueError, r"RNNCell device must be a device torch can allocate on here, got 'tpu'"),
        (lambda: set_backend(rnnkit.LSTMCell(2, 3), "gpu"), ValueError, r"LSTMCell backend must be one of 'auto', 'native', 'fused', 'reference', got 'gpu'"),
        (lambda: set_backend(rnnkit.GRUCell(2, 3), "torch.nn"), ValueError, r"GRUCell backend must be one of .* got 'torch.nn'"),
        (lambda: rnnkit.LSTMCell(2, 3, peephole=1), TypeError, r"LSTMCell peephole must be True or False, got 1"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with fails_within(20), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_every_accepted_dtype_runs_forward_and_backward(backend, dtype):
    for make in (lambda: rnnkit.LSTM(3, 4, bidirectional=True, dtype=dtype, backend=backend),
                 lambda: rnnkit.GRU(3, 4, device=torch.device("cpu"), dtype=dtype, backend=backend),
                 lambda: rnnkit.RNN(3, 4, nonlinearity="relu", device="cpu", dtype=dtype,
                                    backend=backend)):
        layer = make()
        x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
        output, _ = layer(x, lengths=[5, 2])
        output.float().sum().backward()
        assert output.dtype == x.grad.dtype == dtype
    cell = rnnkit.LSTMCell(3, 4, dtype=dtype)
    cell.backend = backend
    h, c = cell(torch.randn(2, 3, dtype=dtype))
    assert h.dtype == c.dtype == dtype


def test_backend_setting_is_kept_by_copies_and_pickles():
    layer = rnnkit.GRU(3, 4, backend="fused")
    cell = rnnkit.LSTMCell(3, 4)
    assert cell.backend == "auto"
    cell.backend = "reference"
    for module, value in ((layer, "fused"), (cell, "reference")):
        assert copy.deepcopy(module).backend == value
        assert pickle.loads(pickle.dumps(module)).backend == value
    # A module pickled before the setting was checked kept it as a plain attribute.
    old = pickle.loads(pickle.dumps(layer))
    old.__dict__["backend"] = "reference"
    assert old.backend == "reference"


def test_a_large_layer_within_memory_still_builds_on_meta():
    # The bound is the memory the parameters need, not a cap on sizes: 2**28 float32 parameters
    # (1 GiB, under any host's memory) build, on meta without allocating.
    layer = rnnkit.LSTM(2**16 - 2**10 - 2, 2**10, device="meta")
    assert layer.weight_ih_l0.shape == (2**12, 2**16 - 2**10 - 2)
    assert sum(p.numel() for p in layer.parameters()) == 2**28
