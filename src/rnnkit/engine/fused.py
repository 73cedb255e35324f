"""The fused engine: the operators' portable implementation, pure PyTorch ops on any device.

`rnnkit.engine.ops` registers these functions as the ``rnnkit::fused_*`` operators, with the
autograd formula that joins each forward to its backward; here is only the math of the time
loops. Per layer and direction:

- forward (`rnn_forward`, `lstm_forward`, `gru_forward`): the input projection of all steps is
  one matrix product ``x W_ih^T + b`` ``(T, N, G*H)``; the recurrent loop does one ``addmm`` and
  in-place gate math per step, writing into preallocated buffers that the backward reads (each
  function returns them after the layer's outputs);
- backward (`rnn_backward`, ...): a reverse loop computes the gate gradients ``dG (T, N, G*H)``
  with one ``mm`` per step for ``dh_{t-1} = dG_t W_hh``; the weight gradients are then one
  product each over all steps (``dW_ih = dG^T x``, ``dW_hh = dG^T h_prev``), taken by the
  operators' autograd formula (`rnnkit.engine.ops`), not here.

Lengths: ``(N,)`` int64 or ``None``. A step past a sequence's end keeps the state
(``where(valid, new, old)``) and outputs zero; in the backward the same ``where`` routes the
gradient around the skipped step and the step's gate gradient is zero. Notation in comments
follows the spec: ``i, f, g, o`` (LSTM), ``r, z, n`` (GRU), ``*_pre`` for a gate's gradient
before its nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engine.products import summed_bias


def valid_steps(lengths: Tensor | None, steps: int) -> Tensor | None:
    """``(T, N, 1)`` bool: whether step t is within sequence n, or ``None`` without lengths."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths).unsqueeze(2)


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


def lstm_cell_update(a: Tensor, c: Tensor, peephole: tuple[Tensor, ...] | None, hidden: int,
                     c_out: Tensor) -> Tensor:
    """The LSTM's gates and new cell from the summed pre-activations ``a (N, 4H)``, in place:
    ``a`` becomes (i, f, g, o) activated, ``c' = f ⊙ c + i ⊙ g`` is written to ``c_out`` and
    returned; peepholes ``(p_i, p_f, p_o)`` see c (i, f) and c' (o)."""
    i, f, g, o = a.chunk(4, dim=1)
    if peephole is not None:
        i.addcmul_(peephole[0], c)
        f.addcmul_(peephole[1], c)
    a[:, : 2 * hidden].sigmoid_()
    g.tanh_()
    c_new = torch.mul(f, c, out=c_out).addcmul_(i, g)
    if peephole is not None:
        o.addcmul_(peephole[2], c_new)
    o.sigmoid_()
    return c_new


def lstm_cell_update_backward(d_c_new: Tensor, gates: Tensor, d_gates: Tensor, c: Tensor,
                              peephole: tuple[Tensor, ...] | None) -> Tensor:
    """Backward of `lstm_cell_update` for i, f, g (d_o is the caller's, already in ``d_gates``):
    writes d_i, d_f, d_g before their nonlinearities into ``d_gates (N, 4H)`` and returns the
    gradient of the entering cell c."""
    i, f, g, _ = gates.chunk(4, dim=1)
    d_i, d_f, d_g, _ = d_gates.chunk(4, dim=1)
    torch.mul(d_c_new * g, i * (1 - i), out=d_i)
    torch.mul(d_c_new * c, f * (1 - f), out=d_f)
    torch.mul(d_c_new * i, 1 - g * g, out=d_g)
    d_c = d_c_new * f
    if peephole is not None:
        d_c.addcmul_(d_i, peephole[0]).addcmul_(d_f, peephole[1])
    return d_c


# ---- Elman RNN -----------------------------------------------------------------------------
# h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu.

def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse: bool, relu: bool):
    """Returns ``output (T, N, H), h_n (N, H), raw (T, N, H), h_prev (T, N, H)``: ``raw`` is
    act(...) of each step before masking, ``h_prev`` the state entering each step."""
    steps = x.shape[0]
    valid = valid_steps(lengths, steps)
    pre_x = F.linear(x, w_ih, summed_bias(b_ih, b_hh))  # (T, N, H)
    w_hh_t = w_hh.t()
    raw = torch.empty_like(pre_x)
    h_prev = torch.empty_like(pre_x)
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
    return output, h.clone(), raw, h_prev


