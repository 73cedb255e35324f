"""minGRU, minLSTM and sLSTM through the operator boundary (rnnkit.engine.ops, the scans'
operators in rnnkit.engine.scan): opcheck, torch.compile (fullgraph), torch.export with dynamic
batch and length, and autocast, each against eager execution of the same layer."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from compare import assert_same, outputs_and_gradients, sequences
from rnnkit.engine import native, scan

INPUT, HIDDEN = 3, 4

# One layer per scan path and sLSTM engine, with the switches that change what runs.
VARIANTS = {
    "mingru_linear": (rnnkit.MinGRU, {"backend": "auto"}),
    "mingru_log_space_log_scan": (rnnkit.MinGRU, {"log_space": True, "backend": "log_scan"}),
    "minlstm_linear_scan_bi": (rnnkit.MinLSTM, {"backend": "scan", "bidirectional": True}),
    "minlstm_log_space_auto": (rnnkit.MinLSTM, {"log_space": True, "backend": "auto"}),
    "minlstm_log_space_log_scan_batch_first": (rnnkit.MinLSTM, {
        "log_space": True, "backend": "log_scan", "batch_first": True}),
    "slstm_fused_heads_bi": (rnnkit.SLSTM, {"backend": "fused", "num_heads": 2,
                                            "bidirectional": True}),
    "slstm_native_exp": (rnnkit.SLSTM, {"backend": "native", "forget_gate": "exp"}),
}
# The operator each variant's graph must hold (not the traced call's constants); "auto" runs
# the minimal cells' native loop where the kernels are built (`scan.engine_for`).
AUTO_MINIMAL = "native_min_scan" if native.why_not(torch.zeros(1)) is None else "linear_scan"
OPERATORS = {"mingru_linear": AUTO_MINIMAL, "mingru_log_space_log_scan": "log_scan",
             "minlstm_linear_scan_bi": "linear_scan", "minlstm_log_space_auto": AUTO_MINIMAL,
             "minlstm_log_space_log_scan_batch_first": "log_scan",
             "slstm_fused_heads_bi": "fused_slstm", "slstm_native_exp": "native_slstm"}


def make_layer(name, dtype=torch.float32):
    layer_class, extra = VARIANTS[name]
    torch.manual_seed(0)
    layer = layer_class(INPUT, HIDDEN, **extra, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.6, 0.6)
    return layer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_with_eager(layer, run, sizes, with_lengths=True):
    """Outputs, final states and every gradient (input and parameters) of ``run`` against eager,
    at each (steps, batch)."""
    for steps, batch in sizes:
        x, lengths = sequences(layer, steps, batch)
        lengths = lengths if with_lengths else None
        x.requires_grad_()
        expected = outputs_and_gradients(layer, lambda m, x=x, n=lengths: m(x, lengths=n),
                                         {"x": x})
        actual = outputs_and_gradients(layer, lambda m, x=x, n=lengths: run(x, n), {"x": x})
        assert_same(actual, expected, torch.float32)


# ---- opcheck: the scans' operators -------------------------------------------------------------

@pytest.mark.parametrize("op", ["linear_scan", "log_scan"])
def test_opcheck_scan_operators(op):
    generator = torch.Generator().manual_seed(0)
    steps, batch = 5, 2

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64).requires_grad_()

    first, second, h0 = rand(steps, batch, HIDDEN), rand(steps, batch, HIDDEN), rand(batch, HIDDEN)
    if op == "log_scan":
        first, second = (t.detach().log().requires_grad_() for t in (first, second))
    torch.library.opcheck(getattr(scan, op), (first, second, h0))


def test_scan_gradient_is_differentiable_again():
    # The backward is `scan_linear` itself, so a recorded backward (double backward) is exact:
    # against gradgradcheck's finite differences.
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.rand(6, 2, 3, generator=generator, dtype=torch.float64).requires_grad_()
            for _ in range(2))
    h0 = torch.rand(2, 3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(scan.scan_linear, (a, b, h0))
    assert torch.autograd.gradgradcheck(scan.scan_log, (a.detach().log().requires_grad_(),
                                                        b.detach().log().requires_grad_(), h0))


# ---- torch.compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mingru_linear", "mingru_log_space_log_scan",
                                  "minlstm_linear_scan_bi", "slstm_fused_heads_bi",
                                  "slstm_native_exp"])
def test_compile_fullgraph_equals_eager(name):
    # aot_eager: dynamo's capture and AOTAutograd's forward/backward split, where the scans'
    # Python loops over T would otherwise be unrolled or break the graph.
    layer = make_layer(name)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")

    def run(x, lengths):
        return compiled(x, lengths=lengths)

    _compare_with_eager(layer, run, [(5, 3), (8, 6)])
    _compare_with_eager(layer, run, [(6, 2)], with_lengths=False)


@pytest.mark.parametrize("name", ["mingru_linear", "minlstm_linear_scan_bi", "slstm_native_exp"])
def test_compile_with_inductor_equals_eager(name):
    # The default backend, inductor, once per family (its C++ code generation and compile take
    # seconds each): the code it generates around the operators (projections, gates, flips and
    # concatenations) in the forward and the backward graph. Static shapes: one compile.
    layer = make_layer(name)
    compiled = torch.compile(layer, fullgraph=True)
    _compare_with_eager(layer, lambda x, lengths: compiled(x, lengths=lengths), [(5, 3)])


@pytest.mark.parametrize("name", ["minlstm_log_space_log_scan_batch_first",
                                  "slstm_fused_heads_bi"])
def test_compiled_inference_equals_eager(name):
    layer = make_layer(name)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    x, lengths = sequences(layer, 7, 3)
    expected = layer(x, lengths=lengths)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, lengths=lengths), expected)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, lengths=lengths), expected)


# ---- torch.export ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_with_dynamic_batch_and_length_equals_eager(name):
    layer = make_layer(name)
    x, lengths = sequences(layer, 6, 4)
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    layout = {0: batch, 1: steps} if layer.batch_first else {0: steps, 1: batch}
    program = torch.export.export(layer, (x,), {"lengths": lengths},
                                  dynamic_shapes={"input": layout, "lengths": {0: batch}})
    exported = program.module()
    _compare_with_eager(layer, lambda x, lengths: exported(x, lengths=lengths),
                        [(3, 2), (9, 7)])
    targets = {str(node.target) for node in program.graph.nodes}
    assert f"rnnkit.{OPERATORS[name]}.default" in targets, targets


def test_export_without_lengths_equals_eager():
    layer = make_layer("minlstm_linear_scan_bi")
    x, _ = sequences(layer, 6, 4)
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    exported = torch.export.export(layer, (x,),
                                   dynamic_shapes={"input": {0: steps, 1: batch}}).module()
    _compare_with_eager(layer, lambda x, lengths: exported(x), [(11, 3)], with_lengths=False)


# ---- autocast ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cell"), [
    ("mingru_linear", rnnkit.MinGRUCell), ("minlstm_log_space_log_scan_batch_first", None),
    ("minlstm_linear_scan_bi", rnnkit.MinLSTMCell), ("slstm_fused_heads_bi", rnnkit.SLSTMCell),
    ("slstm_native_exp", None)])
def test_autocast_bfloat16_runs_in_float32(name, cell):
    # The families' rule (engine/precision.py): under autocast a layer or cell computes in its
    # float32 from bfloat16 inputs and returns float32, the same numbers as a float32 run on
    # them, gradients included; the products around it (here a projection) keep bfloat16.
    layer = make_layer(name)
    projection = torch.nn.Linear(INPUT, INPUT)
    x, lengths = sequences(layer, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = projection(x)
    assert features.dtype == torch.bfloat16

    def run(cast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            output, _ = layer(features if cast else features.float(), lengths=lengths)
        return output, torch.autograd.grad(output.sum(), list(layer.parameters()))

    (mixed, mixed_grads), (plain, plain_grads) = run(True), run(False)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-7)
    for a, e in zip(mixed_grads, plain_grads, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    # And close to the float32 model on the unrounded input (bfloat16 rounds at 2^-8).
    with torch.no_grad():
        exact, _ = layer(projection(x), lengths=lengths)
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.03)
    if cell is not None:
        step_cell = cell(INPUT, HIDDEN)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = step_cell(features[0] if not layer.batch_first else features[:, 0])
        expected = step_cell(features[0].float() if not layer.batch_first
                             else features[:, 0].float())
        torch.testing.assert_close(state, expected)
        assert all(s.dtype == torch.float32 for s in torch.utils._pytree.tree_leaves(state))


@pytest.mark.parametrize("op", ["linear_scan", "log_scan"])
def test_autocast_scan_operators_compute_in_float32(op):
    # Called directly under autocast: float32 results from bfloat16 inputs, exactly the float32
    # scan of the rounded inputs (a bfloat16 scan would differ by far more than float32 rounding).
    generator = torch.Generator().manual_seed(4)
    first, second = (torch.rand(300, 2, 3, generator=generator) * 0.5 + 0.5 for _ in range(2))
    if op == "log_scan":
        first, second = first.log(), second.log()
    h0 = torch.rand(2, 3, generator=generator)
    run = getattr(torch.ops.rnnkit, op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(first.bfloat16(), second.bfloat16(), h0)
    assert mixed.dtype == torch.float32
    expected = run(first.bfloat16().float(), second.bfloat16().float(), h0)
    torch.testing.assert_close(mixed, expected)
    in_bfloat16 = run(first.bfloat16(), second.bfloat16(), h0.bfloat16())
    assert in_bfloat16.dtype == torch.bfloat16  # outside autocast: the inputs' dtype
