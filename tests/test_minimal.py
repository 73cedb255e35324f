"""minGRU and minLSTM (rnnkit.minimal, rnnkit.engine.scan): every execution path against the
reference loop (values and all gradients), the input forms, streaming, state dicts, the
log-space scan's stability, and the boundary's errors."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import rnnkit
from compare import assert_same_normwise, operators_in, outputs_and_gradients
from rnnkit.engine import native, scan
from rnnkit.engine.scan import GATE_COUNT, MinFamily

LAYERS = {MinFamily.GRU: rnnkit.MinGRU, MinFamily.LSTM: rnnkit.MinLSTM}
CELLS = {MinFamily.GRU: rnnkit.MinGRUCell, MinFamily.LSTM: rnnkit.MinLSTMCell}
STEPS = (1, 2, 3, 7, 64, 300)
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _collector_paused_one_thread():
    """Two settings that keep the reference loop's thousands of tiny steps fast:

    - Python's cyclic collector walks the autograd graph that the loop builds, at every
      collection: quadratic in T; under pytest's large heap the T = 10,000 reference took 120 s
      instead of 1.5 s. Paused during each test (and not run after it: a collection of that
      heap costs ~0.4 s, which 77 tests would pay).
    - One thread: tensors this small gain nothing from a second, and on a shared two-core
      machine each parallel region waited for a descheduled thread (the same test: 39 s with
      two threads while the other core was busy, 1.8 s with one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        torch.set_num_threads(threads)


def _path_results(path, family, x, h0, weight, bias, lengths, reverse, log_space):
    """Outputs, final state and the gradients of x, h0, weight and bias of one path, under a
    fixed random projection of both results (float64 draws, as tests/compare.py)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, weight, bias)]
    output, final = path(family, leaves[0], leaves[1], leaves[2], leaves[3], lengths, reverse,
                         log_space)
    generator = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype))
               .sum() for t in (output, final))
    grads = torch.autograd.grad(loss, leaves)
    names = ("grad:x", "grad:h0", "grad:weight_ih", "grad:bias_ih")
    return {"output": output.detach(), "final": final.detach(), **dict(zip(names, grads, strict=True))}


def _direction_inputs(family, steps, dtype, *, batch=3, input_size=4, hidden=5, scale=1.0,
                      seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    gates = GATE_COUNT[family] * hidden
    x = draw(steps, batch, input_size) * scale
    h0 = torch.rand(batch, hidden, generator=generator, dtype=torch.float64).to(dtype)
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps  # one sequence always runs the whole length
    return x, h0, draw(gates, input_size) / math.sqrt(hidden), draw(gates) * 0.5, lengths


def _paths(log_space):
    return [scan.run_linear_scan] + ([scan.run_log_scan] if log_space else [])


# ---- every path against the reference -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_each_path_equals_the_reference(family, log_space, steps, dtype):
    """Outputs, final states and the gradients of input, state, weight and bias, with lengths
    (outputs past each end zero) in both directions; the linear scan also runs the log-space
    variant (its coefficients are real too)."""
    x, h0, weight, bias, lengths = _direction_inputs(family, steps, dtype)
    for reverse in (False, True):
        expected = _path_results(scan.run_reference, family, x, h0, weight, bias, lengths,
                                 reverse, log_space)
        past_end = torch.arange(steps).unsqueeze(1) >= lengths  # (T, N)
        assert not expected["output"][past_end].any()
        for path in _paths(log_space):
            actual = _path_results(path, family, x, h0, weight, bias, lengths, reverse, log_space)
            assert_same_normwise(actual, expected, dtype, group="minimal")


# Every backend but the reference, with the variants it runs ("log_scan": log_space only).
LAYER_BACKENDS = [(backend, log_space) for log_space in (False, True)
                  for backend in ("scan", "auto", "native") + (("log_scan",) if log_space else ())]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "log_space"), LAYER_BACKENDS,
                         ids=[f"{b}-{'log_space' if s else 'linear'}" for b, s in LAYER_BACKENDS])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_layer_backends_agree_stacked_bidirectional(family, backend, log_space, dtype):
    """A two-layer bidirectional layer on each backend equals "reference" in outputs, h_n and
    every gradient (input, h0, each layer's and direction's weight and bias): padded with
    lengths, the same batch packed, and whole (no lengths); and runs that backend's operator."""
    native_missing = native.why_not(torch.zeros(1))
    if backend == "native" and native_missing is not None:
        pytest.skip(f"the native kernels could not be built here: {native_missing}")
    torch.manual_seed(1)
    layer = LAYERS[family](4, 5, num_layers=2, bidirectional=True, log_space=log_space,
                           dtype=dtype, backend="reference")
    x = torch.randn(37, 3, 4, dtype=dtype)
    h0 = torch.rand(4, 3, 5, dtype=dtype)
    lengths = torch.tensor([37, 1, 20])
    inputs = {"x": x.requires_grad_(), "h0": h0.requires_grad_()}
    calls = {
        "lengths": lambda m: m(inputs["x"], inputs["h0"], lengths=lengths),
        "packed": lambda m: m(pack_padded_sequence(inputs["x"], lengths, enforce_sorted=False),
                              inputs["h0"]),
        "whole": lambda m: m(inputs["x"], inputs["h0"]),
    }
    other = copy.deepcopy(layer)
    other.backend = backend
    for call in calls.values():
        expected = outputs_and_gradients(layer, call, inputs)
        assert_same_normwise(outputs_and_gradients(other, call, inputs), expected, dtype,
                             group="minimal native" if backend == "native" else "minimal")
    # "auto" runs the native loop where the kernels are built (`scan.engine_for`).
    operator = {"scan": "linear_scan", "log_scan": "log_scan", "native": "native_min_scan",
                "auto": "linear_scan" if native_missing else "native_min_scan"}[backend]
    for call in calls.values():
        assert operators_in(call(other)[1]) == {operator}


def test_each_backend_runs_its_path_and_auto_without_kernels_the_scan(monkeypatch):
    # Without the native kernels (tests/test_minimal_native.py has the policy with them):
    # "auto" runs the linear scan, and a single step on the loop.
    monkeypatch.setattr(native, "available", lambda: False)
    x = torch.zeros(300, 2, 3)
    assert scan.engine_for("auto", log_space=False, x=x[:2]) == "linear_scan"
    assert scan.engine_for("auto", log_space=True, x=x) == "linear_scan"
    assert scan.engine_for("auto", log_space=True, x=x[:1]) == "reference"
    assert scan.engine_for("scan", log_space=True, x=x[:1]) == "linear_scan"
    assert scan.engine_for("log_scan", log_space=True, x=x[:1]) == "log_scan"
    assert scan.engine_for("reference", log_space=False, x=x) == "reference"
    assert scan.engine_for("native", log_space=False, x=x) == "linear_scan"


# ---- gradcheck ----------------------------------------------------------------------------
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_gradcheck_scans(family, log_space, monkeypatch):
    """Finite differences in float64 against each scan's hand-written backward, with lengths,
    both directions. Small blocks, so that 19 steps take every branch: the log-space scan in
    five blocks of 4 (a ragged last one, two levels of recursion), the linear scan blocked
    (four blocks of 5) over doubling rounds for the blocks' ends."""
    monkeypatch.setattr(scan, "LOG_SCAN_CHUNK", 4)
    monkeypatch.setattr(scan, "DOUBLING_MAX_STEPS", 4)
    steps = 19
    x, h0, weight, bias, _ = _direction_inputs(family, steps, torch.float64, batch=2,
                                               input_size=2, hidden=2)
    lengths = torch.tensor([steps, 5])
    for path in _paths(log_space):
        for reverse in (False, True):
            def run(x, h0, weight, bias, path=path, reverse=reverse):
                return path(family, x, h0, weight, bias, lengths, reverse, log_space)

            leaves = [t.clone().requires_grad_() for t in (x, h0, weight, bias)]
            assert torch.autograd.gradcheck(run, leaves)


def test_gradcheck_scan_functions_directly():
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(9, 2, 3, generator=generator, dtype=torch.float64).requires_grad_()
    b = torch.randn(9, 2, 3, generator=generator, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(scan.scan_linear, (a, b, h0))
    log_a = (a.detach().log()).requires_grad_()
    log_b = torch.randn(9, 2, 3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(scan.scan_log, (log_a, log_b, h0.detach().abs().requires_grad_()))


# ---- the log-space scan at T = 10,000 -----------------------------------------------------
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_log_space_scan_is_stable_for_ten_thousand_steps(family):
    """T = 10,000, small H, inputs x30 so the gates reach 0 and 1: the log-space scan is finite
    and equals the float64 reference within the tolerance in float32 and in float64, values
    and gradients. The paper's unblocked formula in float32 does not (the reason for the
    blocks and the float64 accumulation)."""
    steps = 10_000
    x, h0, weight, bias, _ = _direction_inputs(family, steps, torch.float64, batch=2,
                                               input_size=3, hidden=4, scale=30.0)
    a, _ = scan.coefficients(family, F.linear(x, weight, bias), log_space=True)
    assert float(a.min()) < 1e-6 and float(a.max()) > 1 - 1e-6  # gates near 0 and 1
    expected = _path_results(scan.run_reference, family, x, h0, weight, bias, None, False, True)
    for dtype in DTYPES:
        cast = [t.to(dtype) for t in (x, h0, weight, bias)]
        actual = _path_results(scan.run_log_scan, family, *cast, None, False, True)
        assert all(bool(t.isfinite().all()) for t in actual.values())
        assert_same_normwise({k: v.double() for k, v in actual.items()}, expected, dtype,
                             group="minimal T=1e4")

    log_a, log_b = scan.log_coefficients(family, F.linear(*(t.float() for t in (x, weight, bias))))
    log_decay = log_a.cumsum(0)  # the paper's formula, one block, float32
    paper = (log_decay + torch.logcumsumexp(log_b - log_decay, dim=0)).exp() + \
        log_decay.exp() * h0.float()
    reference = expected["output"]
    assert float((paper.double() - reference).abs().max()) > 1e-5 * float(reference.abs().max())


def test_log_space_state_stays_positive():
    torch.manual_seed(2)
    for family in MinFamily:
        layer = LAYERS[family](3, 4, num_layers=2, log_space=True)
        output, h_n = layer(torch.randn(50, 2, 3) * 10)
        assert bool((output > 0).all()) and bool((h_n > 0).all())


# ---- lengths and packing against independent runs -----------------------------------------
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_lengths_equal_each_sequence_run_alone(family):
    """Padded input with lengths, and the same batch packed: each sequence's output and final
    state (both directions, two layers) equal running it alone, unbatched, at its length."""
    torch.manual_seed(4)
    layer = LAYERS[family](3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    lengths = [6, 2, 9]
    sequences = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    padded = torch.zeros(9, 3, 3, dtype=torch.float64)
    for n, sequence in enumerate(sequences):
        padded[: lengths[n], n] = sequence
    output, h_n = layer(padded, lengths=lengths)
    packed_output, packed_h_n = layer(pack_sequence(sequences, enforce_sorted=False))
    unpacked, _ = pad_packed_sequence(packed_output)
    torch.testing.assert_close(unpacked, output[: max(lengths)], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed_h_n, h_n, rtol=1e-12, atol=1e-12)
    for n, sequence in enumerate(sequences):
        alone, alone_h_n = layer(sequence)
        torch.testing.assert_close(output[: lengths[n], n], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, n], alone_h_n, rtol=1e-12, atol=1e-12)
        assert not output[lengths[n]:, n].any()


def test_input_forms_agree():
    """batch_first, unbatched and an empty batch give torch.nn's shapes and the same values."""
    torch.manual_seed(5)
    layer = rnnkit.MinGRU(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3)
    output, h_n = layer(x)
    assert output.shape == (6, 2, 8) and h_n.shape == (4, 2, 4)
    first = copy.deepcopy(layer)
    first.batch_first = True
    output_first, h_n_first = first(x.transpose(0, 1))
    torch.testing.assert_close(output_first.transpose(0, 1), output)
    torch.testing.assert_close(h_n_first, h_n)
    output_single, h_n_single = layer(x[:, 1])
    torch.testing.assert_close(output_single, output[:, 1])
    torch.testing.assert_close(h_n_single, h_n[:, 1])
    empty_output, empty_h_n = layer(torch.randn(6, 0, 3))
    assert empty_output.shape == (6, 0, 8) and empty_h_n.shape == (4, 0, 4)


# ---- cells: the spec's equations, streaming -----------------------------------------------
def test_cells_follow_the_papers_equations():
    """The cell's step against the equations as the paper writes them (float64, moderate
    inputs, where the literal forms 1 - z and f / (f + i) are exact enough)."""
    torch.manual_seed(6)
    x, h = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)

    def g(v):
        return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))

    for log_space in (False, True):
        cell = rnnkit.MinGRUCell(3, 4, log_space=log_space, dtype=torch.float64)
        w_z, w_h = cell.weight_ih.chunk(2)
        b_z, b_h = cell.bias_ih.chunk(2)
        z = torch.sigmoid(x @ w_z.T + b_z)
        h_tilde = x @ w_h.T + b_h
        h_tilde = g(h_tilde) if log_space else h_tilde
        torch.testing.assert_close(cell(x, h), (1 - z) * h + z * h_tilde)

        cell = rnnkit.MinLSTMCell(3, 4, log_space=log_space, dtype=torch.float64)
        w_f, w_i, w_h = cell.weight_ih.chunk(3)
        b_f, b_i, b_h = cell.bias_ih.chunk(3)
        f, i = torch.sigmoid(x @ w_f.T + b_f), torch.sigmoid(x @ w_i.T + b_i)
        h_tilde = x @ w_h.T + b_h
        h_tilde = g(h_tilde) if log_space else h_tilde
        torch.testing.assert_close(cell(x, h), f / (f + i) * h + i / (f + i) * h_tilde)


