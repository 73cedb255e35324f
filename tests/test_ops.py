"""The engine's torch.library operators: registration (opcheck), torch.compile, torch.export,
autocast, torch.func and double backward, each against eager or the reference engine."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.fx.experimental.proxy_tensor import make_fx

import rnnkit
from compare import assert_same, outputs_and_gradients, sequences
from rnnkit.engine import ops

BACKENDS = ["fused", "native"]
INPUT, HIDDEN = 3, 4

# One layer per family and variant, with every switch that changes what an operator computes.
VARIANTS = {
    "rnn_tanh": (rnnkit.RNN, {}),
    "rnn_relu_bi": (rnnkit.RNN, {"nonlinearity": "relu", "bidirectional": True}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm_peephole_proj_bi": (rnnkit.LSTM, {"peephole": True, "proj_size": 2,
                                            "bidirectional": True}),
    "lstm_learned_2layers": (rnnkit.LSTM, {"learn_initial_state": True, "num_layers": 2}),
    "gru": (rnnkit.GRU, {}),
    "gru_reset_before_bi": (rnnkit.GRU, {"reset_after": False, "bidirectional": True}),
    "gru_nobias_batch_first": (rnnkit.GRU, {"bias": False, "batch_first": True}),
}


def make_layer(name, backend, dtype=torch.float32):
    layer_class, extra = VARIANTS[name]
    torch.manual_seed(0)
    layer = layer_class(INPUT, HIDDEN, **extra, dtype=dtype, backend=backend)
    with torch.no_grad():  # every parameter nonzero: learned states and peepholes included
        for p in layer.parameters():
            p.uniform_(-0.6, 0.6)
    return layer


# ---- opcheck: schema, fake, autograd registration and vmap of every operator -----------------

def _operator_cases():
    """Direct arguments of each forward operator, in float64, with and without lengths."""
    steps, batch = 3, 2
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5).requires_grad_()

    lengths = torch.tensor([3, 1])
    for reverse in (False, True):
        for lens in (None, lengths):
            x, h0, c0 = rand(steps, batch, INPUT), rand(batch, HIDDEN), rand(batch, HIDDEN)
            rnn_w = [rand(HIDDEN, INPUT), rand(HIDDEN, HIDDEN), rand(HIDDEN), rand(HIDDEN)]
            gru_w = [rand(3 * HIDDEN, INPUT), rand(3 * HIDDEN, HIDDEN), rand(3 * HIDDEN),
                     rand(3 * HIDDEN)]
            proj = 2
            lstm_w = [rand(4 * HIDDEN, INPUT), rand(4 * HIDDEN, proj), rand(4 * HIDDEN),
                      rand(4 * HIDDEN), rand(proj, HIDDEN), rand(3 * HIDDEN)]
            for engine in BACKENDS:
                yield (f"{engine}_rnn", (x, h0, *rnn_w, lens, reverse, True))
                yield (f"{engine}_gru", (x, h0, *gru_w, lens, reverse, reverse))
                yield (f"{engine}_lstm", (x, rand(batch, proj), c0, *lstm_w, lens, reverse))


@pytest.mark.parametrize("case", list(_operator_cases()), ids=lambda c: c[0])
def test_opcheck_every_operator(case):
    name, arguments = case
    torch.library.opcheck(getattr(ops, name), arguments)


def test_opcheck_backward_operators():
    # The backward operators are checked where the forward ones call them (above, through the
    # autograd registration test); here their own schema and fake against their real outputs.
    for name, arguments in _operator_cases():
        op = getattr(ops, name)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in arguments)
        outputs = op(*detached)
        _, backward_arguments = _backward_call(name, detached, outputs)
        torch.library.opcheck(getattr(ops, f"{name}_backward"), backward_arguments,
                              test_utils=("test_schema", "test_faketensor"))


def _backward_call(name, a, out):
    """The backward operator's arguments for forward arguments ``a`` and outputs ``out``."""
    family = name.split("_")[1]
    native = name.startswith("native")
    lengths, reverse = (a[6], a[7]) if family != "lstm" else (a[9], a[10])
    if family == "rnn":
        raw = out[3] if native else out[2]
        d_output = torch.ones_like(raw)
        return name, (d_output, torch.ones_like(a[1]), raw, a[3], lengths, reverse, a[8])
    if family == "gru":
        if native:
            states, gates, n_input = out[0], out[3], out[4]
        else:
            states, gates, n_input = out[3], out[2], out[4]
        return name, (torch.ones_like(n_input), torch.ones_like(a[1]), gates, states, n_input,
                      a[3], lengths, reverse, a[8])
    if native:
        h_states, c_states, gates = out[0], out[1], out[5]
        c_new = ops._leaving(c_states, reverse)  # each step's new cell: the state it leaves
        d_output = torch.ones_like(h_states[1:])
        return name, (d_output, torch.ones_like(a[1]), torch.ones_like(a[2]), gates, c_states,
                      c_new, a[4], a[7], a[8], lengths, reverse)
    gates, c_raw, c_prev, h_prev, m = out[3:8]
    return name, (torch.ones_like(h_prev), torch.ones_like(a[1]), torch.ones_like(a[2]), gates,
                  c_raw, c_prev, m, a[4], a[7], a[8], lengths, reverse)


