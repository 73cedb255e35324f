"""Engine backends against the reference loop: outputs, states and every gradient; streaming."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from compare import assert_same, assert_same_normwise, outputs_and_gradients
from rnnkit import engine
from rnnkit.engine import native
from rnnkit.engine.native import build

FAST_BACKENDS = ["fused", "native"]
INPUT, HIDDEN, PROJ, STEPS = 3, 5, 2, 6
LENGTHS = [4, 6, 1, 3]

# Every family and variant: (layer class, constructor arguments).
CONFIGURATIONS = {
    "rnn_tanh": (rnnkit.RNN, {}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": PROJ}),
    "lstm_peephole": (rnnkit.LSTM, {"peephole": True}),
    "lstm_peephole_proj": (rnnkit.LSTM, {"peephole": True, "proj_size": PROJ}),
    "lstm_learned_state": (rnnkit.LSTM, {"learn_initial_state": True, "proj_size": PROJ}),
    "gru": (rnnkit.GRU, {}),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}),
    "gru_learned_state": (rnnkit.GRU, {"learn_initial_state": True, "reset_after": False}),
    "rnn_learned_state": (rnnkit.RNN, {"learn_initial_state": True}),
}


def make_layer(name, dtype=torch.float32, **arguments):
    """A layer with every parameter random and nonzero (peepholes and learned states included)."""
    layer_class, extra = CONFIGURATIONS[name]
    layer = layer_class(INPUT, HIDDEN, **extra, **arguments, dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=generator, dtype=dtype) - 0.5)
    return layer


def with_backend(layer, backend):
    layer.backend = backend
    return layer


def operator_of(tensor):
    """The rnnkit operator whose autograd node produced ``tensor`` (through views), or None.

    Its node is named after the operator (``rnnkit::native_lstm`` -> ``rnnkit_native_lstmBackward``
    from the layers, ``GeneratedBackwardFor_rnnkit_native_lstm_defaultBackward`` from
    ``torch.ops.rnnkit.native_lstm`` directly).
    """
    nodes = [tensor.grad_fn]
    for _ in range(4):  # a view or two (the output of a native op is a slice of its states)
        for node in nodes:
            match = re.search(r"rnnkit_((?:native|fused)_(?:rnn|lstm|gru))", type(node).__name__)
            if match:
                return match.group(1)
        nodes = [n for node in nodes for n, _ in node.next_functions if n is not None]
    return None


@pytest.mark.parametrize("kind", ["batched", "unbatched", "packed", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_equals_reference(backend, name, num_layers, bidirectional, batch_first, bias,
                                  kind):
    layer = make_layer(name, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias)
    generator = torch.Generator().manual_seed(1)
    batch = len(LENGTHS)
    shape = (STEPS, INPUT) if kind == "unbatched" else (
        (batch, STEPS, INPUT) if batch_first else (STEPS, batch, INPUT))
    x = torch.randn(shape, generator=generator).requires_grad_()
    inputs = {"x": x}
    hx = None
    if not layer.learn_initial_state:  # learned states get their gradient from the default
        lead = (num_layers * layer.num_directions,) + (() if kind == "unbatched" else (batch,))
        h0 = torch.randn(lead + (layer.output_size,), generator=generator).requires_grad_()
        inputs["h0"] = h0
        hx = h0
        if isinstance(layer, rnnkit.LSTM):
            c0 = torch.randn(lead + (HIDDEN,), generator=generator).requires_grad_()
            inputs["c0"] = c0
            hx = (h0, c0)

    def run(module):
        if kind == "packed":
            packed = pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
            return module(packed, hx)
        return module(x, hx, lengths=LENGTHS if kind == "lengths" else None)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run, inputs)
    actual = outputs_and_gradients(with_backend(layer, backend), run, inputs)
    assert_same(actual, expected, torch.float32, group=f"{backend}-vs-ref")


# The plain cell of each family gets the full Jacobian; the variants get gradcheck's fast
# mode: a random projection v^T J u of the backward against its central finite difference, as
# independent of every backward, at a few evaluations of the layer per input instead of two per
# element (the full grid took 70 s of CI, most of it the fused backend's Python loop).
FULL_GRADCHECK = {"rnn_tanh", "lstm", "gru"}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_through_backend(backend, name):
    layer = with_backend(make_layer(name, torch.float64, num_layers=2, bidirectional=True),
                         backend)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(4, 3, INPUT, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, HIDDEN, dtype=torch.float64, requires_grad=True)

    def run(x, c0, *params):
        hx = None
        if isinstance(layer, rnnkit.LSTM) and not layer.learn_initial_state:
            hx = (torch.zeros(4, 3, layer.output_size, dtype=torch.float64), c0)
        output, final = torch.func.functional_call(
            layer, dict(zip(names, params, strict=True)), (x, hx), {"lengths": [4, 2, 3]})
        return output, *(final if isinstance(final, tuple) else (final,))

    assert torch.autograd.gradcheck(run, (x, c0, *params),
                                    fast_mode=name not in FULL_GRADCHECK)


# Sizes that exercise the native step products' every path: batch 1 and 2 tiles, leftover rows
# after full tiles, a partial last column strip, and strips split between threads.
# Steps 1-2, and up to 3 rows at any length, take the forward's dot-product kernel on the weight
# as stored; 3 and more steps of 4 and more rows the transposed copy; up to 16 rows
# project the input with the kernels' own product. An LSTM without projection runs on resident
# weights by default ("resident": here with every thread taking a share of the units, so that
# blocks split unevenly between threads), and on the other two only with that path turned off.
# "resident-input": the resident loop projects the input too (`lstm_forward_input`; by default
# from batch 4 with an input narrower than the state), at every batch here.
@pytest.fixture(params=["tiles", "blas", "resident", "resident-input"])
def step_products(request):
    """Runs a test with every native step product on the kernels' tiles, then on ATen's mm,
    then with the LSTM's loops on resident weights shared by all threads, first with the input
    projected before the loop, then inside it."""
    kernels = build.kernels()
    if kernels is None:
        pytest.fail("the native kernels did not build")
    defaults = (kernels.blas_min_multiply_adds(), kernels.resident_max_bytes_per_thread(),
                kernels.thread_min_multiply_adds(), kernels.lstm_input_min_batch(),
                kernels.blas_min_rows())
    kernels.set_blas_min_multiply_adds(2**62 if request.param == "tiles" else 0)
    kernels.set_blas_min_rows(0)  # every product on mm but with "tiles", whatever the CPU
    if request.param.startswith("resident"):
        kernels.set_thread_min_multiply_adds(1)
        kernels.set_lstm_input_min_batch(1 if request.param == "resident-input" else 2**62)
    else:
        kernels.set_resident_max_bytes_per_thread(0)
    yield request.param
    kernels.set_blas_min_multiply_adds(defaults[0])
    kernels.set_resident_max_bytes_per_thread(defaults[1])
    kernels.set_thread_min_multiply_adds(defaults[2])
    kernels.set_lstm_input_min_batch(defaults[3])
    kernels.set_blas_min_rows(defaults[4])


@pytest.mark.parametrize("steps,batch,hidden", [(3, 1, 70), (2, 2, 9), (5, 13, 37), (2, 8, 64),
                                                (1, 3, 20), (4, 7, 33), (6, 3, 41)])
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_native_equals_reference_at_larger_sizes(name, steps, batch, hidden, step_products):
    layer_class, extra = CONFIGURATIONS[name]
    extra = {**extra, "proj_size": hidden // 3} if "proj_size" in extra else extra
    if step_products == "resident-input" and layer_class is rnnkit.LSTM and steps > 1:
        # the path under test is the one taken (it needs I < H and no projection)
        assert build.kernels().lstm_projects_input(steps, batch, 11, hidden, "proj_size" in extra,
                                                   8) == (11 < hidden and "proj_size" not in extra)
    torch.manual_seed(0)
    layer = layer_class(11, hidden, **extra, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)
    x = torch.randn(steps, batch, 11, dtype=torch.float64, requires_grad=True)
    lengths = [steps] + [max(1, steps - k % steps) for k in range(1, batch)]

    def run(module):
        return module(x, lengths=lengths)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run, {"x": x})
    actual = outputs_and_gradients(with_backend(layer, "native"), run, {"x": x})
    assert_same(actual, expected, torch.float64, group="native-vs-ref")
    # Inference runs the same loops, writing neither the activated gates nor c_new (the LSTM's
    # kernels keep them for a backward only): the same bits. One step runs on the step kernels
    # (the same sums in another order).
    with torch.no_grad():
        inferred = run(layer)
    tolerance = 0.0 if steps > 1 else 1e-13
    torch.testing.assert_close(inferred, run(layer), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name, hidden", [("rnn_tanh", 370), ("gru", 216), ("gru_reset_before", 216),
                                          ("lstm_peephole", 184), ("lstm_proj", 184)])
def test_native_equals_reference_with_a_weight_larger_than_the_cache(name, hidden, batch,
                                                                      step_products):
    # Up to 3 rows of a recurrent weight over 1 MiB (here float64), the forward multiplies by the
    # weight as stored (the dot-product kernel) at every step, instead of a transposed copy.
    layer_class, extra = CONFIGURATIONS[name]
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[name.split("_")[0]]
    assert gates * hidden * hidden * 8 > 1 << 20
    extra = {**extra, "proj_size": hidden // 3} if "proj_size" in extra else extra
    torch.manual_seed(0)
    layer = layer_class(7, hidden, **extra, dtype=torch.float64)
    x = torch.randn(4, batch, 7, dtype=torch.float64, requires_grad=True)
    lengths = [4, 2, 3][:batch]

    def run(module):
        return module(x, lengths=lengths)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run, {"x": x})
    actual = outputs_and_gradients(with_backend(layer, "native"), run, {"x": x})
    assert_same(actual, expected, torch.float64, group="native-vs-ref")


@pytest.mark.parametrize("name, gates", [("lstm_peephole", 4), ("gru_reset_before", 3),
                                         ("rnn_relu", 1)])
def test_native_at_a_size_whose_products_run_on_blas_by_default(name, gates):
    batch, hidden = 32, 192
    # The recurrent product of a step, (N, H) x (H, gates * H), is past the default threshold
    # here, and the small sizes of the other tests are below it.
    assert batch * hidden * gates * hidden >= build.kernels().blas_min_multiply_adds() > 4 * 70 * 280
    layer_class, extra = CONFIGURATIONS[name]
    torch.manual_seed(0)
    layer = layer_class(16, hidden, **extra, dtype=torch.float64)
    x = torch.randn(4, batch, 16, dtype=torch.float64, requires_grad=True)

    def run(module):
        return module(x, lengths=[4, 2] * 16)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run, {"x": x})
    actual = outputs_and_gradients(with_backend(layer, "native"), run, {"x": x})
    assert_same(actual, expected, torch.float64, group="native-vs-ref")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("lengths", [None, [STEPS, 2]])
def test_fast_backend_runs_its_own_operator(backend, lengths):
    # Guards the parity grid above: "native" silently running "fused" would pass it too.
    for name, family in [("lstm_peephole", "lstm"), ("gru", "gru"), ("rnn_relu", "rnn")]:
        layer = with_backend(make_layer(name), backend)
        output, (h_n, *_) = layer(torch.randn(STEPS, 2, INPUT), lengths=lengths)
        assert operator_of(output) == operator_of(h_n) == f"{backend}_{family}", name


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("name", ["lstm_peephole_proj", "gru_reset_before", "rnn_tanh", "gru"])
@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_streaming_in_chunks_equals_whole_sequence(backend, name, chunk):
    layer = with_backend(make_layer(name, torch.float64, num_layers=2), backend)
    x = torch.randn(9, 3, INPUT, dtype=torch.float64)
    whole, whole_final = layer(x)
    pieces, state = [], None
    for start in range(0, x.shape[0], chunk):
        piece, state = layer(x[start : start + chunk], state)
        pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, whole_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_native_inference_path_equals_training_path(name):
    # Under no_grad the native engine skips autograd.Function (its forward runs alone): the
    # same kernels, so the same bits. One step runs on the step kernels instead (both products
    # and the gate math in one pass, `engine.inference_step`): the same sums in another order.
    layer = with_backend(make_layer(name, torch.float64, bidirectional=True), "native")
    x = torch.randn(STEPS, len(LENGTHS), INPUT, dtype=torch.float64)
    for step_count, tolerance in ((STEPS, 0.0), (1, 1e-13)):
        expected = layer(x[:step_count], lengths=[min(n, step_count) for n in LENGTHS])
        with torch.no_grad():
            actual = layer(x[:step_count], lengths=[min(n, step_count) for n in LENGTHS])
        assert expected[0].grad_fn is not None and actual[0].grad_fn is None
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def test_streaming_unbatched_single_steps():
    layer = make_layer("lstm_peephole", torch.float64)
    x = torch.randn(7, INPUT, dtype=torch.float64)
    whole, _ = layer(x)
    state, outputs = None, []
    for t in range(7):
        out, state = layer(x[t : t + 1], state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=1e-12, atol=1e-12)


def test_environment_variable_forces_a_backend(monkeypatch):
    layer = with_backend(make_layer("gru"), "fused")
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "reference")
    output, _ = layer(torch.randn(STEPS, 2, INPUT))
    assert operator_of(output) is None
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "turbo")
    with pytest.raises(ValueError, match=r"RNNKIT_BACKEND must be one of 'auto', .* got 'turbo'"):
        layer(torch.randn(STEPS, 2, INPUT))


def test_auto_policy_native_on_cpu_floats_fused_elsewhere():
    for dtype in (torch.float32, torch.float64):
        layer = make_layer("lstm_proj", dtype)
        output, _ = layer(torch.randn(STEPS, 2, INPUT, dtype=dtype))
        assert operator_of(output) == "native_lstm", dtype
    layer = make_layer("gru_reset_before", torch.bfloat16)
    output, _ = layer(torch.randn(STEPS, 2, INPUT, dtype=torch.bfloat16))
    assert operator_of(output) == "fused_gru"
    assert engine.resolve_backend("auto") == "auto"
    with pytest.raises(ValueError, match=r"LSTM backend must be one of .* got 'gpu'"):
        rnnkit.LSTM(3, 4, backend="gpu")


def test_native_build_failure_falls_back_to_fused_with_one_warning(monkeypatch):
    # Simulate a machine without a compiler: the build raises as torch's loader does.
    def no_compiler(capability):
        raise RuntimeError("Error building extension 'rnnkit_native': c++: not found")

    monkeypatch.setattr(build, "_compile", no_compiler)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failure", [])
    layer = make_layer("lstm_peephole")
    x = torch.randn(STEPS, 2, INPUT, requires_grad=True)
    with pytest.warns(build.NativeBuildWarning, match=r"could not be built \(RuntimeError: .*c\+\+: not found\); running the fused"):
        output, _ = with_backend(layer, "native")(x)
    assert operator_of(output) == "fused_lstm"
    assert build.failure() == "RuntimeError: Error building extension 'rnnkit_native': c++: not found"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second layer call does not warn again
        again, _ = with_backend(layer, "auto")(x)
    expected, _ = with_backend(layer, "reference")(x)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(again, expected)
    assert not native.available()


def test_cells_run_on_the_engines():
    cell = rnnkit.LSTMCell(INPUT, HIDDEN, peephole=True)
    x = torch.randn(2, INPUT)
    h, _ = cell(x)
    assert operator_of(h) == "native_lstm"
    cell.backend = "reference"
    expected, _ = cell(x)
    assert operator_of(expected) is None
    torch.testing.assert_close(h, expected)


def test_explicit_native_that_cannot_run_the_input_warns_once_and_runs_fused(monkeypatch):
    monkeypatch.setattr(engine, "_warned", set())
    layer = with_backend(make_layer("gru_reset_before", torch.bfloat16), "native")
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.bfloat16)
    with pytest.warns(engine.BackendWarning, match=r"backend='native' cannot run this input \(the kernels are for float32 and float64, the input is torch.bfloat16\); running backend='fused'"):
        output, _ = layer(x)
    assert operator_of(output) == "fused_gru"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason and process
        layer(x)
    # "auto" picks fused for such input without a word: that is its policy.
    monkeypatch.setattr(engine, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_backend(layer, "auto")(x)


def test_engine_for_states_the_policy():
    x = torch.randn(STEPS, 2, INPUT)
    assert engine.engine_for("auto", x) == "native"
    assert engine.engine_for("fused", x) == "fused"
    assert engine.engine_for("reference", x) == "reference"
    assert engine.engine_for("native", x[:, :0]) == "reference"  # nothing to compute
    assert engine.engine_for("auto", x.bfloat16()) == "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the operators compute in float32
        assert engine.engine_for("auto", x.bfloat16()) == "native"


def _torch_lstm_calls(monkeypatch) -> list[int]:
    """Count the calls of torch's own LSTM kernel (``torch.lstm``) from here on."""
    calls: list[int] = []
    kernel = torch.lstm

    def counted(*arguments):
        calls.append(1)
        return kernel(*arguments)

    monkeypatch.setattr(torch, "lstm", counted)
    return calls


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_auto_runs_plain_lstm_inference_on_torch_s_kernel_equal_to_the_reference(
        monkeypatch, cpu_profile, bidirectional, batch_first):
    cpu_profile("intel")
    torch.manual_seed(0)
    hidden = engine.TORCH_LSTM_MIN_HIDDEN
    model = rnnkit.LSTM(5, hidden, num_layers=2, bidirectional=bidirectional,
                        batch_first=batch_first)
    reference = rnnkit.LSTM(5, hidden, num_layers=2, bidirectional=bidirectional,
                            batch_first=batch_first, backend="reference")
    reference.load_state_dict(model.state_dict())
    batch = engine.TORCH_LSTM_MIN_BATCH
    x = torch.randn((batch, 9, 5) if batch_first else (9, batch, 5))
    directions = 2 if bidirectional else 1
    state = (torch.randn(2 * directions, batch, hidden),
             torch.randn(2 * directions, batch, hidden))
    calls = _torch_lstm_calls(monkeypatch)
    with torch.no_grad():
        found, expected = model(x, state), reference(x, state)
    assert len(calls) == 2 * directions  # every layer and direction
    assert_same({"out": found[0], "h": found[1][0], "c": found[1][1]},
                {"out": expected[0], "h": expected[1][0], "c": expected[1][1]}, torch.float32)


