"""How a layer runs: the one seam between sequence layers and the engines that execute them.

Layers call `run_direction` for each layer and direction of a stack, naming a backend:

- ``"reference"``: the readable per-step loop on autograd (`reference.py`); the spec every other
  backend is tested against.
- ``"fused"``: one autograd.Function per family with a hand-derived backward (`fused.py`); pure
  PyTorch, any device, every variant.
- ``"native"``: the same derivation with the time loops in C++ (`native/`), compiled at first use
  and cached; CPU tensors of float32 or float64. Elsewhere, or when the kernels cannot be built
  (one warning), it runs ``"fused"``.
- ``"auto"`` (default): the fastest correct backend for the input. Policy: ``"native"`` for CPU
  float32/float64 input (every variant; it is the fastest there, see docs/benchmarks.md), else
  ``"fused"`` (other devices and dtypes).

The environment variable ``RNNKIT_BACKEND`` forces one backend for every layer (for testing and
benchmarking without touching code).

An input without elements (an empty batch) runs ``"reference"`` whatever the backend: there is
nothing to compute, so it costs nothing, and autograd gives torch.nn's shapes and zero gradients,
where the fast engines' products over all rows would reshape empty tensors.
"""

from __future__ import annotations

import os

from torch import Tensor

from rnnkit._checks import require_choice
from rnnkit.cells import CellKind, CellWeights, State
from rnnkit.engine import fused, native, onnx, reference
from rnnkit.engine.onnx import is_exporting

BACKENDS = ("auto", "native", "fused", "reference")
ENVIRONMENT_VARIABLE = "RNNKIT_BACKEND"
_ENGINES = {"auto": native, "native": native, "fused": fused, "reference": reference}


def resolve_backend(requested: str) -> str:
    """The backend asked for: ``RNNKIT_BACKEND`` if set, else ``requested``.

    "auto" stays "auto" here: what it runs depends on the input (see `run_direction`).
    """
    forced = os.environ.get(ENVIRONMENT_VARIABLE)
    if forced:
        requested = require_choice(f"environment variable {ENVIRONMENT_VARIABLE}", forced, BACKENDS)
    return requested


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
    backend: str = "auto",
) -> tuple[Tensor, State]:
    """Run one layer in one direction; the contract is `reference.run_direction`'s."""
    if is_exporting():  # a tracer cannot see into the engines' kernels: see engine/onnx.py
        return onnx.run_direction(kind, x, state, weights, lengths, reverse)
    # native runs fused by itself where it cannot run (device, dtype, no compiler).
    module = _ENGINES[resolve_backend(backend)] if x.numel() else reference
    return module.run_direction(kind, x, state, weights, lengths, reverse)


__all__ = ["BACKENDS", "is_exporting", "resolve_backend", "run_direction"]
