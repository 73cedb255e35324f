"""What `rnnkit gradients` does: gradient flow without training, on fresh layers or a trained
language model.

Fresh layers: for each cell, a one-layer network of ``hidden`` units reads ``samples`` random
sequences ``x_t ~ N(0, 1)`` of ``input_size`` features; with ``spectral_radius`` r, each square
``H x H`` gate block of ``W_hh`` is rescaled to spectral radius r first. For a tanh RNN,
``∂h_T/∂h_t = Π diag(1 - h_k²) W_hh``: below r = 1 the product vanishes geometrically with the
distance, above it can grow. An sLSTM's ``W_hh`` is one ``(4d, d)`` stack of gate blocks per
head: each block is rescaled the same way. A checkpoint of `rnnkit lm train` instead gives its
trained stack on real text: ``samples`` windows of ``length`` tokens, evenly spaced through the
text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rnnkit.apps.outputs import output_directory
from rnnkit.apps.recurrent import CELL_NAMES, RecurrentConfig, build_recurrent
from rnnkit.configuration import check_config
from rnnkit.diagnostics import gradient_flow
from rnnkit.engine.native import build
from rnnkit.errors import usage_errors

SHOWN_DISTANCES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def rescale_recurrent_weights(layer, radius: float) -> None:
    """Scale each square gate block of every ``weight_hh`` to spectral radius ``radius``:
    ``(G s, s)`` (torch.nn's layout) or, per head, ``(K, G d, d)`` (sLSTM's)."""
    with torch.no_grad():
        for name, weight in layer.named_parameters():
            if not name.startswith("weight_hh"):
                continue
            heads = weight if weight.dim() == 3 else weight[None]  # (K, G s, s)
            size = heads.shape[-1]
            if heads.shape[1] % size:
                continue
            for head in heads:
                for block in head.split(size):
                    current = torch.linalg.eigvals(block).abs().max()
                    if current > 0:
                        block.mul_(radius / current)


def cell_path(cell: str) -> str:
    """What `GradientFlow.c` is taken through for ``cell``'s family: the LSTM's ``c``, the
    sLSTM's normalised cell ``c/n`` (`rnnkit.diagnostics`)."""
    return "c/n" if CELL_NAMES[cell][0] == "slstm" else "c"


def fresh_flows(cells: list[str], length: int, hidden: int, samples: int, input_size: int,
                radius: float | None, seed: int) -> dict[str, list[float]]:
    """Mean flow by distance (index 0 = distance 0) per cell; LSTMs also through c, sLSTMs
    through c/n."""
    built = check_fresh_options(cells, hidden, radius)
    flows = {}
    for cell, config in built.items():
        torch.manual_seed(seed)
        layer = build_recurrent(config, input_size).double()
        if radius is not None:
            rescale_recurrent_weights(layer, radius)
        inputs = torch.randn(length, samples, input_size, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed))
        flow = gradient_flow(layer, inputs)
        flows[cell] = flow.h.mean(1).flip(0).tolist()
        if flow.c is not None:
            flows[f"{cell} (through {cell_path(cell)})"] = flow.c.mean(1).flip(0).tolist()
    return flows


def check_fresh_options(cells: list[str], hidden: int,
                        radius: float | None) -> dict[str, RecurrentConfig]:
    """The one-layer stack of each cell, every cell checked first; ``ValueError`` for a cell
    the other options cannot build."""
    if "lstm-projection" in cells and radius is not None:
        raise ValueError("lstm-projection has no square W_hh blocks for --spectral-radius to "
                         "rescale")
    configs = {cell: RecurrentConfig(cell, hidden_size=hidden) for cell in cells}
    for config in configs.values():
        check_config(config)
        if radius is not None and not _has_recurrent_weights(config):
            raise ValueError(f"--spectral-radius rescales W_hh, which --cell {config.cell} does "
                             "not have (its gates read x only)")
    return configs