def test_auto_runs_a_large_batch_of_a_smaller_lstm_on_torch_s_kernel(monkeypatch, cpu_profile):
    cpu_profile("intel")
    calls = _torch_lstm_calls(monkeypatch)
    hidden = 128
    assert hidden < engine.TORCH_LSTM_MIN_HIDDEN
    batch = engine.TORCH_LSTM_MIN_STATE_VALUES // hidden
    x = torch.randn(5, batch, 3)
    model = _lstm_inference_equal_to_the_reference(x, hidden)
    with torch.no_grad():
        model(x[:, : batch - 1])  # one row fewer: the native loop
    assert len(calls) == 1


def _lstm_inference_equal_to_the_reference(x: torch.Tensor, hidden: int) -> rnnkit.LSTM:
    """An LSTM (seed 0, backend "auto") whose inference on ``x`` equals the reference's."""
    torch.manual_seed(0)
    model = rnnkit.LSTM(x.shape[-1], hidden)
    reference = rnnkit.LSTM(x.shape[-1], hidden, backend="reference")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        found, expected = model(x), reference(x)
    assert_same({"out": found[0], "h": found[1][0], "c": found[1][1]},
                {"out": expected[0], "h": expected[1][0], "c": expected[1][1]}, torch.float32)
    return model


@pytest.mark.parametrize("shares, batch, on_torch", [
    (0.5, 64, False), (0.5, 8, False),  # within a core's L2: torch's kernel from 24 only
    (1, 8, True), (1, 7, False), (2, 4, True), (2, 3, False), (8, 4, True), (9, 4, False),
    (9, 7, False), (9, 8, True)])
