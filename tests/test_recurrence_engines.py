"""The recurrence operators (layer norm, recurrent dropout, zoneout on the fused and native
engines) against the reference loop: outputs, final states and every gradient, on a grid of
switches x families x directions x lengths; gradcheck in float64 through both operators."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from compare import assert_same, assert_same_normwise, outputs_and_gradients, rounding_sensitivity
from rnnkit.engine import native, ops, steps
from rnnkit.engine.steps import Masks

NATIVE = native.why_not(torch.zeros(1)) is None
ENGINES = ["fused", pytest.param("native", marks=pytest.mark.skipif(
    not NATIVE, reason="the native kernels could not be built here (a warning said why)"))]

# (family, layer options) covering every family form the switches combine with.
FORMS = {
    "lstm": ("lstm", {}),
    "lstm-peephole-projection": ("lstm", {"peephole": True, "proj_size": 3}),
    "gru": ("gru", {}),
    "gru-reset-before": ("gru", {"reset_after": False}),
    "rnn-tanh": ("rnn", {}),
    "rnn-relu": ("rnn", {"nonlinearity": "relu"}),
}
SWITCHES = {
    "layer-norm": ({"layer_norm": True}, True),
    "recurrent-dropout": ({"recurrent_dropout": 0.3}, True),
    "zoneout-training": ({"zoneout": 0.3}, True),
    "zoneout-evaluation": ({"zoneout": 0.3}, False),
    "lstm-zoneout-pair": ({"zoneout": (0.2, 0.4)}, True),
    "all": ({"layer_norm": True, "recurrent_dropout": 0.25, "zoneout": 0.2, "weight_drop": 0.2},
            True),
}
LAYERS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}


def _grid():
    for form, (family, _) in FORMS.items():
        for switch, (options, _) in SWITCHES.items():
            if form == "gru-reset-before" and options.get("layer_norm"):
                continue  # refused by the layer (tested in test_regularisation.py)
            if switch == "lstm-zoneout-pair" and family != "lstm":
                continue
            yield form, switch


def _model(form: str, switch: str, dtype=torch.float32):
    family, form_options = FORMS[form]
    options, training = SWITCHES[switch]
    torch.manual_seed(0)
    # Hidden 16: layer norm over a handful of units amplifies float32 rounding (the reference
    # itself is then 1e-4 away from float64 at hidden 5, and 4e-6 at 16).
    model = LAYERS[family](4, 16, num_layers=2, bidirectional=True, **form_options,
                           **options).to(dtype)
    with torch.no_grad():  # gains away from 1 and shifts away from 0, so each is exercised
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.train(training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize(("form", "switch"), list(_grid()))
def test_every_engine_equals_the_reference(form, switch, with_lengths, engine, dtype):
    model = _model(form, switch, dtype)
    x = torch.randn(7, 3, 4, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([4, 7, 1]) if with_lengths else None
    # A random initial state: from zeros the first recurrent product is 0, and layer norm of
    # a zero row has rstd = 1/sqrt(1e-5) ~ 316, which scales float32 rounding past 1e-5.
    out_size = model.proj_size or model.hidden_size
    hx = [torch.randn(4, 3, out_size, dtype=dtype, requires_grad=True)]
    if isinstance(model, rnnkit.LSTM):
        hx.append(torch.randn(4, 3, model.hidden_size, dtype=dtype, requires_grad=True))
    inputs = {"x": x, **{f"hx{k}": h for k, h in enumerate(hx)}}

    def run(backend, module=model, tensors=inputs):
        module.backend = backend

        def call(layer):
            torch.manual_seed(5)  # the same masks for every engine and both dtypes
            state = [tensors[f"hx{k}"] for k in range(len(hx))]
            return layer(tensors["x"], tuple(state) if len(state) == 2 else state[0],
                         lengths=lengths)

        return outputs_and_gradients(module, call, tensors)

    # float64 entry by entry at 1e-10: the exactness check. float32 relative to each tensor's
    # largest entry (compare.py) at 1e-5, or, where the problem itself amplifies one float32
    # rounding of its inputs past that, at ten times that amplification (measured in float64 by
    # `rounding_sensitivity`): layer norm's backward scales by 1/deviation of rows that can have
    # little spread (this grid's peephole-projection LSTM has 3 projected units, some masked),
    # where one rounding moves a weight gradient by 1.4e-5 and every engine, the reference
    # included, lands 1e-6 to 6e-5 from float64 depending on the draw (measured).
    if dtype == torch.float64:
        assert_same(run(engine), run("reference"), dtype, group=f"recurrence {engine}")
    else:
        sensitivity = rounding_sensitivity(
            lambda module, tensors: run("reference", module, tensors), model, inputs)
        assert_same_normwise(run(engine), run("reference"), dtype,
                             group=f"recurrence {engine}", sensitivity=sensitivity)


def _operator_arguments(family: str, form_options: dict, dtype=torch.float64,
                        fold_layer_norm: bool = False):
    """A direction's recurrence operator inputs with every switch on, at float64; folded, the
    input side is the bare ``W_ih x`` and the weights keep ``γ_ih`` and the summed bias
    (`steps.input_side`), as the LSTM's layers run it."""
    torch.manual_seed(1)
    steps_, batch, hidden = 5, 3, 4
    model = LAYERS[family](3, hidden, layer_norm=family != "gru" or form_options.get(
        "reset_after", True), **form_options).to(dtype)
    kind = model.cell_kind()
    weights = model.cell_weights(0, 0)
    with torch.no_grad():
        for tensor in weights:
            if tensor is not None:
                tensor.add_(0.3 * torch.randn_like(tensor))
    x = torch.randn(steps_, batch, 3, dtype=dtype)
    pre_x, w = steps.input_side(kind, x, weights, fold_layer_norm=fold_layer_norm)
    out_size = weights.weight_hh.shape[1]
    state = [torch.randn(batch, out_size, dtype=dtype)]
    if family == "lstm":
        state.append(torch.randn(batch, hidden, dtype=dtype))
    masks = Masks(torch.bernoulli(torch.full((batch, out_size), 0.7, dtype=dtype)) / 0.7,
                  torch.bernoulli(torch.full((steps_, batch, out_size), 0.3, dtype=dtype)),
                  torch.tensor(0.25, dtype=dtype) if family == "lstm" else None)
    return kind, pre_x.detach(), state, w, masks


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("form,folded", [
    *((form, False) for form in ("lstm-peephole-projection", "lstm", "gru", "gru-reset-before",
                                 "rnn-tanh", "rnn-relu")),
    # Only the LSTM's operators fold the input side's layer norm in (as its layers run them).
    ("lstm-peephole-projection", True), ("lstm", True),
], ids=lambda value: {True: "folded", False: "unfolded"}.get(value, value))
def test_gradcheck_float64_through_the_operators(form, folded, reverse, engine):
    family, form_options = FORMS[form]
    kind, pre_x, state, w, masks = _operator_arguments(family, form_options,
                                                       fold_layer_norm=folded)
    assert (w.layer_norm_ih is not None) == folded
    lengths = torch.tensor([5, 2, 4])
    names = [name for name in ("weight_hh", "bias_hh", "weight_hr", "weight_ch", "layer_norm_hh",
                               "layer_norm_c_weight", "layer_norm_c_bias", "layer_norm_ih",
                               "bias_ih")
             if getattr(w, name) is not None]
    leaves = [pre_x, *state, *(getattr(w, name) for name in names)]
    leaves = [leaf.detach().requires_grad_() for leaf in leaves]

    def run(*tensors):
        pre, *rest = tensors
        state_ = tuple(rest[: len(state)]) if family == "lstm" else rest[0]
        weights = w._replace(**dict(zip(names, rest[len(state):], strict=True)))
        output, final = ops.run_recurrence(kind, pre, state_, weights, lengths, reverse, masks,
                                           native_kernels=engine == "native")
        return (output, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(run, leaves, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("engine", ENGINES)
def test_double_backward_through_a_recurrence_operator_is_the_reference(engine, folded):
    kind, pre_x, (h0, c0), w, masks = _operator_arguments("lstm", {"peephole": True},
                                                          fold_layer_norm=folded)
    pre_x.requires_grad_()

    def penalty(run):
        output, _ = run(pre_x)
        (d_pre,) = torch.autograd.grad(output.square().sum(), pre_x, create_graph=True)
        return torch.autograd.grad(d_pre.square().sum(), pre_x)[0]

    def through_operator(pre):
        return ops.run_recurrence(kind, pre, (h0, c0), w, None, False, masks,
                                  native_kernels=engine == "native")

    def through_reference(pre):
        from rnnkit.engine import reference
        return reference.run_direction(kind, pre, (h0, c0), w, None, False, masks)

    torch.testing.assert_close(penalty(through_operator), penalty(through_reference),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_evaluation_mode_streaming_equals_the_whole_sequence(engine):
    model = rnnkit.LSTM(4, 6, layer_norm=True, zoneout=0.2, backend=engine).eval()
    x = torch.randn(9, 2, 4)
    with torch.no_grad():
        whole, (h_whole, c_whole) = model(x)
        state, pieces = None, []
        for step in x.split(1):
            y, state = model(step, state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[0], h_whole, rtol=1e-5, atol=1e-6)


def test_a_recurrent_mask_that_needs_its_own_gradient_gets_it():
    """The operators treat masks as constants; a caller's mask asking for a gradient runs on
    the reference loop, so the gradient reaches it (as autograd gives)."""
    cell = rnnkit.GRUCell(3, 4, recurrent_dropout=0.5)
    mask = torch.full((2, 4), 2.0, requires_grad=True)
    h = cell(torch.randn(2, 3), torch.randn(2, 4), recurrent_mask=mask)
    h.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_the_operators_trace_compile_and_export_in_evaluation_mode():
    model = rnnkit.GRU(4, 5, layer_norm=True, zoneout=0.1, backend="fused").eval()
    x = torch.randn(6, 2, 4)
    expected, _ = model(x)
    compiled, _ = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected)
    steps_dim, batch_dim = torch.export.Dim("T"), torch.export.Dim("N")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: steps_dim, 1: batch_dim},))
    longer = torch.randn(11, 3, 4)
    torch.testing.assert_close(program.module()(longer)[0], model(longer)[0])
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(longer)[0], model(longer)[0])


