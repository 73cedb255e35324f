"""Autograd Functions around the native kernels: products over all steps here, time loops in C++.

Per layer and direction the forward is one ``F.linear`` (input projection of every step, biases
folded in) and one kernel call (the recurrent loop, `kernels.cpp`); the backward is one kernel
call (the reverse loop, giving the gate gradients of every step) and the weight gradients as one
product each over all steps (`rnnkit.engine.products`). The kernels keep states in a
``(T + 1, N, H)`` buffer in time order; `_entering` picks the ``(T, N, H)`` slice of the states
that enter each step, which the recurrent weight gradient multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.engine.products import input_side_grads, outer_sum, peephole_grad, summed_bias


def _entering(states: Tensor, reverse: bool) -> Tensor:
    """States entering each step t, ``(T, N, H)``, from the ``(T + 1, N, H)`` buffer."""
    return states[1:] if reverse else states[:-1]


def _final(states: Tensor, reverse: bool) -> Tensor:
    """The state after the last step run (step 0 when reversed), as a tensor of its own."""
    return (states[0] if reverse else states[-1]).clone()


# Up to this many rows (steps x batch), the input projection uses the kernels' own product:
# ATen's costs tens of microseconds at one row (a streamed step) with MKL on this CPU class.
SMALL_PROJECTION_ROWS = 16


def _project(kernels, x: Tensor, weight: Tensor, bias: Tensor | None,
             second_bias: Tensor | None = None) -> Tensor:
    """x W^T + b (+ b2) for every step at once, ``(T, N, I) -> (T, N, G)``, contiguous."""
    if x.shape[0] * x.shape[1] <= SMALL_PROJECTION_ROWS:
        return kernels.linear(x.contiguous(), weight.contiguous(), _contiguous(bias),
                              _contiguous(second_bias))
    return F.linear(x, weight, summed_bias(bias, second_bias)).contiguous()


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    """The kernels read raw pointers: every tensor reaching them is made contiguous here (a
    parameter may be an expanded or strided view), and they check it at their entry."""
    return None if tensor is None else tensor.contiguous()


class NativeRNN(torch.autograd.Function):
    """h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

    @staticmethod
    def forward(ctx, kernels, x, h0, lengths, reverse, relu, w_ih, w_hh, b_ih, b_hh):
        pre = _project(kernels, x, w_ih, b_ih, b_hh)  # (T, N, H)
        w_hh = w_hh.contiguous()  # saved as given to the kernel: the backward's kernel reads it
        output, states = kernels.rnn_forward(pre, h0.contiguous(), w_hh, lengths, reverse, relu)
        ctx.save_for_backward(x, w_ih, w_hh, pre, states, lengths)
        ctx.kernels, ctx.reverse, ctx.relu, ctx.has_bias = kernels, reverse, relu, b_ih is not None
        return output, _final(states, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n):
        x, w_ih, w_hh, raw, states, lengths = ctx.saved_tensors
        d_pre, d_h0 = ctx.kernels.rnn_backward(d_output.contiguous(), d_h_n.contiguous(), raw,
                                               w_hh, lengths, ctx.reverse, ctx.relu)
        d_x, d_w_ih = input_side_grads(ctx, d_pre, x, w_ih, 1, 6)
        d_w_hh = outer_sum(d_pre, _entering(states, ctx.reverse))
        d_b = d_pre.sum((0, 1)) if ctx.has_bias else None
        return None, d_x, d_h0, None, None, None, d_w_ih, d_w_hh, d_b, d_b


