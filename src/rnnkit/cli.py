"""The `rnnkit` command line: argument parsing only, one sub-command per app."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from rnnkit import bench
from rnnkit.apps.lm.corpus import CORPORA, LEVELS
from rnnkit.apps.lm.model import ModelConfig
from rnnkit.apps.lm.train import TrainConfig
from rnnkit.apps.recurrent import CELLS
from rnnkit.engine import BACKENDS
from rnnkit.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    is_out_of_memory,
    usage_errors,
)
from rnnkit.training.optimization import OPTIMIZERS, SCHEDULES


def _size(text: str) -> tuple[int, int, int]:
    """'T,N,H' -> (T, N, H), each a positive int."""
    parts = text.split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1 or max(size) > LARGEST_COUNT:
        raise argparse.ArgumentTypeError(
            f"--sizes takes T,N,H triples of positive ints up to 2**63 - 1 (e.g. 100,32,256), "
            f"got {text!r}")
    return size  # type: ignore[return-value]


def _families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in bench.FAMILIES]
    if unknown or not families:
        raise argparse.ArgumentTypeError(
            f"--families takes a comma-separated subset of {','.join(bench.FAMILIES)}, "
            f"got {text!r}")
    return families


# Sizes and counts end up in torch's int64 (shapes, loop bounds); larger ones overflow deep in
# torch with an unrelated message, so the parser refuses them by name.
LARGEST_COUNT = 2**63 - 1


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= LARGEST_COUNT:
        raise argparse.ArgumentTypeError(
            f"expected a positive int (at most 2**63 - 1), got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _add_clip_options(parser: argparse.ArgumentParser, clip_norm: float | None,
                      clip_value: float | None = None,
                      clip_tensor_norm: float | None = None) -> None:
    """The three clipping options of every training command (see `training.optimization`)."""
    parser.add_argument("--clip-norm", type=_nonnegative, default=clip_norm,
                        help=f"global-norm bound, as tf.clip_by_global_norm (0: off; default "
                        f"{clip_norm or 'off'})")
    # A bound of 0 would zero every gradient: refused rather than read as "off".
    parser.add_argument("--clip-value", type=_positive_real, default=clip_value,
                        help="per-element bound, as tf.clip_by_value (default off)")
    parser.add_argument("--clip-tensor-norm", type=_positive_real, default=clip_tensor_norm,
                        help="norm bound per parameter tensor, as tf.clip_by_norm (default off)")


# torch.manual_seed takes a 64-bit integer; numpy's generators and Python's hash of the seed
# agree on the non-negative half, the range every command documents.
SEED_RANGE = (0, 2**63 - 1)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"--seed takes an integer in [0, 2**63 - 1], got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    """Comma-separated seeds, each as `_seed`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(SEED_RANGE[0] <= v <= SEED_RANGE[1] for v in values):
        raise argparse.ArgumentTypeError(
            f"--seed takes comma-separated integers in [0, 2**63 - 1], got {text!r}")
    return values


