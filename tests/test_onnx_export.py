"""ONNX export (rnnkit.engine.onnx, rnnkit.export_onnx, `rnnkit export`): every family and variant
exported with a dynamic length and batch, run in onnxruntime at other sizes than the traced
ones and compared with the layer run eagerly on the reference engine (the spec)."""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.engine.onnx import UnsupportedExport

onnx = pytest.importorskip("onnx", reason='ONNX export tests need the onnx extra')
onnxruntime = pytest.importorskip("onnxruntime", reason='ONNX export tests need the onnx extra')

TRACED = (4, 2)  # (T, N) of the example the exporter traces
CHECKED = [(9, 3), (1, 1)]  # other lengths and batches the exported file must run
TOLERANCE = 1e-5
INPUT_SIZE, HIDDEN_SIZE = 3, 5


class Flat(torch.nn.Module):
    """A layer's ``(output, state)`` as a flat tuple ``(output, h_n[, c_n])``: the ONNX outputs.

    Also gives ``lengths`` positionally (the exporters pass inputs by position)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, lengths=None):
        output, state = self.layer(x, lengths=lengths)
        return (output, *state) if isinstance(state, tuple) else (output, state)


def make(family: str, **options) -> torch.nn.Module:
    """A small layer on the reference engine with every parameter drawn in [-0.5, 0.5], the
    variants' too (peepholes and learned states start at zero, which would hide them)."""
    torch.manual_seed(0)
    layer = getattr(rnnkit, family)(INPUT_SIZE, HIDDEN_SIZE, backend="reference", **options)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.5, 0.5)
    return layer.eval()


def example(layer, steps: int, batch: int, with_lengths: bool, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, steps, INPUT_SIZE) if layer.batch_first else (steps, batch, INPUT_SIZE)
    x = torch.randn(shape, generator=generator)
    if not with_lengths:
        return (x,)
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps  # the longest sequence fills the batch, as in a padded batch
    return x, lengths


def dynamic_shapes(layer, with_lengths: bool):
    steps, batch = torch.export.Dim("T"), torch.export.Dim("N")
    x = {0: batch, 1: steps} if layer.batch_first else {0: steps, 1: batch}
    return (x, {0: batch}) if with_lengths else (x,)


def largest_difference(path, model, inputs) -> float:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    with torch.no_grad():
        expected = model(*inputs)
    assert len(results) == len(expected)
    for result, value in zip(results, expected, strict=True):
        assert result.shape == tuple(value.shape)
    return max(float(np.abs(r - v.numpy()).max()) for r, v in zip(results, expected, strict=True))


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def check_export(tmp_path, layer, with_lengths, export) -> set[str]:
    """Export ``layer`` with ``export(model, args, path, shapes)``, run it at the CHECKED sizes;
    returns the graph's op types."""
    model = Flat(layer)
    path = tmp_path / "layer.onnx"
    export(model, example(layer, *TRACED, with_lengths), path,
           dynamic_shapes(layer, with_lengths))
    for seed, (steps, batch) in enumerate(CHECKED):
        inputs = example(layer, steps, batch, with_lengths, seed=seed + 2)
        assert largest_difference(path, model, inputs) < TOLERANCE, (steps, batch)
    return op_types(path)


def export_native(model, args, path, shapes):
    rnnkit.export_onnx(model, args, path, dynamic_shapes=shapes)


def export_plain(model, args, path, shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=shapes,
                          verbose=False)


# A representative grid (each export costs seconds): every family and variant, each in one of
# the configurations (directions, layers, layout, lengths) rather than all their products.
NATIVE_CASES = [
    ("LSTM", {"batch_first": True}, True, "LSTM"),
    ("LSTM", {"peephole": True, "bidirectional": True}, True, "LSTM"),
    ("LSTM", {"proj_size": 3, "num_layers": 2, "bidirectional": True}, True, "Scan"),
    ("LSTM", {"learn_initial_state": True, "bias": False}, False, "LSTM"),
    ("GRU", {"num_layers": 2, "bidirectional": True}, False, "GRU"),
    ("GRU", {"reset_after": False, "bidirectional": True}, True, "GRU"),
    ("RNN", {"bias": False, "num_layers": 2}, False, "RNN"),
    ("RNN", {"nonlinearity": "relu", "learn_initial_state": True, "bidirectional": True}, True,
     "RNN"),
    # Recurrent dropout and weight drop are the identity in evaluation mode: the plain node.
    ("GRU", {"recurrent_dropout": 0.3, "weight_drop": 0.4}, True, "GRU"),
]