# ---- torch.compile and torch.export ------------------------------------------------------------

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own layers: forget earlier ones (dynamo's recompile limit counts
    every layer object compiled through the same code)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_with_eager(layer, run_compiled, sizes, dtype=torch.float32):
    """Outputs, final states and every gradient of a compiled/exported run against eager, at
    each (steps, batch) size, with lengths."""
    for steps, batch in sizes:
        x, lengths = sequences(layer, steps, batch, dtype)
        x.requires_grad_()

        def eager(module, x=x, lengths=lengths):
            return module(x, lengths=lengths)

        def compiled(module, x=x, lengths=lengths):
            return run_compiled(module, x, lengths)

        expected = outputs_and_gradients(layer, eager, {"x": x})
        actual = outputs_and_gradients(layer, compiled, {"x": x})
        assert_same(actual, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compile_fullgraph_equals_eager(name, backend):
    # aot_eager: dynamo's graph capture and AOTAutograd's forward/backward split, which is where
    # operators must be traceable; inductor's code generation is covered once below.
    layer = make_layer(name, backend)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    _compare_with_eager(layer, lambda m, x, lengths: compiled(x, lengths=lengths),
                        [(5, 3), (8, 6)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lstm_peephole_proj_bi", "gru", "rnn_relu_bi"])
def test_compiled_inference_equals_eager(name, backend):
    # Nothing to differentiate (no_grad, inference_mode, frozen weights): the graph holds the
    # bare operator (dynamo cannot trace an autograd.Function with nothing to record).
    layer = make_layer(name, backend)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    x, lengths = sequences(layer, 7, 3)
    expected = layer(x, lengths=lengths)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, lengths=lengths), expected)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, lengths=lengths), expected)
    layer.requires_grad_(False)
    torch.testing.assert_close(compiled(x, lengths=lengths), expected)


