"""The `rnnkit` command line: argument parsing only, one sub-command per app."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rnnkit import bench
from rnnkit.apps.export import ExportCommand
from rnnkit.apps.forecast.config import (
    FORECAST_EXCLUDE,
    ForecastPredictCommand,
    ForecastTrainCommand,
)
from rnnkit.apps.gradients_config import FRESH, GradientsCommand
from rnnkit.apps.lm.config import (
    LM_EXCLUDE,
    RESUMABLE,
    DemoCommand,
    LMEvalCommand,
    LMSampleCommand,
    LMThroughputCommand,
    LMTrainCommand,
)
from rnnkit.apps.memory.config import MEMORY_EXCLUDE, MemoryCommand
from rnnkit.configuration import (
    add_config_arguments,
    check_config,
    config_from_arguments,
    config_to_toml,
    leaves,
    version_string,
)
from rnnkit.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    is_out_of_memory,
    usage_errors,
)
from rnnkit.training.devices import keep_freed_memory

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
    parser.add_argument("--version", action="version", version=version_string())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_config_command(
        commands, "bench", bench.BenchCommand, frozenset(),
        help="time rnnkit against torch.nn and the reference loop", description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)

    lm = commands.add_parser("lm", help="language models: train, sample, eval")
    lm_commands = lm.add_subparsers(dest="lm_command", required=True, metavar="LM_COMMAND")
    _add_config_command(lm_commands, "train", LMTrainCommand, LM_EXCLUDE,
                        help="train on a text file or a built-in corpus")
    _add_config_command(lm_commands, "sample", LMSampleCommand, frozenset(),
                        help="generate text from a checkpoint")
    _add_config_command(
        lm_commands, "throughput", LMThroughputCommand,
        LM_EXCLUDE | {"train.loop.checkpoint_every"},
        help="training speed on rnnkit against the same model on torch.nn (minGRU, minLSTM: "
        "against rnnkit's GRU, LSTM)")

    _add_config_command(lm_commands, "eval", LMEvalCommand, frozenset(),
                        help="loss of a checkpoint on a new text file")

    _add_forecast_commands(commands)
    _add_config_command(
        commands, "memory", MemoryCommand, MEMORY_EXCLUDE,
        help="train RNN, LSTM, GRU (minGRU, minLSTM, ...) side by side on long-memory tasks",
        description="Train each cell x length (x seed) on the adding problem or the copy task, "
        "then print a table and write results.json, results.csv, learning curves, gradient "
        "flow and gate heatmaps.")
    _add_config_command(
        commands, "gradients", GradientsCommand, frozenset(),
        help="gradient flow ‖∂h_T/∂h_t‖ by distance, without training",
        description="Gradient flow of fresh layers (optionally with W_hh rescaled to a spectral "
        "radius) or of a trained `rnnkit lm` checkpoint on real text; table, JSON and PNG.")

    _add_config_command(
        commands, "export", ExportCommand, frozenset(),
        help="export a checkpoint's model to ONNX, checked with onnxruntime",
        description="Export the model of an 'rnnkit lm' or 'rnnkit forecast' checkpoint to an "
        "ONNX file (dynamic sequence length and batch), then run it in onnxruntime on an input "
        "of another size and print the largest difference from PyTorch. Needs the onnx extra: "
        'pip install "rnnkit[onnx]".')
    _add_config_command(commands, "demo", DemoCommand, frozenset(),
                        help="train a character LSTM on built-in prose and sample")
    return parser


def _add_config_command(commands, name: str, command_type: type, exclude: frozenset[str],
                        **parser_options) -> argparse.ArgumentParser:
    """A sub-command whose options, ``--config FILE`` and ``--print-config`` are generated from
    the dataclass ``command_type`` (less ``exclude``); `resolve_command` reads them back."""
    # No abbreviations: a resumed run tells the given settings by their full names.
    parser = commands.add_parser(name, allow_abbrev=False, **parser_options)
    add_config_arguments(parser, command_type, command_type(), exclude)
    parser.set_defaults(command_type=command_type, exclude=exclude)
    return parser


def resolve_command(args: argparse.Namespace, check: bool = True) -> tuple[object, set[str]]:
    """The command config that ``args`` describe (defaults < --config FILE < command line) and
    the dotted paths given; a bad file or value is a `UsageError` (exit 2)."""
    with usage_errors():
        defaults = args.command_type()
        preset = getattr(args, "preset", None)  # a preset sets the defaults the rest override
        if isinstance(preset, str) and hasattr(args.command_type, "with_preset"):
            defaults = args.command_type.with_preset(preset)
        return config_from_arguments(args, args.command_type, defaults,
                                     check=check, exclude=args.exclude)


def printed_config(args: argparse.Namespace, config: object) -> bool:
    """With --print-config: print ``config`` as TOML (a --config FILE) and say so."""
    if args.print_config:
        print(config_to_toml(config, args.exclude), end="")
    return args.print_config


def _add_forecast_commands(commands) -> None:
    from rnnkit.apps.forecast.data import CSV_DEFAULTS, DATASET_DEFAULTS

    forecast = commands.add_parser("forecast", help="time-series forecasting with baselines")
    forecast_commands = forecast.add_subparsers(dest="forecast_command", required=True,
                                                metavar="FORECAST_COMMAND")
    defaults = " ".join(f"{name} {lookback}/{horizon}"
                        for name, (lookback, horizon) in DATASET_DEFAULTS.items())
    _add_config_command(
        forecast_commands, "train", ForecastTrainCommand, FORECAST_EXCLUDE,
        help="train on a CSV column or a built-in series; score it against baselines",
        description=f"Default lookback/horizon: {defaults} for the datasets, "
        f"{CSV_DEFAULTS[0]}/{CSV_DEFAULTS[1]} for CSV.")

    _add_config_command(forecast_commands, "predict", ForecastPredictCommand, frozenset(),
                        help="forecast past the end of a series")


def run_lm(args: argparse.Namespace) -> int:
    from rnnkit.apps.lm import commands as lm

    command, given = resolve_command(args, check=False)
    if args.lm_command in ("sample", "eval"):
        if printed_config(args, command):
            return 0
        if command.checkpoint is None:
            raise UsageError(f"give the CKPT to {args.lm_command} (a checkpoint of lm train)")
        if args.lm_command == "eval":
            if command.text_file is None:
                raise UsageError("give the TEXT_FILE to evaluate the checkpoint on")
            return lm.evaluate_file(command.checkpoint, command.text_file)
        return lm.sample(command.checkpoint, command.prime, command.length, command.temperature,
                         command.top_k, command.top_p, command.seed)
    resuming = args.lm_command == "train" and command.resume is not None
    if resuming:
        # The saved run's settings are the ones used: a setting given (on the command line
        # or in a file) with another value than the saved one is an error, not ignored.
        if "checkpoint" not in given:  # continue in the file resumed from
            command = replace(command, checkpoint=command.resume)
        saved = replace(command, **lm.saved_settings(command.resume))
        steps = command.train.loop.steps
        conflicts = [leaf.label for leaf in leaves(LMTrainCommand, args.exclude)
                     if leaf.dotted in given and leaf.dotted not in RESUMABLE
                     and _setting(command, leaf.path) != _setting(saved, leaf.path)]
        if conflicts:
            raise UsageError(
                f"{', '.join(conflicts)} cannot change a resumed run (it continues with the "
                f"settings saved in {command.resume}; only --steps may be given)")
        if "train.loop.steps" in given:
            saved.train.loop.steps = steps
        saved.train.loop.device = command.train.loop.device
        command = replace(saved, quiet=command.quiet, plot=command.plot)
    else:  # a resumed run continues with its saved settings, checked when they were saved
        with usage_errors():
            check_config(command)
    if printed_config(args, command):
        return 0
    if (command.text_file is None) == (command.corpus is None):
        raise UsageError("give a TEXT_FILE or --corpus NAME (one of them)")
    if args.lm_command == "throughput":
        return lm.throughput(command.model, command.train, command.text_file, command.corpus,
                             command.blocks, command.block_steps)
    resume_steps = command.train.loop.steps if "train.loop.steps" in given else None
    return lm.train(command.model, command.train, command.text_file, command.corpus,
                    command.checkpoint, command.resume, command.plot, resume_steps=resume_steps,
                    overwrite=command.overwrite, quiet=command.quiet)


def _setting(config: object, path: tuple[str, ...]) -> object:
    for name in path:
        config = getattr(config, name)
    return config


def run_forecast(args: argparse.Namespace) -> int:
    from rnnkit.apps.forecast import commands as forecast

    command, _ = resolve_command(args)
    if printed_config(args, command):
        return 0
    if args.forecast_command == "predict":
        if command.checkpoint is None:
            raise UsageError("give the CKPT to predict with (model.pt of forecast train)")
        if (command.csv is None) == (command.dataset is None):
            raise UsageError("give --csv FILE or --dataset NAME (one of them)")
        return forecast.predict(command.checkpoint, command.csv, command.dataset, command.out)
    data, fit = command.data, command.fit
    if (data.csv is None) == (data.dataset is None):
        raise UsageError("give --csv FILE (with --target COL) or --dataset NAME (one of them)")
    if data.dataset and (data.time or data.features):
        raise UsageError("--time and --features go with --csv; a built-in dataset has its own")
    if data.dataset and data.future_features:
        raise UsageError("--future-features go with --csv: a built-in dataset has no columns "
                         "known in advance")
    if data.dataset and data.id:
        raise UsageError("--id goes with --csv (a long-format file of many series); a built-in "
                         "dataset is one series")
    if data.id and data.id in (data.target, data.time, *data.features, *data.future_features):
        raise UsageError(f"--id names column {data.id!r}, which is also the target, the time or "
                         "a feature: the id column names the series and is nothing else")
    if command.plot_series and not data.id:
        raise UsageError("--plot-series goes with --id: it chooses which of many series to plot")
    if data.csv and not data.target:
        raise UsageError(f"--target COL is required with --csv: which column of {data.csv!r} "
                         "to forecast")
    if data.time and data.time == data.target:
        raise UsageError(f"--time and --target both name column {data.time!r}: the time column "
                         "orders the rows and cannot be the series forecast")
    if command.model.strategy == "recursive" and data.features:
        raise UsageError("--strategy recursive feeds the forecast back as the next input, so it "
                         "needs the future of every feature too; use --strategy direct with "
                         "--features, or drop --features")
    model = replace(command.model, input_size=1 + len(data.features) + len(data.future_features),
                    future_size=len(data.future_features), horizon=data.horizon or 1)
    out = command.out or f"forecast-{data.dataset or Path(data.csv).stem}"
    return forecast.train(data, model, fit, out, overwrite=command.overwrite,
                          plot=command.plot, quiet=command.quiet,
                          plot_series=command.plot_series)


def run_memory(args: argparse.Namespace) -> int:
    from rnnkit.apps.memory.commands import memory
    from rnnkit.apps.memory.experiment import RunConfig

    # The command's own recurrent cell is a placeholder (--cells names them): its settings are
    # checked with each member cell, whose family decides what they may be (a backend, ...).
    command, _ = resolve_command(args, check=False)
    with usage_errors():
        for cell in command.cells:
            check_config(replace(command, recurrent=command.recurrent.with_cell(cell)))
    if printed_config(args, command):
        return 0
    if command.task is None:
        raise UsageError("give the TASK: adding or copy")
    base = RunConfig(task=command.task, length=command.lengths[0],
                     recurrent=command.recurrent.with_cell(command.cells[0]), loop=command.loop,
                     batch_size=command.batch_size, held_out=command.held_out)
    with usage_errors():  # each member cell's own rules (a projection needs hidden >= 2)
        for cell in command.cells:
            check_config(replace(base, recurrent=base.recurrent.with_cell(cell)))
    return memory(command.task, command.cells, command.lengths, command.seeds, base,
                  command.out, plot=command.plot, quiet=command.quiet, flow=command.flow)


def run_gradients(args: argparse.Namespace) -> int:
    from rnnkit.apps import gradients

    command, given = resolve_command(args)
    if printed_config(args, command):
        return 0
    if command.checkpoint:
        fresh = [leaf.label for leaf in leaves(GradientsCommand)
                 if leaf.dotted in FRESH and leaf.dotted in given]
        if fresh:
            raise UsageError(f"{', '.join(fresh)} set up fresh layers and cannot change a "
                             "--checkpoint's trained stack; drop them")
        return gradients.gradients_of_checkpoint(
            command.checkpoint, command.text_file, command.corpus, command.length,
            command.samples, command.layer, command.out, plot=command.plot)
    if command.text_file or command.corpus or command.layer is not None:
        raise UsageError("a text (TEXT_FILE or --corpus) and --layer go with --checkpoint")
    return gradients.gradients_of_fresh_layers(
        command.cells, command.length, command.hidden, command.samples, command.input_size,
        command.spectral_radius, command.seed, command.out, plot=command.plot)


def run_demo(args: argparse.Namespace) -> int:
    from rnnkit.apps.lm.commands import demo

    command, _ = resolve_command(args)
    return 0 if printed_config(args, command) else demo(command.steps, command.out)


def run_export(args: argparse.Namespace) -> int:
    from rnnkit.apps.export import export_checkpoint

    command, _ = resolve_command(args)
    if printed_config(args, command):
        return 0
    if command.checkpoint is None or command.onnx is None:
        raise UsageError("give the CKPT to export and --onnx FILE to write")
    return export_checkpoint(command.checkpoint, command.onnx)


def run_bench(args: argparse.Namespace) -> int:
    command, _ = resolve_command(args)
    return 0 if printed_config(args, command) else bench.bench_command(command)


COMMANDS = {"lm": run_lm, "gradients": run_gradients, "memory": run_memory,
            "forecast": run_forecast, "demo": run_demo, "bench": run_bench,
            "export": run_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; every failure ends in one line on stderr and the exit
    code of `rnnkit.errors` (see ``rnnkit --help``), never a traceback for what is not a bug."""
    args = build_parser().parse_args(argv)
    name = f"rnnkit {args.command}"
    keep_freed_memory()  # this process is the command's: no page faults for memory it reuses
    try:
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
