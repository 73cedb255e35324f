"""What the fused and native engines share outside their time loops: the products over all steps.

Both engines compute the input projection of every step before the loop, and every weight
gradient after it, each as one matrix product over all ``T * N`` rows instead of one per step
(gradients of rows past a sequence's end are zero, so they add nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor


def summed_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """Both biases added once, where they enter the same pre-activation (either may be None)."""
    if b_ih is None or b_hh is None:
        return b_ih if b_hh is None else b_hh
    return b_ih + b_hh


def outer_sum(d_pre: Tensor, inputs: Tensor) -> Tensor:
    """sum over t and n of d_pre[t, n]^T inputs[t, n]: one (G*H, T*N) x (T*N, K) product."""
    return d_pre.flatten(0, 1).t() @ inputs.flatten(0, 1)


def input_side_grads(ctx, d_pre: Tensor, x: Tensor, w_ih: Tensor, x_index: int, w_index: int):
    """d x = dG W_ih and d W_ih = dG^T x, each one product over all steps (if needed).

    ``x_index`` and ``w_index`` are the positions of ``x`` and ``W_ih`` among the arguments of
    the autograd.Function's forward (``ctx.needs_input_grad``).
    """
    # Shapes by flatten/unflatten, never a -1: with T * N = 0 (an empty batch) a -1 is ambiguous;
    # the products are then empty (d x) or zero (d W_ih), as torch.nn's gradients are.
    steps, batch = d_pre.shape[:2]
    flat = d_pre.flatten(0, 1)  # (T*N, G)
    d_x = (flat @ w_ih).unflatten(0, (steps, batch)) if ctx.needs_input_grad[x_index] else None
    d_w_ih = flat.t() @ x.flatten(0, 1) if ctx.needs_input_grad[w_index] else None
    return d_x, d_w_ih


def peephole_grad(d_gates: Tensor, c_prev: Tensor, c_new: Tensor) -> Tensor:
    """Gradient of the peephole weights ``(3H,)`` (order i, f, o) from the LSTM gate gradients.

    ``i`` and ``f`` look at the previous cell, ``o`` at the new one:
    ``dp_i = Σ d_i ⊙ c_prev``, ``dp_f = Σ d_f ⊙ c_prev``, ``dp_o = Σ d_o ⊙ c_new`` over t and n.
    Shapes: ``d_gates (T, N, 4H)``, ``c_prev`` and ``c_new`` ``(T, N, H)``.
    """
    d_i, d_f, _, d_o = d_gates.split(c_prev.shape[2], dim=2)
    return torch.cat([(d_i * c_prev).sum((0, 1)), (d_f * c_prev).sum((0, 1)),
                      (d_o * c_new).sum((0, 1))])
