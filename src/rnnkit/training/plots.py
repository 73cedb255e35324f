"""Plots of training runs (PNG), with matplotlib's Agg backend; matplotlib is optional."""

from __future__ import annotations

from pathlib import Path


class MissingPlotting(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or MissingPlotting with the install hint."""
    try:
        import matplotlib
    except ImportError:
        raise MissingPlotting(
            "plots need matplotlib: pip install 'rnnkit[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_curves(path: str | Path, history) -> None:
    """Training loss per step and validation loss at its steps, one plot, nats per token."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(range(1, len(history.train) + 1), history.train, label="train", linewidth=0.8)
    axes.plot(history.validation_steps, history.validation, "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
