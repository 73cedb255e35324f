"""What `rnnkit memory adding|copy` does: train every cell x length (x seed), then the table,
results.json, results.csv and the PNGs."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from rnnkit.apps.memory.experiment import RunConfig, RunResult, check_run_config, metric_name, run
from rnnkit.apps.outputs import output_directory
from rnnkit.diagnostics import diagnosable
from rnnkit.engine.native import build
from rnnkit.errors import usage_errors
from rnnkit.training.metrics import MetricsLog

# The gates of each family in the heatmaps: what decides how long the state is kept. minLSTM's
# i' is 1 - f', so f' alone says it. sLSTM: its stabilised factors f', i' (in [0, 1], what
# carries c and n) and the write weight i'/n of its normalised cell (`rnnkit.diagnostics`).
GATES_SHOWN = {"lstm": ("f", "i"), "gru": ("z",), "rnn": (), "mingru": ("z",),
               "minlstm": ("f'",), "slstm": ("f'", "i'", "i'/n")}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def format_table(runs: list[RunResult], task: str) -> str:
    """One row per cell x length x init, over seeds: mean ± standard deviation (range)."""
    header = (f"{'cell':<18}{'T':>5}  {'init':<8}{'seeds':>6}  {'final ' + metric_name(task):<44}"
              f"{'baseline':>9}  {'first step < baseline/10':<26}{'seconds':>8}")
    lines = [header, "-" * len(header)]
    groups: dict[tuple, list[RunResult]] = {}
    for result in runs:
        groups.setdefault((result.cell, result.length, result.init), []).append(result)
    for (cell, length, init), group in groups.items():
        reached = [r.first_step_below_tenth for r in group if r.first_step_below_tenth]
        first = (f"{len(reached)}/{len(group)}: " + ", ".join(map(str, reached))
                 if reached else f"0/{len(group)}: never")
        lines.append(
            f"{cell:<18}{length:>5}  {init:<8}{len(group):>6}  "
            f"{_spread([r.final_metric for r in group]):<44}{group[0].baseline:>9.4f}  "
            f"{first:<26}{statistics.fmean(r.seconds for r in group):>8.1f}")
    return "\n".join(lines)


def gate_panels(model, held_out, length: int, cell: str) -> tuple[list, list[int]]:
    """Heatmap panels (label, (T, H)) of one held-out sequence and its marked positions."""
    from rnnkit.diagnostics import gate_trace

    inputs = held_out[0][:, :1]
    trace = gate_trace(model.recurrent, model.encode(inputs))
    panels = [(f"{cell} T={length}: {name}", trace.gate(name)[:, 0])
              for name in GATES_SHOWN[trace.family]]
    if model.task == "adding":
        marks = torch.nonzero(inputs[:, 0, 1]).flatten().tolist()
    else:  # the ten symbols to copy and the delimiter that asks for them
        marks = [*range(10), length + 9]
    return panels, marks


def _class_name(module) -> str:
    """``torch.nn.LSTM``, ``rnnkit.MinGRU``: the module's class as its users name it."""
    package = type(module).__module__.split(".")[0]
    return f"{'torch.nn' if package == 'torch' else package}.{type(module).__name__}"