@pytest.mark.parametrize(("family", "options", "with_lengths", "onnx_op"), NATIVE_CASES)
def test_export_onnx_matches_eager_at_other_lengths_and_batches(
        tmp_path, family, options, with_lengths, onnx_op):
    layer = make(family, **options)
    ops = check_export(tmp_path, layer, with_lengths, export_native)
    assert onnx_op in ops
    # One recurrent construct per layer and direction, nothing else recurrent.
    assert ops & {"LSTM", "GRU", "RNN", "Scan"} == {onnx_op}


def test_plain_torch_onnx_export_runs_a_scan_loop_correct_at_any_length(tmp_path):
    # Without export_onnx's translations the exporter gets the spec's step in a Scan loop
    # (masked by lengths, in the GRU form torch.nn lacks); one direction, since each Scan costs
    # seconds to export: the reverse Scan is the projection case's above.
    layer = make("GRU", reset_after=False)
    ops = check_export(tmp_path, layer, True, export_plain)
    assert "Scan" in ops and not ops & {"LSTM", "GRU", "RNN"}


LEGACY_CASES = [
    ("LSTM", {"num_layers": 2, "bidirectional": True}, "LSTM"),
    ("GRU", {"batch_first": True, "learn_initial_state": True}, "GRU"),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}, "RNN"),
]


def export_legacy(model, args, path, shapes):
    names = ["x"]
    axes = {"x": {0: "N", 1: "T"} if model.layer.batch_first else {0: "T", 1: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=names,
                          dynamic_axes=axes)


@pytest.mark.parametrize(("family", "options", "onnx_op"), LEGACY_CASES)
def test_legacy_exporter_gives_the_onnx_op_for_plain_layers(tmp_path, family, options, onnx_op):
    ops = check_export(tmp_path, make(family, **options), False, export_legacy)
    assert onnx_op in ops and "Scan" not in ops


@pytest.mark.parametrize(("family", "options", "with_lengths", "variant"), [
    ("LSTM", {"peephole": True}, False, "a peephole LSTM"),
    ("LSTM", {"proj_size": 2}, False, "an LSTM with proj_size"),
    ("GRU", {"reset_after": False}, False, "a GRU with reset_after=False"),
    ("RNN", {}, True, "an RNN with lengths"),
    ("LSTM", {"layer_norm": True, "peephole": True}, False, "an LSTM with layer_norm=True"),
    ("GRU", {"zoneout": 0.2}, False, "a GRU with zoneout"),
    ("RNN", {"layer_norm": True, "zoneout": 0.1}, True, "an RNN with layer_norm=True and zoneout"),
])
def test_legacy_exporter_refuses_variants_by_name(tmp_path, family, options, with_lengths,
                                                  variant):
    layer = make(family, **options)
    with pytest.raises(UnsupportedExport, match=re.escape(variant) + ".*rnnkit.export_onnx"):
        export_legacy(Flat(layer), example(layer, *TRACED, with_lengths), tmp_path / "x.onnx",
                      None)


@pytest.mark.parametrize("export", [export_native, export_legacy], ids=["export_onnx", "legacy"])
def test_the_graph_reads_its_input_never_a_constant(tmp_path, export):
    # The old failure: the legacy exporter traced the native kernels into a constant graph.
    layer = make("LSTM")
    path = tmp_path / "lstm.onnx"
    export(Flat(layer), example(layer, *TRACED, False), path, dynamic_shapes(layer, False))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first, second = (example(layer, *TRACED, False, seed=s)[0].numpy() for s in (5, 6))
    output_first = session.run(None, {"x": first})[0]
    output_second = session.run(None, {"x": second})[0]
    assert np.abs(output_first - output_second).max() > 1e-2


def test_export_onnx_refuses_a_model_whose_code_fixes_a_dynamic_length(tmp_path):
    # torch.nn.LSTM's own op fixes T under torch.export (torch 2.13); torch.onnx.export would
    # quietly write a graph that takes only the traced length, export_onnx raises instead.
    class TorchLSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE)

        def forward(self, x):
            return self.lstm(x)[0]

    x = torch.randn(*TRACED, INPUT_SIZE)
    with pytest.raises(Exception, match="specialized it to be a constant"):
        rnnkit.export_onnx(TorchLSTM(), (x,), tmp_path / "x.onnx",
                           dynamic_shapes=({0: torch.export.Dim("T")},))


