"""minGRU and minLSTM on the native CPU loop (``backend="native"``, ``rnnkit::native_min_scan``,
`rnnkit.engine.scan.run_native`): against the reference loop in values and every gradient, over
lengths, directions, variants, dtypes, extreme gates and T = 10,000; gradcheck; the operator's
opcheck, compile and export; the auto policy and the fallback with one warning."""

from __future__ import annotations

import warnings

import mpmath
import pytest
import torch
import torch.nn.functional as F

import rnnkit
from compare import (
    assert_same_normwise,
    operators_in,
    outputs_and_gradients,
    subnormals,
    unflushed_then_flushed,
)
from rnnkit import engine
from rnnkit.engine import BackendWarning, native, scan
from rnnkit.engine.native import build
from rnnkit.engine.scan import MinFamily
from test_minimal import (  # the minimal tests' helpers: one way to draw and compare a path
    DTYPES,
    LAYERS,
    STEPS,
    _collector_paused_one_thread,  # noqa: F401 (an autouse fixture, used by being imported)
    _direction_inputs,
    _path_results,
)

NATIVE = native.why_not(torch.zeros(1)) is None
pytestmark = pytest.mark.skipif(not NATIVE, reason="the native kernels could not be built here")


def _assert_native_equals_reference(family, x, h0, weight, bias, lengths, reverse, log_space,
                                    dtype, expected=None, group="minimal native"):
    expected = expected or _path_results(scan.run_reference, family, x, h0, weight, bias,
                                         lengths, reverse, log_space)
    actual = _path_results(scan.run_native, family, x, h0, weight, bias, lengths, reverse,
                           log_space)
    assert all(bool(t.isfinite().all()) for t in actual.values())
    assert_same_normwise(actual, expected, dtype, group=group)
    return actual


# ---- against the reference --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_native_equals_the_reference(family, log_space, steps, dtype):
    """Outputs (zero past each end), final states and the gradients of input, h0, weight and
    bias, with and without lengths, in both directions; H = 70 crosses a 64-unit work item and
    a vector's partial tail."""
    x, h0, weight, bias, lengths = _direction_inputs(family, steps, dtype, hidden=70)
    for reverse in (False, True):
        for given in (lengths, None):
            actual = _assert_native_equals_reference(family, x, h0, weight, bias, given,
                                                     reverse, log_space, dtype)
            if given is not None:
                past_end = torch.arange(steps).unsqueeze(1) >= given  # (T, N)
                assert not actual["output"][past_end].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_native_with_gates_near_zero_and_one(family, log_space, dtype):
    """Inputs x30: the gates reach 1e-6 of 0 and 1 (so 1 - z and f / (f + i) need their stable
    forms, and the minLSTM's log σ its), with lengths, both directions."""
    x, h0, weight, bias, lengths = _direction_inputs(family, 300, dtype, scale=30.0, seed=3)
    a, _ = scan.coefficients(family, F.linear(x, weight, bias), log_space)
    assert float(a.min()) < 1e-6 and float(a.max()) > 1 - 1e-6
    for reverse in (False, True):
        _assert_native_equals_reference(family, x, h0, weight, bias, lengths, reverse,
                                        log_space, dtype, group="minimal native extreme")


@pytest.mark.parametrize("dtype,steps,update_bias",
                         [(torch.float32, 30, 10.0), (torch.float64, 60, 14.0)],
                         ids=["float32", "float64"])
