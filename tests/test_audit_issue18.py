"""Audit of issue 18's switches (layer_norm, recurrent_dropout, zoneout, weight_drop): one test
per bug found, each against an independent reference (the layer's own forward, the spec's
formula, torch.nn's cell) or the named error the project rules ask for."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit import diagnostics


def perturbed(module, scale=0.3):
    """``module`` with every parameter moved off its initial value (layer-norm gains off 1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


class Wrapped(torch.nn.Module):
    """A model calling the layer, as tracers and exporters are given one."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


# ---- cells: the recurrent_mask argument --------------------------------------------------

def test_a_cell_in_evaluation_ignores_the_recurrent_mask_it_is_given():
    """Spec: recurrent dropout acts in training only. The documented loop draws a mask once
    and passes it every step; the same loop in evaluation must be the plain step."""
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(3, 5, recurrent_dropout=0.5).double()
    plain = torch.nn.LSTMCell(3, 5).double()
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    hx = (torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    mask = cell.recurrent_dropout_mask(2)
    assert (mask == 0).any()  # a mask that would change the step
    cell.eval()
    h, c = cell(x, hx, recurrent_mask=mask)
    h_plain, c_plain = plain(x, hx)
    torch.testing.assert_close(h, h_plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_plain, rtol=0, atol=1e-12)


def test_a_cell_recurrent_mask_of_another_batch_size_is_a_named_error():
    cell = rnnkit.GRUCell(3, 4, recurrent_dropout=0.5)
    with pytest.raises(ValueError, match=r"GRUCell recurrent_mask must have shape \(N, 4\).*"
                                         r"N = 2.*got \(5, 4\)"):
        cell(torch.randn(2, 3), recurrent_mask=torch.ones(5, 4))


def test_an_unbatched_cell_checks_its_recurrent_mask_before_using_it():
    cell = rnnkit.RNNCell(3, 4, recurrent_dropout=0.5)
    with pytest.raises(TypeError, match="RNNCell recurrent_mask must be a torch.Tensor"):
        cell(torch.randn(3), recurrent_mask=[1.0] * 4)
    # The shape named is the one given, not one made from it.
    with pytest.raises(ValueError, match=r"RNNCell recurrent_mask must have shape \(4,\) for "
                                         r"unbatched input.*got \(1, 4\)"):
        cell(torch.randn(3), recurrent_mask=torch.ones(1, 4))
    # What is accepted still works: the (H_out,) mask on the unbatched state.
    torch.manual_seed(0)
    cell.train()
    x, h = torch.randn(3), torch.randn(4)
    mask = torch.tensor([2.0, 0.0, 2.0, 0.0])
    expected = torch.tanh(cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ (mask * h)
                          + cell.bias_hh)
    torch.testing.assert_close(cell(x, h, recurrent_mask=mask), expected)


# ---- diagnostics on a layer with the switches --------------------------------------------

def test_gate_trace_follows_zoneout_as_the_layer_runs_it_in_evaluation():
    """The trace's h is the layer's output; with zoneout in evaluation that is the
    expectation ``p h_{t-1} + (1 - p) h~_t``, and the next step reads that state."""
    for layer in (rnnkit.LSTM(3, 5, layer_norm=True, zoneout=(0.3, 0.6), bidirectional=True),
                  rnnkit.GRU(3, 5, zoneout=0.4, num_layers=2)):
        layer = perturbed(layer).double().eval()
        x = torch.randn(6, 2, 3, dtype=torch.float64)
        lengths = torch.tensor([6, 4])
        output, _ = layer(x, lengths=lengths)
        trace = diagnostics.gate_trace(layer, x, lengths=lengths)
        top = layer.num_layers - 1
        size = layer.output_size
        forward = trace.gate("h", top, 0).nan_to_num(0.0)
        torch.testing.assert_close(forward, output[..., :size], rtol=0, atol=1e-12)
        if layer.bidirectional:
            reverse = trace.gate("h", top, 1).nan_to_num(0.0)
            torch.testing.assert_close(reverse, output[..., size:], rtol=0, atol=1e-12)


def test_gradient_flow_of_a_layer_in_training_mode_reads_it_as_in_evaluation():
    """Diagnostics read the layer as in evaluation (module doc): a training-mode layer with
    recurrent dropout or weight drop gives the evaluation figures, not a random draw."""
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 5, recurrent_dropout=0.5, weight_drop=0.5, zoneout=0.2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected = diagnostics.gradient_flow(layer.eval(), x)
    layer.train()
    for _ in range(2):
        found = diagnostics.gradient_flow(layer, x)
        torch.testing.assert_close(found.h, expected.h, rtol=0, atol=1e-12)
        torch.testing.assert_close(found.c, expected.c, rtol=0, atol=1e-12)
    assert layer.training  # left as it was


# ---- tracing and ONNX export -------------------------------------------------------------

def test_tracing_a_layer_with_a_switch_records_the_operator_or_is_a_named_error():
    """torch.jit.trace once froze the reference loop to the example's length: a module that
    silently answered 4 steps for a 6-step input. The switches now run as one recurrence
    operator, which a trace records whole, so an evaluation-mode trace runs any length; in
    training mode the masks are drawn at the example's shape, so tracing is refused by name."""
    for options in ({"layer_norm": True}, {"zoneout": 0.2}, {}, {"weight_drop": 0.3}):
        torch.manual_seed(0)
        model = Wrapped(rnnkit.LSTM(3, 5, **options)).eval()
        traced = torch.jit.trace(model, torch.randn(4, 2, 3))
        x = torch.randn(6, 2, 3)
        torch.testing.assert_close(traced(x), model(x))
    for options in ({"zoneout": 0.2}, {"recurrent_dropout": 0.2}):
        model = Wrapped(rnnkit.LSTM(3, 5, **options)).train()
        with pytest.raises(ValueError, match="torch.jit.trace cannot record"):
            torch.jit.trace(model, torch.randn(4, 2, 3))


def test_torch_onnx_export_of_a_layer_norm_model_runs_at_any_length_in_evaluation_only(tmp_path):
    """torch.onnx.export(dynamo=True) once wrote a graph fixed to the example's length (its
    strict retry skipped the refusal); then layer norm and zoneout were refused by name. In
    evaluation mode they now export as a Scan loop that runs other lengths and batches than
    the traced ones; in training mode (masks drawn per call) they stay the named error."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = perturbed(Wrapped(rnnkit.LSTM(3, 5, layer_norm=True, zoneout=0.2))).eval()
    path = tmp_path / "ln.onnx"
    steps, batch = torch.export.Dim("T"), torch.export.Dim("N")
    torch.onnx.export(model, (torch.randn(4, 2, 3),), str(path), dynamo=True,
                      dynamic_shapes=({0: steps, 1: batch},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 3)
    (found,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(found), model(x), rtol=0, atol=1e-5)

    path = tmp_path / "training.onnx"
    with pytest.raises(Exception, match="zoneout do not export to ONNX in training mode"):
        torch.onnx.export(model.train(), (torch.randn(4, 2, 3),), str(path), dynamo=True)
    assert not path.exists()
