"""rnnkit.configuration: dataclass configs <-> command line, TOML/YAML files and dicts, on toy
configs defined here. References: the values the configs were built from, literal messages
(those of the hand-written parsers in cli.py), tomllib and PyYAML themselves."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from rnnkit import configuration as cf
from rnnkit.configuration import (
    add_config_arguments,
    check_config,
    config_from_arguments,
    config_from_dict,
    config_to_toml,
    parse_integers,
    read_config_file,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport rnnkit depends on there
    import tomli as tomllib


@dataclass
class Recurrent:
    """The recurrent stack."""

    cell: Literal["rnn", "lstm", "gru"] = "lstm"  # which recurrent cell
    hidden_size: int = field(default=16, metadata={"option": "--hidden", "check": "positive"})  # hidden
                                                                                               # units per layer
    # Not a continuation of hidden_size's help: at the field's indentation, it introduces dropout.
    dropout: float = field(default=0.1, metadata={"check": "probability"})  # between layers (100% drops all)
    peephole: bool = False  # LSTM only

    def check(self) -> None:
        if self.peephole and self.cell != "lstm":
            raise ValueError(f"--peephole is for --cell lstm only, got --cell {self.cell}")


@dataclass
class Model:
    recurrent: Recurrent = field(default_factory=Recurrent)
    embedding_size: int = field(default=8, metadata={"option": "--embedding", "check": "positive"})
    vocabulary_size: int = field(default=0, metadata={"cli": False})  # set from the data


@dataclass
class Run:
    """One toy run: every supported kind of setting."""

    text_file: str | None = field(default=None, metadata={"positional": True, "metavar": "TEXT_FILE"})  # a UTF-8 text file
    model: Model = field(default_factory=Model)
    name: str = "run"  # a label for the logs
    steps: int | None = None  # optimiser steps; none: until stopped
    lr: float = 2e-3  # learning rate
    clip_value: float | None = field(default=None, metadata={"check": "positive_real"})  # per-element bound
    weight_decay: float = field(default=0.0, metadata={"check": "nonnegative"})
    seed: int = field(default=0, metadata={"check": "seed"})  # random seed
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"check": "seed"})  # seeds to average
    lengths: list[int] = field(default_factory=lambda: [50], metadata={"parse": parse_integers(2, "--lengths")})
    features: list[str] = field(default_factory=list)  # extra input columns
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5])
    optimizer: str = field(default="adam", metadata={"choices": ("adam", "sgd")})  # update rule
    level: Literal["char", "word"] | None = "char"  # tokens
    tie_weights: bool = False  # share the embedding matrix
    max_vocabulary: int | None = field(default=None, metadata={"check": "positive"})

    def check(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr must be a number > 0, got {self.lr}")


def parser_for(config_type=Run, defaults=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, config_type, defaults)
    return parser


def resolve(argv, config_type=Run, defaults=None):
    args = parser_for(config_type, defaults).parse_args(argv)
    return config_from_arguments(args, config_type, defaults)


# --- the parsers keep cli.py's exact wording ------------------------------------------------

BIG = str(2**63)


@pytest.mark.parametrize("parse, text, value", [
    (cf.parse_positive, "1", 1), (cf.parse_positive, str(2**63 - 1), 2**63 - 1),
    (cf.parse_nonnegative, "0", 0.0), (cf.parse_nonnegative, "inf", math.inf),
    (cf.parse_positive_real, "1e-3", 1e-3), (cf.parse_probability, "1", 1.0),
    (cf.parse_probability, "0", 0.0), (cf.parse_seed, "0", 0),
    (cf.parse_seeds, "3,1,", [3, 1]), (cf.parse_columns, " a, b ,", ["a", "b"]),
    (parse_integers(2, "--lengths"), "2,9", [2, 9]),
])
def test_parsers_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", [
    (cf.parse_positive, "0", "expected a positive int (at most 2**63 - 1), got '0'"),
    (cf.parse_positive, "x", "expected a positive int (at most 2**63 - 1), got 'x'"),
    (cf.parse_positive, BIG, f"expected a positive int (at most 2**63 - 1), got '{BIG}'"),
    (cf.parse_nonnegative, "-1", "expected a number >= 0, got '-1'"),
    (cf.parse_nonnegative, "nan", "expected a number >= 0, got 'nan'"),
    (cf.parse_positive_real, "0", "expected a finite number > 0, got '0'"),
    (cf.parse_positive_real, "inf", "expected a finite number > 0, got 'inf'"),
    (cf.parse_probability, "1.5", "expected a number in [0, 1], got '1.5'"),
    (cf.parse_probability, "-0.5", "expected a number in [0, 1], got '-0.5'"),
    (cf.parse_seed, "-1", "--seed takes an integer in [0, 2**63 - 1], got '-1'"),
    (cf.parse_seed, BIG, f"--seed takes an integer in [0, 2**63 - 1], got '{BIG}'"),
    (cf.parse_seeds, "1,x", "--seed takes comma-separated integers in [0, 2**63 - 1], got '1,x'"),
    (cf.parse_seeds, ",", "--seed takes comma-separated integers in [0, 2**63 - 1], got ','"),
    (cf.parse_columns, " , ", "expected comma-separated column names, got ' , '"),
    (parse_integers(2, "--lengths"), "1", "--lengths takes comma-separated integers in [2, 2**63 - 1], got '1'"),
])
def test_parsers_refuse_with_clis_wording(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(text)
    assert str(error.value) == message


# --- the command line -------------------------------------------------------------------------

def test_defaults_without_options_and_nothing_given():
    config, given_paths = resolve([])
    assert config == Run() and given_paths == set()


def test_every_kind_of_option():
    config, given_paths = resolve([
        "notes.txt", "--cell", "gru", "--hidden", "32", "--dropout", "0.5", "--embedding", "4",
        "--name", "x", "--steps", "7", "--lr", "0.5", "--clip-value", "2", "--weight-decay",
        "0", "--seed", "5", "--seeds", "1,2", "--lengths", "3,4", "--features", "a, b",
        "--scales", "0.25", "--optimizer", "sgd", "--level", "word", "--tie-weights",
        "--max-vocabulary", "100"])
    assert config == Run(
        text_file="notes.txt", model=Model(Recurrent("gru", 32, 0.5, False), 4, 0), name="x",
        steps=7, lr=0.5, clip_value=2.0, weight_decay=0.0, seed=5, seeds=[1, 2],
        lengths=[3, 4], features=["a", "b"], scales=[0.25], optimizer="sgd", level="word",
        tie_weights=True, max_vocabulary=100)
    assert isinstance(config.clip_value, float) and isinstance(config.scales[0], float)
    assert given_paths == {f.name for f in dataclasses.fields(Run)} - {"model"} | {
        "model.recurrent.cell", "model.recurrent.hidden_size", "model.recurrent.dropout",
        "model.embedding_size"}


def test_none_and_bool_flags():
    config, given_paths = resolve(["--steps", "none", "--level", "None", "--clip-value", "none",
                                   "--no-tie-weights", "--peephole"])
    assert (config.steps, config.level, config.clip_value) == (None, None, None)
    assert config.tie_weights is False and config.model.recurrent.peephole is True
    # --no-tie-weights equals the default, yet it was given: `given` says what the user set.
    assert {"tie_weights", "steps", "model.recurrent.peephole"} <= given_paths
    assert resolve(["--tie-weights"])[0].tie_weights is True


def test_empty_list_from_an_empty_value():
    assert resolve(["--features", "a", "--features", ""])[0].features == []


def test_cli_false_field_has_no_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        parser_for().parse_args(["--vocabulary-size", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --vocabulary-size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "0"], "argument --hidden: expected a positive int (at most 2**63 - 1), got '0'"),
    (["--dropout", "2"], "argument --dropout: expected a number in [0, 1], got '2'"),
    (["--clip-value", "0"], "argument --clip-value: expected a finite number > 0, got '0'"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0, got '-1'"),
    (["--seed", "-1"], "argument --seed: --seed takes an integer in [0, 2**63 - 1], got '-1'"),
    (["--seeds", "1,-2"], "argument --seeds: --seeds takes comma-separated integers in [0, 2**63 - 1], got '1,-2'"),
    (["--lengths", "1"], "argument --lengths: --lengths takes comma-separated integers in [2, 2**63 - 1], got '1'"),
    (["--steps", "many"], "argument --steps: expected an int, got 'many'"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--scales", "1,x"], "argument --scales: --scales takes comma-separated numbers, got '1,x'"),
    (["--cell", "tcn"], "argument --cell: invalid choice: 'tcn' (choose from rnn, lstm, gru)"),
    (["--optimizer", "adamw"], "argument --optimizer: invalid choice: 'adamw' (choose from adam, sgd)"),
    (["--level", "byte"], "argument --level: invalid choice: 'byte' (choose from char, word)"),
    (["--max-vocabulary", "0"], "argument --max-vocabulary: expected a positive int (at most 2**63 - 1), got '0'"),
])
def test_bad_values_are_usage_errors_naming_option_and_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser_for().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cross_field_check_runs_inner_first():
    with pytest.raises(ValueError, match=r"^--peephole is for --cell lstm only, got --cell gru$"):
        resolve(["--cell", "gru", "--peephole"])
    with pytest.raises(ValueError, match=r"^--lr must be a number > 0, got -1.0$"):
        resolve(["--lr", "-1"])
    config, _ = config_from_arguments(parser_for().parse_args(["--lr", "-1"]), Run, check=False)
    assert config.lr == -1.0


def test_app_defaults_in_result_and_help():
    defaults = Run(name="lm", model=Model(Recurrent(hidden_size=256)), seeds=[3, 4])
    assert resolve([], defaults=defaults)[0] == defaults
    assert resolve(["--hidden", "8"], defaults=defaults)[0].model.recurrent.hidden_size == 8
    text = " ".join(parser_for(defaults=defaults).format_help().split())
    assert "hidden units per layer (default: 256)" in text
    assert "(default: 3,4)" in text and "a label for the logs (default: lm)" in text


def test_help_shows_comment_and_default_for_every_option():
    text = " ".join(parser_for().format_help().split())  # unwrapped
    expected = [
        "TEXT_FILE a UTF-8 text file (default: none)",
        "--cell {rnn,lstm,gru} which recurrent cell (default: lstm)",
        # A two-line comment; the comment line below it at the field's indentation is not help.
        "--hidden HIDDEN hidden units per layer (default: 16)",
        "--dropout DROPOUT between layers (100% drops all) (default: 0.1)",
        "--peephole, --no-peephole LSTM only (default: --no-peephole)",
        "--embedding EMBEDDING (default: 8)",
        "--name NAME a label for the logs (default: run)",
        "--steps STEPS optimiser steps; none: until stopped (default: none)",
        "--lr LR learning rate (default: 0.002)",
        "--clip-value CLIP_VALUE per-element bound (default: none)",
        "--seeds SEEDS,... seeds to average (default: 0)",
        "--lengths LENGTHS,... (default: 50)",
        "--features FEATURES,... extra input columns (default: '')",
        "--scales SCALES,... (default: 1.0,0.5)",
        "--optimizer {adam,sgd} update rule (default: adam)",
        "--level {char,word} tokens (default: char)",
        "--tie-weights, --no-tie-weights share the embedding matrix (default: --no-tie-weights)",
    ]
    for piece in expected:
        assert piece in text, piece
    assert "introduces dropout" not in text and "vocabulary" not in text.replace(
        "max-vocabulary", "").replace("MAX_VOCABULARY", "")
    parser = parser_for()
    for action in parser._actions:
        if action.dest not in ("help", cf.CONFIG_FILE_DEST, cf.PRINT_CONFIG_DEST):
            assert "(default: " in action.help, action.dest


# --- files and dicts -------------------------------------------------------------------------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_file_over_defaults_and_command_line_over_file(tmp_path):
    path = write(tmp_path, "run.toml", """
        name = "from-file"
        steps = 10
        seeds = [1, 2]
        lr = 1  # an int for a float setting is widened
        [model]
        vocabulary_size = 99
        [model.recurrent]
        hidden_size = 64
        cell = "gru"
        """.replace("\n        ", "\n"))
    config, given_paths = resolve(["--config", path, "--steps", "20", "--cell", "rnn"])
    assert config == Run(name="from-file", steps=20, seeds=[1, 2], lr=1.0,
                         model=Model(Recurrent(cell="rnn", hidden_size=64), vocabulary_size=99))
    assert given_paths == {"name", "steps", "seeds", "lr", "model.vocabulary_size",
                           "model.recurrent.hidden_size", "model.recurrent.cell"}


def test_yaml_file_with_null_and_yaml_floats(tmp_path):
    path = write(tmp_path, "run.yaml", "steps: null\nlevel: none\nlr: 1e-3\nmodel:\n"
                 "  recurrent: {dropout: 0.5}\nfeatures: [a, b]\n")
    config, _ = resolve(["--config", path])
    # YAML 1.1 reads 1e-3 as a string: read as the command line would.
    assert (config.steps, config.level, config.lr) == (None, None, 1e-3)
    assert config.model.recurrent.dropout == 0.5 and config.features == ["a", "b"]
    assert read_config_file(write(tmp_path, "empty.yml", "")) == {}


@pytest.mark.parametrize("data, message", [
    ({"hiden": 3}, "config file 'run.toml': unknown key 'hiden' at the top level; accepted: "
     "text_file, model, name, steps, lr, clip_value, weight_decay, seed, seeds, lengths, "
     "features, scales, optimizer, level, tie_weights, max_vocabulary"),
    ({"model": {"recurrent": {"hiden": 3}}}, "config file 'run.toml': unknown key 'hiden' in "
     "[model.recurrent]; accepted: cell, hidden_size, dropout, peephole"),
    ({"model": {"recurrent": {"hidden_size": 0}}}, "config file 'run.toml': key 'hidden_size' "
     "in [model.recurrent]: --hidden must be a positive int (at most 2**63 - 1), got 0"),
    ({"model": {"recurrent": {"hidden_size": "abc"}}}, "config file 'run.toml': key "
     "'hidden_size' in [model.recurrent]: --hidden must be a positive int (at most "
     "2**63 - 1), got 'abc'"),
    ({"seeds": "1,2,x"}, "--seeds must be a list of integers in [0, 2**63 - 1], got '1,2,x'"),
    ({"model": {"recurrent": {"hidden_size": 2.0}}}, "config file 'run.toml': key "
     "'hidden_size' in [model.recurrent]: --hidden must be a positive int (at most "
     "2**63 - 1), got 2.0"),
    ({"steps": True}, "config file 'run.toml': key 'steps' at the top level: --steps must be "
     "an int, or none, got True"),
    ({"tie_weights": "yes"}, "config file 'run.toml': key 'tie_weights' at the top level: "
     "--tie-weights must be true or false, got 'yes'"),
    ({"name": None}, "config file 'run.toml': key 'name' at the top level: --name must be a "
     "string, got None"),
    ({"seeds": [1, -1]}, "config file 'run.toml': key 'seeds' at the top level: --seeds must "
     "be a list of integers in [0, 2**63 - 1], got [1, -1]"),
    ({"seeds": []}, "--seeds must be a list of integers in [0, 2**63 - 1], got []"),
    ({"seeds": 3}, "--seeds must be a list of integers in [0, 2**63 - 1], got 3"),
    ({"lengths": [1]}, "config file 'run.toml': key 'lengths' at the top level: --lengths "
     "takes comma-separated integers in [2, 2**63 - 1], got '1'"),
    ({"optimizer": "adamw"}, "--optimizer must be one of 'adam', 'sgd', got 'adamw'"),
    ({"level": "byte"}, "--level must be one of 'char', 'word', or none, got 'byte'"),
    ({"model": {"vocabulary_size": -1.5}}, "key 'vocabulary_size' in [model]: "
     "model.vocabulary_size must be an int, got -1.5"),
    ({"model": 3}, "config file 'run.toml': [model] must be a table of keys, got 3"),
    ({"lr": -1.0}, "config file 'run.toml': --lr must be a number > 0, got -1.0"),
    ({"model": {"recurrent": {"cell": "gru", "peephole": True}}},
     "config file 'run.toml': --peephole is for --cell lstm only, got --cell gru"),
])
def test_config_from_dict_refuses_naming_file_key_and_value(data, message):
    with pytest.raises(ValueError) as error:
        config_from_dict(Run, data, source="config file 'run.toml'")
    assert message in str(error.value)


def test_bad_file_fails_even_with_the_option_on_the_command_line(tmp_path):
    path = write(tmp_path, "run.toml", "seed = -3\n")
    with pytest.raises(ValueError, match=r"key 'seed' at the top level: --seed must"):
        resolve(["--config", path, "--seed", "4"])


def test_checkpoint_dicts_read_back():
    config = Run(steps=None, level=None, seeds=[5], model=Model(vocabulary_size=7))
    assert config_from_dict(Run, dataclasses.asdict(config), source="checkpoint 'x.pt'") == config


def test_required_field_needs_a_value():
    @dataclass
    class Sized:
        size: int = field(metadata={"check": "positive"})  # how many
        name: str = "n"

    with pytest.raises(ValueError, match=r"^config: size has no default: give --size or set "
                       r"key 'size' at the top level$"):
        config_from_dict(Sized, {})
    assert config_from_dict(Sized, {"size": 2}) == Sized(2)
    assert resolve(["--size", "3"], Sized)[0] == Sized(3, "n")
    assert "--size SIZE how many (no default: required)" in " ".join(
        parser_for(Sized).format_help().split())


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "a = [1,\nb = 2\n", r"config file '.*bad\.toml' is not valid TOML: .*\(at line 2, column \d+\)"),
    ("bad.yaml", "a: 1\nb: [1, 2\nc: 3\n", r"config file '.*bad\.yaml' is not valid YAML at line \d+, column \d+: "),
    ("list.yaml", "- 1\n- 2\n", r"config file '.*list\.yaml' must hold a mapping of keys at the top level, got list"),
    ("run.json", "{}", r"config file '.*run\.json': unknown format \.json; accepted: \.toml, \.yaml, \.yml"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        read_config_file(write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^config file '.*nowhere\.toml' does not exist$"):
        resolve(["--config", str(tmp_path / "nowhere.toml")])


def test_yaml_without_pyyaml_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path, "run.yml", "name: x\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(ValueError, match=r'pip install "rnnkit\[yaml\]"'):
        read_config_file(path)


# --- TOML output and round trips -------------------------------------------------------------

def test_toml_layout():
    text = config_to_toml(Run(steps=None, features=["a"]))
    assert text.startswith('text_file = "none"  # a UTF-8 text file\n')
    assert 'steps = "none"' in text and 'features = ["a"]' in text
    assert "\n[model]\nembedding_size = 8\nvocabulary_size = 0  # set from the data\n" in text
    assert text.index("[model]") < text.index("[model.recurrent]")
    assert tomllib.loads(text)["model"]["recurrent"]["hidden_size"] == 16


def test_print_config_parses_back_to_the_same_config(tmp_path, capsys):
    path = write(tmp_path, "run.toml", "name = 'saved'\n[model.recurrent]\ncell = 'rnn'\n")
    args = parser_for().parse_args(["--config", path, "--hidden", "12", "--print-config"])
    assert getattr(args, cf.PRINT_CONFIG_DEST) is True
    config, _ = config_from_arguments(args, Run)
    printed = config_to_toml(config)
    again, given_paths = resolve(["--config", write(tmp_path, "printed.toml", printed)])
    assert again == config == Run(name="saved", model=Model(Recurrent(cell="rnn", hidden_size=12)))
    assert "model.recurrent.hidden_size" in given_paths


# Texts the command line can carry unchanged; for list items also no comma or edge blanks.
plain_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
item_text = plain_text.map(str.strip).filter(lambda s: s and "," not in s)
not_none = plain_text.filter(lambda s: s.strip().lower() != "none")
finite = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(1, 2**63 - 1)
seeds = st.integers(0, 2**63 - 1)


@st.composite
def runs(draw) -> Run:
    cell = draw(st.sampled_from(["rnn", "lstm", "gru"]))
    recurrent = Recurrent(cell, draw(counts), draw(st.floats(0, 1)),
                          draw(st.booleans()) if cell == "lstm" else False)
    return Run(
        text_file=draw(st.none() | not_none),
        model=Model(recurrent, draw(counts), draw(st.integers(-2**63, 2**63 - 1))),
        name=draw(plain_text), steps=draw(st.none() | st.integers(-2**63, 2**63 - 1)),
        lr=draw(st.floats(min_value=0, exclude_min=True, allow_infinity=True)),
        clip_value=draw(st.none() | st.floats(min_value=0, exclude_min=True,
                                              allow_infinity=False)),
        weight_decay=draw(st.floats(min_value=0)), seed=draw(seeds),
        seeds=draw(st.lists(seeds, min_size=1, max_size=3)),
        lengths=draw(st.lists(st.integers(2, 2**63 - 1), min_size=1, max_size=3)),
        features=draw(st.lists(item_text, max_size=3)),
        scales=draw(st.lists(finite, max_size=3)),
        optimizer=draw(st.sampled_from(["adam", "sgd"])),
        level=draw(st.sampled_from(["char", "word", None])),
        tie_weights=draw(st.booleans()), max_vocabulary=draw(st.none() | counts))


def argv_of(run: Run) -> list[str]:
    """``run`` as a command line, written here independently of the module's own formatting."""
    def text(value):
        return "none" if value is None else repr(value) if isinstance(value, float) else str(value)

    def joined(values):
        return ",".join(text(v) for v in values)

    recurrent = run.model.recurrent
    argv = [f"--cell={recurrent.cell}", f"--hidden={recurrent.hidden_size}",
            f"--dropout={recurrent.dropout!r}",
            "--peephole" if recurrent.peephole else "--no-peephole",
            f"--embedding={run.model.embedding_size}", f"--name={run.name}",
            f"--steps={text(run.steps)}", f"--lr={run.lr!r}",
            f"--clip-value={text(run.clip_value)}", f"--weight-decay={run.weight_decay!r}",
            f"--seed={run.seed}", f"--seeds={joined(run.seeds)}",
            f"--lengths={joined(run.lengths)}", f"--features={joined(run.features)}",
            f"--scales={joined(run.scales)}", f"--optimizer={run.optimizer}",
            f"--level={text(run.level)}",
            "--tie-weights" if run.tie_weights else "--no-tie-weights",
            f"--max-vocabulary={text(run.max_vocabulary)}"]
    return argv + (["--", run.text_file] if run.text_file is not None else [])