def test_native_flushes_subnormal_gradients_and_still_equals_the_reference(dtype, steps,
                                                                          update_bias):
    """minGRU with its update gate near 1 (a = 1 - z about e^-update_bias), the loss at the
    last step: the gradient decays back through the subnormal range (issue 20). The input is
    the projection itself (W_ih = I), so the input's gradient is the kernel's: subnormal on the
    reference and on the kernel with its flushing off, none with it on (the default), equal to
    the reference's either way."""
    family, hidden = MinFamily.GRU, 5
    x, h0, _, bias, _ = _direction_inputs(family, steps, dtype, input_size=2 * hidden,
                                          hidden=hidden, seed=4)
    weight = torch.eye(2 * hidden, dtype=dtype)
    bias = bias.clone()
    bias[:hidden] += update_bias  # (b_z|b_h)

    def results(path):
        leaves = [t.detach().clone().requires_grad_() for t in (x, h0, weight, bias)]
        output, _ = path(family, *leaves, None, False, False)
        grads = torch.autograd.grad(output[-1].sum(), leaves)
        names = ("grad:x", "grad:h0", "grad:weight_ih", "grad:bias_ih")
        return {"output": output.detach(), **dict(zip(names, grads, strict=True))}

    kernels = build.kernels()
    expected = results(scan.run_reference)
    assert subnormals(expected["grad:x"]) > 0
    unflushed, flushed = unflushed_then_flushed(kernels, lambda: results(scan.run_native))
    assert subnormals(unflushed["grad:x"]) > 0
    assert subnormals(flushed["grad:x"]) == 0
    assert_same_normwise(unflushed, expected, dtype, group="minimal native unflushed")
    assert_same_normwise(flushed, expected, dtype, group="minimal native flushed")


@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_native_log_space_is_stable_for_ten_thousand_steps(family):
    """T = 10,000, inputs x30 (gates at 0 and 1): finite, and equal to the float64 reference
    within the tolerance in float32 and float64, values and gradients (a loop in linear space
    has no cancellation to bound: each step is a convex combination)."""
    x, h0, weight, bias, _ = _direction_inputs(family, 10_000, torch.float64, batch=2,
                                               input_size=3, hidden=4, scale=30.0)
    expected = _path_results(scan.run_reference, family, x, h0, weight, bias, None, False, True)
    for dtype in DTYPES:
        cast = [t.to(dtype) for t in (x, h0, weight, bias)]
        actual = _path_results(scan.run_native, family, *cast, None, False, True)
        assert all(bool(t.isfinite().all()) for t in actual.values())
        assert_same_normwise({k: v.double() for k, v in actual.items()}, expected, dtype,
                             group="minimal native T=1e4")


def test_native_splits_the_units_between_threads():
    """Two threads and enough items that each gets its own (rows x 64-unit blocks, a ragged
    last block): the same values and gradients as the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for family in MinFamily:
            x, h0, weight, bias, lengths = _direction_inputs(family, 2, torch.float64, batch=64,
                                                             hidden=1000)
            _assert_native_equals_reference(family, x, h0, weight, bias, lengths, True, True,
                                            torch.float64)
    finally:
        torch.set_num_threads(threads)


# ---- gradcheck, double backward, torch.func --------------------------------------------------
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_gradcheck_native(family, log_space):
    """Finite differences in float64 against the C++ backward, with lengths (one sequence
    ending early), both directions, x, h0, weight and bias."""
    x, h0, weight, bias, _ = _direction_inputs(family, 11, torch.float64, batch=2,
                                               input_size=2, hidden=3)
    lengths = torch.tensor([11, 4])
    for reverse in (False, True):
        def run(x, h0, weight, bias, reverse=reverse):
            return scan.run_native(family, x, h0, weight, bias, lengths, reverse, log_space)

        leaves = [t.clone().requires_grad_() for t in (x, h0, weight, bias)]
        assert torch.autograd.gradcheck(run, leaves)


def test_native_gradient_is_differentiable_again():
    """A recorded backward (create_graph) differentiates the linear scan of the same
    projection: gradgradcheck's finite differences, and torch.func.grad equals autograd."""
    for family in MinFamily:
        x, h0, weight, bias, _ = _direction_inputs(family, 6, torch.float64, batch=2,
                                                   input_size=2, hidden=2)
        lengths = torch.tensor([6, 3])

        def run(x, h0, weight, bias, family=family, lengths=lengths):
            return scan.run_native(family, x, h0, weight, bias, lengths, True, True)

        leaves = [t.clone().requires_grad_() for t in (x, h0, weight, bias)]
        assert torch.autograd.gradgradcheck(run, leaves)
    torch.manual_seed(10)
    x = torch.randn(70, 2, 3, dtype=torch.float64)
    layer = rnnkit.MinLSTM(3, 4, backend="native", dtype=torch.float64)
    transformed = torch.func.grad(lambda x: layer(x)[0].sum())(x)
    leaf = x.clone().requires_grad_()
    layer(leaf)[0].sum().backward()
    torch.testing.assert_close(transformed, leaf.grad, rtol=1e-12, atol=1e-12)


