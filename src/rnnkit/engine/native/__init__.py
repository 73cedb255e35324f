"""The native engine: C++ CPU kernels for the time loops, compiled at first use and cached.

- `build.kernels()` compiles ``kernels.cpp`` with ``torch.utils.cpp_extension`` (once per machine)
  or returns ``None`` after one warning when that is impossible;
- `functions` wraps the kernels in one autograd.Function per family;
- `run_direction` is the engine seam's contract (`rnnkit.engine.reference.run_direction`); it
  runs the fused engine instead when the kernels are unavailable or the input is not theirs
  (`supports`: CPU tensors of float32 or float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engine import fused
from rnnkit.engine.native import build
from rnnkit.engine.native.functions import NativeGRU, NativeLSTM, NativeRNN
from rnnkit.engine.steps import CellKind, CellWeights, State

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def supports(x: Tensor) -> bool:
    """Whether the kernels handle this input's device and dtype (they may still be unbuilt)."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES


def available() -> bool:
    """Whether the kernels are built (building them now if this is the first ask)."""
    return build.kernels() is not None


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, State]:
    """Same contract as `rnnkit.engine.reference.run_direction`."""
    kernels = build.kernels() if supports(x) else None
    if kernels is None:
        return fused.run_direction(kind, x, state, weights, lengths, reverse)
    if lengths is not None:
        lengths = lengths.to(torch.int64).contiguous()
    w = weights
    if kind.family == "lstm":
        h0, c0 = state  # type: ignore[misc]
        output, h_n, c_n = _apply(
            NativeLSTM, kernels, x, h0, c0, lengths, reverse, w.weight_ih, w.weight_hh,
            w.bias_ih, w.bias_hh, w.weight_hr, w.weight_ch,
        )
        return output, (h_n, c_n)
    if kind.family == "gru":
        output, h_n = _apply(
            NativeGRU, kernels, x, state, lengths, reverse, kind.reset_after, w.weight_ih,
            w.weight_hh, w.bias_ih, w.bias_hh,
        )
        return output, h_n
    output, h_n = _apply(
        NativeRNN, kernels, x, state, lengths, reverse, kind.nonlinearity == "relu", w.weight_ih,
        w.weight_hh, w.bias_ih, w.bias_hh,
    )
    return output, h_n


class _NoBackward:
    """Stands in for autograd's context when nothing will be differentiated: keeps nothing."""

    def save_for_backward(self, *tensors) -> None:
        pass


def _apply(function: type[torch.autograd.Function], *arguments):
    """``function.apply``, or under ``no_grad`` its forward alone (no graph, nothing saved).

    Function.apply costs tens of microseconds, as much as a whole streamed step's kernels.
    """
    if torch.is_grad_enabled():
        return function.apply(*arguments)
    return function.forward(_NoBackward(), *arguments)


__all__ = ["SUPPORTED_DTYPES", "available", "run_direction", "supports"]
