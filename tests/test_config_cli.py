"""The command line generated from the command configs: every setting of every wired command
reaches its config, survives ``--print-config`` -> ``--config FILE``, and a bad file or value is
a named usage error (exit 2)."""

from __future__ import annotations

import pytest

from rnnkit import cli
from rnnkit.apps.export import ExportCommand
from rnnkit.apps.forecast.config import (
    FORECAST_EXCLUDE,
    ForecastPredictCommand,
    ForecastTrainCommand,
)
from rnnkit.apps.gradients_config import GradientsCommand
from rnnkit.apps.lm.config import (
    LM_EXCLUDE,
    DemoCommand,
    LMEvalCommand,
    LMSampleCommand,
    LMThroughputCommand,
    LMTrainCommand,
)
from rnnkit.apps.memory.config import MEMORY_EXCLUDE, MemoryCommand
from rnnkit.bench import BenchCommand
from rnnkit.configuration import config_from_dict, leaves, tomllib
from rnnkit.training.checkpoint import load_checkpoint

LOOP = ["--steps", "9", "--lr", "0.01", "--optimizer", "sgd", "--schedule", "linear",
        "--clip-norm", "0", "--clip-value", "2.0", "--clip-tensor-norm", "3.0", "--accumulate",
        "2", "--eval-every", "4", "--patience", "5", "--min-steps", "3", "--device", "cpu"]
STACK = ["--hidden", "24", "--layers", "3", "--dropout", "0.25", "--proj-size", "8", "--init",
         "chrono", "--backend", "reference", "--layer-norm", "--recurrent-dropout", "0.1",
         "--zoneout", "0.2", "--weight-drop", "0.3"]
AWD = ["--embedding-dropout", "0.1", "--input-dropout", "0.2", "--locked-dropout",
       "--output-dropout", "0.3"]
LM_MODEL = ["--level", "word", "--max-vocabulary", "50", "--seq-len", "7", "--batch-size", "3",
            "--validation-fraction", "0.2", "--embedding", "12", "--seed", "11",
            "--cell", "lstm", "--peephole", *STACK, *LOOP]
# The variant switches exclude one another (a peephole GRU is refused), hence several argvs.
VARIANTS = [["--cell", "gru", "--reset-before", "--forget-bias", "1.0"],
            ["--cell", "rnn", "--nonlinearity", "relu"]]
