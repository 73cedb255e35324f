"""The fused engine: one ``torch.autograd.Function`` per cell family with a hand-derived backward.

Pure PyTorch ops, so it runs on any device. Per layer and direction:

- forward: the input projection of all steps is one matrix product ``x W_ih^T + b``
  ``(T, N, G*H)``; the recurrent loop does one ``addmm`` and in-place gate math per step, writing
  into preallocated buffers that the backward reads;
- backward: a reverse loop computes the gate gradients ``dG (T, N, G*H)`` with one ``mm`` per
  step for ``dh_{t-1} = dG_t W_hh``; every weight gradient is then one product over all steps,
  ``dW_ih = dG^T x``, ``dW_hh = dG^T h_prev``, instead of one per step.

Lengths: a step past a sequence's end keeps the state (``where(valid, new, old)``) and outputs
zero; in the backward the same ``where`` routes the gradient around the skipped step. Notation
in comments follows the spec: ``i, f, g, o`` (LSTM), ``r, z, n`` (GRU), ``*_pre`` for a gate's
gradient before its nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.engine.products import input_side_grads, outer_sum, peephole_grad, summed_bias
from rnnkit.engine.steps import CellKind, CellWeights, State


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, State]:
    """Same contract as `rnnkit.engine.reference.run_direction`."""
    valid = None
    if lengths is not None:
        steps = torch.arange(x.shape[0], device=x.device)
        valid = (steps.unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)  # (T, N, 1) bool
    w = weights
    if kind.family == "lstm":
        h0, c0 = state  # type: ignore[misc]
        output, h_n, c_n = FusedLSTM.apply(
            x, h0, c0, valid, reverse, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh,
            w.weight_hr, w.weight_ch,
        )
        return output, (h_n, c_n)
    if kind.family == "gru":
        output, h_n = FusedGRU.apply(
            x, state, valid, reverse, kind.reset_after, w.weight_ih, w.weight_hh, w.bias_ih,
            w.bias_hh,
        )
        return output, h_n
    output, h_n = FusedRNN.apply(
        x, state, valid, reverse, kind.nonlinearity == "relu", w.weight_ih, w.weight_hh,
        w.bias_ih, w.bias_hh,
    )
    return output, h_n


# ---- pieces every family shares --------------------------------------------------------------

def _time_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _keep(valid_t: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """State after a step: the new one where the step is valid, the old one elsewhere."""
    return new if valid_t is None else torch.where(valid_t, new, old)


def _step_output_grad(valid_t: Tensor | None, d_state: Tensor, d_output_t: Tensor):
    """Gradient reaching a step's raw new ``h``, and the part that skips the step (masked rows)."""
    total = d_state + d_output_t
    if valid_t is None:
        return total, None
    return torch.where(valid_t, total, 0.0), torch.where(valid_t, 0.0, d_state)


def _rejoin(valid_t: Tensor | None, through_step: Tensor, skipped: Tensor | None) -> Tensor:
    return through_step if valid_t is None else torch.where(valid_t, through_step, skipped)


# ---- Elman RNN -----------------------------------------------------------------------------

