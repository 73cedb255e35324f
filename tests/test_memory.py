"""`rnnkit memory`: a tiny adding run learns; outputs are written; bad settings are named."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from rnnkit import cli
from rnnkit.apps.memory.experiment import RunConfig, default_loop, run
from rnnkit.apps.recurrent import RecurrentConfig
from rnnkit.tasks import ADDING_BASELINE_MSE


def test_a_tiny_adding_run_with_lstm_ends_below_a_fifth_of_the_baseline():
    result, _, _ = run(RunConfig("adding", 20, RecurrentConfig("lstm", hidden_size=32),
                                 replace(default_loop(), steps=400, lr=1e-2, eval_every=100),
                                 held_out=500), show_progress=False, flow=False)
    assert result.baseline == ADDING_BASELINE_MSE
    assert result.final_metric < ADDING_BASELINE_MSE / 5
    assert result.first_step_below_tenth is not None and result.eval_steps[-1] == 400


def test_memory_command_writes_table_results_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["memory", "copy", "--cells", "lstm,gru-reset-before,rnn", "--lengths", "5",
            "--hidden", "8", "--steps", "6", "--eval-every", "3", "--seed", "0,1",
            "--init", "chrono", "--clip-value", "0.5", "--clip-tensor-norm", "2",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "first step < baseline/10" in printed and "gru-reset-before" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6 and results["settings"]["init"] == "chrono"
    assert results["settings"]["clip_value"] == 0.5
    assert results["settings"]["clip_tensor_norm"] == 2.0
    # the command's cells, lengths and seeds, not one run's (each run records its own)
    assert results["settings"]["seeds"] == [0, 1] and results["settings"]["lengths"] == [5]
    assert results["settings"]["cells"] == ["lstm", "gru-reset-before", "rnn"]
    assert results["settings"]["task"] == "copy"
    assert not {"seed", "cell", "length"} & set(results["settings"])
    assert [run["seed"] for run in results["runs"]] == [0, 1] * 3
    assert len(results["runs"][0]["gradient_norm"]) == 6  # the pre-clip norm of every step
    run0 = results["runs"][0]
    assert run0["eval_steps"] == [3, 6] and len(run0["flow_trained"]) == 25  # T + 20 steps
    assert run0["baseline"] == pytest.approx(10 * 2.0794415416798357 / 25)
    table = pd.read_csv(out / "results.csv")
    assert set(table["cell"]) == {"lstm", "gru-reset-before", "rnn"} and len(table) == 6
    for name in ("learning_curves.png", "gradient_flow.png", "gates_T5.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["memory", "sorting"], "invalid choice: 'sorting'"),
    (["memory", "adding", "--cells", "lstm,transformer"], "--cells takes a comma-separated subset"),
    (["memory", "adding", "--lengths", "1"], "--lengths takes comma-separated integers in [2, 2**63 - 1]"),
    (["memory", "adding", "--hidden", "0"], "expected a positive int (at most 2**63 - 1), got '0'"),
    (["memory", "adding", "--steps", "-5"], "expected a positive int (at most 2**63 - 1), got '-5'"),
    (["memory", "adding", "--init", "xavier"], "invalid choice: 'xavier'"),
    (["memory", "adding", "--clip-value", "0"], "expected a finite number > 0, got '0'"),
    (["memory", "adding", "--clip-tensor-norm", "-1"], "expected a finite number > 0, got '-1'"),
])
def test_bad_memory_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_learning_rate_is_named(tmp_path, capsys):
    assert cli.main(["memory", "adding", "--lr", "0", "--out", str(tmp_path)]) == 2
    assert "--lr must be positive, got 0.0" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "results").write_text("keep me")
    assert cli.main(["memory", "adding", "--lengths", "5", "--steps", "1", "--hidden", "4",
                     "--out", str(tmp_path / "results")]) == 1
    printed = capsys.readouterr()
    assert "is an existing file; give a folder" in printed.err
    assert "rnnkit memory adding:" not in printed.out  # said before the run's header, not after
    assert (tmp_path / "results").read_text() == "keep me"


def test_forget_bias_reaches_the_lstm_is_labelled_and_conflicts_with_chrono():
    from rnnkit.apps.memory.experiment import MemoryModel, check_run_config, init_label

    model = MemoryModel(RunConfig("adding", 10, RecurrentConfig("lstm", hidden_size=4, forget_bias=1.0)))
    assert model.recurrent.forget_bias == 1.0
    assert MemoryModel(RunConfig("adding", 10, RecurrentConfig("gru", hidden_size=4, forget_bias=1.0))).recurrent.family == "gru"  # ignored there
    with pytest.raises(ValueError, match="--forget-bias and --init chrono"):
        check_run_config(RunConfig("adding", 10, RecurrentConfig("lstm", forget_bias=1.0, init="chrono")))
    assert init_label(RunConfig("adding", 10, RecurrentConfig("lstm", forget_bias=1.0))) == "fb=1"
    assert init_label(RunConfig("adding", 10, RecurrentConfig("gru", forget_bias=1.0))) == "default"
    assert init_label(RunConfig("adding", 10, RecurrentConfig("lstm", init="chrono"))) == "chrono"
    # chrono has no meaning for a plain RNN: it keeps (and is labelled) the default
    assert init_label(RunConfig("adding", 10, RecurrentConfig("rnn-relu", init="chrono"))) == "default"
    check_run_config(RunConfig("adding", 10, RecurrentConfig("gru", forget_bias=1.0, init="chrono")))  # no LSTM


def test_the_projected_lstm_reads_out_its_projection():
    from rnnkit.apps.memory.experiment import MemoryModel, check_run_config

    model = MemoryModel(RunConfig("copy", 5, RecurrentConfig("lstm-projection", hidden_size=8)))
    assert model.recurrent.proj_size == 4 and model.readout.in_features == 4
    result, _, _ = run(RunConfig("adding", 6, RecurrentConfig("lstm-projection", hidden_size=8), replace(default_loop(), steps=2, eval_every=1), held_out=10), show_progress=False)
    assert len(result.flow_initial) == 6 and result.flow_initial[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="lstm-projection projects h to hidden // 2 units"):
        check_run_config(RunConfig("adding", 5, RecurrentConfig("lstm-projection", hidden_size=1)))


@pytest.mark.parametrize("command", [["memory"], ["lm", "train"]])
def test_the_help_names_every_cell_and_the_slstm_engines(command, capsys):
    from rnnkit.apps.recurrent import CELL_NAMES

    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    # argparse wraps at spaces and after hyphens: join the lines back before looking
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert [name for name in CELL_NAMES if name not in text] == []
    assert "native (LSTM, GRU, RNN, sLSTM)" in text
