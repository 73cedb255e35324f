"""`rnnkit export CKPT --onnx FILE`: a trained model as an ONNX file, checked against PyTorch.

The checkpoint's model (an `rnnkit lm` language model or an `rnnkit forecast` network) is built
in eval mode and exported by `rnnkit.export_onnx` with its sequence length and batch dynamic;
onnxruntime then runs the file on a random input of another length and batch than the traced
one, and the largest difference from PyTorch's output is printed (the command fails, exit 1,
above `TOLERANCE`).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rnnkit.apps.outputs import not_an_input, output_file
from rnnkit.apps.recurrent import FAMILIES, RecurrentConfig
from rnnkit.engine.onnx import INSTALL_HINT, export_onnx
from rnnkit.errors import EXIT_FAILURE
from rnnkit.training.checkpoint import WrongKind

REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
TOLERANCE = 1e-4  # float32 through different kernels; measured differences are about 1e-6
EXPORTABLE = ("lm", "forecast")
STATE_NAMES = {"lstm": ["h_n", "c_n"], "slstm": ["h_n", "c_n", "n_n", "m_n"]}
"""The ONNX outputs of a language model's final state, per family (others: ``h_n`` alone)."""


@dataclass
class ExportCommand:
    """`rnnkit export`: its options are generated from this dataclass (`rnnkit.configuration`)."""

    checkpoint: str | None = field(default=None, metadata={"positional": True,
                                                           "metavar": "CKPT"})
        # a checkpoint of `rnnkit lm train` or `rnnkit forecast train`
    onnx: str | None = field(default=None, metadata={"metavar": "FILE"})
        # the ONNX file to write


@dataclass
class ExportPlan:
    """What to trace and how to check it, for one checkpoint's model."""

    model: nn.Module  # in eval mode
    description: str  # for the report line
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple  # torch.export's, one entry per input
    example: Callable[[int, int], tuple[Tensor, ...]]  # (length, batch) -> inputs
    traced: tuple[int, int] = (8, 2)  # (length, batch) of the traced example
    checked: tuple[int, int] = (13, 3)  # another (length, batch), for the onnxruntime check


def plan_export(checkpoint: str) -> ExportPlan:
    """The model of an `rnnkit lm` or `rnnkit forecast` checkpoint, with its inputs' shapes;
    ``ValueError`` naming the file when it is neither or does not load."""
    from rnnkit.apps.forecast import commands as forecast
    from rnnkit.apps.lm import commands as lm

    length, batch = torch.export.Dim("length"), torch.export.Dim("batch")
    try:
        model, vocabulary, _ = lm.restore(checkpoint)
    except WrongKind as error:
        if error.found != "forecast":
            raise ValueError(
                f"checkpoint {checkpoint!r} was written by 'rnnkit {error.found}'; rnnkit export "
                f"reads the checkpoints of {' and '.join(f'rnnkit {k}' for k in EXPORTABLE)}"
            ) from None
    else:
        config = model.config.recurrent
        refuse_unexported(checkpoint, config)
        if config.backend == "torch.nn":
            raise ValueError(
                f"checkpoint {checkpoint!r} holds a torch.nn {config.cell.upper()} (backend "
                "'torch.nn', for comparisons), which torch's exporter ties to the traced length; "
                "rnnkit export exports models trained on an rnnkit backend")
        vocabulary_size = len(vocabulary)
        state = STATE_NAMES.get(config.family, ["h_n"])
        return ExportPlan(
            model.eval(),
            f"language model ({config.cell}, {config.num_layers} layer(s) of "
            f"{config.hidden_size}, vocabulary {vocabulary_size})",
            ["ids"], ["logits", *state], ({0: length, 1: batch},),
            lambda steps, rows: (torch.randint(vocabulary_size, (steps, rows)),))
    model, _, _ = forecast.restore(checkpoint)  # in eval mode
    config, recurrent = model.config, model.config.recurrent
    refuse_unexported(checkpoint, recurrent)
    # A recursive forecast slides the window by one step (window[:, 1:]), which torch.export
    # traces for windows of 3 steps or more; a network that corrects seasonal naive reads one
    # season back, so its window holds a season at least (traced and checked longer than that).
    # With known future features the window also holds the horizon's rows after the past.
    season, ahead = config.season or 0, config.horizon if config.future_size else 0
    length = torch.export.Dim("length", min=max(3, season) + ahead)
    return ExportPlan(
        model, f"forecaster ({recurrent.cell}, {recurrent.num_layers} layer(s) of "
        f"{recurrent.hidden_size}, "
        f"{config.strategy}, horizon {config.horizon}"
        + (f", {config.future_size} known future feature(s)" if ahead else "") + ")",
        ["window"], ["forecast"], ({0: batch, 1: length},),
        lambda steps, rows: (torch.randn(rows, steps, config.input_size),),
        traced=(max(8, season + 2) + ahead, 2), checked=(max(13, season + 7) + ahead, 3))