# ---- the operator --------------------------------------------------------------------------
@pytest.mark.parametrize("with_lengths", [False, True], ids=["whole", "lengths"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_opcheck_native_min_scan(family, with_lengths):
    generator = torch.Generator().manual_seed(0)
    steps, batch, hidden = 5, 3, 4
    gates = scan.GATE_COUNT[family] * hidden
    projected = torch.randn(steps, batch, gates, generator=generator,
                            dtype=torch.float64).requires_grad_()
    h0 = torch.rand(batch, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    for reverse in (False, True):
        torch.library.opcheck(scan.native_min_scan,
                              (projected, h0, lengths, reverse, str(family), True))


def _minlstm_step_exactly(k_f, k_i, v, h0):
    """One minLSTM step h = f' h0 + i' v and its gradient in (k_f, k_i, v), in 60-digit
    arithmetic (mpmath): f' = f / (f + i), i' = i / (f + i), ∂f'/∂k_f = f' i' σ(-k_f),
    ∂f'/∂k_i = -f' i' σ(-k_i), each term computed without cancellation. Returns
    (h, (∂h/∂k_f, ∂h/∂k_i, ∂h/∂v)) as floats."""
    with mpmath.workdps(60):
        k_f, k_i, v, h0 = (mpmath.mpf(float(t)) for t in (k_f, k_i, v, h0))
        f, i = 1 / (1 + mpmath.exp(-k_f)), 1 / (1 + mpmath.exp(-k_i))
        f_prime, i_prime = f / (f + i), i / (f + i)
        spread = f_prime * i_prime * (h0 - v)
        d_k_f = spread / (1 + mpmath.exp(k_f))  # σ(-k_f)
        d_k_i = -spread / (1 + mpmath.exp(k_i))
        return float(f_prime * h0 + i_prime * v), (float(d_k_f), float(d_k_i), float(i_prime))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minlstm_coefficients_on_a_grid_of_extreme_gates(dtype):
    """The kernel's f' = f / (f + i) form against 60-digit arithmetic at every pair of gate
    pre-activations from -200 to 200: both gates underflowing (σ(-104) is 0 in float32), one
    saturated and the other not, equal ones (f' = 1/2). One step from h0 = 1 with h̃ = 0
    gives h = f', from h0 = 0 with h̃ = 1 gives h = i'; the backward of the same step gives
    the three pre-activations' gradients. Every value within 16 ulps, or below the smallest
    normal number (the kernels flush subnormals). The reference loop's σ(r) form loses these
    gradients (its σ(r) (1 - σ(r)) is 0 from r = 37 in float64), so it is not the oracle here."""
    kernels = build.kernels()
    levels = [-200.0, -104.0, -90.0, -30.0, -3.0, -0.5, 0.0, 0.5, 3.0, 30.0, 90.0, 104.0, 200.0]
    pairs = [(k_f, k_i) for k_f in levels for k_i in levels]
    rows = len(pairs)
    tolerance = {"rtol": 16 * torch.finfo(dtype).eps, "atol": torch.finfo(dtype).tiny}
    for h0_value, v in ((1.0, 0.0), (0.0, 1.0)):  # h = f', then h = i'
        exact = [_minlstm_step_exactly(k_f, k_i, v, h0_value) for k_f, k_i in pairs]
        expected_h = torch.tensor([[[h] for h, _ in exact]], dtype=torch.float64)  # (1, rows, 1)
        expected_d = torch.tensor([[list(d) for _, d in exact]], dtype=torch.float64)
        projected = torch.tensor([[[k_f, k_i, v] for k_f, k_i in pairs]], dtype=dtype)
        h0 = torch.full((rows, 1), h0_value, dtype=dtype)
        output, states = kernels.min_scan_forward(projected, h0, None, False, True, False)
        torch.testing.assert_close(output.double(), expected_h, **tolerance)
        d_projected, _ = kernels.min_scan_backward(torch.ones(1, rows, 1, dtype=dtype),
                                                   torch.zeros(rows, 1, dtype=dtype),
                                                   projected, states, None, False, True, False)
        torch.testing.assert_close(d_projected.double(), expected_d, **tolerance)


def test_native_kernel_checks_its_arguments():
    kernels = build.kernels()
    projected, h0 = torch.zeros(4, 2, 6), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match=r"min_scan_forward: projected must have shape "
                                           r"\[4, 2, 9\], got \[4, 2, 6\]"):
        kernels.min_scan_forward(projected, h0, None, False, True, False)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 4\].*got 5"):
        kernels.min_scan_forward(projected, h0, torch.tensor([5, 1]), False, False, False)
    with pytest.raises(RuntimeError, match=r"h0 must be Float"):
        kernels.min_scan_forward(projected, h0.double(), None, False, False, False)


@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_compile_and_export_see_one_native_node(family):
    """torch.compile (fullgraph, dynamic, aot_eager) and torch.export with a dynamic batch and
    length: the same outputs and gradients as eager, and the exported graph holds the
    operator."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LAYERS[family](3, 4, bidirectional=True, backend="native")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for steps, batch in ((5, 3), (8, 6)):
        x = torch.randn(steps, batch, 3, requires_grad=True)
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0] = steps
        expected = outputs_and_gradients(layer, lambda m, x=x, n=lengths: m(x, lengths=n),
                                         {"x": x})
        actual = outputs_and_gradients(layer, lambda m, x=x, n=lengths: compiled(x, lengths=n),
                                       {"x": x})
        assert_same_normwise(actual, expected, torch.float32)
    torch._dynamo.reset()
    x, lengths = torch.randn(6, 4, 3), torch.tensor([6, 2, 5, 1])
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    program = torch.export.export(layer, (x,), {"lengths": lengths},
                                  dynamic_shapes={"input": {0: steps, 1: batch},
                                                  "lengths": {0: batch}})
    assert "rnnkit.native_min_scan.default" in {str(n.target) for n in program.graph.nodes}
    x, lengths = torch.randn(9, 7, 3), torch.tensor([9, 1, 2, 3, 4, 5, 6])
    for actual, expected in zip(program.module()(x, lengths=lengths), layer(x, lengths=lengths),
                                strict=True):
        torch.testing.assert_close(actual, expected)


# ---- one streamed step: the step kernel --------------------------------------------------------
@pytest.mark.parametrize("threads", ["inline", "every-block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log_space", [False, True], ids=["linear", "log_space"])
@pytest.mark.parametrize("family", list(MinFamily), ids=str)
def test_step_kernel_equals_the_reference_step(family, log_space, dtype, threads):
    """``min_step`` (the projection and ``h' = a ⊙ h + b`` in one call) against the reference
    step on autograd (`scan.step`) within 1e-5 (float32) / 1e-10 (float64) of the largest
    entry: batches 1-5 and 8 (one 6-row chunk and a partial one), odd sizes (I = 7, H = 1, 5, 37,
    70: partial vectors and blocks), with and without a bias, inputs x1 and x30 (gates at 0 and
    1), on one thread and with every block its own task on two."""
    kernels = build.kernels()
    built = kernels.thread_min_multiply_adds()
    if threads == "every-block":
        kernels.set_thread_min_multiply_adds(1)
        torch.set_num_threads(2)  # the autouse fixture restores the count
    try:
        for hidden in (1, 5, 37, 70):
            for batch in (1, 2, 3, 4, 5, 8):
                for scale in (1.0, 30.0):
                    x, h0, weight, bias, _ = _direction_inputs(
                        family, 1, dtype, batch=batch, input_size=7, hidden=hidden,
                        scale=scale, seed=hidden + batch)
                    for given_bias in (bias, None):
                        with torch.no_grad():
                            got = native.functions.min_step_kernel(
                                weight, given_bias, str(family), log_space)(x[0], h0)
                        want = scan.step(family, x[0], h0, weight, given_bias, log_space)
                        assert got.shape == (batch, hidden) and bool(got.isfinite().all())
                        if log_space:
                            assert bool((got >= 0).all())
                        assert_same_normwise({"h": got}, {"h": want}, dtype,
                                             group="minimal step kernel")
    finally:
        kernels.set_thread_min_multiply_adds(built)


def test_step_kernel_checks_its_arguments_and_declines_a_negative_log_space_state():
    """A wrong argument is named with what was expected; with log_space a state with a
    negative entry is declined (None, nothing computed: the callers' checked way refuses it by
    name), the linear variant's is stepped."""
    kernels = build.kernels()
    x, h, weight, bias = torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(8, 3), torch.zeros(8)
    assert kernels.min_step(x, h, weight, bias, False, True).shape == (2, 4)
    cases = [
        ((x, h, weight, bias, True, False), r"w_ih must have shape \[12, 3\], got \[8, 3\]"),
        ((x, h[:1], weight, bias, False, False), r"h must have shape \[2, 4\], got \[1, 4\]"),
        ((x, h[0], weight, bias, False, False), r"h must have 2 dimensions"),
        ((x, h, weight, bias[:4], False, False), r"b_ih must have shape \[8\], got \[4\]"),
        ((x, h.double(), weight, bias, False, False), r"h must be Float, got Double"),
        ((x.int(), h, weight, bias, False, False), r"x must be float32 or float64"),
        ((x, torch.zeros(4, 2).t(), weight, bias, False, False), r"h must be contiguous"),
    ]
    for arguments, message in cases:
        with pytest.raises(RuntimeError, match=f"min_step: {message}"):
            kernels.min_step(*arguments)
    negative = h.clone()
    negative[1, 2] = -1e-30
    assert kernels.min_step(x, negative, weight, bias, False, True) is None
    assert kernels.min_step(x, negative, weight, bias, False, False).shape == (2, 4)


# ---- the policy and the fallback ---------------------------------------------------------------
def test_auto_runs_native_on_cpu_floats_and_the_scan_elsewhere():
    x = torch.zeros(5, 2, 3)
    assert scan.engine_for("auto", False, x) == "native"
    assert scan.engine_for("auto", True, x.double()[:1]) == "native"  # a streamed step too
    assert scan.engine_for("native", True, x) == "native"
    assert scan.engine_for("auto", True, x.bfloat16()) == "linear_scan"
    assert scan.engine_for("auto", True, x.bfloat16()[:1]) == "reference"
    assert scan.engine_for("auto", False, x[:, :0]) == "linear_scan"  # nothing to compute
    assert scan.engine_for("scan", True, x) == "linear_scan"
    assert scan.engine_for("log_scan", True, x) == "log_scan"
    assert scan.engine_for("reference", False, x) == "reference"
    layer = rnnkit.MinGRU(3, 4)
    assert operators_in(scan.run_direction(MinFamily.GRU, x.requires_grad_(), torch.zeros(2, 4),
                                           layer.weight_ih_l0, layer.bias_ih_l0, None, False,
                                           False)[0]) == {"native_min_scan"}


def test_native_on_an_unsupported_input_runs_the_scan_after_one_warning(monkeypatch):
    monkeypatch.setattr(engine, "_warned", set())  # whatever ran before in this process
    torch.manual_seed(3)
    layer = rnnkit.MinLSTM(3, 4, backend="native", dtype=torch.bfloat16)
    x = torch.randn(9, 2, 3, dtype=torch.bfloat16)
    with pytest.warns(BackendWarning, match=r"backend='native' cannot run this input \(the "
                                            r"kernels are for float32 and float64, the input is "
                                            r"torch.bfloat16\); running backend='scan'"):
        output, h_n = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again, _ = layer(x)
    layer.backend = "scan"
    expected, expected_h_n = layer(x)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h_n, rtol=0, atol=0)


def test_without_kernels_native_runs_the_scan(monkeypatch):
    """No compiler (the build has already warned, `NativeBuildWarning`): "native" and "auto"
    run the linear scan without another warning, with the same results."""
    monkeypatch.setattr(native, "available", lambda: False)
    x = torch.randn(6, 2, 3)
    assert scan.engine_for("native", False, x) == "linear_scan"
    assert scan.engine_for("auto", False, x[:1]) == "reference"
    layer = rnnkit.MinGRU(3, 4, backend="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, _ = layer(x)
    layer.backend = "scan"
    torch.testing.assert_close(output, layer(x)[0], rtol=0, atol=0)