class NativeLSTM(torch.autograd.Function):
    """The spec's LSTM with optional peephole (w_ch) and projection (w_hr)."""

    @staticmethod
    def forward(ctx, kernels, x, h0, c0, lengths, reverse, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch):
        gates = _project(kernels, x, w_ih, b_ih, b_hh)  # (T, N, 4H)
        w_hh, w_hr, w_ch = w_hh.contiguous(), _contiguous(w_hr), _contiguous(w_ch)
        output, h_states, c_states, c_new = kernels.lstm_forward(
            gates, h0.contiguous(), c0.contiguous(), w_hh, w_hr, w_ch, lengths, reverse
        )
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, w_ch, gates, h_states, c_states, c_new,
                              lengths)
        ctx.kernels, ctx.reverse, ctx.has_bias = kernels, reverse, b_ih is not None
        return output, _final(h_states, reverse), _final(c_states, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n, d_c_n):
        (x, w_ih, w_hh, w_hr, w_ch, gates, h_states, c_states, c_new,
         lengths) = ctx.saved_tensors
        c_prev = _entering(c_states, ctx.reverse)
        d_gates, d_h0, d_c0, d_w_hr = ctx.kernels.lstm_backward(
            d_output.contiguous(), d_h_n.contiguous(), d_c_n.contiguous(), gates, c_states, c_new,
            w_hh, w_hr, w_ch, lengths, ctx.reverse,
        )
        d_x, d_w_ih = input_side_grads(ctx, d_gates, x, w_ih, 1, 6)
        d_w_hh = outer_sum(d_gates, _entering(h_states, ctx.reverse))
        d_b = d_gates.sum((0, 1)) if ctx.has_bias else None
        d_w_ch = peephole_grad(d_gates, c_prev, c_new) if w_ch is not None else None
        return (None, d_x, d_h0, d_c0, None, None, d_w_ih, d_w_hh, d_b, d_b,
                d_w_hr if w_hr is not None else None, d_w_ch)


class NativeGRU(torch.autograd.Function):
    """The spec's GRU, ``h' = n + z ⊙ (h - n)``, reset gate after or before W_hn."""

    @staticmethod
    def forward(ctx, kernels, x, h0, lengths, reverse, reset_after, w_ih, w_hh, b_ih, b_hh):
        # Reset before W_hn: every recurrent bias sits outside r's product and folds into b_ih.
        # Reset after: b_hn is multiplied by r, so the recurrent biases stay in the loop.
        gates = _project(kernels, x, w_ih, b_ih, None if reset_after else b_hh)
        w_hh = w_hh.contiguous()
        output, states, n_input = kernels.gru_forward(
            gates, h0.contiguous(), w_hh, _contiguous(b_hh) if reset_after else None, lengths,
            reverse, reset_after,
        )
        ctx.save_for_backward(x, w_ih, w_hh, gates, states, n_input, lengths)
        ctx.kernels, ctx.reverse, ctx.reset_after = kernels, reverse, reset_after
        ctx.has_bias = b_ih is not None
        return output, _final(states, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n):
        x, w_ih, w_hh, gates, states, n_input, lengths = ctx.saved_tensors
        hidden = states.shape[2]
        d_x_gates, d_hn, d_h0 = ctx.kernels.gru_backward(
            d_output.contiguous(), d_h_n.contiguous(), gates, states, n_input, w_hh, lengths,
            ctx.reverse, ctx.reset_after,
        )
        h_prev = _entering(states, ctx.reverse)
        d_x, d_w_ih = input_side_grads(ctx, d_x_gates, x, w_ih, 1, 6)
        d_rz = d_x_gates[:, :, : 2 * hidden]  # r and z: the same on both sides of the sums
        # n's recurrent side: r ⊙ dn multiplies W_hn h (reset after); dn multiplies W_hn (r ⊙ h).
        d_n_recurrent, n_recurrent_input = (
            (d_hn, h_prev) if ctx.reset_after else (d_x_gates[:, :, 2 * hidden :], n_input))
        d_w_hh = torch.cat([outer_sum(d_rz, h_prev),
                            outer_sum(d_n_recurrent, n_recurrent_input)])
        d_b_ih = d_x_gates.sum((0, 1)) if ctx.has_bias else None
        d_b_hh = (torch.cat([d_rz.sum((0, 1)), d_n_recurrent.sum((0, 1))])
                  if ctx.has_bias else None)
        return None, d_x, d_h0, None, None, None, d_w_ih, d_w_hh, d_b_ih, d_b_hh