def memory(task: str, cells: list[str], lengths: list[int], seeds: list[int], base: RunConfig,
           out: str, plot: bool = True, quiet: bool = False, flow: bool = True) -> int:
    """`rnnkit memory`: train every cell x length x seed, then the table, results and plots;
    ``flow`` False skips the gradient flow (`experiment.run`), which at long T costs more than
    the training."""
    configs = [replace(base, task=task, length=length, recurrent=base.recurrent.with_cell(cell),
                       loop=replace(base.loop, seed=seed))
               for length in lengths for cell in cells for seed in seeds]
    with usage_errors():  # the settings are the command line's: a bad one is a usage error
        for config in configs:
            check_run_config(config)  # every bad setting before any training
    out_dir = output_directory(out)
    build.kernels()  # compile once, before the clocks start
    recurrent, loop = base.recurrent, base.loop
    print(f"rnnkit memory {task}: cells {', '.join(cells)}; T = {', '.join(map(str, lengths))}; "
          f"seeds {', '.join(map(str, seeds))}; hidden {recurrent.hidden_size}, {loop.steps} "
          f"steps of batch {base.batch_size}, {loop.optimizer.capitalize()} lr {loop.lr}, "
          f"clipping: global norm {loop.clip_norm}, value {loop.clip_value}, tensor norm "
          f"{loop.clip_tensor_norm}; init {recurrent.init}"
          + (f", LSTM forget bias {recurrent.forget_bias}" if recurrent.forget_bias else ""),
          flush=True)
    runs: list[RunResult] = []
    gate_figures: list = []
    marks_by_length: dict[int, list[int]] = {}
    log = MetricsLog(out_dir / "metrics.jsonl")  # one file, each record naming its run
    for config in configs:
        result, model, held_out = run(
            config, flow=flow, quiet=quiet, metrics=log,
            metrics_fields={"cell": config.cell, "length": config.length, "seed": config.seed})
        runs.append(result)
        print(f"{config.cell} T={config.length} seed {config.seed}: held-out "
              f"{metric_name(task)} {result.final_metric:.4f} (baseline {result.baseline:.4f})"
              f" in {result.seconds:.1f} s", flush=True)
        if not diagnosable(model.recurrent):
            if config.seed == seeds[0]:
                print(f"note: {config.cell} runs on {_class_name(model.recurrent)}, which "
                      "rnnkit.diagnostics does not read (it reads rnnkit's RNN, LSTM, GRU, "
                      "MinGRU, MinLSTM and SLSTM): no gradient flow or gate heatmaps for it",
                      flush=True)
        elif config.seed == seeds[0]:
            panels, marks = gate_panels(model, held_out, config.length, config.cell)
            gate_figures += [(config.length, panel) for panel in panels]
            marks_by_length[config.length] = marks
    log.close()
    print()
    print(format_table(runs, task))
    (out_dir / "results.json").write_text(json.dumps(
        {"task": task, "metric": metric_name(task),
         "settings": _shared_settings(base, task, cells, lengths, seeds),
         "runs": [asdict(r) for r in runs]}, indent=1) + "\n", encoding="utf-8")
    pd.DataFrame([r.summary() for r in runs]).to_csv(out_dir / "results.csv", index=False)
    written = [out_dir / "results.json", out_dir / "results.csv", out_dir / "metrics.jsonl"]
    if plot:
        written += _plots(out_dir, runs, task, seeds[0], gate_figures, marks_by_length)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _shared_settings(base: RunConfig, task: str, cells: list[str], lengths: list[int],
                     seeds: list[int]) -> dict:
    """The command's settings for results.json: what every run shares, and the cells, lengths
    and seeds compared in place of one run's (each run records its own in ``runs``)."""
    settings = {**base.settings(), "task": task}
    for one_run in ("cell", "length", "seed"):
        settings.pop(one_run, None)
    return {**settings, "cells": cells, "lengths": lengths, "seeds": seeds}


def _plots(out_dir: Path, runs: list[RunResult], task: str, first_seed: int, gate_figures,
           marks_by_length) -> list[Path]:
    from rnnkit.apps.memory.plots import save_flow_plot, save_gate_heatmaps, save_learning_curves
    from rnnkit.training.plots import MissingPlotting

    written = []
    try:
        save_learning_curves(out_dir / "learning_curves.png", runs, metric_name(task))
        panels = {}
        for result in (r for r in runs if r.seed == first_seed and r.flow_initial):
            lines = panels.setdefault(f"T = {result.length}", {})
            lines[f"{result.cell} (init)"] = result.flow_initial
            lines[f"{result.cell} (trained)"] = result.flow_trained
        written.append(out_dir / "learning_curves.png")
        if panels:
            save_flow_plot(out_dir / "gradient_flow.png", panels,
                           f"gradient flow, seed {first_seed}")
            written.append(out_dir / "gradient_flow.png")
        for length, marks in marks_by_length.items():
            shown = [panel for panel_length, panel in gate_figures if panel_length == length]
            if shown:
                path = out_dir / f"gates_T{length}.png"
                save_gate_heatmaps(path, shown, marks,
                                   f"{task}, T = {length}: gates over one held-out sequence "
                                   "after training")
                written.append(path)
    except MissingPlotting as error:
        print(f"note: {error}", file=sys.stderr)
    return written