@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_streaming_equals_the_whole_sequence(family, log_space):
    """One step at a time, with the cell (the layer's weights loaded) and with the layer itself
    (two layers, one step per call), equals the whole sequence through the scan."""
    torch.manual_seed(7)
    layer = LAYERS[family](3, 4, num_layers=2, log_space=log_space)
    x = torch.randn(40, 2, 3)
    output, h_n = layer(x)

    cell = CELLS[family](3, 4, log_space=log_space)
    cell.load_state_dict({"weight_ih": layer.weight_ih_l0, "bias_ih": layer.bias_ih_l0})
    first_layer, _ = LAYERS[family](3, 4, log_space=log_space), None
    first_layer.load_state_dict({"weight_ih_l0": layer.weight_ih_l0,
                                 "bias_ih_l0": layer.bias_ih_l0})
    first_output, _ = first_layer(x)
    h = None
    for t in range(40):
        h = cell(x[t], h)
        torch.testing.assert_close(h, first_output[t], rtol=1e-5, atol=1e-6)

    state = None
    for t in range(40):
        step_output, state = layer(x[t : t + 1], state)
        torch.testing.assert_close(step_output[0], output[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, h_n, rtol=1e-5, atol=1e-6)

    unbatched = cell(x[0, 0])
    torch.testing.assert_close(unbatched, cell(x[0, :1])[0])


# ---- parameters ---------------------------------------------------------------------------
def test_parameters_names_shapes_initialisation_and_state_dict_round_trip():
    torch.manual_seed(8)
    layer = rnnkit.MinLSTM(3, 16, num_layers=2, bidirectional=True)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (48, 3), "bias_ih_l0": (48,),
        "weight_ih_l0_reverse": (48, 3), "bias_ih_l0_reverse": (48,),
        "weight_ih_l1": (48, 32), "bias_ih_l1": (48,),
        "weight_ih_l1_reverse": (48, 32), "bias_ih_l1_reverse": (48,),
    }
    bound = 1 / math.sqrt(16)
    for parameter in layer.parameters():
        values = parameter.detach()
        assert float(values.abs().max()) <= bound
        assert float(values.std()) > bound / 4  # drawn, not constant
    assert {n: tuple(p.shape) for n, p in rnnkit.MinGRUCell(3, 16).named_parameters()} == \
        {"weight_ih": (32, 3), "bias_ih": (32,)}
    assert [n for n, _ in rnnkit.MinGRU(3, 4, bias=False).named_parameters()] == ["weight_ih_l0"]

    copy_of = rnnkit.MinLSTM(3, 16, num_layers=2, bidirectional=True)
    copy_of.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(copy_of(x), layer(x), rtol=0, atol=0)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(9)
    layer = rnnkit.MinGRU(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(8, 2, 3)
    layer.eval()
    evaluation, _ = layer(x)
    torch.testing.assert_close(layer(x)[0], evaluation)
    layer.train()
    torch.manual_seed(0)
    scanned, _ = layer(x)
    assert not torch.allclose(scanned, evaluation)
    layer.backend = "reference"
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x)[0], scanned)  # the same masks on every backend
    with pytest.warns(UserWarning, match="dropout=0.5 acts between stacked layers only"):
        rnnkit.MinGRU(3, 4, dropout=0.5)