def _has_recurrent_weights(config: RecurrentConfig) -> bool:
    """Whether ``config``'s layer has a ``weight_hh`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        layer = build_recurrent(config, 1)
    return any(name.startswith("weight_hh") for name, _ in layer.named_parameters())


def checkpoint_flows(checkpoint: str, text_file: str | None, corpus: str | None, length: int,
                     samples: int, layer_index: int | None) -> tuple[dict[str, list[float]], str]:
    """Mean flow by distance of a trained language model's stack over windows of real text."""
    from rnnkit.apps.lm.commands import load_text, restore

    model, vocabulary, _ = restore(checkpoint)
    recurrent = model.config.recurrent
    if recurrent.backend == "torch.nn":
        raise ValueError(f"checkpoint {checkpoint!r} runs on torch.nn layers; gradient flow "
                         "reads rnnkit layers")
    layers = recurrent.num_layers
    if layer_index is not None and not 0 <= layer_index < layers:
        raise ValueError(f"--layer must be in [0, {layers - 1}] for the {layers}-layer stack of "
                         f"{checkpoint!r}, got {layer_index}")
    text, source = load_text(text_file, corpus)
    ids, _ = vocabulary.encode(text)
    if ids.numel() < length:
        raise ValueError(f"{source} has {ids.numel()} tokens, fewer than --length {length}")
    starts = torch.linspace(0, ids.numel() - length, samples).long()
    windows = torch.stack([ids[s : s + length] for s in starts], dim=1)  # (T, N)
    model.eval()
    with torch.no_grad():
        embedded = model.embedding(windows)
    flow = gradient_flow(model.recurrent, embedded, layer_index=layer_index)
    cell = recurrent.family
    index = layers - 1 if layer_index is None else layer_index
    label = f"{cell} layer {index} (trained)"
    flows = {label: flow.h.mean(1).flip(0).tolist()}
    if flow.c is not None:
        flows[f"{cell} layer {index} (trained, through {cell_path(recurrent.cell)})"] = \
            flow.c.mean(1).flip(0).tolist()
    return flows, f"{checkpoint} on {source}"


def format_flows(flows: dict[str, list[float]]) -> str:
    longest = max(len(v) for v in flows.values())
    distances = [0, *[d for d in SHOWN_DISTANCES if d < longest]]
    width = max(len(k) for k in flows) + 2
    lines = [f"{'mean ‖∂h_T/∂h_t‖ at distance':<{width}}" + "".join(f"{d:>10}" for d in distances)]
    for label, values in flows.items():
        lines.append(f"{label:<{width}}" + "".join(
            f"{values[d]:>10.3g}" if d < len(values) else f"{'':>10}" for d in distances))
    return "\n".join(lines)


def gradients_of_fresh_layers(cells: list[str], length: int, hidden: int, samples: int,
                              input_size: int, radius: float | None, seed: int, out: str,
                              plot: bool = True) -> int:
    """`rnnkit gradients` without a checkpoint: fresh layers, table, JSON and PNG in ``out``."""
    with usage_errors():  # the command line's options alone decide these
        check_fresh_options(cells, hidden, radius)
    out_dir = output_directory(out)
    build.kernels()
    flows = fresh_flows(cells, length, hidden, samples, input_size, radius, seed)
    described = (f"fresh layers, hidden {hidden}, T = {length}, {samples} random sequences"
                 + (f", W_hh gate blocks at spectral radius {radius}" if radius else ""))
    return report(flows, described, out_dir, plot)


def gradients_of_checkpoint(checkpoint: str, text_file: str | None, corpus: str | None,
                            length: int, samples: int, layer_index: int | None, out: str,
                            plot: bool = True) -> int:
    """`rnnkit gradients --checkpoint`: a trained language model's stack on real text."""
    out_dir = output_directory(out)
    build.kernels()
    flows, described = checkpoint_flows(checkpoint, text_file, corpus, length, samples,
                                        layer_index)
    return report(flows, described, out_dir, plot)


def report(flows: dict[str, list[float]], described: str, out_dir: Path,
           plot: bool = True) -> int:
    """Print the flows by distance; write gradient_flow.json (and .png) into ``out_dir``."""
    print(f"gradient flow: {described}")
    print(format_flows(flows))
    (out_dir / "gradient_flow.json").write_text(
        json.dumps({"source": described, "flow_by_distance": flows}, indent=1) + "\n",
        encoding="utf-8")
    written = [out_dir / "gradient_flow.json"]
    if plot:
        from rnnkit.apps.memory.plots import save_flow_plot
        from rnnkit.training.plots import MissingPlotting

        try:
            save_flow_plot(out_dir / "gradient_flow.png", {described: flows})
            written.append(out_dir / "gradient_flow.png")
        except MissingPlotting as error:
            print(f"note: {error}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    return 0
