"""xLSTM's sLSTM (rnnkit.slstm, rnnkit.engine.slstm): the fused and native operators against the
reference loop (values and all gradients), all against the paper's unstabilised equations
written out here, the stabiliser at extreme inputs, the native kernels' threads, products and
argument checks, the input forms, streaming, state dicts and the boundary's errors."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import rnnkit
from compare import (
    assert_same,
    assert_same_normwise,
    operators_in,
    outputs_and_gradients,
    subnormals,
    unflushed_then_flushed,
)
from rnnkit import engine
from rnnkit.engine import ops, slstm
from rnnkit.engine.native import build

DTYPES = (torch.float32, torch.float64)
PATHS = {"reference": slstm.run_reference, "fused": ops.run_fused_slstm,
         "native": ops.run_native_slstm}
FAST_PATHS = ("fused", "native")
NAMES = ("x", "h0", "c0", "n0", "m0", "weight_ih", "weight_hh", "bias_ih")


@pytest.fixture(autouse=True)
def _collector_paused_one_thread():
    """As tests/test_minimal.py: the reference loop's autograd graph makes Python's cyclic
    collector quadratic in T, and tensors this small gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        torch.set_num_threads(threads)


def _inputs(steps, dtype, *, batch=3, input_size=4, hidden=8, heads=2, scale=1.0, seed=0,
            empty_state=False):
    """x, the initial state (h, c, n, m), weights and lengths (one sequence full length), drawn
    in float64 and rounded, so that both dtypes see the same problem."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    width = hidden // heads
    x = draw(steps, batch, input_size) * scale
    if empty_state:
        state = (torch.zeros(batch, hidden, dtype=torch.float64),) * 3 + (
            torch.full((batch, hidden), -math.inf, dtype=torch.float64),)
    else:  # a state the cell can reach: |c| <= n, n >= 1
        n0 = 1 + torch.rand(batch, hidden, generator=generator, dtype=torch.float64)
        state = (draw(batch, hidden).tanh() * 0.5, (torch.rand(batch, hidden,
                 generator=generator, dtype=torch.float64) * 2 - 1) * n0, n0, draw(batch, hidden))
    weight_ih = draw(4 * hidden, input_size) / math.sqrt(input_size)
    weight_hh = draw(heads, 4 * width, width) / math.sqrt(width)
    bias = draw(4 * hidden) * 0.5
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    tensors = (x, *state, weight_ih, weight_hh, bias)
    return [t.to(dtype) for t in tensors], lengths


def _results(path, tensors, lengths, reverse, exp_forget):
    """Outputs, the four final state parts and the gradients of every input of one path, under
    a fixed random projection of all five results (float64 draws, as tests/compare.py)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    output, final = path(leaves[0], tuple(leaves[1:5]), leaves[5], leaves[6], leaves[7],
                         lengths, reverse, exp_forget)
    results = {"output": output, "h_n": final[0], "c_n": final[1], "n_n": final[2],
               "m_n": final[3]}
    generator = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype))
               .sum() for t in results.values())
    grads = torch.autograd.grad(loss, leaves)
    return {**{k: v.detach() for k, v in results.items()},
            **{f"grad:{name}": g for name, g in zip(NAMES, grads, strict=True)}}