def test_compile_with_inductor_equals_eager():
    layer = make_layer("lstm_peephole_proj_bi", "auto")
    head = torch.nn.Linear(2 * layer.output_size, 1)
    model = torch.nn.ModuleDict({"rnn": layer, "head": head})

    def loss(x, lengths):
        output, _ = model["rnn"](x, lengths=lengths)
        return model["head"](output).square().mean()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for steps, batch in [(5, 3), (9, 4)]:
        x, lengths = sequences(layer, steps, batch)
        expected = torch.autograd.grad(loss(x, lengths), list(model.parameters()))
        actual = torch.autograd.grad(compiled(x, lengths), list(model.parameters()))
        for e, a in zip(expected, actual, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_with_dynamic_batch_and_length_equals_eager(name, backend):
    layer = make_layer(name, backend)
    x, lengths = sequences(layer, 6, 4)
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    layout = {0: batch, 1: steps} if layer.batch_first else {0: steps, 1: batch}
    program = torch.export.export(layer, (x,), {"lengths": lengths},
                                  dynamic_shapes={"input": layout, "lengths": {0: batch}})
    exported = program.module()
    _compare_with_eager(layer, lambda m, x, lengths: exported(x, lengths=lengths),
                        [(3, 2), (9, 7)])
    # The graph holds the operator, not a constant of the traced call.
    targets = {str(node.target) for node in program.graph.nodes}
    assert any(t.startswith(f"rnnkit.{backend}_") for t in targets), targets


def test_exported_program_refuses_lengths_out_of_range():
    layer = make_layer("gru", "native")
    x, lengths = sequences(layer, 6, 4)
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    exported = torch.export.export(
        layer, (x,), {"lengths": lengths},
        dynamic_shapes={"input": {0: steps, 1: batch}, "lengths": {0: batch}}).module()
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\], T the input's number of time steps"):
        exported(x, lengths=torch.tensor([6, 7, 1, 2]))


