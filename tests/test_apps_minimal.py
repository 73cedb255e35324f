"""minGRU, minLSTM and sLSTM in the apps (`rnnkit.apps.recurrent`'s families): `rnnkit memory`,
`rnnkit lm` and `rnnkit gradients` run end to end with them, their diagnostics are drawn,
switches they do not have are refused by name (exit 2) or ignored where the rule says so, and
their settings survive ``--print-config`` -> ``--config``."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from rnnkit import cli
from rnnkit.apps.lm.model import LanguageModel
from rnnkit.apps.memory.commands import gate_panels
from rnnkit.apps.memory.experiment import MemoryModel, RunConfig, default_loop, init_label, run
from rnnkit.apps.recurrent import CELL_NAMES, FAMILIES, RecurrentConfig, build_recurrent
from rnnkit.configuration import check_config
from rnnkit.minimal import MinGRU, MinLSTM
from test_cli_errors import TINY_LM, fails
from test_lm_train import tiny

MINIMAL_CELLS = ("mingru", "mingru-log", "minlstm", "minlstm-log")


def test_the_minimal_cell_names_build_their_layers():
    assert all(name in CELL_NAMES for name in MINIMAL_CELLS)
    for name in MINIMAL_CELLS:
        layer = build_recurrent(RecurrentConfig(name, hidden_size=4, num_layers=2,
                                                dropout=0.5), 3, batch_first=True)
        assert isinstance(layer, MinGRU if name.startswith("mingru") else MinLSTM)
        assert layer.log_space == name.endswith("-log")
        assert (layer.num_layers, layer.dropout, layer.batch_first) == (2, 0.5, True)
    assert FAMILIES["mingru"].peer == "gru" and FAMILIES["minlstm"].peer == "lstm"
    scan = build_recurrent(RecurrentConfig("minlstm-log", hidden_size=4, backend="log_scan"), 3)
    assert scan.backend == "log_scan"


def test_the_slstm_cell_names_build_their_layers():
    from rnnkit.slstm import SLSTM

    for name, heads, forget in [("slstm", 1, "sigmoid"), ("slstm-exp", 1, "exp"),
                                ("slstm-heads4", 4, "sigmoid")]:
        layer = build_recurrent(RecurrentConfig(name, hidden_size=8, num_layers=2, dropout=0.5),
                                3)
        assert isinstance(layer, SLSTM)
        assert (layer.num_heads, layer.forget_gate, layer.num_layers) == (heads, forget, 2)
    assert FAMILIES["slstm"].peer == "lstm"
    with pytest.raises(ValueError, match="--zoneout is for --cell lstm, gru or rnn, got --cell "
                                         "slstm"):
        check_config(RecurrentConfig("slstm", hidden_size=8, zoneout=0.1))


def test_settings_only_other_families_have_are_ignored_as_for_the_rnn():
    """init=chrono and forget_bias are the cases of the module's rule: a comparison with LSTMs
    keeps them for the LSTMs; the minimal cells keep the default draw and say so."""
    for cell in ("mingru", "minlstm"):
        config = RecurrentConfig(cell, hidden_size=4, init="chrono", forget_bias=1.0)
        check_config(config)  # for an LSTM the two would conflict
        assert config.layer_options() == {}
        run_config = RunConfig("adding", 10, config)
        assert init_label(run_config) == "default"
        assert type(MemoryModel(run_config).recurrent).__name__ in ("MinGRU", "MinLSTM")
    assert init_label(RunConfig("adding", 10, RecurrentConfig("lstm", forget_bias=1.0))) == "fb=1"


# rnnkit memory ----------------------------------------------------------------------------------

def test_memory_adding_runs_minimal_cells_with_their_flow_and_gates(tmp_path, capsys):
    out = tmp_path / "adding"
    assert cli.main(["memory", "adding", "--cells", "gru,mingru,minlstm-log", "--lengths", "6",
                     "--hidden", "5", "--steps", "4", "--eval-every", "2", "--batch-size", "8",
                     "--held-out", "20", "--init", "chrono", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed
    results = json.loads((out / "results.json").read_text())
    runs = {r["cell"]: r for r in results["runs"]}
    assert set(runs) == {"gru", "mingru", "minlstm-log"}
    assert runs["gru"]["init"] == "chrono" and runs["mingru"]["init"] == "default"
    for cell in ("mingru", "minlstm-log"):
        assert runs[cell]["eval_steps"] == [2, 4] and math.isfinite(runs[cell]["final_metric"])
        # distance 0: ∂h_T/∂h_T is the identity, norm sqrt(H); then the decay of Π a
        flow = runs[cell]["flow_initial"]
        assert len(flow) == 6 and flow[0] == pytest.approx(math.sqrt(5))
        assert all(later < earlier for earlier, later in zip(flow, flow[1:], strict=False))
    for name in ("learning_curves.png", "gradient_flow.png", "gates_T6.png"):
        assert (out / name).stat().st_size > 0


def test_memory_no_flow_skips_the_gradient_flow_and_keeps_the_rest(tmp_path, capsys):
    # at long T the flow's Jacobians cost more than the training (issue 20's T = 1000 runs)
    out = tmp_path / "adding"
    assert cli.main(["memory", "adding", "--cells", "gru,mingru", "--lengths", "6", "--hidden",
                     "5", "--steps", "2", "--eval-every", "1", "--batch-size", "8",
                     "--held-out", "20", "--no-flow", "--out", str(out), "--quiet"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["cell"] for r in runs} == {"gru", "mingru"}
    assert all(r["flow_initial"] == [] == r["flow_trained"] for r in runs)
    assert all(math.isfinite(r["final_metric"]) for r in runs)
    assert not (out / "gradient_flow.png").exists()
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "gates_T6.png").exists()
    assert "gradient_flow.png" not in capsys.readouterr().out
    printed = tmp_path / "memory.toml"
    assert cli.main(["memory", "adding", "--no-flow", "--print-config"]) == 0
    printed.write_text(capsys.readouterr().out)
    assert "flow = false" in printed.read_text()


def test_memory_copy_runs_minimal_cells_on_a_chosen_engine(tmp_path, capsys):
    out = tmp_path / "copy"
    assert cli.main(["memory", "copy", "--cells", "minlstm,mingru-log", "--lengths", "4",
                     "--hidden", "4", "--layers", "2", "--dropout", "0.1", "--steps", "2",
                     "--eval-every", "1", "--batch-size", "4", "--held-out", "10",
                     "--backend", "scan", "--seed", "0,1", "--out", str(out), "--quiet"]) == 0
    assert "minlstm" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["backend"] == "scan" and len(results["runs"]) == 4
    assert len(results["runs"][0]["flow_trained"]) == 24  # T + 20 steps
    assert (out / "gates_T4.png").stat().st_size > 0


@pytest.mark.parametrize("cell, gate", [("mingru", "z"), ("minlstm-log", "f'")])
def test_the_gate_heatmaps_show_the_minimal_gates(cell, gate):
    result, model, held_out = run(RunConfig("copy", 3, RecurrentConfig(cell, hidden_size=4),
                                            replace(default_loop(), steps=1, eval_every=1),
                                            held_out=4), show_progress=False)
    panels, marks = gate_panels(model, held_out, 3, cell)
    assert [label for label, _ in panels] == [f"{cell} T=3: {gate}"]
    values = panels[0][1]
    assert values.shape == (23, 4) and bool(((values > 0) & (values < 1)).all())
    assert marks == [*range(10), 12]


def test_memory_runs_slstm_cells_with_their_flow_and_gate_heatmaps(tmp_path, capsys):
    # rnnkit.diagnostics reads sLSTM: no note, the same outputs as for the other cells
    out = tmp_path / "adding"
    assert cli.main(["memory", "adding", "--cells", "lstm,slstm,slstm-exp,slstm-heads4",
                     "--lengths", "6", "--hidden", "4", "--steps", "2", "--eval-every", "1",
                     "--batch-size", "4", "--held-out", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed and "gates_T6.png" in printed
    runs = {r["cell"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for cell in ("slstm", "slstm-exp", "slstm-heads4"):
        for flow in (runs[cell]["flow_initial"], runs[cell]["flow_trained"]):
            assert len(flow) == 6 and flow[0] == pytest.approx(2.0)  # sqrt(H) at distance 0
            assert all(math.isfinite(v) and v > 0 for v in flow)
    for name in ("learning_curves.png", "gradient_flow.png", "gates_T6.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("cell", ["slstm", "slstm-exp", "slstm-heads4"])
def test_the_gate_heatmaps_show_the_slstm_factors_in_zero_one(cell):
    result, model, held_out = run(RunConfig("copy", 3, RecurrentConfig(cell, hidden_size=4),
                                            replace(default_loop(), steps=1, eval_every=1),
                                            held_out=4), show_progress=False)
    panels, marks = gate_panels(model, held_out, 3, cell)
    assert [label for label, _ in panels] == [f"{cell} T=3: {gate}" for gate in
                                              ("f'", "i'", "i'/n")]
    for _, values in panels:
        assert values.shape == (23, 4) and bool(((values >= 0) & (values <= 1)).all())
    f_prime, i_prime, write = (values for _, values in panels)
    assert torch.equal(torch.maximum(f_prime, i_prime), torch.ones(23, 4))
    assert bool((write[0] == 1).all())  # the first step from the empty state writes all
    assert marks == [*range(10), 12]


def test_gradients_of_a_trained_slstm_language_model(tmp_path, capsys):
    checkpoint = tmp_path / "lm.pt"
    assert cli.main(["lm", "train", "--corpus", "prose", *TINY_LM, "--layers", "2",
                     "--cell", "slstm-heads4", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    assert cli.main(["gradients", "--checkpoint", str(checkpoint), "--corpus", "prose",
                     "--length", "10", "--samples", "2", "--layer", "0", "--out",
                     str(tmp_path / "g"), "--no-plot"]) == 0
    flows = json.loads((tmp_path / "g" / "gradient_flow.json").read_text())["flow_by_distance"]
    assert set(flows) == {"slstm layer 0 (trained)", "slstm layer 0 (trained, through c/n)"}
    assert len(flows["slstm layer 0 (trained)"]) == 10
    assert flows["slstm layer 0 (trained, through c/n)"][0] == 0


def test_memory_notes_a_layer_the_diagnostics_do_not_read_and_draws_the_rest(tmp_path, capsys):
    out = tmp_path / "torch"
    assert cli.main(["memory", "adding", "--cells", "lstm", "--backend", "torch.nn",
                     "--lengths", "4", "--hidden", "4", "--steps", "2", "--eval-every", "1",
                     "--batch-size", "4", "--held-out", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("note: lstm runs on torch.nn.LSTM, which rnnkit.diagnostics does "
                             "not read") == 1
    assert "Traceback" not in printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][0]["flow_initial"] == []
    assert (out / "learning_curves.png").exists()
    assert not (out / "gradient_flow.png").exists() and not (out / "gates_T4.png").exists()


# rnnkit lm --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["mingru", "minlstm-log", "slstm-heads4"])
def test_lm_train_resume_and_sample_with_a_minimal_cell(cell, tmp_path, capsys):
    checkpoint = tmp_path / "lm.pt"
    assert cli.main(["lm", "train", "--corpus", "prose", *TINY_LM, "--layers", "2",
                     "--cell", cell, "--checkpoint", str(checkpoint), "--quiet"]) == 0
    assert f"({cell}, 2 x 8)" in capsys.readouterr().out
    # the carried state (h alone) is saved with the run and restored
    assert cli.main(["lm", "train", "--corpus", "prose", "--resume", str(checkpoint),
                     "--steps", "3", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    samples = []
    for _ in range(2):
        assert cli.main(["lm", "sample", str(checkpoint), "--prime", "The ", "--length", "12",
                         "--seed", "3"]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and samples[0].startswith("The ")
    assert len(samples[0].rstrip("\n")) == len("The ") + 12


@pytest.mark.parametrize("cell", ["mingru", "minlstm-log", "slstm-exp"])
def test_the_minimal_models_token_stream_equals_forward(cell):
    model_config, _, vocabulary = tiny()
    model_config = replace(model_config, recurrent=RecurrentConfig(cell, hidden_size=8,
                                                                   num_layers=2))
    torch.manual_seed(0)
    model = LanguageModel(model_config).eval()
    ids, _ = vocabulary.encode("the quick")
    with torch.no_grad():
        _, state = model(ids[:3].view(-1, 1))
        step = model.stream(state)
        streamed = torch.stack([step(token.view(1)) for token in ids[3:]])  # (T, 1, V)
        expected, _ = model(ids[3:].view(-1, 1), state)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


def test_lm_throughput_times_a_minimal_cell_against_rnnkits_gated_peer(capsys):
    assert cli.main(["lm", "throughput", "--corpus", "prose", "--cell", "minlstm",
                     "--hidden", "8", "--layers", "1", "--embedding", "4", "--seq-len", "8",
                     "--batch-size", "2", "--blocks", "1", "--block-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch.nn has no minlstm: the peer is rnnkit's lstm of the same size (1 x 8, " \
        "backend auto)" in out
    lines = dict(line.split(": ", 1) for line in out.splitlines()[2:])
    assert set(lines) == {"rnnkit minlstm tokens/s", "rnnkit lstm tokens/s",
                          "rnnkit minlstm x rnnkit lstm throughput"}
    rates = {key: float(value.replace(",", "")) for key, value in lines.items()}
    # The ratio is printed to two decimals: within half of the last one of the printed rates'
    # quotient (a relative bound failed on small ratios, 0.24 against 0.2353)
    assert rates["rnnkit minlstm x rnnkit lstm throughput"] == pytest.approx(
        rates["rnnkit minlstm tokens/s"] / rates["rnnkit lstm tokens/s"], abs=0.005 + 1e-9)


def test_export_refuses_a_family_it_does_not_export_by_name(tmp_path, monkeypatch):
    # Every family exports today (the minimal cells and sLSTM as ONNX Scan loops:
    # tests/test_onnx_export.py); a family plugged in without an ONNX route is refused by name.
    from dataclasses import replace

    from rnnkit.apps import export
    from rnnkit.apps.export import plan_export

    checkpoint = tmp_path / "lm.pt"
    assert cli.main(["lm", "train", "--corpus", "prose", *TINY_LM, "--cell", "mingru",
                     "--checkpoint", str(checkpoint), "--quiet"]) == 0
    families = dict(export.FAMILIES, mingru=replace(export.FAMILIES["mingru"], exports=False))
    monkeypatch.setattr(export, "FAMILIES", families)
    with pytest.raises(ValueError, match="holds a mingru stack, which rnnkit export does not "
                                         r"write to ONNX yet \(it exports lstm, gru, rnn, "
                                         r"minlstm, slstm\)"):
        plan_export(str(checkpoint))


def test_gradients_of_fresh_minimal_layers(tmp_path, capsys):
    assert cli.main(["gradients", "--cells", "mingru,minlstm-log", "--length", "8", "--hidden",
                     "4", "--samples", "2", "--out", str(tmp_path), "--no-plot"]) == 0
    flows = json.loads((tmp_path / "gradient_flow.json").read_text())["flow_by_distance"]
    assert set(flows) == {"mingru", "minlstm-log"}
    assert all(len(v) == 8 and v[0] == pytest.approx(2.0) for v in flows.values())


# switches the minimal layers do not have --------------------------------------------------------

LM = ["lm", "train", "--corpus", "prose"]


@pytest.mark.parametrize("argv, message", [
    ([*LM, "--cell", "mingru", "--zoneout", "0.1"],
     "--zoneout is for --cell lstm, gru or rnn, got --cell mingru (its layer has no zoneout)"),
    ([*LM, "--cell", "minlstm-log", "--layer-norm"],
     "--layer-norm is for --cell lstm, gru or rnn, got --cell minlstm-log"),
    (["memory", "adding", "--cells", "lstm,mingru", "--weight-drop", "0.5"],
     "--weight-drop is for --cell lstm, gru or rnn, got --cell mingru"),
    (["memory", "copy", "--cells", "minlstm", "--recurrent-dropout", "0.2"],
     "--recurrent-dropout is for --cell lstm, gru or rnn, got --cell minlstm"),
    ([*LM, "--cell", "mingru", "--peephole"], "--peephole is for --cell lstm only, got --cell mingru"),
    ([*LM, "--cell", "minlstm", "--proj-size", "2"],
     "--proj-size is for --cell lstm only, got --cell minlstm"),
    ([*LM, "--cell", "mingru", "--reset-before"],
     "--reset-before is for --cell gru only, got --cell mingru"),
    ([*LM, "--cell", "minlstm", "--nonlinearity", "relu"],
     "--nonlinearity is for --cell rnn only, got --cell minlstm"),
    ([*LM, "--cell", "mingru", "--backend", "torch.nn"],
     "--backend torch.nn has no mingru layer (torch.nn has lstm, gru, rnn); --cell mingru takes "
     "--backend auto, reference, scan, log_scan, native"),
    (["lm", "throughput", "--corpus", "prose", "--cell", "minlstm", "--backend", "fused"],
     "--backend fused is not an engine of --cell minlstm; it takes auto, reference, scan, "
     "log_scan, native"),
    ([*LM, "--cell", "gru", "--backend", "scan"],
     "--backend scan is not an engine of --cell gru; it takes auto, native, fused, reference"),
    (["memory", "adding", "--cells", "mingru-log,mingru", "--backend", "log_scan"],
     "--backend log_scan runs the log-space variant only (its b_t > 0 has a logarithm): use "
     "--cell mingru-log, or --backend scan; got --cell mingru"),
    ([*LM, "--cell", "mingru", "--locked-dropout"],
     "--locked-dropout runs the stack layer by layer, which --cell mingru's layer does not open"),
    (["forecast", "train", "--dataset", "co2", "--cell", "minlstm", "--weight-drop", "0.1"],
     "--weight-drop is for --cell lstm, gru or rnn, got --cell minlstm"),
    (["gradients", "--cells", "gru,mingru", "--spectral-radius", "0.9"],
     "--spectral-radius rescales W_hh, which --cell mingru does not have"),
])
def test_switches_a_minimal_layer_lacks_are_usage_errors_naming_them(argv, message, capsys):
    assert message in fails(argv, capsys, 2)


@pytest.mark.parametrize("prefix, argv", [
    (LM, ["--cell", "minlstm-log", "--backend", "log_scan", "--layers", "3", "--dropout",
          "0.2", "--tie-weights", "--hidden", "12"]),
    (["lm", "throughput", "--corpus", "prose"], ["--cell", "mingru", "--backend", "reference"]),
    (["lm", "throughput", "--corpus", "prose"], ["--cell", "minlstm", "--backend", "native"]),
    (["memory", "copy"], ["--cells", "mingru,minlstm-log,lstm", "--backend", "auto",
                          "--init", "chrono"]),
    (["forecast", "train", "--dataset", "co2"], ["--cell", "mingru-log", "--backend", "scan"]),
    (["gradients"], ["--cells", "minlstm,mingru-log"]),
])
def test_minimal_settings_round_trip_through_a_config_file(prefix, argv, tmp_path, capsys):
    assert cli.main([*prefix, *argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    for value in argv[1::2][:1]:  # the cell (or cells) given
        names = value.split(",")
        assert all(f"'{name}'" in text or f'"{name}"' in text for name in names), text
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert cli.main([*prefix, "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == text