class FusedRNN(torch.autograd.Function):
    """h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

    @staticmethod
    def forward(ctx, x, h0, valid, reverse, relu, w_ih, w_hh, b_ih, b_hh):
        steps = x.shape[0]
        pre_x = F.linear(x, w_ih, summed_bias(b_ih, b_hh))  # (T, N, H)
        w_hh_t = w_hh.t()
        raw = torch.empty_like(pre_x)  # (T, N, H): act(...) of each step, before masking
        h_prev = torch.empty_like(pre_x)  # (T, N, H): state entering each step
        output = torch.empty_like(pre_x)
        h = h0
        for t in _time_order(steps, reverse):
            h_prev[t] = h
            h_t = torch.addmm(pre_x[t], h, w_hh_t, out=raw[t])
            if relu:
                h_t.relu_()
            else:
                h_t.tanh_()
            valid_t = None if valid is None else valid[t]
            h = _keep(valid_t, h_t, h)
            output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
        ctx.save_for_backward(x, w_ih, w_hh, raw, h_prev, valid)
        ctx.relu, ctx.reverse, ctx.has_bias = relu, reverse, b_ih is not None
        return output, h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n):
        x, w_ih, w_hh, raw, h_prev, valid = ctx.saved_tensors
        d_pre = torch.empty_like(raw)  # (T, N, H)
        d_h = d_h_n
        for t in reversed(_time_order(x.shape[0], ctx.reverse)):
            valid_t = None if valid is None else valid[t]
            d_raw, d_skip = _step_output_grad(valid_t, d_h, d_output[t])
            h_t = raw[t]
            if ctx.relu:
                # Autograd's relu backward (threshold_backward): zero where the output is <= 0,
                # so a NaN output passes its gradient on, as torch.nn and the reference do.
                d_pre[t].copy_(d_raw).masked_fill_(h_t <= 0, 0.0)
            else:
                torch.mul(d_raw, 1 - h_t * h_t, out=d_pre[t])
            if valid_t is not None:
                d_pre[t].masked_fill_(~valid_t, 0.0)
            d_h = _rejoin(valid_t, d_pre[t] @ w_hh, d_skip)
        d_x, d_w_ih = input_side_grads(ctx, d_pre, x, w_ih, 0, 5)
        d_b = d_pre.sum((0, 1)) if ctx.has_bias else None
        return d_x, d_h, None, None, None, d_w_ih, outer_sum(d_pre, h_prev), d_b, d_b


# ---- LSTM ----------------------------------------------------------------------------------

class FusedLSTM(torch.autograd.Function):
    """The spec's LSTM with optional peephole (w_ch) and projection (w_hr)."""

    @staticmethod
    def forward(ctx, x, h0, c0, valid, reverse, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch):
        steps, batch = x.shape[:2]
        hidden = c0.shape[1]
        gates = F.linear(x, w_ih, summed_bias(b_ih, b_hh))  # (T, N, 4H), activated in place
        w_hh_t = w_hh.t()
        new_zeros = x.new_empty
        c_raw = new_zeros(steps, batch, hidden)  # (T, N, H): c' of each step before masking
        tanh_c = new_zeros(steps, batch, hidden)  # (T, N, H)
        c_prev = new_zeros(steps, batch, hidden)  # (T, N, H): cell entering each step
        h_prev = new_zeros(steps, batch, h0.shape[1])  # (T, N, H_out)
        output = new_zeros(steps, batch, h0.shape[1])  # (T, N, H_out)
        # With a projection, the unprojected m = o * tanh(c') is kept for dW_hr.
        m_all = new_zeros(steps, batch, hidden) if w_hr is not None else None  # (T, N, H)
        if w_ch is not None:
            p_i, p_f, p_o = w_ch.chunk(3)
        h, c = h0, c0
        for t in _time_order(steps, reverse):
            h_prev[t], c_prev[t] = h, c
            a = gates[t]  # (N, 4H)
            a.addmm_(h, w_hh_t)
            i, f, g, o = a.chunk(4, dim=1)
            if w_ch is not None:
                i.addcmul_(p_i, c)
                f.addcmul_(p_f, c)
            a[:, : 2 * hidden].sigmoid_()
            g.tanh_()
            c_t = torch.mul(f, c, out=c_raw[t]).addcmul_(i, g)
            if w_ch is not None:
                o.addcmul_(p_o, c_t)
            o.sigmoid_()
            m = torch.mul(o, torch.tanh(c_t, out=tanh_c[t]),
                          out=None if m_all is None else m_all[t])
            h_t = m if w_hr is None else m @ w_hr.t()
            valid_t = None if valid is None else valid[t]
            h, c = _keep(valid_t, h_t, h), _keep(valid_t, c_t, c)
            output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, w_ch, gates, c_raw, tanh_c, c_prev, h_prev,
                              m_all, valid)
        ctx.reverse, ctx.has_bias = reverse, b_ih is not None
        return output, h.clone(), c.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n, d_c_n):
        (x, w_ih, w_hh, w_hr, w_ch, gates, c_raw, tanh_c, c_prev, h_prev, m_all,
         valid) = ctx.saved_tensors
        d_gates = torch.empty_like(gates)  # (T, N, 4H): gradients before the nonlinearities
        d_h_raw_all = torch.empty_like(h_prev) if w_hr is not None else None  # (T, N, P)
        if w_ch is not None:
            p_i, p_f, p_o = w_ch.chunk(3)
        d_h, d_c = d_h_n, d_c_n
        for t in reversed(_time_order(x.shape[0], ctx.reverse)):
            valid_t = None if valid is None else valid[t]
            d_h_raw, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
            d_c_raw = d_c if valid_t is None else torch.where(valid_t, d_c, 0.0)
            i, f, g, o = gates[t].chunk(4, dim=1)
            d_i, d_f, d_g, d_o = d_gates[t].chunk(4, dim=1)
            if w_hr is not None:
                d_h_raw_all[t] = d_h_raw
                d_m = d_h_raw @ w_hr  # (N, H)
            else:
                d_m = d_h_raw
            tc = tanh_c[t]
            # o = σ(.): dσ = σ(1 - σ); tanh' = 1 - tanh²
            torch.mul(d_m * tc, o * (1 - o), out=d_o)
            d_c_t = d_c_raw + d_m * o * (1 - tc * tc)
            if w_ch is not None:
                d_c_t.addcmul_(d_o, p_o)
            torch.mul(d_c_t * g, i * (1 - i), out=d_i)
            torch.mul(d_c_t * c_prev[t], f * (1 - f), out=d_f)
            torch.mul(d_c_t * i, 1 - g * g, out=d_g)
            d_c_prev = d_c_t * f
            if w_ch is not None:
                d_c_prev.addcmul_(d_i, p_i).addcmul_(d_f, p_f)
            if valid_t is not None:
                # Rows past a sequence's end contribute nothing to the weight gradients.
                d_gates[t].masked_fill_(~valid_t, 0.0)
            d_h = _rejoin(valid_t, d_gates[t] @ w_hh, d_h_skip)
            d_c = _rejoin(valid_t, d_c_prev, d_c)
        d_x, d_w_ih = input_side_grads(ctx, d_gates, x, w_ih, 0, 5)
        d_b = d_gates.sum((0, 1)) if ctx.has_bias else None
        d_w_hr = outer_sum(d_h_raw_all, m_all) if w_hr is not None else None
        d_w_ch = peephole_grad(d_gates, c_prev, c_raw) if w_ch is not None else None
        return (d_x, d_h, d_c, None, None, d_w_ih, outer_sum(d_gates, h_prev), d_b, d_b,
                d_w_hr, d_w_ch)


