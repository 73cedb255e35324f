"""What the fused and native engines share outside their time loops: the products over all steps.

Both engines compute the input projection of every step before the loop, and every weight
gradient after it, each as one matrix product over all ``T * N`` rows instead of one per step
(gradients of rows past a sequence's end are zero, so they add nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEW_COLUMNS = range(2, 12)
"""For an ``inputs`` of 2 to 11 columns, the weight gradient ``d^T inputs`` (``(G, K)`` summed
over all ``R = T * N`` rows) is computed as ``(inputs^T d)^T``: the same sums, but MKL's product
of a transposed ``(G, R)`` by an ``(R, K)`` with ``K`` this small ran 2.5-25x slower than the
other orientation (AMD EPYC VM, 1 and 2 threads, R = 2000 and 50,000, G = 32-2048: at K = 4,
G = 2048, R = 50,000 1.59 s against 0.085 s on one thread). At K = 1 the two were level in bulk
(0.2-1.2x), from K = 12 level or the other way (0.46-1.5x):
`benchmarks/weight_product_orientation.py`, docs/benchmarks.md, issue 19's tenth part. A
recurrent model's input is often this narrow (a few series, the adding problem's two
features)."""


def weight_product(d_rows: Tensor, inputs: Tensor) -> Tensor:
    """``d_rows^T inputs`` for ``d_rows (R, G)`` and ``inputs (R, K)``: ``(G, K)``, contiguous
    (`FEW_COLUMNS` for why the orientation depends on ``K``)."""
    if inputs.shape[1] in FEW_COLUMNS:
        return (inputs.t() @ d_rows).t().contiguous()
    return d_rows.t() @ inputs


def project_all_steps(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x (..., K)`` on autograd, with a narrow input
    (``K`` in `FEW_COLUMNS`) through a row-major copy of ``W^T`` (``K x G``, a few values): autograd
    then computes the weight's gradient as ``x^T d``, `weight_product`'s fast orientation, where
    for ``F.linear`` it computes ``d^T x``. The same sums either way."""
    if torch.jit.is_tracing():  # a traced graph keeps F.linear (shapes are traced values there)
        return F.linear(x, weight, bias)
    columns = weight.shape[1]
    if columns not in FEW_COLUMNS or x.dim() < 2:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, columns)  # (R, K); R = 0 is fine with K >= 2
    # W^T through a flat view: the backward of viewing the flat W as (G, K) reshapes the
    # transposed gradient to 1-D, which copies it, so W's gradient comes back contiguous (as
    # F.linear's), not as the transposed view `weight.t()` alone would pass back.
    w_t = weight.reshape(-1).view(weight.shape).t().contiguous()
    out = rows @ w_t if bias is None else torch.addmm(bias, rows, w_t)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def summed_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """Both biases added once, where they enter the same pre-activation (either may be None)."""
    if b_ih is None or b_hh is None:
        return b_ih if b_hh is None else b_hh
    return b_ih + b_hh


def outer_sum(d_pre: Tensor, inputs: Tensor) -> Tensor:
    """sum over t and n of d_pre[t, n]^T inputs[t, n]: one (G*H, T*N) x (T*N, K) product."""
    return weight_product(d_pre.flatten(0, 1), inputs.flatten(0, 1))


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
    d_w_ih = weight_product(flat, x.flatten(0, 1)) if ctx.needs_input_grad[w_index] else None
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
