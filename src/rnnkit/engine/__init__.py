"""How a layer runs: the one seam between sequence layers and the engines that execute them.

Layers call `run_direction` for each layer and direction of a stack, naming a backend:

- ``"reference"``: the readable per-step loop on autograd (`reference.py`); the spec every other
  backend is tested against.
- ``"fused"``: one autograd.Function per family with a hand-derived backward (`fused.py`); pure
  PyTorch, any device, every variant.
- ``"auto"``: the fastest correct backend for the configuration. Policy today: ``"fused"`` for
  every configuration and device (it covers all variants and is never slower than the reference).

The environment variable ``RNNKIT_BACKEND`` forces one backend for every layer (for testing and
benchmarking without touching code).
"""

from __future__ import annotations

import os

from torch import Tensor

from rnnkit._checks import require_choice
from rnnkit.cells import CellKind, CellWeights, State
from rnnkit.engine import fused, reference

BACKENDS = ("auto", "fused", "reference")
ENVIRONMENT_VARIABLE = "RNNKIT_BACKEND"


def resolve_backend(requested: str) -> str:
    """The backend that will run: ``RNNKIT_BACKEND`` if set, else ``requested``; never "auto"."""
    forced = os.environ.get(ENVIRONMENT_VARIABLE)
    if forced:
        requested = require_choice(f"environment variable {ENVIRONMENT_VARIABLE}", forced, BACKENDS)
    return "fused" if requested == "auto" else requested


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
    module = reference if resolve_backend(backend) == "reference" else fused
    return module.run_direction(kind, x, state, weights, lengths, reverse)


__all__ = ["BACKENDS", "resolve_backend", "run_direction"]