def test_on_other_cpus_torch_s_lstm_kernel_runs_where_w_hh_outgrows_the_cache(
        monkeypatch, cpu_profile, shares, batch, on_torch):
    # A thread's share of W_hh, 4 H^2 float32 values over the threads, in units of a core's L2:
    # the L2 is set so that H = 64 gives `shares` of them.
    cpu_profile("other")
    hidden = 64
    monkeypatch.setattr(native, "l2_cache_bytes",
                        lambda: int(4 * hidden * hidden * 4 / torch.get_num_threads() / shares))
    calls = _torch_lstm_calls(monkeypatch)
    x = torch.randn(5, batch, 3)
    model = _lstm_inference_equal_to_the_reference(x, hidden)
    assert len(calls) == (1 if on_torch else 0)
    cpu_profile("intel")  # the same sizes: the Intel rules (from batch 24) keep the native loop
    with torch.no_grad():
        model(x)
    assert len(calls) == (1 if on_torch else 0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_on_other_cpus_plain_lstm_training_on_torch_s_kernel_equals_the_reference(
        monkeypatch, cpu_profile, bidirectional):
    # The rule's sizes are large (`OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN`); the test lowers the
    # hidden size bound to run the same path at a small size.
    cpu_profile("other")
    hidden = 8
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN", hidden)
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS", 7)
    batch = engine.OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH
    torch.manual_seed(0)
    model = rnnkit.LSTM(5, hidden, num_layers=2, bidirectional=bidirectional)
    reference = rnnkit.LSTM(5, hidden, num_layers=2, bidirectional=bidirectional,
                            backend="reference")
    reference.load_state_dict(model.state_dict())
    directions = 2 if bidirectional else 1
    inputs = {"x": torch.randn(7, batch, 5, requires_grad=True),
              "h0": torch.randn(2 * directions, batch, hidden, requires_grad=True),
              "c0": torch.randn(2 * directions, batch, hidden, requires_grad=True)}
    calls = _torch_lstm_calls(monkeypatch)
    found = outputs_and_gradients(
        model, lambda m: m(inputs["x"], (inputs["h0"], inputs["c0"])), inputs)
    assert len(calls) == 2 * directions  # every layer and direction, with a gradient asked for
    expected = outputs_and_gradients(
        reference, lambda m: m(inputs["x"], (inputs["h0"], inputs["c0"])), inputs)
    assert_same(found, expected, torch.float32)


@pytest.mark.parametrize("steps, batch_from_minimum, hidden, input_grad, on_torch", [
    (4, 0, 8, True, True), (9, 9, 8, True, True), (4, -1, 8, True, False),
    (4, 0, 7, True, False), (4, 0, 8, False, False), (3, 0, 8, True, False)])
def test_on_other_cpus_torch_s_kernel_trains_only_where_it_was_measured_faster(
        monkeypatch, cpu_profile, steps, batch_from_minimum, hidden, input_grad, on_torch):
    # The bounds on the hidden size and the length lowered to 8 and 4 for a small test.
    cpu_profile("other")
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN", 8)
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS", 4)
    calls = _torch_lstm_calls(monkeypatch)
    model = rnnkit.LSTM(3, hidden)
    x = torch.randn(steps, engine.OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH + batch_from_minimum, 3,
                    requires_grad=input_grad)
    model(x)[0].sum().backward()
    assert len(calls) == (1 if on_torch else 0)
    cpu_profile("intel")  # the Intel rules: training stays on the operators
    model(x)[0].sum().backward()
    assert len(calls) == (1 if on_torch else 0)


def test_training_under_torch_func_stays_on_the_operators(monkeypatch, cpu_profile):
    cpu_profile("other")
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN", 8)
    monkeypatch.setattr(engine, "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS", 4)
    calls = _torch_lstm_calls(monkeypatch)
    torch.manual_seed(0)
    model = rnnkit.LSTM(3, 8)
    x = torch.randn(4, engine.OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH, 3, requires_grad=True)
    parameters = dict(model.named_parameters())

    def loss(params):
        return torch.func.functional_call(model, params, (x,))[0].sum()

    gradients = torch.func.grad(loss)(parameters)
    assert len(calls) == 0
    model(x)[0].sum().backward()  # plain autograd: torch's kernel
    assert len(calls) == 1
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, rtol=1e-5, atol=1e-5)