# ---- GRU -----------------------------------------------------------------------------------

class FusedGRU(torch.autograd.Function):
    """The spec's GRU, ``h' = n + z ⊙ (h - n)``, reset gate after or before W_hn."""

    @staticmethod
    def forward(ctx, x, h0, valid, reverse, reset_after, w_ih, w_hh, b_ih, b_hh):
        steps, batch = x.shape[:2]
        hidden = h0.shape[1]
        has_bias = b_ih is not None
        # Reset before W_hn: every recurrent bias sits outside r's product and folds into b_ih.
        # Reset after: b_hn is multiplied by r, so the recurrent biases stay in the loop.
        gates = F.linear(x, w_ih, b_ih if reset_after else summed_bias(b_ih, b_hh))  # (T,N,3H)
        h_prev = torch.empty(steps, batch, hidden, dtype=x.dtype, device=x.device)
        output = torch.empty_like(h_prev)
        # reset_after: W_hn h + b_hn per step; reset before: r ⊙ h per step. Both (T, N, H).
        saved_n_input = torch.empty_like(h_prev)
        w_rz_t, w_n_t = w_hh[: 2 * hidden].t(), w_hh[2 * hidden :].t()
        h = h0
        for t in _time_order(steps, reverse):
            h_prev[t] = h
            a = gates[t]  # (N, 3H), becomes (r | z | n)
            rz, n = a[:, : 2 * hidden], a[:, 2 * hidden :]
            if reset_after:
                h_gates = F.linear(h, w_hh, b_hh)  # (N, 3H)
                rz.add_(h_gates[:, : 2 * hidden]).sigmoid_()
                saved_n_input[t] = h_gates[:, 2 * hidden :]
                n.addcmul_(rz[:, :hidden], saved_n_input[t]).tanh_()
            else:
                rz.addmm_(h, w_rz_t).sigmoid_()
                torch.mul(rz[:, :hidden], h, out=saved_n_input[t])
                n.addmm_(saved_n_input[t], w_n_t).tanh_()
            z = rz[:, hidden:]
            h_t = torch.addcmul(n, z, h - n)  # (1 - z) n + z h
            valid_t = None if valid is None else valid[t]
            h = _keep(valid_t, h_t, h)
            output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
        ctx.save_for_backward(x, w_ih, w_hh, gates, h_prev, saved_n_input, valid)
        ctx.reverse, ctx.reset_after, ctx.has_bias = reverse, reset_after, has_bias
        return output, h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, d_h_n):
        x, w_ih, w_hh, gates, h_prev, saved_n_input, valid = ctx.saved_tensors
        hidden = h_prev.shape[2]
        w_rz, w_n = w_hh[: 2 * hidden], w_hh[2 * hidden :]
        d_x_gates = torch.empty_like(gates)  # (T, N, 3H): gradient of the input-side sums
        # reset_after: the recurrent side's n gradient is r ⊙ dn_pre, so it needs its own buffer.
        d_h_gates = torch.empty_like(gates) if ctx.reset_after else d_x_gates
        d_h = d_h_n
        for t in reversed(_time_order(x.shape[0], ctx.reverse)):
            valid_t = None if valid is None else valid[t]
            d_h_raw, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
            r, z, n = gates[t].chunk(3, dim=1)
            d_r, d_z, d_n = d_x_gates[t].chunk(3, dim=1)
            h_old = h_prev[t]
            torch.mul(d_h_raw * (h_old - n), z * (1 - z), out=d_z)
            torch.mul(d_h_raw * (1 - z), 1 - n * n, out=d_n)
            d_h_old = d_h_raw * z
            if ctx.reset_after:
                torch.mul(d_n * saved_n_input[t], r * (1 - r), out=d_r)
                if valid_t is not None:
                    d_x_gates[t].masked_fill_(~valid_t, 0.0)
                d_hg = d_h_gates[t]
                d_hg[:, : 2 * hidden] = d_x_gates[t][:, : 2 * hidden]
                torch.mul(d_n, r, out=d_hg[:, 2 * hidden :])
                d_h_old.addmm_(d_hg, w_hh)
            else:
                d_rh = d_n @ w_n  # (N, H): gradient of r ⊙ h
                torch.mul(d_rh * h_old, r * (1 - r), out=d_r)
                if valid_t is not None:
                    d_x_gates[t].masked_fill_(~valid_t, 0.0)
                d_h_old.addcmul_(d_rh, r).addmm_(d_x_gates[t][:, : 2 * hidden], w_rz)
            d_h = _rejoin(valid_t, d_h_old, d_h_skip)
        d_x, d_w_ih = input_side_grads(ctx, d_x_gates, x, w_ih, 0, 5)
        if ctx.reset_after:
            d_w_hh = outer_sum(d_h_gates, h_prev)
        else:
            d_w_hh = torch.cat([outer_sum(d_x_gates[:, :, : 2 * hidden], h_prev),
                                outer_sum(d_x_gates[:, :, 2 * hidden :], saved_n_input)])
        d_b_ih = d_x_gates.sum((0, 1)) if ctx.has_bias else None
        d_b_hh = d_h_gates.sum((0, 1)) if ctx.has_bias else None
        return d_x, d_h, None, None, None, d_w_ih, d_w_hh, d_b_ih, d_b_hh