# ---- the fused and native operators against the reference loop -----------------------------
@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("steps", [1, 2, 7, 64, 300])
def test_fast_path_equals_the_reference(steps, heads, dtype, path):
    """Outputs, all four final state parts and the gradients of input, initial state (all four
    parts) and every parameter, with lengths (outputs past each end zero) and without, both
    directions, both forget gates, from a reachable state and from the empty one (m_0 =
    -inf)."""
    for empty_state in (False, True):
        tensors, lengths = _inputs(steps, dtype, heads=heads, empty_state=empty_state,
                                   seed=steps)
        for reverse in (False, True):
            for exp_forget in (False, True):
                # Without lengths, once per direction (the native output is then a view of its
                # states buffer, a path of its own).
                for each_length in (lengths, None) if exp_forget == empty_state else (lengths,):
                    expected = _results(slstm.run_reference, tensors, each_length, reverse,
                                        exp_forget)
                    if each_length is not None:
                        past_end = torch.arange(steps).unsqueeze(1) >= each_length  # (T, N)
                        assert not expected["output"][past_end].any()
                    actual = _results(PATHS[path], tensors, each_length, reverse, exp_forget)
                    if empty_state:  # m_0 = -inf: its gradient is 0 on both, compared apart
                        assert not expected.pop("grad:m0").any()
                        assert not actual.pop("grad:m0").any()
                    assert_same_normwise(actual, expected, dtype, group=f"slstm {path}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_backends_agree_stacked_bidirectional_packed(dtype):
    """A three-layer bidirectional layer with four heads: "fused", "native" and "auto" equal
    "reference"
    in outputs, every state part and the gradients of input, hx and every parameter, on
    padded input with lengths and on the same batch packed."""
    torch.manual_seed(1)
    layer = rnnkit.SLSTM(4, 8, num_layers=3, bidirectional=True, num_heads=4, dtype=dtype,
                         backend="reference")
    x = torch.randn(37, 3, 4, dtype=dtype)
    h0, c0, m0 = (torch.randn(6, 3, 8, dtype=dtype) * 0.5 for _ in range(3))
    n0 = 1 + torch.rand(6, 3, 8, dtype=dtype)
    lengths = torch.tensor([37, 1, 20])
    inputs = {name: t.requires_grad_() for name, t in
              zip(("x", "h0", "c0", "n0", "m0"), (x, h0, c0, n0, m0), strict=True)}

    def state():
        return tuple(inputs[k] for k in ("h0", "c0", "n0", "m0"))

    calls = {
        "lengths": lambda m: m(inputs["x"], state(), lengths=lengths),
        "packed": lambda m: m(pack_padded_sequence(inputs["x"], lengths, enforce_sorted=False),
                              state()),
    }
    for call in calls.values():
        expected = outputs_and_gradients(layer, call, inputs)
        for backend in ("fused", "native", "auto"):
            other = copy.deepcopy(layer)
            other.backend = backend
            assert_same_normwise(outputs_and_gradients(other, call, inputs), expected, dtype,
                                 group="slstm layer")


def test_auto_runs_native_where_it_can_and_an_empty_batch_the_reference():
    x = torch.zeros(3, 2, 4)
    assert engine.slstm_engine_for("auto", x) == "native"
    assert engine.slstm_engine_for("auto", x.double()) == "native"
    assert engine.slstm_engine_for("auto", x.half()) == "fused"  # no float16 kernels
    assert engine.slstm_engine_for("native", x) == "native"
    assert engine.slstm_engine_for("fused", x) == "fused"
    assert engine.slstm_engine_for("reference", x) == "reference"
    assert engine.slstm_engine_for("auto", torch.zeros(3, 0, 4)) == "reference"


@pytest.mark.parametrize("lengths", [None, [5, 2]])
@pytest.mark.parametrize("backend", ["auto", "native", "fused"])
def test_fast_backend_runs_its_own_operator(backend, lengths):
    """Guards the parity tests above: "native" (or "auto") silently running "fused" would pass
    them too. The operator is read off the autograd node that produced the output and h_n."""
    layer = rnnkit.SLSTM(3, 8, num_heads=2, backend=backend)
    output, (h_n, *_) = layer(torch.randn(5, 2, 3), lengths=lengths)
    expected = "fused" if backend == "fused" else "native"
    assert operators_in(output) == operators_in(h_n) == {f"{expected}_slstm"}


@settings(max_examples=25)
@given(steps=st.integers(1, 12), batch=st.integers(1, 3), heads=st.sampled_from([1, 2, 3]),
       width=st.integers(1, 3), reverse=st.booleans(), exp_forget=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_fast_paths_equal_the_reference_property(steps, batch, heads, width, reverse,
                                                 exp_forget, scale, seed):
    """Any small shape, head count and input scale (float64): the same values and gradients."""
    tensors, lengths = _inputs(steps, torch.float64, batch=batch, hidden=heads * width,
                               heads=heads, scale=scale, seed=seed)
    expected = _results(slstm.run_reference, tensors, lengths, reverse, exp_forget)
    for path in FAST_PATHS:
        actual = _results(PATHS[path], tensors, lengths, reverse, exp_forget)
        assert_same_normwise(actual, expected, torch.float64, group=path)


# ---- gradcheck ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_gradcheck(path):
    """Finite differences in float64 against each path's backward (the fused and native ones
    hand-written), with lengths, both directions, both forget gates; and the operators' double
    backward (through the reference's differentiable vector-Jacobian product)."""
    tensors, _ = _inputs(6, torch.float64, batch=2, input_size=3, hidden=4, heads=2, seed=3)
    lengths = torch.tensor([6, 3])
    leaves = [t.clone().requires_grad_() for t in tensors]
    for reverse in (False, True):
        for exp_forget in (False, True):
            def run(*a, reverse=reverse, exp_forget=exp_forget):
                output, final = PATHS[path](a[0], tuple(a[1:5]), a[5], a[6], a[7], lengths,
                                            reverse, exp_forget)
                return (output, *final)

            assert torch.autograd.gradcheck(run, leaves)
    if path != "reference":
        assert torch.autograd.gradgradcheck(run, leaves)


def test_operator_registration():
    """torch.library's own check of the operators: schema, fake (meta) shapes, autograd formula
    registration, against the implementation; the native ones with and without lengths (their
    output is then an empty stand-in), and the native backward on the forward's buffers."""
    tensors, lengths = _inputs(4, torch.float64, batch=2, input_size=3, hidden=4, heads=2)
    arguments = (*[t.requires_grad_() for t in tensors], lengths, True, False)
    torch.library.opcheck(ops.fused_slstm, arguments)
    for each_length in (lengths, None):
        for exp_forget in (False, True):
            torch.library.opcheck(ops.native_slstm, (*arguments[:8], each_length, False,
                                                     exp_forget))
    with torch.no_grad():
        (h_states, _, h_n, c_n, n_n, m_n, pre, c_states, n_states,
         m_states) = ops.native_slstm(*arguments[:8], lengths, True, False)
    d_output = torch.randn(4, 2, 4, dtype=torch.float64)
    torch.library.opcheck(ops.native_slstm_backward, (
        d_output, *(torch.randn_like(h_n) for _ in range(4)), pre, c_states, n_states,
        m_states, arguments[6].detach(), lengths, True, False))


def test_torch_func_grad_equals_autograd():
    torch.manual_seed(10)
    layer = rnnkit.SLSTM(3, 4, num_heads=2, dtype=torch.float64)
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    transformed = torch.func.grad(lambda x: layer(x)[0].sum())(x)
    leaf = x.clone().requires_grad_()
    layer(leaf)[0].sum().backward()
    torch.testing.assert_close(transformed, leaf.grad, rtol=1e-12, atol=1e-12)


# ---- the native kernels: threads, products, the inference path, argument checks -------------
@pytest.fixture(params=["tiles", "blas", "threads", "blas-threads"])
def native_products(request):
    """Runs a test with the native step products on the kernels' tiles, then on ATen's mm,
    then with two threads sharing every head and product, on the tiles and on mm (ATen's mm
    then called from inside the heads' parallel region); the default thresholds restored."""
    kernels = build.kernels()
    if kernels is None:
        pytest.fail("the native kernels did not build")
    defaults = (kernels.blas_min_multiply_adds(), kernels.thread_min_multiply_adds(),
                kernels.blas_min_rows())
    kernels.set_blas_min_multiply_adds(0 if request.param.startswith("blas") else 2**62)
    kernels.set_blas_min_rows(0)  # "blas": every product on mm, whatever the CPU's profile
    if request.param.endswith("threads"):
        kernels.set_thread_min_multiply_adds(1)
        torch.set_num_threads(2)  # the autouse fixture restores the count
    yield request.param
    kernels.set_blas_min_multiply_adds(defaults[0])
    kernels.set_thread_min_multiply_adds(defaults[1])
    kernels.set_blas_min_rows(defaults[2])


@pytest.mark.parametrize("steps,batch,hidden,heads", [(2, 1, 12, 1), (5, 13, 36, 4),
                                                      (3, 7, 70, 2), (9, 3, 20, 5)])
def test_native_equals_the_reference_on_every_product(steps, batch, hidden, heads,
                                                      native_products):
    """Float64, with lengths, both directions and forget gates: batch 1 and leftover rows of
    the tiles, head widths that leave a partial vector (d = 9, 35, 4), steps 1-2 on the
    dot-product kernel and 3 or more on the transposed copy of R_k."""
    tensors, lengths = _inputs(steps, torch.float64, batch=batch, input_size=5, hidden=hidden,
                               heads=heads, seed=steps + batch)
    for reverse in (False, True):
        for exp_forget in (False, True):
            expected = _results(slstm.run_reference, tensors, lengths, reverse, exp_forget)
            actual = _results(ops.run_native_slstm, tensors, lengths, reverse, exp_forget)
            assert_same_normwise(actual, expected, torch.float64, group=native_products)


def test_native_threads_heads_at_a_size_worth_it_by_default():
    """Default thresholds, two threads: each head's product (N d 4d multiply-adds) is worth a
    thread here, so the heads of a step are shared between threads; float32 and float64."""
    kernels = build.kernels()
    batch, hidden, heads = 16, 128, 4
    width = hidden // heads
    assert batch * width * 4 * width >= kernels.thread_min_multiply_adds()
    torch.set_num_threads(2)
    for dtype in DTYPES:
        tensors, lengths = _inputs(6, dtype, batch=batch, input_size=5, hidden=hidden,
                                   heads=heads, seed=2)
        expected = _results(slstm.run_reference, tensors, lengths, False, False)
        actual = _results(ops.run_native_slstm, tensors, lengths, False, False)
        assert_same_normwise(actual, expected, dtype, group="threaded heads")


@pytest.mark.parametrize("dtype,steps,forget_bias,recurrent_scale",
                         [(torch.float32, 30, -10.0, 1e-2), (torch.float64, 60, -14.0, 1e-6)],
                         ids=["float32", "float64"])
def test_native_flushes_subnormal_gradients_and_still_equals_the_reference(
        dtype, steps, forget_bias, recurrent_scale):
    """A backward whose gradients decay through the subnormal range on their way back from a
    loss at the last step (a strongly negative forget bias and a weak recurrence: a factor of
    e^forget_bias, or recurrent_scale, a step; issue 20): the reference's input gradient holds
    subnormals, so does the native one with the kernels' flushing off, none with it on (the
    default), and its outputs and gradients equal the reference's either way."""
    kernels = build.kernels()
    tensors, _ = _inputs(steps, torch.float64, empty_state=True, seed=3)
    tensors[6] = tensors[6] * recurrent_scale  # weight_hh
    tensors[7] = tensors[7].clone()
    tensors[7][8:16] += forget_bias  # bias_ih's forget gate (hidden 8)
    tensors = [t.to(dtype) for t in tensors]

    def results(path):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        output, final = path(leaves[0], tuple(leaves[1:5]), leaves[5], leaves[6], leaves[7],
                             None, False, False)
        wanted = {"x": leaves[0], "weight_ih": leaves[5], "weight_hh": leaves[6],
                  "bias_ih": leaves[7]}
        grads = torch.autograd.grad(output[-1].sum(), list(wanted.values()))
        return {"output": output.detach(), **{f"grad:{name}": g for name, g in
                                              zip(wanted, grads, strict=True)}}

    expected = results(slstm.run_reference)
    assert subnormals(expected["grad:x"]) > 0
    unflushed, flushed = unflushed_then_flushed(kernels, lambda: results(ops.run_native_slstm))
    assert subnormals(unflushed["grad:x"]) > 0
    assert not any(subnormals(t) for t in flushed.values())
    assert_same_normwise(unflushed, expected, dtype, group="slstm unflushed")
    assert_same_normwise(flushed, expected, dtype, group="slstm flushed")


def test_native_inference_path_equals_the_training_path():
    """Under no_grad the native operator's implementation runs alone and keeps nothing for a
    backward (z and o are not written over the pre-activations): the
    same kernels otherwise, so the same bits."""
    layer = rnnkit.SLSTM(3, 8, num_layers=2, bidirectional=True, num_heads=2,
                         dtype=torch.float64, backend="native")
    x = torch.randn(11, 3, 3, dtype=torch.float64)
    for lengths in (None, [11, 4, 1]):
        expected = layer(x, lengths=lengths)
        with torch.no_grad():
            actual = layer(x, lengths=lengths)
        assert expected[0].grad_fn is not None and actual[0].grad_fn is None
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_native_kernels_check_every_argument():
    """A direct call of a kernel with a wrong argument names the kernel, the argument, what it
    got and what it accepts, before any work."""
    kernels = build.kernels()
    steps, batch, heads, width = 3, 2, 2, 4
    hidden = heads * width
    pre = torch.zeros(steps, batch, 4 * hidden)
    state = torch.zeros(batch, hidden)
    w_hh = torch.zeros(heads, 4 * width, width)

    def forward(**changed):
        arguments = {"pre": pre.clone(), "h0": state, "c0": state, "n0": state, "m0": state,
                     "w_hh": w_hh, "lengths": None, "reverse": False, "exp_forget": False,
                     "for_backward": True, **changed}
        return kernels.slstm_forward(*arguments.values())

    cases = [
        (dict(h0=torch.zeros(batch, hidden + 1)), r"slstm_forward: h0 must have shape \[2, 8\], "
         r"got \[2, 9\]"),
        (dict(m0=torch.zeros(batch, hidden, dtype=torch.float64)),
         r"slstm_forward: m0 must be Float, got Double"),
        (dict(c0=torch.zeros(hidden, batch).t()), r"slstm_forward: c0 must be contiguous"),
        (dict(w_hh=torch.zeros(4 * hidden, hidden)),
         r"slstm_forward: w_hh must have 3 dimensions \[heads, 4 \* head_size, head_size\], "
         r"got shape \[32, 8\]"),
        (dict(w_hh=torch.zeros(heads, 3 * width, width)),
         r"slstm_forward: w_hh must have shape \[2, 16, 4\], got \[2, 12, 4\]"),
        (dict(pre=torch.zeros(steps, batch, 3 * hidden)),
         r"slstm_forward: pre must have shape \[3, 2, 32\], got \[3, 2, 24\]"),
        (dict(pre=torch.zeros(steps, batch, 4 * hidden, dtype=torch.int32)),
         r"slstm_forward: pre must be float32 or float64, got Int"),
        (dict(lengths=torch.tensor([3, 4])),
         r"slstm_forward: lengths must lie in \[1, 3\] .*got 4 at index 1"),
        (dict(lengths=torch.tensor([3, 2], dtype=torch.int32)),
         r"slstm_forward: lengths must be Long, got Int"),
    ]
    for changed, message in cases:
        with pytest.raises(RuntimeError, match=message):
            forward(**changed)
    _, _, c_states, n_states, m_states = forward()
    good = {"d_output": torch.zeros(steps, batch, hidden), "d_h_n": state, "d_c_n": state,
            "d_n_n": state, "d_m_n": state, "pre": pre, "c_states": c_states,
            "n_states": n_states, "m_states": m_states, "w_hh": w_hh, "lengths": None,
            "reverse": False, "exp_forget": False}
    assert kernels.slstm_backward(*good.values())[0].shape == pre.shape
    for name, wrong, message in [
        ("pre", pre[:, :, :-1].contiguous(), r"pre must have shape \[3, 2, 32\], got "
         r"\[3, 2, 31\]"),
        ("m_states", m_states[1:].contiguous(), r"m_states must have shape \[4, 2, 8\]"),
        ("d_output", torch.zeros(steps, batch, hidden + 1), r"d_output must have shape"),
        ("d_n_n", state.double(), r"d_n_n must be Float, got Double"),
    ]:
        with pytest.raises(RuntimeError, match=f"slstm_backward: {message}"):
            kernels.slstm_backward(*{**good, name: wrong}.values())


# ---- the streamed step's kernel (inference) ---------------------------------------------------
STEP_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _step_case(batch, heads, dtype, scale, empty_state, seed):
    """x (N, I), the state (h, c, n, m) and the weights of one step; head widths 37 and 9 leave
    a partial vector; float64 draws rounded, as `_inputs`."""
    tensors, _ = _inputs(1, dtype, batch=batch, input_size=13, hidden=37 if heads == 1 else 36,
                         heads=heads, scale=scale, seed=seed, empty_state=empty_state)
    return tensors[0][0].contiguous(), tuple(tensors[1:5]), *tensors[5:]


def _step64(case, with_bias, exp_forget, generator=None):
    """The reference step in float64 on ``case``; with a ``generator``, every input and weight
    first multiplied by ``1 + u``, ``u`` uniform in ±2^-24 (one float32 rounding; as
    tests/compare.py's ``rounding_sensitivity``)."""
    x, state, w_ih, w_hh, bias = case

    def rounded(t):
        if t is None or generator is None:
            return t
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1
        return t * (1 + u * 2.0**-24)

    return slstm.step(rounded(x), tuple(rounded(p) for p in state), rounded(w_ih),
                      rounded(w_hh), rounded(bias) if with_bias else None, exp_forget)


def _normwise(got, want):
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("threads", ["by-size", "every-block"])
@pytest.mark.parametrize("exp_forget", [False, True], ids=["sigmoid", "exp"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_kernel_equals_the_reference_step(dtype, heads, batch, exp_forget, threads):
    """``slstm_step`` (both products and the gate math in one call) against the reference
    step on autograd (`slstm.step`, i.e. `gate_step` after the products) for h, c, n, m: within
    1e-5 (float32) and 1e-10 (float64) of each part's largest entry, from a reachable state and
    from the empty one (n = 0, m = -inf), with and without a bias, on one thread and with every
    block of units its own task on two. With inputs x1e3 every value stays finite, n >= 1 and
    |h| <= 1; in float64 the 1e-10 holds there too, while in float32 the problem itself moves
    by more than 1e-5 under one rounding of its inputs (pre-activations of ~1e3, exponentiated;
    the float32 reference is off from the float64 one by up to ~5e-5), so there the kernel is
    held, as tests/compare.py holds such cases, to max(1e-5, ten times that movement) of the
    float64 step."""
    kernels = build.kernels()
    built = kernels.thread_min_multiply_adds()
    if threads == "every-block":
        kernels.set_thread_min_multiply_adds(1)
        torch.set_num_threads(2)  # the autouse fixture restores the count
    try:
        for scale in (1.0, 1e3):
            for empty_state in (False, True):
                for with_bias in (True, False):
                    x, state, w_ih, w_hh, bias = _step_case(batch, heads, dtype, scale,
                                                            empty_state, seed=batch + heads)
                    bias = bias if with_bias else None
                    with torch.no_grad():
                        got = engine.native_functions.slstm_step_kernel(
                            w_ih, w_hh, bias, exp_forget)(x, state)
                    want = slstm.step(x, state, w_ih, w_hh, bias, exp_forget)
                    assert all(bool(part.isfinite().all()) for part in got)
                    assert bool((got[2] >= 1).all()) and bool((got[0].abs() <= 1).all())
                    if scale == 1.0 or dtype == torch.float64:
                        assert_same_normwise(dict(zip("hcnm", got, strict=True)),
                                             dict(zip("hcnm", want, strict=True)), dtype,
                                             group="slstm step kernel")
                        continue
                    exact = _step_case(batch, heads, torch.float64, scale, empty_state,
                                       seed=batch + heads)
                    truth = _step64(exact, with_bias, exp_forget)
                    moved = [0.0] * 4
                    generator = torch.Generator().manual_seed(0)
                    for _ in range(3):  # one float32 rounding of every input, in float64
                        rounded = _step64(exact, with_bias, exp_forget, generator)
                        moved = [max(a, _normwise(b, t)) for a, b, t in
                                 zip(moved, rounded, truth, strict=True)]
                    for part, mine, exact_part, sensitivity in zip("hcnm", got, truth, moved,
                                                                   strict=True):
                        allowed = max(STEP_TOLERANCE[dtype], 10 * sensitivity)
                        error = _normwise(mine.double(), exact_part)
                        assert error <= allowed, f"{part}: {error:.3g} > {allowed:.3g}"
    finally:
        kernels.set_thread_min_multiply_adds(built)


def test_step_kernel_checks_every_argument():
    """A direct call of ``slstm_step`` with a wrong argument names the kernel, the argument,
    what it got and what it accepts, before any work."""
    kernels = build.kernels()
    batch, heads, width, inputs = 2, 2, 4, 3
    hidden = heads * width
    state = torch.zeros(batch, hidden)
    good = {"x": torch.zeros(batch, inputs), "h": state, "c": state, "n": state, "m": state,
            "w_ih": torch.zeros(4 * hidden, inputs), "w_hh": torch.zeros(heads, 4 * width, width),
            "b_ih": torch.zeros(4 * hidden), "exp_forget": False}
    assert all(part.shape == (batch, hidden) for part in kernels.slstm_step(*good.values()))
    cases = [
        ("x", torch.zeros(batch, inputs, 1), r"x must have 2 dimensions, got shape \[2, 3, 1\]"),
        ("x", torch.zeros(batch, inputs, dtype=torch.int64), r"x must be float32 or float64"),
        ("h", torch.zeros(batch, hidden + 1), r"h must have shape \[2, 8\], got \[2, 9\]"),
        ("c", torch.zeros(batch + 1, hidden), r"c must have shape \[2, 8\], got \[3, 8\]"),
        ("n", torch.zeros(batch, hidden, dtype=torch.float64), r"n must be Float, got Double"),
        ("m", torch.zeros(hidden, batch).t(), r"m must be contiguous"),
        ("w_ih", torch.zeros(4 * hidden, inputs + 1), r"w_ih must have shape \[32, 3\]"),
        ("w_hh", torch.zeros(4 * hidden, hidden),
         r"w_hh must have 3 dimensions \[heads, 4 \* head_size, head_size\], got shape "
         r"\[32, 8\]"),
        ("w_hh", torch.zeros(heads, 3 * width, width),
         r"w_hh must have shape \[2, 16, 4\], got \[2, 12, 4\]"),
        ("b_ih", torch.zeros(3 * hidden), r"b_ih must have shape \[32\], got \[24\]"),
    ]
    for name, wrong, message in cases:
        with pytest.raises(RuntimeError, match=f"slstm_step: {message}"):
            kernels.slstm_step(*{**good, name: wrong}.values())


# ---- the paper's equations and the stabiliser -----------------------------------------------
def _dense_recurrent(weight_hh):
    """The block-diagonal (4H, H) matrix: gate g's (H, H) block is block_diag over heads."""
    heads, rows, width = weight_hh.shape
    per_gate = weight_hh.reshape(heads, 4, width, width)
    return torch.cat([torch.block_diag(*per_gate[:, g]) for g in range(4)])


def _unstabilised(x, weight_ih, weight_hh, bias, exp_forget):
    """The paper's sLSTM without the stabiliser, written out independently (a dense
    block-diagonal R): ``i = exp(ĩ)``, ``f = σ(f̃)`` or ``exp(f̃)``, from zero states. Returns
    ``h, c, n`` for every step ``(T, N, H)``."""
    recurrent = _dense_recurrent(weight_hh)
    hidden = recurrent.shape[1]
    h = c = n = x.new_zeros(x.shape[1], hidden)
    hs, cs, ns = [], [], []
    for x_t in x:
        i_pre, f_pre, z_pre, o_pre = (x_t @ weight_ih.T + h @ recurrent.T + bias).chunk(4, 1)
        i = torch.exp(i_pre)
        f = torch.exp(f_pre) if exp_forget else torch.sigmoid(f_pre)
        c = f * c + i * torch.tanh(z_pre)
        n = f * n + i
        h = torch.sigmoid(o_pre) * c / n
        hs.append(h), cs.append(c), ns.append(n)
    return torch.stack(hs), torch.stack(cs), torch.stack(ns)


def _stabilised_states(x, weight_ih, weight_hh, bias, exp_forget):
    """``h, c, n, m`` of every step through the cell (the reference step)."""
    state = None
    cell = rnnkit.SLSTMCell(x.shape[2], weight_ih.shape[0] // 4, num_heads=weight_hh.shape[0],
                            forget_gate="exp" if exp_forget else "sigmoid", dtype=x.dtype)
    cell.load_state_dict({"weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias})
    parts = []
    with torch.no_grad():
        for x_t in x:
            state = cell(x_t, state)
            parts.append(state)
    return [torch.stack(p) for p in zip(*parts, strict=True)]


@pytest.mark.parametrize("exp_forget", [False, True], ids=["sigmoid", "exp"])
def test_stabiliser_does_not_change_the_output(exp_forget):
    """Moderate inputs, float64: the stabilised cell's h equals the unstabilised formula's (m
    cancels in h = c / n), and its c, n are the unstabilised ones times exp(-m); the layer's
    fused and reference paths give the same h."""
    tensors, _ = _inputs(40, torch.float64, heads=2, seed=5)
    x, _, _, _, _, weight_ih, weight_hh, bias = tensors
    h_plain, c_plain, n_plain = _unstabilised(x, weight_ih, weight_hh, bias, exp_forget)
    h, c, n, m = _stabilised_states(x, weight_ih, weight_hh, bias, exp_forget)
    assert float(m.abs().max()) > 1.0  # the stabiliser did move
    torch.testing.assert_close(h, h_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c * m.exp(), c_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(n * m.exp(), n_plain, rtol=1e-10, atol=1e-12)
    layer = rnnkit.SLSTM(4, 8, num_heads=2, dtype=torch.float64,
                         forget_gate="exp" if exp_forget else "sigmoid")
    layer.load_state_dict({"weight_ih_l0": weight_ih, "weight_hh_l0": weight_hh,
                           "bias_ih_l0": bias})
    for backend in slstm.BACKENDS:
        layer.backend = backend
        torch.testing.assert_close(layer(x)[0], h_plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("exp_forget", [False, True], ids=["sigmoid", "exp"])
def test_stabiliser_keeps_large_inputs_finite_where_the_plain_formula_overflows(exp_forget):
    """Inputs x1e3 in float32: the unstabilised formula's exp overflows (inf, then inf / inf =
    nan in h), while both paths stay finite in every value and gradient, with n >= 1 and
    |h| <= 1 as the spec says."""
    tensors, lengths = _inputs(50, torch.float32, heads=2, seed=6, scale=1e3, empty_state=True)
    x, _, _, _, _, weight_ih, weight_hh, bias = tensors
    h_plain, c_plain, n_plain = _unstabilised(x, weight_ih, weight_hh, bias, exp_forget)
    assert not bool(torch.isfinite(n_plain).all())
    assert not bool(torch.isfinite(h_plain).all())
    for name, path in PATHS.items():
        for reverse in (False, True):
            results = _results(path, tensors, lengths, reverse, exp_forget)
            results.pop("grad:m0")  # m_0 = -inf: its gradient is zero (tested above)
            assert all(bool(t.isfinite().all()) for t in results.values()), name
            assert bool((results["n_n"] >= 1).all()) and bool((results["output"].abs() <= 1)
                                                                .all())


@settings(max_examples=30)
@given(scale=st.floats(1e-2, 1e4), seed=st.integers(0, 2**16), exp_forget=st.booleans())
def test_normaliser_at_least_one_and_h_bounded(scale, seed, exp_forget):
    """Any input scale, from the empty state: every step's n >= 1, |c| <= n and |h| <= 1
    (float32), the bounds the stabiliser guarantees."""
    tensors, _ = _inputs(20, torch.float32, batch=2, heads=2, seed=seed, scale=scale)
    x, _, _, _, _, weight_ih, weight_hh, bias = tensors
    h, c, n, m = _stabilised_states(x, weight_ih, weight_hh, bias, exp_forget)
    assert bool(torch.isfinite(m).all())
    assert bool((n >= 1).all())
    assert bool((c.abs() <= n * (1 + 1e-6)).all())
    assert bool((h.abs() <= 1).all())


def test_zero_state_acts_as_the_empty_state():
    """An all-zero hx (torch.nn's habit) gives what no hx gives: where n = 0, m is -inf."""
    torch.manual_seed(11)
    layer = rnnkit.SLSTM(3, 4, num_layers=2)
    x = torch.randn(6, 2, 3) * 1e3
    zeros = tuple(torch.zeros(2, 2, 4) for _ in range(4))
    default_output, default_state = layer(x)
    output, state = layer(x, zeros)
    assert bool(output.isfinite().all())
    torch.testing.assert_close(output, default_output, rtol=0, atol=0)
    for part, default in zip(state, default_state, strict=True):
        torch.testing.assert_close(part, default, rtol=0, atol=0)


# ---- input forms, lengths, streaming ----------------------------------------------------------
def test_lengths_equal_each_sequence_run_alone():
    """Padded input with lengths, and the same batch packed: each sequence's output and final
    state (all four parts, both directions, two layers) equal running it alone, unbatched."""
    torch.manual_seed(4)
    layer = rnnkit.SLSTM(3, 4, num_layers=2, bidirectional=True, num_heads=2,
                         dtype=torch.float64)
    lengths = [6, 2, 9]
    sequences = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    padded = torch.zeros(9, 3, 3, dtype=torch.float64)
    for n, sequence in enumerate(sequences):
        padded[: lengths[n], n] = sequence
    output, state = layer(padded, lengths=lengths)
    packed_output, packed_state = layer(pack_sequence(sequences, enforce_sorted=False))
    unpacked, _ = pad_packed_sequence(packed_output)
    torch.testing.assert_close(unpacked, output[: max(lengths)], rtol=1e-12, atol=1e-12)
    for part, packed_part in zip(state, packed_state, strict=True):
        torch.testing.assert_close(packed_part, part, rtol=1e-12, atol=1e-12)
    for n, sequence in enumerate(sequences):
        alone, alone_state = layer(sequence)
        torch.testing.assert_close(output[: lengths[n], n], alone, rtol=1e-12, atol=1e-12)
        for part, alone_part in zip(state, alone_state, strict=True):
            torch.testing.assert_close(part[:, n], alone_part, rtol=1e-12, atol=1e-12)
        assert not output[lengths[n]:, n].any()


def test_input_forms_agree():
    """batch_first, unbatched (input and hx) and an empty batch give torch.nn's shapes and the
    same values."""
    torch.manual_seed(5)
    layer = rnnkit.SLSTM(3, 4, num_layers=2, bidirectional=True, num_heads=2)
    x = torch.randn(6, 2, 3)
    output, state = layer(x)
    assert output.shape == (6, 2, 8) and all(s.shape == (4, 2, 4) for s in state)
    first = copy.deepcopy(layer)
    first.batch_first = True
    output_first, state_first = first(x.transpose(0, 1))
    torch.testing.assert_close(output_first.transpose(0, 1), output)
    output_single, state_single = layer(x[:, 1], tuple(s[:, 1] for s in state))
    output_batched, state_batched = layer(x[:, 1:], tuple(s[:, 1:] for s in state))
    torch.testing.assert_close(output_single, output_batched[:, 0])
    for single, batched in zip(state_single, state_batched, strict=True):
        torch.testing.assert_close(single, batched[:, 0])
    empty_output, empty_state = layer(torch.randn(6, 0, 3))
    assert empty_output.shape == (6, 0, 8) and all(s.shape == (4, 0, 4) for s in empty_state)


@pytest.mark.parametrize("backend", ["native", "fused", "reference"])
def test_streaming_equals_the_whole_sequence(backend):
    """One step at a time, with the cell (the first layer's weights loaded) and with the layer
    itself (two layers, one step per call, the state carried), equals the whole sequence."""
    torch.manual_seed(7)
    layer = rnnkit.SLSTM(3, 8, num_layers=2, num_heads=4, backend=backend,
                         dtype=torch.float64)
    x = torch.randn(40, 2, 3, dtype=torch.float64)
    output, final = layer(x)
    first_layer = rnnkit.SLSTM(3, 8, num_heads=4, dtype=torch.float64)
    first_layer.load_state_dict({k: v for k, v in layer.state_dict().items() if "_l0" in k})
    first_output, _ = first_layer(x)
    cell = rnnkit.SLSTMCell(3, 8, num_heads=4, dtype=torch.float64)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()
                          if "_l0" in k})
    state = None
    for t in range(40):
        state = cell(x[t], state)
        torch.testing.assert_close(state[0], first_output[t], rtol=1e-12, atol=1e-12)
    state = None
    for t in range(40):
        step_output, state = layer(x[t : t + 1], state)
        torch.testing.assert_close(step_output[0], output[t], rtol=1e-12, atol=1e-12)
    for part, whole in zip(state, final, strict=True):
        torch.testing.assert_close(part, whole, rtol=1e-12, atol=1e-12)
    unbatched = cell(x[0, 0])
    for part, batched in zip(unbatched, cell(x[0, :1]), strict=True):
        torch.testing.assert_close(part, batched[0])


# ---- parameters -------------------------------------------------------------------------------
def test_parameters_names_shapes_initialisation_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(8)
    layer = rnnkit.SLSTM(3, 16, num_layers=2, bidirectional=True, num_heads=4)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (64, 3), "weight_hh_l0": (4, 16, 4), "bias_ih_l0": (64,),
        "weight_ih_l0_reverse": (64, 3), "weight_hh_l0_reverse": (4, 16, 4),
        "bias_ih_l0_reverse": (64,),
        "weight_ih_l1": (64, 32), "weight_hh_l1": (4, 16, 4), "bias_ih_l1": (64,),
        "weight_ih_l1_reverse": (64, 32), "weight_hh_l1_reverse": (4, 16, 4),
        "bias_ih_l1_reverse": (64,),
    }
    bound = 1 / math.sqrt(16)
    for parameter in layer.parameters():
        values = parameter.detach()
        assert float(values.abs().max()) <= bound
        assert float(values.std()) > bound / 4  # drawn, not constant
    assert {n: tuple(p.shape) for n, p in rnnkit.SLSTMCell(3, 16).named_parameters()} == \
        {"weight_ih": (64, 3), "weight_hh": (1, 64, 16), "bias_ih": (64,)}
    assert [n for n, _ in rnnkit.SLSTM(3, 4, bias=False).named_parameters()] == \
        ["weight_ih_l0", "weight_hh_l0"]

    path = tmp_path / "slstm.pt"
    torch.save(layer.state_dict(), path)
    copy_of = rnnkit.SLSTM(3, 16, num_layers=2, bidirectional=True, num_heads=4)
    copy_of.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(5, 2, 3)
    output, state = layer(x)
    copy_output, copy_state = copy_of(x)
    torch.testing.assert_close(copy_output, output, rtol=0, atol=0)
    for part, copy_part in zip(state, copy_state, strict=True):
        torch.testing.assert_close(copy_part, part, rtol=0, atol=0)


def test_heads_are_independent():
    """Block-diagonal recurrence: with input weights zero except one head's rows, the other
    heads' units do not move from their zero-input trajectory (h only mixes within a head)."""
    torch.manual_seed(12)
    layer = rnnkit.SLSTM(3, 8, num_heads=2, dtype=torch.float64)
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    baseline, _ = layer(torch.zeros_like(x))
    with torch.no_grad():  # only head 0's units (0..3 of each gate) read the input
        layer.weight_ih_l0.view(4, 2, 4, 3)[:, 1] = 0
    output, _ = layer(x)
    torch.testing.assert_close(output[..., 4:], baseline[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(output[..., :4], baseline[..., :4])


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(9)
    layer = rnnkit.SLSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(8, 2, 3)
    layer.eval()
    evaluation, _ = layer(x)
    layer.train()
    torch.manual_seed(0)
    trained, _ = layer(x)
    assert not torch.allclose(trained, evaluation)
    layer.backend = "reference"
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x)[0], trained)  # the same masks on every backend
    with pytest.warns(UserWarning, match="dropout=0.5 acts between stacked layers only"):
        rnnkit.SLSTM(3, 4, dropout=0.5)


# ---- the boundary's errors --------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    layer = rnnkit.SLSTM(3, 4, num_layers=2)
    cell = rnnkit.SLSTMCell(3, 4)
    x = torch.randn(5, 2, 3)
    good = tuple(torch.zeros(2, 2, 4) for _ in range(4))
    cases = [
        (lambda: rnnkit.SLSTM(3, 10, num_heads=4), ValueError,
         r"SLSTM num_heads must divide hidden_size=10 .*got num_heads=4; accepted: 1, 2, 5, 10"),
        (lambda: rnnkit.SLSTMCell(3, 4, num_heads=0), ValueError,
         r"SLSTMCell num_heads must be an int >= 1, got 0"),
        (lambda: rnnkit.SLSTM(3, 4, forget_gate="tanh"), ValueError,
         r"SLSTM forget_gate must be one of 'sigmoid', 'exp', got 'tanh'"),
        (lambda: rnnkit.SLSTM(3, 4, backend="turbo"), ValueError,
         r"SLSTM backend must be one of 'auto', 'native', 'fused', 'reference', got 'turbo'"),
        (lambda: rnnkit.SLSTM(0, 4), ValueError, r"SLSTM input_size must be an int >= 1, got 0"),
        (lambda: layer(torch.randn(5, 2, 7)), ValueError,
         r"SLSTM input must have shape \(L, N, H_in\) .* input_size = 3; got \(5, 2, 7\)"),
        (lambda: layer(x, good[0]), TypeError,
         r"SLSTM hx must be a tuple \(h_0, c_0, n_0, m_0\) of four Tensors of shape "
         r"\(D\*num_layers, N, H\) = \(2, 2, 4\), got a Tensor"),
        (lambda: layer(x, good[:3]), TypeError, r"SLSTM hx must be a tuple \(h_0, c_0, n_0, m_0\)"),
        (lambda: layer(x, (*good[:2], torch.zeros(1, 2, 4), good[3])), ValueError,
         r"SLSTM hx \(n_0\) must have shape \(D\*num_layers, N, H\) = \(2, 2, 4\), got \(1, 2, 4\)"),
        (lambda: layer(x, (*good[:3], good[3].double())), TypeError,
         r"SLSTM hx \(m_0\) has dtype torch.float64"),
        (lambda: layer(x.double()), TypeError,
         r"SLSTM input has dtype torch.float64 but the parameters have dtype torch.float32"),
        (lambda: layer(x, lengths=[5, 6]), ValueError, r"lengths must lie in \[1, 5\]"),
        (lambda: cell(torch.randn(2, 5)), ValueError,
         r"SLSTMCell input must have shape \(N, 3\) or \(3,\) \(input_size=3\), got \(2, 5\)"),
        (lambda: cell(torch.randn(2, 3), tuple(torch.zeros(3, 4) for _ in range(4))),
         ValueError, r"SLSTMCell hx \(h_0\) must have shape \(N, H\) = \(2, 4\), got \(3, 4\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    with pytest.raises(ValueError, match=r"SLSTM backend must be one of"):
        layer.backend = "fast"


def test_reference_step_matches_the_dense_formula_with_torch_lstm_gate_order():
    """The reference step against F.linear with the dense block-diagonal matrix, rows in the
    documented order (i|f|z|o): a check of the weight layout the docs promise."""
    torch.manual_seed(13)
    cell = rnnkit.SLSTMCell(3, 6, num_heads=3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    h, c = torch.randn(2, 6, dtype=torch.float64) * 0.5, torch.randn(2, 6, dtype=torch.float64)
    n, m = 2 + torch.rand(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    pre = F.linear(x, cell.weight_ih, cell.bias_ih) + h @ _dense_recurrent(cell.weight_hh).T
    i_pre, f_pre, z_pre, o_pre = pre.chunk(4, dim=1)
    m_new = torch.maximum(F.logsigmoid(f_pre) + m, i_pre)
    i, f = torch.exp(i_pre - m_new), torch.exp(F.logsigmoid(f_pre) + m - m_new)
    c_new = f * c + i * torch.tanh(z_pre)
    n_new = f * n + i
    expected = (torch.sigmoid(o_pre) * c_new / n_new, c_new, n_new, m_new)
    for part, want in zip(cell(x, (h, c, n, m)), expected, strict=True):
        assert_same({"v": part}, {"v": want}, torch.float64)


def test_native_training_keeps_eight_values_a_unit_and_step_for_the_backward():
    """What the native operator saves for its backward, through autograd's own hooks: the
    projection buffer (T, N, 4H) holding (ĩ|f̃|z|o) and the four states (T + 1, N, H), beside
    the inputs and weights; no separate buffer of gate values (the backward recomputes i' and f';
    `native_slstm_backward`'s equality with the reference is tested above)."""
    steps, batch, hidden = 50, 3, 8
    layer = rnnkit.SLSTM(4, hidden, num_heads=2, backend="native")
    x = torch.randn(steps, batch, 4, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = layer(x)
    parameters = sum(p.numel() for p in layer.parameters())
    unit_steps = steps * batch * hidden
    big = sorted(size // 4 for size in storages.values() if size // 4 >= unit_steps)
    # pre (T N 4H) and the h, c, n, m states ((T + 1) N H each); nothing else that large.
    assert big == sorted([4 * unit_steps] + [(steps + 1) * batch * hidden] * 4), big
    assert sum(storages.values()) // 4 <= 8 * unit_steps + 4 * batch * hidden + x.numel() \
        + parameters + 4 * batch * hidden * 2
    output.sum().backward()  # the saved buffers are what the backward needs
    assert x.grad is not None and torch.isfinite(x.grad).all()