def rnn_backward(d_output, d_h_n, raw, w_hh, lengths, reverse: bool, relu: bool):
    """Returns ``d_pre (T, N, H)`` (the gradient before the nonlinearity) and ``d_h0 (N, H)``."""
    valid = valid_steps(lengths, raw.shape[0])
    d_pre = torch.empty_like(raw)  # (T, N, H)
    d_h = d_h_n
    for t in reversed(_time_order(raw.shape[0], reverse)):
        valid_t = None if valid is None else valid[t]
        d_raw, d_skip = _step_output_grad(valid_t, d_h, d_output[t])
        h_t = raw[t]
        if relu:
            # Autograd's relu backward (threshold_backward): zero where the output is <= 0,
            # so a NaN output passes its gradient on, as torch.nn and the reference do.
            d_pre[t].copy_(d_raw).masked_fill_(h_t <= 0, 0.0)
        else:
            torch.mul(d_raw, 1 - h_t * h_t, out=d_pre[t])
        if valid_t is not None:
            d_pre[t].masked_fill_(~valid_t, 0.0)
        d_h = _rejoin(valid_t, d_pre[t] @ w_hh, d_skip)
    return d_pre, d_h


# ---- LSTM ----------------------------------------------------------------------------------
# The spec's LSTM with optional peephole (w_ch, order i, f, o) and projection (w_hr).

def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse: bool):
    """Returns ``output (T, N, P), h_n (N, P), c_n (N, H)`` and what the backward reads:
    ``gates (T, N, 4H)`` activated, ``c_raw (T, N, H)`` each step's c' before masking,
    ``c_prev (T, N, H)`` the cell entering each step, ``h_prev (T, N, P)``, and with a
    projection ``m (T, N, H)`` = o ⊙ tanh(c') (else an empty tensor)."""
    steps, batch = x.shape[:2]
    hidden = c0.shape[1]
    valid = valid_steps(lengths, steps)
    gates = F.linear(x, w_ih, summed_bias(b_ih, b_hh))  # (T, N, 4H), activated in place
    w_hh_t = w_hh.t()
    new = x.new_empty
    c_raw = new(steps, batch, hidden)
    tanh_c = new(steps, batch, hidden)
    c_prev = new(steps, batch, hidden)
    h_prev = new(steps, batch, h0.shape[1])
    output = new(steps, batch, h0.shape[1])
    m_all = new(steps, batch, hidden) if w_hr is not None else new(0)
    peephole = None if w_ch is None else w_ch.chunk(3)
    h, c = h0, c0
    for t in _time_order(steps, reverse):
        h_prev[t], c_prev[t] = h, c
        a = gates[t]  # (N, 4H)
        a.addmm_(h, w_hh_t)
        c_t = lstm_cell_update(a, c, peephole, hidden, c_raw[t])
        o = a[:, 3 * hidden :]
        m = torch.mul(o, torch.tanh(c_t, out=tanh_c[t]),
                      out=None if w_hr is None else m_all[t])
        h_t = m if w_hr is None else m @ w_hr.t()
        valid_t = None if valid is None else valid[t]
        h, c = _keep(valid_t, h_t, h), _keep(valid_t, c_t, c)
        output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
    return output, h.clone(), c.clone(), gates, c_raw, c_prev, h_prev, m_all


def lstm_backward(d_output, d_h_n, d_c_n, gates, c_raw, c_prev, m_all, w_hh, w_hr, w_ch,
                  lengths, reverse: bool):
    """Returns ``d_gates (T, N, 4H)`` before the nonlinearities, ``d_h0 (N, P)``, ``d_c0 (N, H)``
    and ``d_w_hr (P, H)`` (an empty tensor without a projection)."""
    valid = valid_steps(lengths, gates.shape[0])
    d_gates = torch.empty_like(gates)
    d_h_raw_all = torch.empty_like(d_output) if w_hr is not None else None  # (T, N, P)
    peephole = None if w_ch is None else w_ch.chunk(3)
    hidden = c_raw.shape[2]
    d_h, d_c = d_h_n, d_c_n
    for t in reversed(_time_order(gates.shape[0], reverse)):
        valid_t = None if valid is None else valid[t]
        d_h_raw, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
        d_c_raw = d_c if valid_t is None else torch.where(valid_t, d_c, 0.0)
        o, d_o = gates[t][:, 3 * hidden :], d_gates[t][:, 3 * hidden :]
        if w_hr is not None:
            d_h_raw_all[t] = d_h_raw
            d_m = d_h_raw @ w_hr  # (N, H)
        else:
            d_m = d_h_raw
        tc = torch.tanh(c_raw[t])
        # o = σ(.): dσ = σ(1 - σ); tanh' = 1 - tanh²
        torch.mul(d_m * tc, o * (1 - o), out=d_o)
        d_c_t = d_c_raw + d_m * o * (1 - tc * tc)
        if peephole is not None:
            d_c_t.addcmul_(d_o, peephole[2])
        d_c_prev = lstm_cell_update_backward(d_c_t, gates[t], d_gates[t], c_prev[t], peephole)
        if valid_t is not None:
            # Rows past a sequence's end contribute nothing to the weight gradients.
            d_gates[t].masked_fill_(~valid_t, 0.0)
        d_h = _rejoin(valid_t, d_gates[t] @ w_hh, d_h_skip)
        d_c = _rejoin(valid_t, d_c_prev, d_c)
    if w_hr is None:
        d_w_hr = d_gates.new_empty(0)
    else:
        d_w_hr = d_h_raw_all.flatten(0, 1).t() @ m_all.flatten(0, 1)
    return d_gates, d_h, d_c, d_w_hr


