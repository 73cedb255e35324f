"""PNGs of long-memory runs: learning curves against the baseline, gradient flow by distance,
and gate activations over one held-out sequence. matplotlib (Agg) is the optional `plot` extra.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from torch import Tensor

from rnnkit.training.plots import pyplot


def _grid(plt, panels: int, height: float = 3.6):
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, height), squeeze=False)
    return figure, axes[0]


def save_learning_curves(path: Path, runs: list, metric: str) -> None:
    """One panel per length: each cell's held-out metric by step (the mean over seeds, with the
    range shaded), the baseline dashed and a tenth of it dotted; log scale."""
    plt = pyplot()
    lengths = sorted({r.length for r in runs})
    figure, axes = _grid(plt, len(lengths))
    for axis, length in zip(axes, lengths, strict=True):
        group = [r for r in runs if r.length == length]
        for label in dict.fromkeys(f"{r.cell} ({r.init})" for r in group):
            curves = np.array([r.eval_metric for r in group if f"{r.cell} ({r.init})" == label])
            steps = next(r.eval_steps for r in group if f"{r.cell} ({r.init})" == label)
            line, = axis.plot(steps, curves.mean(0), label=label, linewidth=1.3)
            if len(curves) > 1:
                axis.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2,
                                  color=line.get_color())
        axis.axhline(group[0].baseline, color="black", linestyle="--", linewidth=1,
                     label="baseline")
        axis.axhline(group[0].baseline / 10, color="0.5", linestyle=":", linewidth=1,
                     label="baseline / 10")
        axis.set_yscale("log")
        axis.set_title(f"T = {length}")
        axis.set_xlabel("training step")
        axis.set_ylabel(f"held-out {metric}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_flow_plot(path: Path, panels: dict[str, dict[str, list[float]]],
                   title: str = "gradient flow") -> None:
    """One panel per key of ``panels``; in each, one line per label: ‖∂h_T/∂h_t‖ (mean over
    samples) against the distance T - t, log scale. Labels ending in "(init)" are dashed, and
    share their colour with the same cell's "(trained)" line."""
    plt = pyplot()
    figure, axes = _grid(plt, len(panels))
    palette = plt.get_cmap("tab10").colors
    for axis, (panel, lines) in zip(axes, panels.items(), strict=True):
        cells = list(dict.fromkeys(_cell_of(label) for label in lines))
        for label, values in lines.items():
            values = np.asarray(values, dtype=float)
            shown = np.where(values > 0, values, np.nan)  # log scale: exact zeros left out
            axis.plot(np.arange(len(values)), shown, label=label, linewidth=1.2,
                      color=palette[cells.index(_cell_of(label)) % len(palette)],
                      linestyle="--" if label.endswith("(init)") else "-")
        axis.set_yscale("log")
        axis.set_xlabel("distance T - t (steps)")
        axis.set_ylabel("‖∂h_T / ∂h_t‖_F")
        axis.set_title(textwrap.fill(f"{title}: {panel}", 60), fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cell_of(label: str) -> str:
    """The line's cell: its label without a trailing " (init)" or " (trained)"."""
    for suffix in (" (init)", " (trained)"):
        if label.endswith(suffix):
            return label[: -len(suffix)]
    return label


def save_gate_heatmaps(path: Path, panels: list[tuple[str, Tensor]], marks: list[int],
                       title: str) -> None:
    """One heatmap row per (label, gate values ``(T, H)``), units by time, values in [0, 1];
    ``marks`` are drawn as vertical lines (the positions the task asks to remember)."""
    plt = pyplot()
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 1.9 * len(panels) + 0.6),
                                squeeze=False)
    for axis, (label, values) in zip(axes[:, 0], panels, strict=True):
        image = axis.imshow(values.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                            interpolation="nearest")
        for mark in marks:
            axis.axvline(mark, color="red", linewidth=0.8)
        axis.set_ylabel(label, fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.02)
    axes[-1, 0].set_xlabel("time step (red: marked positions)")
    axes[0, 0].set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