def test_tracing_training_masks_is_a_named_error():
    model = rnnkit.LSTM(4, 5, zoneout=0.1).train()
    with pytest.raises(ValueError, match="torch.jit.trace cannot record recurrent_dropout or "
                                         "zoneout in training mode"):
        torch.jit.trace(model, (torch.randn(3, 2, 4),), check_trace=False)


def test_compiled_training_with_masks_equals_eager_under_the_same_seed():
    """The masks are drawn by the layer with torch.rand: under aot_eager the compiled graph
    draws them from the same generator as eager; inductor has its own random number generator
    (different masks, equally valid), and with ``fallback_random`` it calls torch's, so the
    compiled step equals eager (README, "torch.compile")."""
    torch.manual_seed(0)
    model = rnnkit.LSTM(6, 8, layer_norm=True, zoneout=0.2, recurrent_dropout=0.2,
                        weight_drop=0.3).train()
    x = torch.randn(5, 3, 6, requires_grad=True)

    def step(module):
        torch.manual_seed(7)
        output, _ = module(x)
        return (output, *torch.autograd.grad(output.square().sum(),
                                             [x, *model.parameters()]))

    eager = step(model)
    compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    for found, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(found, expected, rtol=0, atol=0)
    torch._dynamo.reset()
    # The config's own patch: monkeypatch's undo broke the config module for later tests.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = step(torch.compile(model, fullgraph=True))
    for found, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_per_sample_gradients_with_torch_func_equal_the_reference(engine):
    torch.manual_seed(0)
    model = rnnkit.GRU(4, 6, layer_norm=True, zoneout=0.2, backend=engine).eval()
    reference_model = rnnkit.GRU(4, 6, layer_norm=True, zoneout=0.2, backend="reference").eval()
    reference_model.load_state_dict(model.state_dict())
    sequences = torch.randn(5, 3, 4)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def per_sample(module):
        def loss(parameters, sequence):
            output, _ = torch.func.functional_call(module, parameters, (sequence.unsqueeze(1),))
            return output.square().mean()
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, sequences)

    found, expected = per_sample(model), per_sample(reference_model)
    assert found["layer_norm_hh_l0"].shape == (3, 18)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-6)