# ---- GRU -----------------------------------------------------------------------------------
# The spec's GRU, h' = n + z ⊙ (h - n), reset gate after or before W_hn.

def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse: bool, reset_after: bool):
    """Returns ``output (T, N, H), h_n (N, H)`` and what the backward reads: ``gates (T, N, 3H)``
    activated (r | z | n), ``h_prev (T, N, H)``, and ``n_input (T, N, H)``: what r multiplies,
    ``W_hn h + b_hn`` (reset after) or ``r ⊙ h`` (reset before)."""
    steps, batch = x.shape[:2]
    hidden = h0.shape[1]
    valid = valid_steps(lengths, steps)
    # Reset before W_hn: every recurrent bias sits outside r's product and folds into b_ih.
    # Reset after: b_hn is multiplied by r, so the recurrent biases stay in the loop.
    gates = F.linear(x, w_ih, b_ih if reset_after else summed_bias(b_ih, b_hh))  # (T,N,3H)
    h_prev = x.new_empty(steps, batch, hidden)
    output = torch.empty_like(h_prev)
    n_input = torch.empty_like(h_prev)
    w_rz_t, w_n_t = w_hh[: 2 * hidden].t(), w_hh[2 * hidden :].t()
    h = h0
    for t in _time_order(steps, reverse):
        h_prev[t] = h
        a = gates[t]  # (N, 3H), becomes (r | z | n)
        rz, n = a[:, : 2 * hidden], a[:, 2 * hidden :]
        if reset_after:
            h_gates = F.linear(h, w_hh, b_hh)  # (N, 3H)
            rz.add_(h_gates[:, : 2 * hidden]).sigmoid_()
            n_input[t] = h_gates[:, 2 * hidden :]
            n.addcmul_(rz[:, :hidden], n_input[t]).tanh_()
        else:
            rz.addmm_(h, w_rz_t).sigmoid_()
            torch.mul(rz[:, :hidden], h, out=n_input[t])
            n.addmm_(n_input[t], w_n_t).tanh_()
        z = rz[:, hidden:]
        h_t = torch.addcmul(n, z, h - n)  # (1 - z) n + z h
        valid_t = None if valid is None else valid[t]
        h = _keep(valid_t, h_t, h)
        output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
    return output, h.clone(), gates, h_prev, n_input


def gru_backward(d_output, d_h_n, gates, h_prev, n_input, w_hh, lengths, reverse: bool,
                 reset_after: bool):
    """Returns ``d_x_gates (T, N, 3H)``, the gradient of the input-side sums (r, z, n before
    their nonlinearities), ``d_hn (T, N, H)``: reset after, the gradient of ``W_hn h + b_hn``,
    ``r ⊙ dn`` (the recurrent side's r and z parts equal ``d_x_gates``'; reset before, an empty
    tensor), and ``d_h0 (N, H)``: the layout of the native kernel's `gru_backward`."""
    valid = valid_steps(lengths, gates.shape[0])
    hidden = h_prev.shape[2]
    w_rz, w_n = w_hh[: 2 * hidden], w_hh[2 * hidden :]
    d_x_gates = torch.empty_like(gates)
    d_hn = h_prev.new_empty(h_prev.shape) if reset_after else h_prev.new_empty(0)
    d_h = d_h_n
    for t in reversed(_time_order(gates.shape[0], reverse)):
        valid_t = None if valid is None else valid[t]
        d_h_raw, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
        r, z, n = gates[t].chunk(3, dim=1)
        d_r, d_z, d_n = d_x_gates[t].chunk(3, dim=1)
        h_old = h_prev[t]
        torch.mul(d_h_raw * (h_old - n), z * (1 - z), out=d_z)
        torch.mul(d_h_raw * (1 - z), 1 - n * n, out=d_n)
        d_h_old = d_h_raw * z
        if reset_after:
            torch.mul(d_n * n_input[t], r * (1 - r), out=d_r)
            if valid_t is not None:
                d_x_gates[t].masked_fill_(~valid_t, 0.0)
            torch.mul(d_n, r, out=d_hn[t])
            d_h_old.addmm_(d_x_gates[t][:, : 2 * hidden], w_rz).addmm_(d_hn[t], w_n)
        else:
            d_rh = d_n @ w_n  # (N, H): gradient of r ⊙ h
            torch.mul(d_rh * h_old, r * (1 - r), out=d_r)
            if valid_t is not None:
                d_x_gates[t].masked_fill_(~valid_t, 0.0)
            d_h_old.addcmul_(d_rh, r).addmm_(d_x_gates[t][:, : 2 * hidden], w_rz)
        d_h = _rejoin(valid_t, d_h_old, d_h_skip)
    return d_x_gates, d_hn, d_h