@given(runs())
def test_round_trip_through_argv(run):
    config, given_paths = resolve(argv_of(run))
    # vocabulary_size is not on the command line: it keeps its default.
    assert config == dataclasses.replace(run, model=dataclasses.replace(run.model,
                                                                        vocabulary_size=0))
    assert "model.vocabulary_size" not in given_paths and "model.recurrent.cell" in given_paths


@given(runs())
def test_round_trip_through_toml(run):
    text = config_to_toml(run)
    assert config_from_dict(Run, tomllib.loads(text)) == run


def test_round_trip_through_yaml_files(tmp_path):
    path = tmp_path / "run.yaml"

    @given(runs())
    def round_trip(run):
        path.write_text(yaml.safe_dump(dataclasses.asdict(run), allow_unicode=True), "utf-8")
        assert resolve(["--config", str(path)])[0] == run

    round_trip()


def test_toml_file_round_trip_with_awkward_strings(tmp_path):
    run = Run(name='quote " back\\slash \t tab \n line \x7f del \x00 nul é 😀', features=["ü"],
              text_file="", scales=[1e-300, -0.0, 1e16])
    path = write(tmp_path, "run.toml", config_to_toml(run))
    assert resolve(["--config", path])[0] == run


# --- code values, build-time errors, version -------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda r: r.model.recurrent.__setattr__("hidden_size", 0), r"^--hidden must be a positive int \(at most 2\*\*63 - 1\), got 0$"),
    (lambda r: r.model.__setattr__("recurrent", None), r"^model.recurrent must be a Recurrent, got None$"),
    (lambda r: r.__setattr__("seeds", (1, "2")), r"^--seeds must be a list of integers in \[0, 2\*\*63 - 1\], got \(1, '2'\)$"),
    (lambda r: r.__setattr__("text_file", 3), r"^TEXT_FILE must be a string, or none, got 3$"),
    (lambda r: r.__setattr__("lengths", [1, 5]), r"^--lengths takes comma-separated integers in \[2, 2\*\*63 - 1\], got '1,5'$"),
])
def test_check_config_on_values_from_code(change, message):
    run = Run()
    check_config(run)  # the defaults are valid
    change(run)
    with pytest.raises(ValueError, match=message):
        check_config(run)