# ---- the boundary's errors ----------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    layer = rnnkit.MinGRU(3, 4, num_layers=2)
    log_layer = rnnkit.MinLSTM(3, 4, log_space=True)
    cell = rnnkit.MinLSTMCell(3, 4, log_space=True)
    x = torch.randn(5, 2, 3)
    cases = [
        (lambda: layer(torch.randn(5, 2, 7)), ValueError,
         r"MinGRU input must have shape \(L, N, H_in\) .* input_size = 3; got \(5, 2, 7\)"),
        (lambda: layer(x, torch.zeros(1, 2, 4)), ValueError,
         r"MinGRU hx \(h_0\) must have shape \(D\*num_layers, N, H\) = \(2, 2, 4\), got \(1, 2, 4\)"),
        (lambda: layer(x, (torch.zeros(2, 2, 4),)), TypeError, r"MinGRU hx must be a Tensor h_0"),
        (lambda: layer(x.double()), TypeError,
         r"MinGRU input has dtype torch.float64 but the parameters have dtype torch.float32"),
        (lambda: layer(x.long()), TypeError, r"MinGRU input must be a floating-point tensor"),
        (lambda: layer(x, lengths=[5, 6]), ValueError, r"lengths must lie in \[1, 5\]"),
        (lambda: layer(x[:, 0], lengths=[5]), ValueError, r"MinGRU lengths applies to batched input only"),
        (lambda: log_layer(x, -torch.ones(1, 2, 4)), ValueError,
         r"MinLSTM hx \(h_0\) must be >= 0 everywhere \(log_space=True keeps h >= 0.*got a minimum of -1"),
        (lambda: cell(torch.randn(2, 5)), ValueError,
         r"MinLSTMCell input must have shape \(N, 3\) or \(3,\) \(input_size=3\), got \(2, 5\)"),
        (lambda: cell(torch.randn(2, 3), torch.zeros(3, 4)), ValueError,
         r"MinLSTMCell hx must have shape \(N, H\) = \(2, 4\), got \(3, 4\)"),
        (lambda: cell(torch.randn(2, 3), -torch.ones(2, 4)), ValueError,
         r"MinLSTMCell hx must be >= 0 everywhere"),
        (lambda: cell(torch.randn(2, 3).half()), TypeError, r"MinLSTMCell input has dtype torch.float16"),
        (lambda: rnnkit.MinGRU(0, 4), ValueError, r"MinGRU input_size must be an int >= 1, got 0"),
        (lambda: rnnkit.MinLSTM(3, 4, log_space=1), TypeError, r"MinLSTM log_space must be True or False"),
        (lambda: rnnkit.MinGRU(3, 4, backend="fused"), ValueError,
         r"MinGRU backend must be one of 'auto', 'reference', 'scan', 'log_scan', 'native', "
         r"got 'fused'"),
        (lambda: rnnkit.MinGRU(3, 4, backend="log_scan"), ValueError,
         r"MinGRU backend 'log_scan' needs log_space=True .*got log_space=False, use 'scan'"),
        (lambda: rnnkit.MinGRUCell(3, 4, dtype=torch.int32), ValueError, r"MinGRUCell dtype must be None or one of"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    with pytest.raises(ValueError, match=r"MinGRU backend must be one of"):
        layer.backend = "fast"
    with pytest.raises(ValueError, match=r"run_log_scan needs log_space=True"):
        scan.run_log_scan(MinFamily.GRU, x, torch.zeros(2, 4), torch.zeros(8, 3), None, None,
                          False, False)
    # A zero state (the default) is accepted in log space: h_0 enters the scan linearly.
    log_layer(x, torch.zeros(1, 2, 4))


def test_torch_func_grad_equals_autograd():
    """The scans' autograd Functions keep forward and setup_context apart, so torch.func's
    transforms run them."""
    torch.manual_seed(10)
    x = torch.randn(70, 2, 3, dtype=torch.float64)
    for log_space, backend in ((False, "scan"), (True, "log_scan")):
        layer = rnnkit.MinLSTM(3, 4, log_space=log_space, backend=backend, dtype=torch.float64)
        transformed = torch.func.grad(lambda x, layer=layer: layer(x)[0].sum())(x)
        leaf = x.clone().requires_grad_()
        layer(leaf)[0].sum().backward()
        torch.testing.assert_close(transformed, leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_class", [rnnkit.MinGRU, rnnkit.MinLSTM, rnnkit.SLSTM, rnnkit.LSTM])
def test_the_unused_dropout_warning_points_at_the_callers_line(layer_class):
    with pytest.warns(UserWarning, match="acts between stacked layers only") as record:
        layer_class(4, 4, dropout=0.5)
    assert [w.filename for w in record] == [__file__]