# ---- autocast ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("name", ["lstm_peephole_proj_bi", "gru_reset_before_bi", "rnn_tanh"])
def test_autocast_bfloat16_runs_in_float32(name, backend):
    # Under autocast the operators compute in float32 from bfloat16 inputs and return float32:
    # the same numbers as a float32 run on the bfloat16-rounded input, gradients included.
    layer = make_layer(name, backend)
    projection = torch.nn.Linear(INPUT, INPUT)
    x, lengths = sequences(layer, 20, 8)  # T * N above the kernels' small-product path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = projection(x)  # bfloat16 under autocast, as in a real model
    assert features.dtype == torch.bfloat16

    def run(module, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            output, _ = module(features if cast else features.float(), lengths=lengths)
        return output

    mixed = run(layer, True)
    assert mixed.dtype == torch.float32
    reference = run(layer, False)
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-7)
    expected = torch.autograd.grad(reference.sum(), list(layer.parameters()))
    actual = torch.autograd.grad(run(layer, True).sum(), list(layer.parameters()))
    for e, a in zip(expected, actual, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_autocast_cell_and_operator_rule():
    cell = rnnkit.LSTMCell(INPUT, HIDDEN)
    x = torch.randn(2, INPUT, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x)
    expected = cell(x.float())
    assert h.dtype == c.dtype == torch.float32
    torch.testing.assert_close((h, c), expected)
    # Calling the operator directly: torch.library's autocast rule casts to float32 too.
    layer = make_layer("gru", "native")
    w = layer.cell_weights(0, 0)
    sequence = torch.randn(4, 2, INPUT)
    arguments = (torch.zeros(2, HIDDEN), w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, None,
                 False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = torch.ops.rnnkit.native_gru(sequence.bfloat16(), *arguments)
    plain = torch.ops.rnnkit.native_gru(sequence.bfloat16().float(), *arguments)
    assert direct[0].dtype == torch.float32
    torch.testing.assert_close(direct, plain)


# ---- torch.func --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lstm_peephole_proj_bi", "gru_reset_before_bi", "rnn_relu_bi"])
def test_func_grad_and_vmap_equal_reference(name, backend):
    layer = make_layer(name, backend, torch.float64)
    reference = make_layer(name, "reference", torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x, lengths = sequences(layer, 5, 3, torch.float64)

    def loss(module):
        def of(parameters, inputs):
            output, _ = functional_call(module, parameters, (inputs,), {"lengths": lengths})
            return output.square().sum()
        return of

    expected = grad(loss(reference))(params, x)
    actual = grad(loss(layer))(params, x)
    for key in params:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-10, atol=1e-12)

    # vmap over an ensemble of parameter sets (the model-ensembling recipe) and over inputs.
    ensemble = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    batched = vmap(loss(layer), in_dims=(0, None))(ensemble, x)
    expected_batched = vmap(loss(reference), in_dims=(0, None))(ensemble, x)
    torch.testing.assert_close(batched, expected_batched, rtol=1e-10, atol=1e-12)
    inputs = torch.stack([x, x.flip(0)])
    per_input = vmap(loss(layer), in_dims=(None, 0))(params, inputs)
    torch.testing.assert_close(per_input, torch.stack([loss(reference)(params, xi)
                                                       for xi in inputs]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_jacrev_equals_reference(backend):
    # jacrev: vmap over the backward; the Jacobian of the final state by the input sequence.
    layer = make_layer("gru_reset_before_bi", backend, torch.float64)
    reference = make_layer("gru_reset_before_bi", "reference", torch.float64)
    x, _ = sequences(layer, 4, 2, torch.float64)

    def final_state(module):
        return lambda inputs: module(inputs)[1]

    jacobian = torch.func.jacrev(final_state(layer))(x)
    assert jacobian.shape == (2, 2, HIDDEN, 4, 2, INPUT)
    torch.testing.assert_close(jacobian, torch.func.jacrev(final_state(reference))(x),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_per_sample_gradients(backend):
    # vmap(grad(...)): per-sample gradients, the torch.func recipe.
    layer = make_layer("lstm", backend, torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x, _ = sequences(layer, 4, 3, torch.float64)

    def sample_loss(parameters, sample):
        output, _ = functional_call(layer, parameters, (sample.unsqueeze(1),))
        return output.sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 1))(params, x)
    for n in range(x.shape[1]):
        one = grad(sample_loss)(params, x[:, n])
        for key in params:
            torch.testing.assert_close(per_sample[key][n], one[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_is_refused_and_the_reference_has_it(backend):
    # The operators have no jvp rule (dynamo refuses a Function that defines one, even one
    # that only raises), so forward mode is refused by autograd itself; README says to use the
    # reference engine, or reverse mode.
    layer = make_layer("gru", backend, torch.float64)
    x, _ = sequences(layer, 4, 2, torch.float64)
    with pytest.raises(NotImplementedError, match=r"implement the jvp function .* forward mode AD"):
        torch.func.jacfwd(lambda inputs: layer(inputs)[0].sum())(x)
    reference = make_layer("gru", "reference", torch.float64)
    forward = torch.func.jacfwd(lambda inputs: reference(inputs)[0].sum())(x)
    torch.testing.assert_close(forward, torch.func.jacrev(lambda i: layer(i)[0].sum())(x))


# ---- double backward ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lstm_peephole_proj_bi", "gru_reset_before_bi", "gru",
                                  "rnn_tanh"])
def test_gradgradcheck(name, backend):
    layer = make_layer(name, backend, torch.float64)
    x, lengths = sequences(layer, 3, 2, torch.float64)
    x.requires_grad_()
    weight = layer.weight_hh_l0

    def run(inputs, w_hh):
        output, _ = functional_call(layer, {"weight_hh_l0": w_hh}, (inputs,),
                                    {"lengths": lengths}, strict=False)
        return output

    assert torch.autograd.gradgradcheck(run, (x, weight.detach().requires_grad_()))


def test_gradient_penalty_equals_reference():
    # The WGAN-GP pattern: the norm of d output / d input, itself differentiated.
    results = {}
    for backend in ("native", "reference"):
        layer = make_layer("lstm_peephole_proj_bi", backend, torch.float64)
        x, lengths = sequences(layer, 5, 3, torch.float64)
        x.requires_grad_()
        output, _ = layer(x, lengths=lengths)
        (d_x,) = torch.autograd.grad(output.sum(), x, create_graph=True)
        penalty = d_x.square().sum()
        results[backend] = torch.autograd.grad(penalty, list(layer.parameters()))
    for a, e in zip(results["native"], results["reference"], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ---- the eager shortcut past the dispatcher ----------------------------------------------------

@pytest.mark.parametrize("family, forward, backward", [
    ("LSTM", "native_lstm", "native_lstm_backward"),
    ("GRU", "fused_gru", "fused_gru_backward"),
    ("SLSTM", "native_slstm", "native_slstm_backward")])
def test_eager_training_calls_the_implementations_directly_with_the_operators_results(
        monkeypatch, family, forward, backward):
    """In plain eager mode the autograd.Functions call their operator's implementation, and the
    backward formulas theirs, without the dispatcher (`ops._call_named`): the same results, bit
    for bit, as through ``torch.ops``; under a dispatch mode (here make_fx's) or a compiler the
    operators run."""
    torch.manual_seed(0)
    backend = "fused" if forward.startswith("fused") else "native"
    layer = getattr(rnnkit, family)(3, 5, bidirectional=True, backend=backend)
    x = torch.randn(6, 2, 3, requires_grad=True)
    lengths = torch.tensor([6, 4])

    def results():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        output, _ = layer(x, lengths=lengths)
        (output * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
        return [output.detach(), x.grad, *(p.grad for p in layer.parameters())]

    implementations = dict(ops._IMPLEMENTATIONS)
    calls = {forward: 0, backward: 0}

    def counted(name):
        def call(*arguments):
            calls[name] += 1
            return implementations[name](*arguments)
        return call

    monkeypatch.setitem(ops._IMPLEMENTATIONS, forward, counted(forward))
    monkeypatch.setitem(ops._IMPLEMENTATIONS, backward, counted(backward))
    direct = results()
    assert calls == {forward: 2, backward: 2}  # both directions, each way
    for name in (forward, backward):  # through the dispatcher
        monkeypatch.delitem(ops._IMPLEMENTATIONS, name)
    dispatched = results()
    for a, b in zip(direct, dispatched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setitem(ops._IMPLEMENTATIONS, forward, counted(forward))
    calls[forward] = 0
    traced = make_fx(lambda x: layer(x)[0])(x)
    assert calls[forward] == 0  # under a dispatch mode, the operator
    assert f"rnnkit.{forward}.default" in {str(node.target) for node in traced.graph.nodes}


def _spy_on_function_apply(monkeypatch) -> list:
    """One entry per call of any of the layers' autograd.Functions' ``apply``."""
    applied = []
    for function in set(ops._FUNCTIONS.values()):
        def spy(*arguments, real=function.apply):
            applied.append(1)
            return real(*arguments)
        monkeypatch.setattr(function, "apply", spy)
    return applied


def test_eager_recording_skips_function_apply_s_python_half_with_the_same_results(monkeypatch):
    """In plain eager mode `ops._record` calls the C half of ``Function.apply`` (no per-call
    `inspect.signature` binding): the same output and gradients, bit for bit, as through
    ``Function.apply``; under a torch.func transform the Python ``apply`` runs, as it must."""
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 5, num_layers=2, backend="native")
    x = torch.randn(6, 2, 3, requires_grad=True)

    def results():
        output, _ = layer(x)
        grads = torch.autograd.grad((output * output).sum(), [x, *layer.parameters()])
        return [output.detach(), *grads]

    applied = _spy_on_function_apply(monkeypatch)
    direct = results()
    assert not applied  # the C half, directly
    monkeypatch.setattr(ops, "_record", lambda function, arguments: function.apply(*arguments))
    through_apply = results()
    assert len(applied) == 2  # one per layer
    for a, b in zip(direct, through_apply, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.undo()
    applied = _spy_on_function_apply(monkeypatch)
    params = dict(layer.named_parameters())
    gradient = grad(lambda p: functional_call(layer, p, (x.detach(),))[0].square().sum())(params)
    assert applied and set(gradient) == set(params)
    eager = dict(zip(params, through_apply[2:], strict=True))  # after the output and x's
    for name, value in gradient.items():
        torch.testing.assert_close(value, eager[name])