# (argv prefix, command type, excluded settings, argvs that together change every setting)
COMMANDS = {
    "lm train": (["lm", "train"], LMTrainCommand, LM_EXCLUDE, [
        ["text.txt", "--corpus", "python", "--checkpoint", "a.pt", "--overwrite", "--plot",
         "p.png", "--quiet", "--checkpoint-every", "6", *LM_MODEL],
        ["--corpus", "prose", "--tie-weights", *VARIANTS[0], *AWD],
        ["--corpus", "prose", "--preset", "awd", *VARIANTS[1]],
        # a resumed run prints the saved run's settings: r.pt is made by the test
        ["--corpus", "prose", "--resume", "r.pt", "--steps", "5"]]),
    "lm throughput": (["lm", "throughput"], LMThroughputCommand,
                      LM_EXCLUDE | {"train.loop.checkpoint_every"}, [
        ["text.txt", "--corpus", "python", "--blocks", "2", "--block-steps", "3", *LM_MODEL],
        ["--corpus", "prose", "--tie-weights", *VARIANTS[0], *AWD],
        ["--corpus", "prose", *VARIANTS[1]]]),
    "memory": (["memory"], MemoryCommand, MEMORY_EXCLUDE, [
        ["copy", "--cells", "lstm,gru", "--lengths", "7,9", "--seed", "1,2", "--batch-size", "5",
         "--held-out", "10", *STACK, *LOOP, "--out", "o", "--no-plot", "--no-flow", "--quiet"],
        ["adding", "--forget-bias", "1.0"]]),
    "forecast train": (["forecast", "train"], ForecastTrainCommand, FORECAST_EXCLUDE, [
        ["--csv", "s.csv", "--target", "y", "--time", "t", "--features", "a,b", "--fill",
         "ffill", "--season", "0", "--lookback", "5", "--horizon", "2", "--test-size", "4",
         "--validation-size", "3", "--stride", "2", "--cell", "lstm", "--peephole", *STACK,
         "--steps", "3", "--min-steps", "1", "--eval-every", "2", "--patience", "2",
         "--batch-size", "8", "--lr", "0.01", "--seeds", "4,5", "--scaler", "standard",
         "--levels", "80,95", "--windows", "2", "--id", "k", "--future-features", "c",
         "--refit", "--plot-series", "s1,s2",
         "--clip-norm", "0", "--clip-value", "1.5", "--clip-tensor-norm", "2.5", "--seed", "3",
         "--device", "cpu", "--out", "o", "--overwrite", "--no-plot", "--quiet"],
        ["--dataset", "sunspots", "--strategy", "recursive", *VARIANTS[0]],
        ["--dataset", "co2", *VARIANTS[1]]]),
    "lm sample": (["lm", "sample"], LMSampleCommand, frozenset(), [
        ["c.pt", "--prime", "ab", "--length", "3", "--temperature", "0.5", "--top-k", "2",
         "--top-p", "0.9", "--seed", "1"]]),
    "gradients": (["gradients"], GradientsCommand, frozenset(), [
        ["--cells", "gru,rnn-relu", "--length", "7", "--hidden", "24", "--samples", "3",
         "--input-size", "2", "--spectral-radius", "0.9", "--seed", "4", "--out", "o",
         "--no-plot"],
        ["--checkpoint", "lm.pt", "text.txt", "--corpus", "prose", "--layer", "1"]]),
    "lm eval": (["lm", "eval"], LMEvalCommand, frozenset(), [["c.pt", "t.txt"]]),
    "forecast predict": (["forecast", "predict"], ForecastPredictCommand, frozenset(), [
        ["m.pt", "--csv", "s.csv", "--out", "p.csv"], ["m.pt", "--dataset", "co2"]]),
    "demo": (["demo"], DemoCommand, frozenset(), [["--steps", "3", "--out", "o"]]),
    "export": (["export"], ExportCommand, frozenset(), [["c.pt", "--onnx", "m.onnx"]]),
    "bench": (["bench"], BenchCommand, frozenset(), [
        ["--quick", "--sizes", "10,2,4", "20,1,8", "--families", "gru,rnn", "--backend",
         "fused", "--repeats", "3", "--streaming-hidden", "8", "--memory-size", "5,2,3",
         "--no-memory", "--no-reference", "--json", "b.json"]]),
}


def printed(argv, capsys) -> str:
    assert cli.main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), argv
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_setting_round_trips_through_a_config_file(name, tmp_path, capsys,
                                                        monkeypatch):
    prefix, command_type, exclude, argvs = COMMANDS[name]
    if name == "lm train":
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RNNKIT_BACKEND", "fused")
        assert cli.main(["lm", "train", "--corpus", "prose", "--hidden", "4", "--layers", "1",
                         "--seq-len", "5", "--batch-size", "2", "--steps", "1", "--checkpoint",
                         "r.pt", "--quiet"]) == 0
        capsys.readouterr()
    default = command_type()
    changed = set()
    for number, argv in enumerate(argvs):
        text = printed([*prefix, *argv], capsys)
        resolved = config_from_dict(command_type, tomllib.loads(text), defaults=default)
        changed |= {leaf.dotted for leaf in leaves(command_type, exclude)
                    if leaf.read(resolved) != leaf.read(default)}
        path = tmp_path / f"{number}.toml"
        path.write_text(text)
        # What the file holds is the whole resolved config: read back, it prints the same.
        assert printed([*prefix, "--config", str(path)], capsys) == text
    # Every option of the command took a value other than its default in some argv above.
    assert changed == {leaf.dotted for leaf in leaves(command_type, exclude)}


@pytest.mark.parametrize("name", [name for name in COMMANDS
                                  if name in ("lm train", "lm throughput", "memory",
                                              "forecast train")])
def test_the_command_line_overrides_the_file(name, tmp_path, capsys):
    prefix, _, _, argvs = COMMANDS[name]
    path = tmp_path / "run.toml"
    path.write_text(printed([*prefix, *argvs[0]], capsys))
    text = printed([*prefix, "--config", str(path), "--hidden", "30"], capsys)
    assert "hidden_size = 30" in text and "hidden_size = 24" not in text
    assert "dropout = 0.25" in text  # the rest still from the file