def test_lengths_given_as_a_list_are_refused_when_exporting(tmp_path):
    # A list would be baked into the graph as a constant: every batch would get those lengths.
    class ListLengths(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = make("GRU")

        def forward(self, x):
            return self.layer(x, lengths=[TRACED[0]] * x.shape[1])[0]

    x = example(make("GRU"), *TRACED, False)
    with pytest.raises(Exception, match="lengths must be a 1-D integer tensor when a model is "
                                        "exported"):
        rnnkit.export_onnx(ListLengths(), x, tmp_path / "x.onnx")


def test_export_onnx_without_onnxscript_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "rnnkit[onnx]"')):
        rnnkit.export_onnx(Flat(make("RNN")), (torch.randn(2, 1, INPUT_SIZE),),
                           tmp_path / "x.onnx")


def test_eager_runs_are_unchanged_after_an_export(tmp_path):
    # The export hook is scoped: the layer runs its engine again afterwards.
    layer = make("LSTM", peephole=True)
    inputs = example(layer, *TRACED, True)
    before = Flat(layer)(*inputs)
    export_native(Flat(layer), inputs, tmp_path / "x.onnx", dynamic_shapes(layer, True))
    assert not rnnkit.engine.is_exporting()
    after = Flat(layer)(*inputs)
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


# ---- layer norm and zoneout (issue 18's switches) ----------------------------------------

# Evaluation mode, where they are deterministic: the spec's step with the layer-norm gains and
# zoneout's expectation in a Scan loop, on export_onnx too (ONNX's recurrent nodes have no place
# for them). Gains and shifts are drawn in [-0.5, 0.5] by `make`, far from the identity.
# Representative, not a product (each Scan costs seconds to export): every family with layer
# norm, zoneout or both, and between them 2 layers, both directions, lengths or none, peephole,
# projection, learned initial state, batch_first, and the switches that are plain in
# evaluation (recurrent dropout, weight drop).
VARIANT_CASES = [
    ("LSTM", {"layer_norm": True, "zoneout": (0.3, 0.1), "recurrent_dropout": 0.4,
              "weight_drop": 0.3, "num_layers": 2, "bidirectional": True}, True),
    ("LSTM", {"peephole": True, "zoneout": 0.2}, False),
    ("LSTM", {"proj_size": 3, "layer_norm": True, "learn_initial_state": True,
              "batch_first": True}, True),
    ("GRU", {"layer_norm": True, "zoneout": 0.25, "bidirectional": True}, True),
    ("RNN", {"layer_norm": True, "zoneout": 0.15, "nonlinearity": "relu", "num_layers": 2},
     False),
]


def recurrent_constructs(path) -> list[str]:
    """The op types of the graph's recurrent constructs, one per layer and direction."""
    return [node.op_type for node in onnx.load(str(path)).graph.node
            if node.op_type in ("LSTM", "GRU", "RNN", "Scan")]


@pytest.mark.parametrize(("family", "options", "with_lengths"), VARIANT_CASES)
def test_export_onnx_of_layer_norm_and_zoneout_in_evaluation_runs_a_scan_at_any_size(
        tmp_path, family, options, with_lengths):
    layer = make(family, **options)
    check_export(tmp_path, layer, with_lengths, export_native)
    assert recurrent_constructs(tmp_path / "layer.onnx") == \
        ["Scan"] * (layer.num_layers * layer.num_directions)


def test_plain_torch_onnx_export_of_layer_norm_and_zoneout_runs_a_scan_at_any_size(tmp_path):
    layer = make("LSTM", layer_norm=True, zoneout=(0.3, 0.1), peephole=True, batch_first=True)
    check_export(tmp_path, layer, True, export_plain)
    assert recurrent_constructs(tmp_path / "layer.onnx") == ["Scan"]


def export_legacy_training(model, args, path, shapes):
    """The legacy exporter as asked to keep training mode (it exports in evaluation unless
    told otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)


def raised(error: BaseException, kind: type) -> BaseException | None:
    """``error`` or the first of its causes that is a ``kind`` (torch.onnx.export wraps the
    model's error in its own, the model's as the cause)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    return error


@pytest.mark.parametrize("export", [export_native, export_plain, export_legacy_training],
                         ids=["export_onnx", "dynamo", "legacy"])
@pytest.mark.parametrize(("family", "options"), [
    ("LSTM", {"zoneout": 0.2}),
    ("GRU", {"recurrent_dropout": 0.3, "layer_norm": True}),
])
def test_training_mode_recurrent_dropout_and_zoneout_are_a_named_error(
        tmp_path, export, family, options):
    # Their masks are drawn per call: a graph would freeze the example's draws.
    layer = make(family, **options).train()
    path = tmp_path / "x.onnx"
    with pytest.raises(Exception) as caught:
        export(Flat(layer), example(layer, *TRACED, True), path, dynamic_shapes(layer, True))
    error = raised(caught.value, ValueError)
    assert error is not None, caught.value
    assert re.search(r"recurrent_dropout and zoneout do not export to ONNX in training mode.*"
                     r"model\.eval\(\)", str(error))
    assert not path.exists()
    assert layer.training  # left as it was


# ---- rnnkit export CKPT --onnx FILE -------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def lm_checkpoint(tmp_path, monkeypatch):
    """A 2-layer LSTM language model trained for two steps, saved as `rnnkit lm train` does."""
    from rnnkit.apps.lm.corpus import Vocabulary
    from rnnkit.apps.lm.model import ModelConfig
    from rnnkit.apps.lm.train import TrainConfig, Trainer, default_loop
    from rnnkit.apps.recurrent import RecurrentConfig

    monkeypatch.setenv("RNNKIT_BACKEND", "reference")  # tiny sizes: no kernel build needed
    vocabulary = Vocabulary.build(TEXT, "char")
    model = ModelConfig(len(vocabulary), embedding_size=4,
                        recurrent=RecurrentConfig(hidden_size=8, num_layers=2, peephole=True))
    config = TrainConfig(seq_len=10, batch_size=2,
                         loop=replace(default_loop(), steps=2, eval_every=2, checkpoint_every=2))
    Trainer(model, config, vocabulary, TEXT, tmp_path / "lm.pt").run()
    return tmp_path / "lm.pt"


def test_cli_exports_an_lm_checkpoint_and_checks_it_with_onnxruntime(
        lm_checkpoint, tmp_path, capsys):
    from rnnkit.apps.lm.commands import restore
    from rnnkit.cli import main

    path = tmp_path / "out" / "lm.onnx"
    assert main(["export", str(lm_checkpoint), "--onnx", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "recurrent layers as ONNX 2 LSTM" in printed
    reported = [float(v) for v in re.findall(r"(\d\.\d+e[-+]\d+) \((?:logits|h_n|c_n)\)", printed)]
    assert len(reported) == 3 and max(reported) < 1e-5

    # Independently of the command's own check: the file against the restored model.
    model, vocabulary, _ = restore(str(lm_checkpoint))
    model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "h_n", "c_n"]
    ids = torch.randint(len(vocabulary), (17, 4), generator=torch.Generator().manual_seed(3))
    logits, h_n, c_n = session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        expected_logits, (expected_h, expected_c) = model(ids)
    assert np.abs(logits - expected_logits.numpy()).max() < TOLERANCE
    assert np.abs(h_n - expected_h.numpy()).max() < TOLERANCE
    assert np.abs(c_n - expected_c.numpy()).max() < TOLERANCE


def test_cli_exports_a_forecast_checkpoint(tmp_path, capsys, monkeypatch):
    from dataclasses import asdict

    from rnnkit.apps.forecast.data import DataConfig
    from rnnkit.apps.forecast.model import Forecaster, ForecastModelConfig
    from rnnkit.apps.recurrent import RecurrentConfig
    from rnnkit.cli import main
    from rnnkit.training.checkpoint import save_checkpoint

    monkeypatch.setenv("RNNKIT_BACKEND", "reference")
    # Saved with the keys `rnnkit forecast train` writes and `forecast.restore` reads.
    config = ForecastModelConfig(input_size=1, horizon=3, strategy="recursive",
                                 recurrent=RecurrentConfig("gru", hidden_size=6,
                                                           reset_before=True))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", "forecast", {
        "data_config": asdict(DataConfig(dataset="airpassengers")),
        "model_config": asdict(config), "columns": ["passengers"], "time_column": "month",
        "scaler": {"mean": [0.0], "scale": [1.0]}, "model": Forecaster(config).state_dict()})
    assert main(["export", str(tmp_path / "model.pt"), "--onnx", str(tmp_path / "f.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "forecaster (gru" in printed and "recurrent layers as ONNX 3 GRU" in printed
    reported = re.search(r"= (\d\.\d+e[-+]\d+) \(forecast\)", printed)
    assert reported and float(reported.group(1)) < 1e-5


@pytest.mark.parametrize(("arguments", "message"), [
    (["export", "{tmp}/missing.pt", "--onnx", "{tmp}/x.onnx"], "does not exist"),
    (["export", "{ckpt}", "--onnx", "{tmp}"], "--onnx .* is an existing folder"),
])
def test_cli_export_errors_are_one_line_exit_1(tmp_path, capsys, arguments, message):
    from rnnkit.cli import main

    (tmp_path / "lm.pt").write_bytes(b"")  # the output path is checked before it is read
    argv = [a.format(tmp=tmp_path, ckpt=tmp_path / "lm.pt") for a in arguments]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and re.search(message, error[0])


def test_cli_export_without_the_onnx_packages_names_the_extra(tmp_path, capsys, monkeypatch):
    from rnnkit.apps import export
    from rnnkit.cli import main

    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else object())
    # Said before the checkpoint is read (this one does not exist).
    assert main(["export", str(tmp_path / "lm.pt"), "--onnx", str(tmp_path / "x.onnx")]) == 1
    error = capsys.readouterr().err
    assert "onnxruntime" in error and 'pip install "rnnkit[onnx]"' in error
    assert not (tmp_path / "x.onnx").exists()


# ---- minGRU, minLSTM, sLSTM: the sequential loop as an ONNX Scan -----------------------------

def make_new_cell(family: str, **options) -> torch.nn.Module:
    """As `make`, on the layer's default backend (the scans, the native sLSTM loops): what the
    export replaces by a loop is then compared with the fast path it stands for."""
    torch.manual_seed(0)
    layer = getattr(rnnkit, family)(INPUT_SIZE, HIDDEN_SIZE + 1, **options)  # 6: 2 heads
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-0.5, 0.5)
    return layer.eval()


NEW_CELL_CASES = [
    ("MinGRU", {}, True),
    ("MinGRU", {"log_space": True, "backend": "log_scan", "bidirectional": True}, False),
    ("MinLSTM", {"num_layers": 2, "bidirectional": True}, True),
    ("MinLSTM", {"log_space": True, "batch_first": True}, True),
    ("SLSTM", {"num_heads": 2, "bidirectional": True}, True),
    ("SLSTM", {"forget_gate": "exp", "num_layers": 2, "backend": "fused"}, False),
]


@pytest.mark.parametrize(("family", "options", "with_lengths"), NEW_CELL_CASES)
def test_export_onnx_of_the_new_cells_matches_eager(tmp_path, family, options, with_lengths):
    # ONNX has no operator for these recurrences (nor CumProd or LogCumSumExp for the scans):
    # each layer and direction is one Scan loop over the reference step, any length and batch.
    layer = make_new_cell(family, **options)
    ops = check_export(tmp_path, layer, with_lengths, export_native)
    assert "Scan" in ops and not ops & {"LSTM", "GRU", "RNN", "CumSum"}


def test_plain_torch_onnx_export_of_an_slstm_is_a_scan_loop(tmp_path):
    layer = make_new_cell("SLSTM", num_heads=3)
    ops = check_export(tmp_path, layer, True, export_plain)
    assert "Scan" in ops


@pytest.mark.parametrize(("family", "named"), [("MinLSTM", "minGRU or minLSTM"),
                                               ("SLSTM", "an sLSTM")])
def test_legacy_exporter_refuses_the_new_cells_by_name(tmp_path, family, named):
    layer = make_new_cell(family)
    with pytest.raises(UnsupportedExport, match=re.escape(named) + ".*rnnkit.export_onnx"):
        export_legacy(Flat(layer), example(layer, *TRACED, False), tmp_path / "x.onnx", None)


@pytest.mark.parametrize(("cell", "state"), [("slstm-heads4", ["h_n", "c_n", "n_n", "m_n"]),
                                             ("minlstm-log", ["h_n"])])
def test_cli_exports_a_new_cell_lm_checkpoint(tmp_path, capsys, cell, state):
    from rnnkit.apps.lm.commands import restore
    from rnnkit.cli import main

    checkpoint, path = tmp_path / "lm.pt", tmp_path / "lm.onnx"
    assert main(["lm", "train", "--corpus", "prose", "--steps", "2", "--hidden", "8",
                 "--layers", "2", "--embedding", "4", "--batch-size", "2", "--seq-len", "8",
                 "--eval-every", "1", "--cell", cell, "--checkpoint", str(checkpoint),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--onnx", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "recurrent layers as ONNX 2 Scan" in printed
    reported = re.findall(r"(\d\.\d+e[-+]\d+) \((\w+)\)", printed)
    assert [name for _, name in reported] == ["logits", *state]
    assert max(float(value) for value, _ in reported) < 1e-5

    # Independently of the command's own check: the file against the restored model.
    model, vocabulary, _ = restore(str(checkpoint))
    model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", *state]
    ids = torch.randint(len(vocabulary), (17, 4), generator=torch.Generator().manual_seed(3))
    results = session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(ids))
    for result, value in zip(results, expected, strict=True):
        assert np.abs(result - value.numpy()).max() < TOLERANCE