def refuse_unexported(checkpoint: str, recurrent: RecurrentConfig) -> None:
    """``ValueError`` for a checkpoint whose layer family `rnnkit.export_onnx` does not export."""
    if not FAMILIES[recurrent.family].exports:
        exported = ", ".join(name for name, family in FAMILIES.items() if family.exports)
        raise ValueError(f"checkpoint {checkpoint!r} holds a {recurrent.cell} stack, which "
                         f"rnnkit export does not write to ONNX yet (it exports {exported})")


def missing_packages() -> list[str]:
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def recurrent_nodes(path: str) -> dict[str, int]:
    """How many ONNX recurrent nodes (LSTM, GRU, RNN) and Scan loops the file's graph holds."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        if node.op_type in ("LSTM", "GRU", "RNN", "Scan"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def onnxruntime_differences(path: str, plan: ExportPlan, inputs: tuple[Tensor, ...]
                            ) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| per output of the model on ``inputs``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(plan.input_names, inputs, strict=True)}
    results = session.run(plan.output_names, feeds)
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(plan.model(*inputs))
    return {name: float(abs(torch.from_numpy(result) - value).max())
            for name, result, value in zip(plan.output_names, results, expected, strict=True)}


def export_checkpoint(checkpoint: str, onnx_path: str) -> int:
    """Export ``checkpoint``'s model to ``onnx_path`` and check it with onnxruntime."""
    output_file(onnx_path, "--onnx")  # before the checkpoint is read
    not_an_input(onnx_path, "--onnx", {"CKPT": checkpoint})
    missing = missing_packages()
    if missing:
        print(f"rnnkit export: error: ONNX export needs {', '.join(missing)}, not installed; "
              f"install the onnx extra: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_FAILURE
    plan = plan_export(checkpoint)
    torch.manual_seed(0)  # the same random inputs on every run
    export_onnx(plan.model, plan.example(*plan.traced), onnx_path,
                dynamic_shapes=plan.dynamic_shapes, input_names=plan.input_names,
                output_names=plan.output_names)
    nodes = ", ".join(f"{count} {op}" for op, count in recurrent_nodes(onnx_path).items())
    print(f"wrote {onnx_path}: {plan.description}; recurrent layers as ONNX {nodes}; inputs "
          f"{', '.join(plan.input_names)} with dynamic length and batch")
    steps, rows = plan.checked
    differences = onnxruntime_differences(onnx_path, plan, plan.example(steps, rows))
    worst = max(differences.values())
    print(f"onnxruntime check at length {steps}, batch {rows} (traced at length "
          f"{plan.traced[0]}, batch {plan.traced[1]}): max |onnxruntime - torch| = "
          + ", ".join(f"{value:.2e} ({name})" for name, value in differences.items()))
    if not worst <= TOLERANCE:  # also a NaN
        print(f"rnnkit export: error: onnxruntime differs from PyTorch by {worst:.2e}, more than "
              f"{TOLERANCE:.0e}; the file {onnx_path!r} is not a faithful export",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0