@pytest.mark.parametrize("argv, contents, message", [
    (["memory"], "[recurrent]\nhiden_size = 4\n",
     "unknown key 'hiden_size' in [recurrent]; accepted: hidden_size, num_layers"),
    (["memory"], "[loop]\nseed = 3\n", "unknown key 'seed' in [loop]"),  # one of --seed's
    (["memory"], "[recurrent]\ncell = 'gru'\n", "unknown key 'cell' in [recurrent]"),
    (["lm", "train", "--corpus", "prose"], "[model]\nvocabulary_size = 3\n",
     "unknown key 'vocabulary_size' in [model]"),
    (["lm", "train", "--corpus", "prose"], "[model.recurrent]\nhidden_size = 0\n",
     "--hidden must be a positive int (at most 2**63 - 1), got 0"),
    (["forecast", "train", "--dataset", "co2"], "[model.recurrent]\ncell = 'tcn'\n",
     "--cell must be one of 'lstm', "),
    (["forecast", "train", "--dataset", "co2"], "[model.recurrent]\ncell = 'gru'\n"
     "peephole = true\n", "--peephole is for --cell lstm only, got --cell gru"),
    (["lm", "train", "--corpus", "prose"], "steps = [", "is not valid TOML"),
    (["gradients"], "length = 1\n", "--length must be an integer in [2, 2**63 - 1], got 1"),
    (["bench"], 'sizes = ["10,20,30", "10,2"]\n', "--sizes takes T,N,H triples of positive ints"),
])
def test_bad_files_are_named_usage_errors(argv, contents, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(contents)
    assert cli.main([*argv, "--config", str(path), "--print-config"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    # A value is named with its file; a rule across settings (above) with its options.
    assert "bad.toml" in error or "peephole" in message, error


@pytest.mark.parametrize("argv, message", [
    (["memory", "adding", "--reset-before"], "unrecognized arguments: --reset-before"),
    (["lm", "throughput", "--corpus", "prose", "--checkpoint-every", "3"],
     "unrecognized arguments: --checkpoint-every"),
    (["memory", "adding", "--proj-size", "-1"], "expected an int >= 0"),
    (["forecast", "train", "--dataset", "co2", "--patience", "x"],
     "expected a positive int (at most 2**63 - 1), got 'x'"),
    (["forecast", "train", "--dataset", "co2", "--device", "tpu"],
     "argument --device: --device takes auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["memory", "adding", "--device", "cuda:x"],
     "argument --device: --device takes auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_bad_and_excluded_options_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_resumed_run_refuses_settings_from_a_file_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RNNKIT_BACKEND", "fused")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert cli.main(["lm", "train", str(text), "--hidden", "8", "--layers", "1", "--seq-len",
                     "10", "--batch-size", "4", "--steps", "2", "--checkpoint",
                     str(tmp_path / "a.pt"), "--quiet"]) == 0
    path = tmp_path / "run.toml"
    path.write_text("[train.loop]\nlr = 0.5\nsteps = 40\n")
    assert cli.main(["lm", "train", "--corpus", "prose", "--resume", str(tmp_path / "a.pt"),
                     "--config", str(path), "--device", "cpu"]) == 2
    assert "--lr cannot change a resumed run (it continues with the settings saved in " \
        f"{tmp_path / 'a.pt'}; only --steps may be given)" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    import rnnkit
    assert capsys.readouterr().out.strip() == f"rnnkit {rnnkit.__version__}"


def test_a_resumed_run_compares_settings_with_the_saved_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RNNKIT_BACKEND", "fused")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "runs" / "a.pt"
    assert cli.main(["lm", "train", str(text), "--hidden", "8", "--layers", "1", "--seq-len",
                     "10", "--batch-size", "4", "--steps", "2", "--checkpoint", str(run),
                     "--quiet"]) == 0
    capsys.readouterr()
    # --print-config shows the settings the resumed run will use: the saved ones, new --steps
    assert cli.main(["lm", "train", str(text), "--resume", str(run), "--steps", "3",
                     "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "hidden_size = 8" in printed and "steps = 3" in printed
    assert f"checkpoint = '{run}'" in printed or f'checkpoint = "{run}"' in printed
    # the same value as saved (from a file, say) is not a conflict; another value is
    same = tmp_path / "same.toml"
    same.write_text("[model.recurrent]\nhidden_size = 8\n")
    assert cli.main(["lm", "train", str(text), "--resume", str(run), "--steps", "3",
                     "--config", str(same), "--quiet"]) == 0
    # without --checkpoint the run continues in the file it resumed from
    assert load_checkpoint(run, "lm")["step"] == 3
    assert not (tmp_path / "lm.pt").exists()
    assert cli.main(["lm", "train", str(text), "--resume", str(run), "--hidden", "9"]) == 2
    assert "--hidden cannot change a resumed run" in capsys.readouterr().err
