"""The reference engine: a plain per-step loop on autograd, written to be read.

Every faster engine is tested against this one (outputs, final states and all gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engine.steps import CellKind, CellWeights, Masks, State, cell_step, output_of, zoneout


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
    masks: Masks | None = None,
) -> tuple[Tensor, State]:
    """Run one layer in one direction over a padded, time-major sequence.

    Args:
        kind: the cell family and its parameter-free switches.
        x: input ``(T, N, I)``.
        state: initial state, ``h (N, H_out)`` or ``(h (N, H_out), c (N, H))``.
        weights: the cell's parameters.
        lengths: ``(N,)`` int64 on ``x``'s device, each in ``[1, T]``, or ``None`` when every
            sequence has all ``T`` steps.
        reverse: run from the last valid step of each sequence to its first.
        masks: recurrent dropout and zoneout (`Masks`, drawn by the layer); None: neither.

    Returns:
        ``output (T, N, H_out)``, zero at ``t >= lengths[n]``, and the final state, taken
        after each sequence's own last step (or, reversed, after its step 0).
    """
    steps = x.shape[0]
    outputs: list[Tensor | None] = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    recurrent = None if masks is None else masks.recurrent
    for t in order:
        new_state = cell_step(kind, x[t], state, weights, recurrent)
        if masks is not None and (masks.zoneout_h is not None or masks.zoneout_c is not None):
            new_state = zoneout(new_state, state, *masks.zoneout_at(t))
        if lengths is not None:
            # Past a sequence's end the state is held, so going forward it stays at the value
            # after the last valid step, and going backward it stays at the initial state
            # until the last valid step is reached.
            valid = (lengths > t).unsqueeze(1)  # (N, 1)
            if isinstance(new_state, tuple):
                new_state = tuple(
                    torch.where(valid, new, old) for new, old in zip(new_state, state, strict=True)
                )
            else:
                new_state = torch.where(valid, new_state, state)
            outputs[t] = output_of(new_state).masked_fill(~valid, 0.0)
        else:
            outputs[t] = output_of(new_state)
        state = new_state
    if not outputs:  # no steps: an empty output, the state as it came in
        return x.new_zeros((0, *output_of(state).shape)), state
    return torch.stack(outputs), state  # type: ignore[arg-type]