def test_torch_s_lstm_kernel_runs_only_what_it_covers(monkeypatch, cpu_profile):
    cpu_profile("intel")
    calls = _torch_lstm_calls(monkeypatch)
    batch, hidden = engine.TORCH_LSTM_MIN_BATCH, engine.TORCH_LSTM_MIN_HIDDEN
    x = torch.randn(6, batch, 4)
    plain = rnnkit.LSTM(4, hidden)
    with torch.no_grad():
        plain(x)
    assert len(calls) == 1
    plain(x)  # a gradient may be asked for: rnnkit's operators and their backward
    with torch.no_grad():
        plain(x[:, : batch - 1])  # one stream fewer: the native loop is faster there
        rnnkit.LSTM(4, hidden - 1)(x)  # a smaller hidden size: the same
        rnnkit.LSTM(4, 128)(torch.randn(6, engine.TORCH_LSTM_MIN_STATE_VALUES // 128 - 1, 4))
        plain(x, lengths=[6] + [5] * (batch - 1))  # lengths (all full would be none)
        rnnkit.LSTM(4, hidden).double()(x.double())  # float64
        rnnkit.LSTM(4, hidden, peephole=True)(x)
        rnnkit.LSTM(4, hidden, proj_size=3)(x)
        rnnkit.LSTM(4, hidden, backend="native")(x)
        rnnkit.GRU(4, hidden)(x)
    monkeypatch.setenv("RNNKIT_BACKEND", "native")
    with torch.no_grad():
        rnnkit.LSTM(4, hidden)(x)
    assert len(calls) == 1


@pytest.fixture
def cpu_profile():
    """``set(name)`` switches the kernels' loop rules to a CPU profile ("intel" or "other")
    for one test; the detected profile and its rules are restored after."""
    kernels = build.kernels()
    if kernels is None:
        pytest.fail("the native kernels did not build")
    detected, rows = kernels.cpu_profile(), kernels.blas_min_rows()
    yield kernels.set_cpu_profile
    kernels.set_cpu_profile(detected)
    kernels.set_blas_min_rows(rows)


def test_the_cpu_profile_sets_the_rules_that_differ_between_cpu_makers(cpu_profile):
    kernels = build.kernels()
    assert kernels.cpu_profile() in ("intel", "other")
    assert kernels.l2_cache_bytes() >= 1
    cpu_profile("other")  # MKL's products of few rows are slow: up to 8 rows on the tiles
    assert kernels.cpu_profile() == "other" and kernels.blas_min_rows() == 9
    cpu_profile("intel")
    assert kernels.cpu_profile() == "intel" and kernels.blas_min_rows() == 0
    with pytest.raises(RuntimeError, match="cpu_profile must be 'intel' or 'other', got 'amd'"):
        kernels.set_cpu_profile("amd")
    with pytest.raises(RuntimeError, match="blas_min_rows must be >= 0, got -1"):
        kernels.set_blas_min_rows(-1)
    assert kernels.cpu_profile() == "intel" and kernels.blas_min_rows() == 0


def test_native_gates_saturate_exactly_as_the_reference_does():
    # σ and tanh of large inputs are exactly 1 in float32; the kernels' reciprocal estimate
    # once stopped an ulp short under AVX2, so an infinite input's weight gradient was inf
    # where the reference has 0 x inf = NaN (test_fuzz found it on an AMD EPYC).
    layer = rnnkit.RNN(1, 8, backend="native")
    reference = rnnkit.RNN(1, 8, backend="reference")
    with torch.no_grad():
        layer.weight_ih_l0.fill_(1.0)
        layer.weight_hh_l0.zero_()
        layer.bias_ih_l0.zero_()
        layer.bias_hh_l0.zero_()
    reference.load_state_dict(layer.state_dict())
    x = torch.tensor([20.0, -20.0, 1e4, float("inf"), float("-inf")]).view(5, 1, 1)
    out = layer(x)[0]
    assert torch.equal(out[:, 0, 0], torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0]))
    out.sum().backward()
    reference(x)[0].sum().backward()
    assert torch.isnan(layer.weight_ih_l0.grad).all() and torch.isnan(reference.weight_ih_l0.grad).all()
    gru = rnnkit.GRU(1, 8, backend="native")  # z = σ(large) = 1: the state is kept exactly
    with torch.no_grad():
        gru.weight_ih_l0.zero_()
        gru.weight_hh_l0.zero_()
        gru.bias_hh_l0.zero_()
        gru.bias_ih_l0.fill_(0.0)[8:16] = 100.0
    h0 = torch.randn(1, 1, 8)
    assert torch.equal(gru(torch.zeros(3, 1, 1), h0)[1], h0)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_products_of_few_rows_past_the_blas_threshold_agree_on_either_profile(
        cpu_profile, family):
    # A step product of 3 rows past the BLAS threshold: mm on the "intel" profile, the tiles
    # on "other"; both equal the reference.
    layer_class = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}[family]
    kernels = build.kernels()
    hidden = 640
    assert 3 * hidden * hidden >= kernels.blas_min_multiply_adds()
    torch.manual_seed(0)
    layer = layer_class(8, hidden, backend="native", dtype=torch.float64)
    reference = layer_class(8, hidden, backend="reference", dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    expected = reference(x)[0]
    expected_grad, = torch.autograd.grad(expected.square().sum(), x)
    for profile in ("intel", "other"):
        cpu_profile(profile)
        found = layer(x)[0]
        found_grad, = torch.autograd.grad(found.square().sum(), x)
        assert_same({"out": found, "dx": found_grad}, {"out": expected, "dx": expected_grad},
                    torch.float64)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """torch's thread count for one test, restored after it: the rules that depend on it are
    checked on both sides whatever count the run was started with (a pytest-xdist worker has
    one thread on a 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def test_lstm_loops_run_on_resident_weights_while_a_threads_share_fits_its_cache(cpu_profile,
                                                                                 torch_threads):
    kernels = build.kernels()
    cpu_profile("intel")
    limit = kernels.resident_max_bytes_per_thread()
    threads = torch_threads
    assert limit == 1 << 20
    for runs_resident in (kernels.lstm_forward_runs_resident, kernels.lstm_backward_runs_resident):
        # (T, N, H) = (100, 32, 256) float32: W_hh is 1 MiB, shared by the threads.
        assert runs_resident(100, 32, 256, False, 4)
        assert not runs_resident(100, 32, 256, True, 4)  # a projection: the old loop
        assert not runs_resident(1, 32, 256, False, 4)  # one step: no packing
        assert not runs_resident(100, 0, 256, False, 4)  # an empty batch
    # Beyond the cache, where the shares do not hold W_hh (H = 2048 float32: 64 MiB, against
    # 1 MiB a thread below 64 threads), the loops stream the packed shares: the forward from 4
    # rows and 3 steps, the backward for 4 to 8 rows from 3 steps.
    beyond = threads < 64
    forward, backward = kernels.lstm_forward_runs_resident, kernels.lstm_backward_runs_resident
    for rows in (4, 8, 9, 256):
        assert forward(3, rows, 2048, False, 4)
        assert forward(2, rows, 2048, False, 4) != beyond  # no transposed copy to beat at T = 2
        assert backward(3, rows, 2048, False, 4) == (rows <= 8 or not beyond)
        assert backward(2, rows, 2048, False, 4) != beyond
    for rows in (1, 2, 3):
        assert backward(100, rows, 2048, False, 4) != beyond
    # 1 to 3 rows: the forward streams up to twice a thread's cached share (H = 512: 4 MiB,
    # held by two threads' doubled shares) from 48 steps.
    for rows in (1, 3):
        assert forward(48, rows, 512, False, 4) == (threads >= 2)
        assert forward(47, rows, 512, False, 4) == (threads >= 4)
        assert forward(100, rows, 2048, False, 4) == (threads >= 32)
    # The "other" profile (the AMD EPYC's measurements): the forward of 1 to 3 rows streams up
    # to 8 cached shares (H = 1024 on two threads, 8 MiB each; not 2048), and the backward
    # streams from 4 rows at every batch.
    cpu_profile("other")
    for rows in (1, 3):
        assert forward(48, rows, 1024, False, 4) == (threads >= 2)
        assert forward(47, rows, 1024, False, 4) == (threads >= 16)
        assert forward(100, rows, 2048, False, 4) == (threads >= 8)
    for rows in (4, 9, 256):
        assert backward(3, rows, 2048, False, 4)
        assert backward(2, rows, 2048, False, 4) != beyond
    assert backward(100, 3, 2048, False, 4) != beyond
    cpu_profile("intel")
    try:
        kernels.set_resident_max_bytes_per_thread(0)
        for runs_resident in (kernels.lstm_forward_runs_resident,
                              kernels.lstm_backward_runs_resident):
            assert not runs_resident(100, 32, 64, False, 4)
            assert not runs_resident(100, 32, 512, False, 4)
    finally:
        kernels.set_resident_max_bytes_per_thread(limit)
    for bad in (-1, (1 << 48) + 1):
        with pytest.raises(RuntimeError,
                           match=rf"resident_max_bytes_per_thread must be in \[0, 2\^48\], got {bad}"):
            kernels.set_resident_max_bytes_per_thread(bad)


def test_lstm_loops_project_a_narrower_input_themselves_from_a_batch_of_four(torch_threads):
    kernels = build.kernels()
    assert kernels.lstm_input_min_batch() == 4
    threads = torch_threads
    # rnnkit lm's first layer: a 64-wide embedding into 256 units
    assert kernels.lstm_projects_input(100, 32, 64, 256, False, 4) == (threads >= 2)
    assert kernels.lstm_projects_input(100, 4, 16, 32, False, 4)
    assert not kernels.lstm_projects_input(100, 3, 16, 32, False, 4)  # a batch under 4
    assert not kernels.lstm_projects_input(100, 32, 32, 32, False, 4)  # I = H: ATen's mm
    assert not kernels.lstm_projects_input(100, 32, 16, 32, True, 4)  # a projection
    assert not kernels.lstm_projects_input(1, 32, 16, 32, False, 4)  # one step: not resident
    with pytest.raises(RuntimeError, match="lstm_input_min_batch must be >= 1, got 0"):
        kernels.set_lstm_input_min_batch(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_lstm_projecting_its_input_in_the_loop_equals_the_reference(dtype):
    # At the default policy (batch >= 4, input narrower than the state): two layers, both
    # directions, lengths, an initial state; training and inference, against the reference.
    torch.manual_seed(0)
    assert build.kernels().lstm_projects_input(9, 6, 10, 24, False, 4)
    layer = rnnkit.LSTM(10, 24, num_layers=2, bidirectional=True, peephole=True, dtype=dtype)
    x = torch.randn(9, 6, 10, dtype=dtype, requires_grad=True)
    h0 = torch.randn(4, 6, 24, dtype=dtype, requires_grad=True)
    c0 = torch.randn(4, 6, 24, dtype=dtype, requires_grad=True)
    lengths = [9, 3, 7, 1, 9, 5]

    def run(module):
        return module(x, (h0, c0), lengths=lengths)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run,
                                     {"x": x, "h0": h0, "c0": c0})
    actual = outputs_and_gradients(with_backend(layer, "native"), run,
                                   {"x": x, "h0": h0, "c0": c0})
    assert_same(actual, expected, dtype, group="native-vs-ref")
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    with torch.no_grad():  # no gates kept
        output, (h_n, c_n) = run(layer)
    for value, key in ((output, "out0"), (h_n, "out1"), (c_n, "out2")):
        torch.testing.assert_close(value, expected[key], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layer_class, extra", [
    (rnnkit.LSTM, {}), (rnnkit.LSTM, {"peephole": True}), (rnnkit.LSTM, {"layer_norm": True}),
    (rnnkit.GRU, {}), (rnnkit.GRU, {"reset_after": False}), (rnnkit.GRU, {"layer_norm": True}),
    (rnnkit.RNN, {})])
def test_native_kernels_stay_exact_where_the_gates_saturate(layer_class, extra):
    # Inputs x1e3 drive pre-activations far below -88, where e^-x overflows float32: the fast
    # reciprocal in the kernels' sigmoid once turned that inf into NaN (inf * 0 in its Newton
    # step). Whole sequences (training and inference paths) and a cell's step kernel.
    torch.manual_seed(0)
    layer = layer_class(INPUT, 16, **extra)
    x = torch.randn(STEPS, 3, INPUT) * 1e3

    def run(module):
        return module(x)

    expected = outputs_and_gradients(with_backend(layer, "reference"), run, {})
    actual = outputs_and_gradients(with_backend(layer, "native"), run, {})
    assert all(torch.isfinite(value).all() for value in actual.values())
    # normwise: the weight gradients sum x1e3 inputs, and float32's rounding scales with them
    assert_same_normwise(actual, expected, torch.float32)
    with torch.no_grad():
        inference, _ = with_backend(layer, "native")(x)
        stepped, _ = with_backend(layer, "native")(x[:1])  # one step: the step kernels
    torch.testing.assert_close(inference, expected["out0"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepped, expected["out0"][:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("columns", [1, 2, 4, 11, 12, 40])
def test_weight_products_of_narrow_inputs_equal_the_plain_product(columns):
    # `products.weight_product` and `project_all_steps` turn the product around for inputs of
    # FEW_COLUMNS (2-11) columns: the same sums, so the same values and gradients as F.linear,
    # in the same (contiguous) layout.
    from rnnkit.engine import products
    torch.manual_seed(0)
    d_rows, inputs = torch.randn(300, 24, dtype=torch.float64), torch.randn(300, columns,
                                                                            dtype=torch.float64)
    found = products.weight_product(d_rows, inputs)
    assert found.is_contiguous() and found.shape == (24, columns)
    torch.testing.assert_close(found, d_rows.t() @ inputs, rtol=1e-12, atol=1e-12)
    assert products.weight_product(d_rows[:0], inputs[:0]).abs().sum() == 0  # no rows
    for bias in (None, torch.randn(24, dtype=torch.float64, requires_grad=True)):
        weight = torch.randn(24, columns, dtype=torch.float64, requires_grad=True)
        x = torch.randn(7, 5, columns, dtype=torch.float64, requires_grad=True)
        projected = products.project_all_steps(x, weight, bias)
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(projected, expected, rtol=1e-12, atol=1e-12)
        leaves = [t for t in (x, weight, bias) if t is not None]
        upstream = torch.randn_like(expected)
        for found_grad, expected_grad in zip(torch.autograd.grad(projected, leaves, upstream),
                                             torch.autograd.grad(expected, leaves, upstream),
                                             strict=True):
            torch.testing.assert_close(found_grad, expected_grad, rtol=1e-12, atol=1e-12)
            assert found_grad.stride() == expected_grad.stride()
        assert products.project_all_steps(x[:0], weight, bias).shape == (0, 5, 24)