def _temperature(text: str) -> float:
    value = _nonnegative(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"--temperature takes a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _nonnegative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


EXIT_CODES = f"""exit codes:
  0    success
  {EXIT_FAILURE}    the command ran and failed: a file missing, unreadable or malformed (text, CSV,
       checkpoint), data that do not fit the options, an output path that cannot be
       written, a model too large for memory, a non-finite loss, an operating-system error
  {EXIT_USAGE}    the command line is wrong: an unknown option, a value outside what an option
       accepts, options that do not go together (before any file is read)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); lm train saves a checkpoint first and says how to
       resume"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnkit", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = commands.add_parser(
        "bench", help="time rnnkit against torch.nn and the reference loop",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--quick", action="store_true",
                   help="one tiny size and 2 repeats: checks the command, not the speed")
    b.add_argument("--sizes", type=_size, nargs="+", metavar="T,N,H",
                   help="sizes to time (default: " +
                   " ".join(",".join(map(str, s)) for s in bench.FULL_SIZES) + ")")
    b.add_argument("--families", type=_families, default=list(bench.FAMILIES),
                   help="comma-separated subset of lstm,gru,rnn (default: all)")
    b.add_argument("--backend", choices=[x for x in BACKENDS if x != "reference"], default="auto",
                   help="rnnkit backend to time (default: auto)")
    b.add_argument("--repeats", type=_positive, default=7, help="timed repeats (median)")
    b.add_argument("--streaming-hidden", type=_positive, default=256,
                   help="hidden size of the single-step latency test (default 256)")
    b.add_argument("--memory-size", type=_size, metavar="T,N,H",
                   help="size of the training-step peak-memory comparison (default " +
                   ",".join(map(str, bench.MEMORY_SIZE)) + ")")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    b.add_argument("--no-reference", action="store_true",
                   help="skip the (slow) reference loop peers")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON here")

    lm = commands.add_parser("lm", help="language models: train, sample, eval")
    lm_commands = lm.add_subparsers(dest="lm_command", required=True, metavar="LM_COMMAND")
    # No abbreviations: `resume_conflicts` recognises the run settings by their full names.
    t = lm_commands.add_parser("train", help="train on a text file or a built-in corpus",
                               allow_abbrev=False)
    t.add_argument("text_file", nargs="?", metavar="TEXT_FILE", help="a UTF-8 text file")
    t.add_argument("--corpus", choices=CORPORA, help="a built-in corpus instead of a file")
    _add_model_options(t)
    _add_train_options(t, TrainConfig())
    t.add_argument("--checkpoint", default="lm.pt", help="checkpoint path (default lm.pt)")
    t.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --checkpoint file (refused otherwise)")
    t.add_argument("--plot", metavar="PNG", help="save train/validation loss curves here")

    s = lm_commands.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("checkpoint", metavar="CKPT")
    s.add_argument("--prime", default="", help="text the model reads before generating")
    s.add_argument("--length", type=_positive, default=500, help="tokens to generate")
    s.add_argument("--temperature", type=_temperature, default=1.0,
                   help="0 is greedy (a tiny one tends to it); below 1 sharper, above 1 flatter "
                   "(default 1)")
    s.add_argument("--top-k", type=_positive, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=_probability,
                   help="sample among the fewest most likely tokens whose probability reaches "
                   "this mass, in [0, 1]; the most likely token always stays, so 0 is greedy")
    s.add_argument("--seed", type=_seed, help="random seed in [0, 2**63 - 1] (reproducible "
                   "samples)")

    c = lm_commands.add_parser(
        "throughput", help="training speed on rnnkit against the same model on torch.nn")
    c.add_argument("text_file", nargs="?", metavar="TEXT_FILE", help="a UTF-8 text file")
    c.add_argument("--corpus", choices=CORPORA, help="a built-in corpus instead of a file")
    _add_model_options(c)
    _add_train_options(c, TrainConfig())
    c.add_argument("--blocks", type=_positive, default=7, help="timed blocks (median)")
    c.add_argument("--block-steps", type=_positive, default=10, help="training steps per block")

    e = lm_commands.add_parser("eval", help="loss of a checkpoint on a new text file")
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("text_file", metavar="TEXT_FILE")

    _add_forecast_commands(commands)

    _add_memory_command(commands)
    _add_gradients_command(commands)

    x = commands.add_parser(
        "export", help="export a checkpoint's model to ONNX, checked with onnxruntime",
        description="Export the model of an 'rnnkit lm' or 'rnnkit forecast' checkpoint to an "
        "ONNX file (dynamic sequence length and batch), then run it in onnxruntime on an input "
        "of another size and print the largest difference from PyTorch. Needs the onnx extra: "
        'pip install "rnnkit[onnx]".')
    x.add_argument("checkpoint", metavar="CKPT")
    x.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")

    d = commands.add_parser("demo", help="train a character LSTM on built-in prose and sample")
    d.add_argument("--steps", type=_positive, default=DEMO_STEPS,
                   help=f"training steps (default {DEMO_STEPS}, a few minutes on 2 cores)")
    d.add_argument("--out", default="rnnkit-demo",
                   help="folder for checkpoint and plot (a previous demo's are replaced)")
    return parser


DEMO_STEPS = 600


def _columns(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return columns


def _season(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(
            f"--season takes a season length >= 2, or 0 for none, got {text!r}")
    return value


def _integers(smallest: int, option: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < smallest or max(values) > LARGEST_COUNT:
            raise argparse.ArgumentTypeError(
                f"{option} takes comma-separated integers in [{smallest}, 2**63 - 1], got "
                f"{text!r}")
        return values
    return parse


def _cells(text: str) -> list[str]:
    from rnnkit.apps.recurrent import CELL_NAMES as CELL_VARIANTS

    cells = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELL_VARIANTS]
    if unknown or not cells:
        raise argparse.ArgumentTypeError(
            f"--cells takes a comma-separated subset of {','.join(CELL_VARIANTS)}, got {text!r}")
    return cells


def _add_memory_command(commands) -> None:
    from rnnkit.apps.memory.experiment import TASKS, RunConfig
    from rnnkit.apps.recurrent import INITS

    run = RunConfig(task="adding", length=100)
    defaults = SimpleNamespace(**run.settings())
    m = commands.add_parser(
        "memory", help="train RNN, LSTM and GRU side by side on long-memory tasks",
        description="Train each cell x length (x seed) on the adding problem or the copy task, "
        "then print a table and write results.json, results.csv, learning curves, gradient "
        "flow and gate heatmaps.")
    m.add_argument("task", choices=TASKS)
    m.add_argument("--cells", type=_cells, default=["rnn", "lstm", "gru"],
                   help="comma-separated (default rnn,lstm,gru; variants: rnn-relu, "
                   "lstm-peephole, lstm-projection (h to hidden // 2), gru-reset-before)")
    m.add_argument("--lengths", type=_integers(2, "--lengths"), default=[50],
                   help="sequence lengths T (adding) or delays T (copy), comma-separated "
                   "(default 50)")
    m.add_argument("--hidden", type=_positive, default=defaults.hidden_size)
    m.add_argument("--steps", type=_positive, default=defaults.steps)
    m.add_argument("--batch-size", type=_positive, default=defaults.batch_size)
    m.add_argument("--lr", type=float, default=defaults.lr)
    _add_clip_options(m, defaults.clip_norm, defaults.clip_value, defaults.clip_tensor_norm)
    m.add_argument("--init", choices=INITS, default=defaults.init,
                   help="chrono: Tallec & Ollivier's gate biases for LSTM and GRU, T_max = the "
                   "sequence length")
    m.add_argument("--forget-bias", type=float, default=0.0,
                   help="added to the LSTM cells' forget-gate bias at initialisation (1.0 per "
                   "Jozefowicz et al. 2015); other cells ignore it")
    m.add_argument("--seed", type=_seeds, default=[0],
                   help="random seed, or several comma-separated (mean and spread reported)")
    m.add_argument("--eval-every", type=_positive, default=defaults.eval_every,
                   help="steps between held-out evaluations")
    m.add_argument("--out", default="rnnkit-memory", help="folder for results and plots")
    m.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def _add_gradients_command(commands) -> None:
    g = commands.add_parser(
        "gradients", help="gradient flow ‖∂h_T/∂h_t‖ by distance, without training",
        description="Gradient flow of fresh layers (optionally with W_hh rescaled to a spectral "
        "radius) or of a trained `rnnkit lm` checkpoint on real text; table, JSON and PNG.")
    # The fresh-layer options default to None so that giving one with --checkpoint (which
    # they cannot affect) is an error rather than silently ignored.
    g.add_argument("--cells", type=_cells,
                   help="comma-separated (default rnn,lstm,gru; fresh layers)")
    g.add_argument("--length", type=_integers(2, "--length"), default=[100],
                   help="sequence length T (default 100)")
    g.add_argument("--hidden", type=_positive, help="hidden units (default 128; fresh layers)")
    g.add_argument("--samples", type=_positive, default=8, help="sequences averaged over")
    g.add_argument("--input-size", type=_positive, help="features (default 4; fresh layers)")
    g.add_argument("--spectral-radius", type=_positive_real,
                   help="rescale each square gate block of W_hh to this spectral radius")
    g.add_argument("--seed", type=_seed, help="weights and inputs (default 0; fresh layers)")
    g.add_argument("--checkpoint", metavar="CKPT",
                   help="a trained `rnnkit lm` model instead of fresh layers")
    g.add_argument("text_file", nargs="?", metavar="TEXT_FILE", help="text for --checkpoint")
    g.add_argument("--corpus", choices=CORPORA, help="built-in text for --checkpoint")
    g.add_argument("--layer", type=int, help="which layer of the checkpoint's stack (default last)")
    g.add_argument("--out", default="rnnkit-gradients", help="folder for JSON and PNG")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _add_forecast_commands(commands) -> None:
    from rnnkit.apps.forecast.data import CSV_DEFAULTS, DATASET_DEFAULTS, DATASETS, FILL_RULES
    from rnnkit.apps.forecast.model import STRATEGIES, ForecastModelConfig
    from rnnkit.apps.forecast.train import FitConfig

    forecast = commands.add_parser("forecast", help="time-series forecasting with baselines")
    forecast_commands = forecast.add_subparsers(dest="forecast_command", required=True,
                                                metavar="FORECAST_COMMAND")
    defaults = " ".join(f"{name} {lookback}/{horizon}"
                        for name, (lookback, horizon) in DATASET_DEFAULTS.items())
    t = forecast_commands.add_parser(
        "train", help="train on a CSV column or a built-in series; score it against baselines")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="a CSV file with a header row")
    source.add_argument("--dataset", choices=DATASETS, help="a built-in series (offline)")
    t.add_argument("--target", metavar="COL", help="the column to forecast (with --csv)")
    t.add_argument("--time", metavar="COL", help="a time column to sort by (with --csv)")
    t.add_argument("--features", type=_columns, default=[], metavar="COL,...",
                   help="extra input columns (direct strategy only)")
    t.add_argument("--fill", choices=FILL_RULES, default="interpolate",
                   help="missing or infinite values, filled after the split from the history "
                   "only: interpolate linearly (default) or carry the last value forward (ffill; "
                   "a leading gap takes the first value); in the test tail always the last "
                   "value before; or error: stop")
    t.add_argument("--season", type=_season,
                   help="season length (default: the dataset's, or detected on the train part;"
                   " 0: none)")
    t.add_argument("--lookback", type=_positive,
                   help=f"steps the network reads (default: {defaults} for the datasets "
                   f"(lookback/horizon), {CSV_DEFAULTS[0]} for CSV)")
    t.add_argument("--horizon", type=_positive,
                   help=f"steps forecast from each origin (default: see --lookback; "
                   f"{CSV_DEFAULTS[1]} for CSV)")
    t.add_argument("--strategy", choices=STRATEGIES, default="direct",
                   help="direct: one output per step (default); recursive: one step, fed back")
    t.add_argument("--test-size", type=_positive,
                   help="rows in the test tail (default 10%% of the rows, at least the horizon)")
    t.add_argument("--validation-size", type=_positive,
                   help="rows in the validation part (default: as the test tail)")
    t.add_argument("--stride", type=_positive, default=1,
                   help="evaluate every stride-th test origin (default 1: all)")
    model = ForecastModelConfig(input_size=1, horizon=1).recurrent
    t.add_argument("--cell", choices=list(CELLS), default=model.cell)
    t.add_argument("--layers", type=_positive, default=model.num_layers)
    t.add_argument("--hidden", type=_positive, default=model.hidden_size)
    t.add_argument("--dropout", type=_probability, default=model.dropout)
    t.add_argument("--peephole", action="store_true", help="peephole LSTM")
    t.add_argument("--reset-before", action="store_true",
                   help="GRU with the reset gate before W_hn (the original GRU)")
    fit = FitConfig()
    t.add_argument("--epochs", type=_positive, default=fit.epochs, help="at most this many")
    t.add_argument("--patience", type=_positive, default=fit.patience,
                   help="stop after this many epochs without a better validation loss")
    t.add_argument("--batch-size", type=_positive, default=fit.batch_size)
    t.add_argument("--lr", type=float, default=fit.lr)
    _add_clip_options(t, fit.clip_norm, fit.clip_value, fit.clip_tensor_norm)
    t.add_argument("--seed", type=_seed, default=fit.seed)
    t.add_argument("--out", metavar="DIR",
                   help="folder for model.pt, metrics.csv/json, forecasts.csv, forecast.png "
                   "(default forecast-<dataset or CSV name>)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (refused otherwise)")
    t.add_argument("--no-plot", action="store_true", help="skip forecast.png")

    p = forecast_commands.add_parser("predict", help="forecast past the end of a series")
    p.add_argument("checkpoint", metavar="CKPT", help="model.pt written by forecast train")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="the series, with the trained columns")
    source.add_argument("--dataset", choices=DATASETS, help="a built-in series")
    p.add_argument("--out", default="forecast.csv", help="CSV to write (default forecast.csv)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = ModelConfig(vocabulary_size=0)
    defaults = SimpleNamespace(**vars(model.recurrent), embedding_size=model.embedding_size)
    parser.add_argument("--cell", choices=list(CELLS), default=defaults.cell)
    parser.add_argument("--layers", type=_positive, default=defaults.num_layers)
    parser.add_argument("--hidden", type=_positive, default=defaults.hidden_size)
    parser.add_argument("--embedding", type=_positive, default=defaults.embedding_size)
    parser.add_argument("--dropout", type=_probability, default=defaults.dropout)
    parser.add_argument("--tie-weights", action="store_true",
                        help="output layer shares the embedding matrix")
    parser.add_argument("--peephole", action="store_true", help="peephole LSTM")
    parser.add_argument("--reset-before", action="store_true",
                        help="GRU with the reset gate before W_hn (the original GRU)")


def _add_train_options(parser: argparse.ArgumentParser, train: TrainConfig) -> None:
    defaults = SimpleNamespace(**{**vars(train), **vars(train.loop)})
    parser.add_argument("--level", choices=list(LEVELS), default=defaults.level)
    parser.add_argument("--max-vocabulary", type=_positive, default=defaults.max_vocabulary)
    parser.add_argument("--seq-len", type=_positive, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size)
    parser.add_argument("--steps", type=_positive,
                        help=f"total optimiser steps (default {defaults.steps}; with --resume, "
                        "the saved run's)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default=defaults.optimizer)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule)
    _add_clip_options(parser, defaults.clip_norm, defaults.clip_value,
                      defaults.clip_tensor_norm)
    parser.add_argument("--validation-fraction", type=float,
                        default=defaults.validation_fraction)
    parser.add_argument("--eval-every", type=_positive, default=defaults.eval_every)
    parser.add_argument("--checkpoint-every", type=_positive, default=defaults.checkpoint_every)
    parser.add_argument("--seed", type=_seed, default=defaults.seed)


def resume_conflicts(argv: Sequence[str]) -> list[str]:
    """Run settings given on a command line that also resumes (--steps aside): the saved run's
    settings are the ones used, so any other is an error rather than silently ignored."""
    settings = {option for action in _lm_train_parser()._actions
                if action.dest not in ("help", "steps") for option in action.option_strings}
    return [token.split("=")[0] for token in argv if token.split("=")[0] in settings]


def _lm_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    _add_model_options(parser)
    _add_train_options(parser, TrainConfig())
    return parser


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    from rnnkit.apps.lm.train import default_loop
    from rnnkit.apps.recurrent import RecurrentConfig

    model = ModelConfig(
        vocabulary_size=0, embedding_size=args.embedding, tie_weights=args.tie_weights,
        recurrent=RecurrentConfig(
            args.cell, hidden_size=args.hidden, num_layers=args.layers, dropout=args.dropout,
            peephole=args.peephole, reset_before=args.reset_before))
    train = TrainConfig(
        level=args.level, max_vocabulary=args.max_vocabulary, seq_len=args.seq_len,
        batch_size=args.batch_size, validation_fraction=args.validation_fraction,
        loop=replace(default_loop(), steps=args.steps or default_loop().steps, lr=args.lr,
                     optimizer=args.optimizer, schedule=args.schedule,
                     clip_norm=args.clip_norm or None, clip_value=args.clip_value,
                     clip_tensor_norm=args.clip_tensor_norm, eval_every=args.eval_every,
                     checkpoint_every=args.checkpoint_every, seed=args.seed))
    return model, train


def check_cell_variants(cell: str, peephole: bool, reset_before: bool) -> None:
    """`UsageError` for a variant option given with a cell that does not have it."""
    if peephole and cell != "lstm":
        raise UsageError(f"--peephole is for --cell lstm only, got --cell {cell}")
    if reset_before and cell != "gru":
        raise UsageError(f"--reset-before is for --cell gru only, got --cell {cell}")


def run_lm(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rnnkit.apps.lm import commands as lm
    from rnnkit.apps.lm.train import check_train_config

    if args.lm_command in ("train", "throughput"):
        conflicts = resume_conflicts(argv) if args.lm_command == "train" and args.resume else []
        if conflicts:
            raise UsageError(
                f"{', '.join(conflicts)} cannot change a resumed run (it continues with the "
                f"settings saved in {args.resume}; only --steps may be given)")
        model, train = _configs(args)
        if not (args.lm_command == "train" and args.resume):
            check_cell_variants(args.cell, args.peephole, args.reset_before)
            with usage_errors():
                check_train_config(train)
        if (args.text_file is None) == (args.corpus is None):
            raise UsageError("give a TEXT_FILE or --corpus NAME (one of them)")
    if args.lm_command == "train":
        return lm.train(model, train, args.text_file, args.corpus, args.checkpoint, args.resume,
                        args.plot, resume_steps=args.steps, overwrite=args.overwrite)
    if args.lm_command == "throughput":
        return lm.throughput(model, train, args.text_file, args.corpus, args.blocks,
                             args.block_steps)
    if args.lm_command == "sample":
        return lm.sample(args.checkpoint, args.prime, args.length, args.temperature, args.top_k,
                         args.top_p, args.seed)
    return lm.evaluate_file(args.checkpoint, args.text_file)


def run_forecast(args: argparse.Namespace) -> int:
    from rnnkit.apps.forecast import commands as forecast
    from rnnkit.apps.forecast.data import DataConfig
    from rnnkit.apps.forecast.model import ForecastModelConfig
    from rnnkit.apps.forecast.train import FitConfig

    if args.forecast_command == "predict":
        return forecast.predict(args.checkpoint, args.csv, args.dataset, args.out)
    if args.dataset and (args.time or args.features):
        raise UsageError("--time and --features go with --csv; a built-in dataset has its own")
    if args.csv and not args.target:
        raise UsageError(f"--target COL is required with --csv: which column of {args.csv!r} "
                         "to forecast")
    if args.time and args.time == args.target:
        raise UsageError(f"--time and --target both name column {args.time!r}: the time column "
                         "orders the rows and cannot be the series forecast")
    if args.strategy == "recursive" and args.features:
        raise UsageError("--strategy recursive feeds the forecast back as the next input, so it "
                         "needs the future of every feature too; use --strategy direct with "
                         "--features, or drop --features")
    check_cell_variants(args.cell, args.peephole, args.reset_before)
    if not args.lr > 0 or math.isinf(args.lr):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    data = DataConfig(
        dataset=args.dataset, csv=args.csv, target=args.target, time=args.time,
        features=args.features, fill=args.fill, season=args.season, lookback=args.lookback,
        horizon=args.horizon, test_size=args.test_size, validation_size=args.validation_size,
        stride=args.stride)
    from rnnkit.apps.recurrent import RecurrentConfig

    model = ForecastModelConfig(
        input_size=1 + len(args.features), horizon=args.horizon or 1, strategy=args.strategy,
        recurrent=RecurrentConfig(args.cell, hidden_size=args.hidden, num_layers=args.layers,
                                  dropout=args.dropout, peephole=args.peephole,
                                  reset_before=args.reset_before))
    fit = FitConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                    lr=args.lr, clip_norm=args.clip_norm or None, clip_value=args.clip_value,
                    clip_tensor_norm=args.clip_tensor_norm, seed=args.seed)
    out = args.out or f"forecast-{args.dataset or Path(args.csv).stem}"
    return forecast.train(data, model, fit, out, overwrite=args.overwrite,
                          plot=not args.no_plot)


def run_memory(args: argparse.Namespace) -> int:
    from rnnkit.apps.memory.commands import memory
    from rnnkit.apps.memory.experiment import RunConfig, default_loop
    from rnnkit.apps.recurrent import RecurrentConfig

    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    base = RunConfig(
        task=args.task, length=args.lengths[0],
        recurrent=RecurrentConfig(args.cells[0], hidden_size=args.hidden, init=args.init,
                                  forget_bias=args.forget_bias),
        loop=replace(default_loop(), steps=args.steps, lr=args.lr,
                     clip_norm=args.clip_norm or None, clip_value=args.clip_value,
                     clip_tensor_norm=args.clip_tensor_norm, eval_every=args.eval_every),
        batch_size=args.batch_size)
    return memory(args.task, args.cells, args.lengths, args.seed, base, args.out,
                  plot=not args.no_plot)


def run_gradients(args: argparse.Namespace) -> int:
    from rnnkit.apps import gradients

    if len(args.length) != 1:
        raise UsageError(f"--length takes one length, got {args.length}")
    fresh = {"--cells": args.cells, "--hidden": args.hidden, "--input-size": args.input_size,
             "--spectral-radius": args.spectral_radius, "--seed": args.seed}
    if args.checkpoint:
        given = [option for option, value in fresh.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} set up fresh layers and cannot change a "
                             "--checkpoint's trained stack; drop them")
        return gradients.gradients_of_checkpoint(
            args.checkpoint, args.text_file, args.corpus, args.length[0], args.samples,
            args.layer, args.out, plot=not args.no_plot)
    if args.text_file or args.corpus or args.layer is not None:
        raise UsageError("a text (TEXT_FILE or --corpus) and --layer go with --checkpoint")
    return gradients.gradients_of_fresh_layers(
        args.cells or ["rnn", "lstm", "gru"], args.length[0], args.hidden or 128, args.samples,
        args.input_size or 4, args.spectral_radius, args.seed or 0, args.out,
        plot=not args.no_plot)


def run_demo(args: argparse.Namespace) -> int:
    from rnnkit.apps.lm import commands as lm
    from rnnkit.apps.outputs import output_directory

    out = output_directory(args.out)
    from rnnkit.apps.lm.train import default_loop

    model = ModelConfig(vocabulary_size=0)  # 2 x 256 LSTM, dropout 0.1
    train = TrainConfig(loop=replace(default_loop(), steps=args.steps,
                                     eval_every=max(1, args.steps // 6),
                                     checkpoint_every=args.steps))
    status = lm.train(model, train, None, "prose", str(out / "lm.pt"), None,
                      str(out / "loss.png"), resume_steps=None, overwrite=True)
    if status == 0:
        print("\nsample (temperature 0.8):\n")
        lm.sample(str(out / "lm.pt"), "The ", 400, 0.8, None, None, seed=0)
    return status


def run_export(args: argparse.Namespace) -> int:
    from rnnkit.apps.export import export_checkpoint

    return export_checkpoint(args.checkpoint, args.onnx)


def run_bench(args: argparse.Namespace) -> int:
    from rnnkit.apps.outputs import output_file

    if args.json:
        output_file(args.json, "--json")  # said now, not after minutes of timing
    sizes = args.sizes or (bench.QUICK_SIZES if args.quick else bench.FULL_SIZES)
    repeats = 2 if args.quick else args.repeats
    streaming_hidden = 16 if args.quick else args.streaming_hidden
    machine = bench.machine_description()
    print(f"rnnkit bench: torch {machine['torch']}, {machine['threads']} threads, "
          f"{machine['processor']}, median of {repeats}", flush=True)
    rows = bench.run_benchmarks(
        sizes, args.families, args.backend, repeats, streaming_hidden,
        with_reference=not args.no_reference,
        progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(bench.format_table(rows))
    memory_rows = []
    if not args.no_memory:
        memory_size = args.memory_size or (
            bench.QUICK_MEMORY_SIZE if args.quick else bench.MEMORY_SIZE)
        for family in args.families:
            print(f"measuring {family} training-step memory at T,N,H = {memory_size} ...",
                  file=sys.stderr, flush=True)
            memory_rows += bench.benchmark_memory(family, memory_size, args.backend)
        print()
        print(bench.format_memory_table(memory_rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(bench.rows_to_json(rows, memory_rows))
        print(f"wrote {args.json}")
    return 0


COMMANDS = {"lm": run_lm, "gradients": run_gradients, "memory": run_memory,
            "forecast": run_forecast, "demo": run_demo, "bench": run_bench,
            "export": run_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; every failure ends in one line on stderr and the exit
    code of `rnnkit.errors` (see ``rnnkit --help``), never a traceback for what is not a bug."""
    args = build_parser().parse_args(argv)
    name = f"rnnkit {args.command}"
    try:
        if args.command == "lm":
            return run_lm(args, sys.argv[1:] if argv is None else list(argv))
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:
        # lm train's Interrupted says where it saved the run and how to resume it.
        print(str(error) or f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as error:  # bad input, said plainly: no traceback
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except MemoryError:
        print(f"{name}: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise  # a bug: its traceback is what a report needs
        print(f"{name}: error: {OUT_OF_MEMORY} ({_one_line(error)[:200]})", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        print(f"{name}: error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_FAILURE


OUT_OF_MEMORY = "out of memory; choose smaller sizes (--hidden, --batch-size, --lengths, ...)"


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines) or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def describe_os_error(error: OSError) -> str:
    """'<file>: <reason>' (both files of a rename), in one line."""
    reason = error.strerror or _one_line(error)
    files = [repr(str(f)) for f in (error.filename, error.filename2) if f is not None]
    return f"{' -> '.join(files)}: {reason}" if files else reason


if __name__ == "__main__":
    sys.exit(main())