@dataclass
class Data:
    seed: int = 0


@dataclass
class Both:
    data: Data = field(default_factory=Data)
    seed: int = 1


@dataclass
class Renamed:
    data: Data = field(default_factory=Data)
    seed: int = field(default=1, metadata={"option": "--model-seed"})


def test_option_clash_is_a_type_error_at_build_time():
    with pytest.raises(TypeError, match=r"config fields 'data.seed' and 'seed' of Both would "
                       r"both take --seed; give one of them metadata\['option'\]"):
        parser_for(Both)

    @dataclass
    class Negated:
        plot: bool = True
        no_plot: int = 0

    with pytest.raises(TypeError, match=r"'plot' and 'no_plot' .* both take --no-plot"):
        parser_for(Negated)

    assert resolve(["--seed", "4", "--model-seed", "5"], Renamed)[0] == Renamed(Data(4), 5)


@pytest.mark.parametrize("annotation, message", [
    ("tuple[int, int]", r"Odd\.value: unsupported annotation tuple"),
    ("int | str", r"Odd\.value: a union other than `X \| None` is not supported"),
    ("bool | None", r"Odd\.value: unsupported annotation bool"),
])
def test_unsupported_annotations_are_type_errors(annotation, message):
    odd = dataclasses.make_dataclass("Odd", [("value", annotation, None)])
    with pytest.raises(TypeError, match=message):
        parser_for(odd)


def test_unknown_check_is_a_type_error():
    @dataclass
    class Odd:
        size: int = field(default=1, metadata={"check": "posittive"})

    with pytest.raises(TypeError, match=r"unknown metadata\['check'\] 'posittive'; accepted: "
                       r"positive, seed, nonnegative, positive_real, probability"):
        parser_for(Odd)

    @dataclass
    class Mismatched:
        rate: float = field(default=1.0, metadata={"check": "positive"})

    with pytest.raises(TypeError, match=r"Mismatched.rate: metadata\['check'\] 'positive' is "
                       r"for int values, not float"):
        parser_for(Mismatched)


def test_version_string(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.8.7")
    assert cf.version_string() == "rnnkit 9.8.7"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    import rnnkit

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cf.version_string() == f"rnnkit {rnnkit.__version__}"
