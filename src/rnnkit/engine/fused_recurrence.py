r"""The recurrence operators' portable implementation: layer norm, recurrent dropout and zoneout
with a hand-derived backward, in pure PyTorch ops on any device.

`rnnkit.engine.ops` registers these functions as the ``rnnkit::fused_*_recurrence`` operators
(the native ones, `rnnkit.engine.native.functions`, have the same signatures and results). They
run only the *recurrence* of a layer direction: its input side ``pre_x (T, N, G·H)`` is
computed before, for every step at once, by ordinary autograd ops (`steps.input_side`:
``LN(W_ih x; γ_ih)`` plus the biases outside any recurrent product), so layer norm of the input
product and every input-side gradient come from ATen's own kernels. The LSTM's alone also take
that layer norm (``gain_ih``, ``bias_ih``, with ``pre_x`` the bare ``W_ih x``), as its native
kernel folds it into its row passes; its backward then returns the product's gradient and sums
the gain, bias and peephole gradients itself. Per step, for a valid row
(shared/spec/cells.md, "Normalisation and regularisation")::

    hm = m ⊙ h_{t-1}                         recurrent dropout mask m (N, H_out), or 1
    v  = hm W_hh^T                           (N, G·H)
    u  = γ_hh ⊙ x̂,  x̂ = (v - μ(v)) · rstd    layer norm (rstd = 1 / sqrt(σ²(v) + 1e-5)); else u = v
    h̃, c̃ = the family's update from pre_x[t] + u (GRU: u + b_hh, its n part times r)
    h_t = d ⊙ h_{t-1} + (1 - d) ⊙ h̃           zoneout d: a (T, N, ·) 0/1 mask, or p (0-dim), or off

and the output of step t is the zoned ``h_t``. A row past its length holds its state, outputs
zero, and in the backward lets the state gradients pass around the step.

Buffers: states ``(T + 1, N, ·)`` in time order, as the native kernels keep them (the state
entering step t is at index t going forward, t + 1 going backward); ``normalised_*`` hold x̂ and
``rstd_*`` the inverse deviations of each layer norm, for the backward. The backward returns the
per-step gradients (``d_pre_x`` of the gate pre-activations, ``d_product`` of the raw product v
with layer norm, ...) and the operators' autograd formula sums them into weight gradients with
one product or reduction over all steps.

Layer norm's backward, per row, for ``y = γ ⊙ x̂`` and ``g = dy ⊙ γ``::

    dv = rstd · (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂))
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engine.fused import (
    _keep,
    _rejoin,
    _step_output_grad,
    _time_order,
    lstm_cell_update,
    lstm_cell_update_backward,
    valid_steps,
)
from rnnkit.engine.products import peephole_grad

EPS = 1e-5  # the spec's layer norm epsilon


# ---- argument checks ------------------------------------------------------------------------
# The operators are public (torch.ops.rnnkit.*): a tensor of another shape would broadcast into
# silent garbage, so each forward checks its arguments once, as the native kernels do.

def _check(op: str, pre_x: Tensor, shapes: dict[str, tuple[Tensor | None, tuple[int, ...]]],
           zoneouts: dict[str, tuple[Tensor | None, tuple[int, ...]]],
           lengths: Tensor | None) -> None:
    """``ValueError`` naming ``op`` and the argument: of pre_x's dtype and device, each tensor
    of its shape, each zoneout 0-dim or of its ``(T, N, ·)`` shape, lengths ``(N,)`` integer."""
    if pre_x.dim() != 3 or not pre_x.is_floating_point():
        raise ValueError(f"{op}: pre_x must be a floating (T, N, G*H) tensor, got "
                         f"{pre_x.dtype} of shape {tuple(pre_x.shape)}")

    def same_kind(name: str, t: Tensor) -> None:
        if t.dtype != pre_x.dtype or t.device != pre_x.device:
            raise ValueError(f"{op}: {name} must be {pre_x.dtype} on {pre_x.device} (as pre_x), "
                             f"got {t.dtype} on {t.device}")

    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        same_kind(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, (t, shape) in zoneouts.items():
        if t is None:
            continue
        same_kind(name, t)
        if t.dim() != 0 and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be a 0-dim probability or have shape {shape}, "
                             f"got {tuple(t.shape)}")
    if lengths is not None and (tuple(lengths.shape) != pre_x.shape[1:2]
                                or lengths.is_floating_point() or lengths.is_complex()
                                or lengths.device != pre_x.device):
        raise ValueError(f"{op}: lengths must be an integer ({pre_x.shape[1]},) tensor on "
                         f"{pre_x.device}, got {lengths.dtype} of shape "
                         f"{tuple(lengths.shape)} on {lengths.device}")


# ---- pieces every family shares -------------------------------------------------------------

def _positions(steps: int, t: int, reverse: bool) -> tuple[int, int]:
    """Indices of the states entering and leaving step t in a ``(T + 1, N, ·)`` buffer."""
    return (t + 1, t) if reverse else (t, t + 1)


def _entering(h: Tensor, recurrent_mask: Tensor | None) -> Tensor:
    return h if recurrent_mask is None else h * recurrent_mask


def _normalise(v: Tensor) -> tuple[Tensor, Tensor]:
    """x̂ and rstd ``(N,)`` of each row of ``v (N, K)``: LN without gain or shift."""
    normalised, _, rstd = torch.native_layer_norm(v, v.shape[-1:], None, None, EPS)
    return normalised, rstd.squeeze(-1)


def normalised_backward(d_y: Tensor, gain: Tensor, normalised: Tensor, rstd: Tensor) -> Tensor:
    """Gradient of ``v`` from that of ``y = γ ⊙ x̂``: the module doc's formula, rows ``(N, K)``."""
    g = d_y * gain
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * normalised).mean(-1, keepdim=True)
    return rstd.unsqueeze(-1) * (g - mean_g - normalised * mean_gx)


def _keep_rate(zoneout: Tensor | None, t: int) -> Tensor | None:
    """Zoneout's d at step t: the step's 0/1 mask, the probability (0-dim), or None (off)."""
    if zoneout is None:
        return None
    return zoneout if zoneout.dim() == 0 else zoneout[t]


def _zoned(updated: Tensor, previous: Tensor, keep: Tensor | None) -> Tensor:
    return updated if keep is None else keep * previous + (1 - keep) * updated


def _split_zoned_grad(d_state: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(gradient of the update h̃, gradient going straight to h_{t-1}) from that of h_t."""
    if keep is None:
        return d_state, None
    return (1 - keep) * d_state, keep * d_state


def _plus(total: Tensor, part: Tensor | None) -> Tensor:
    return total if part is None else total + part


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


class _Buffers:
    """The forward's per-step buffers of one layer norm (x̂ ``(T, N, K)`` and rstd ``(T, N)``),
    empty when it is off."""

    def __init__(self, like: Tensor, steps: int, batch: int, width: int, on: bool):
        self.on = on
        self.normalised = like.new_empty(steps, batch, width) if on else _empty(like)
        self.rstd = like.new_empty(steps, batch) if on else _empty(like)

    def normalise(self, t: int, v: Tensor, gain: Tensor) -> Tensor:
        """``γ ⊙ x̂`` of ``v`` at step t, keeping x̂ and rstd."""
        normalised, rstd = _normalise(v)
        self.normalised[t], self.rstd[t] = normalised, rstd
        return normalised * gain


def _recurrent_sum(v: Tensor, gain: Tensor | None, norm: _Buffers, t: int) -> Tensor:
    """u: the recurrent product, normalised with layer norm."""
    return v if gain is None else norm.normalise(t, v, gain)


def _product_grad(d_u: Tensor, gain: Tensor | None, normalised: Tensor, rstd: Tensor, t: int,
                  d_product: Tensor) -> Tensor:
    """dv from du (through layer norm, stored in ``d_product[t]``), or du itself."""
    if gain is None:
        return d_u
    d_v = normalised_backward(d_u, gain, normalised[t], rstd[t])
    d_product[t] = d_v
    return d_v


# ---- LSTM -----------------------------------------------------------------------------------
# pre_x + u -> i, f, g, o; c̃ = f c + i g; h̃ = W_hr (o ⊙ tanh(LN(c̃; γ_c, β_c))); zoneout.

def lstm_forward(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, recurrent_mask,
                 zoneout_h, zoneout_c, lengths, reverse: bool, gain_ih=None, bias_ih=None):
    """Returns ``output (T, N, P), h_n (N, P), c_n (N, H)``, the states ``h_states (T + 1, N,
    P)``, ``c_states (T + 1, N, H)``, ``gates (T, N, 4H)`` activated, ``c_new (T, N, H)`` (c̃,
    before zoneout), and layer norm's ``normalised_hh (T, N, 4H)``, ``rstd_hh (T, N)``,
    ``normalised_c (T, N, H)``, ``rstd_c (T, N)``, ``mean_ih``, ``rstd_ih (T, N)`` (each empty
    when off).

    The input side's layer norm folded in (``gain_ih``, which needs ``gain_hh``): ``pre_x`` is
    the raw product ``W_ih x``, and the gates start from ``γ_ih ⊙ LN(pre_x)`` (its moments
    kept, zero in held rows, as the native kernel keeps them); ``bias_ih (4H,)``, when given, is
    added to every row."""
    steps, batch = pre_x.shape[:2]
    hidden = pre_x.shape[-1] // 4
    out_size = w_hr.shape[0] if w_hr is not None and w_hr.dim() == 2 else hidden
    rows = (steps, batch)
    _check("fused_lstm_recurrence", pre_x, {
        "pre_x": (pre_x, (*rows, 4 * hidden)), "h0": (h0, (batch, out_size)),
        "c0": (c0, (batch, hidden)), "w_hh": (w_hh, (4 * hidden, out_size)),
        "gain_hh": (gain_hh, (4 * hidden,)), "gain_c": (gain_c, (hidden,)),
        "shift_c": (shift_c, (hidden,)), "w_hr": (w_hr, (out_size, hidden)),
        "w_ch": (w_ch, (3 * hidden,)), "recurrent_mask": (recurrent_mask, (batch, out_size)),
        "gain_ih": (gain_ih, (4 * hidden,)), "bias_ih": (bias_ih, (4 * hidden,))},
        {"zoneout_h": (zoneout_h, (*rows, out_size)), "zoneout_c": (zoneout_c, (*rows, hidden))},
        lengths)
    if (gain_c is None) != (shift_c is None):
        raise ValueError("fused_lstm_recurrence: gain_c and shift_c must be given together")
    if gain_ih is not None and gain_hh is None:
        raise ValueError("fused_lstm_recurrence: gain_ih (the input side's layer norm) needs "
                         "gain_hh")
    valid = valid_steps(lengths, steps)
    gates, mean_ih, rstd_ih = _input_rows(pre_x, gain_ih, bias_ih, valid)  # activated in place
    new = pre_x.new_empty
    h_states, c_states = new(steps + 1, batch, out_size), new(steps + 1, batch, hidden)
    c_new, output = new(steps, batch, hidden), new(steps, batch, out_size)
    norm_hh = _Buffers(pre_x, steps, batch, 4 * hidden, gain_hh is not None)
    norm_c = _Buffers(pre_x, steps, batch, hidden, gain_c is not None)
    w_hh_t = w_hh.t()
    peephole = None if w_ch is None else w_ch.chunk(3)
    first = steps if reverse else 0
    h_states[first], c_states[first] = h0, c0
    h, c = h0, c0
    for t in _time_order(steps, reverse):
        _, leaving = _positions(steps, t, reverse)
        a = gates[t]  # (N, 4H)
        v = _entering(h, recurrent_mask) @ w_hh_t  # (N, 4H)
        a.add_(_recurrent_sum(v, gain_hh, norm_hh, t))
        c_t = lstm_cell_update(a, c, peephole, hidden, c_new[t])
        o = a[:, 3 * hidden :]
        cell_out = c_t if gain_c is None else norm_c.normalise(t, c_t, gain_c) + shift_c
        h_t = o * torch.tanh(cell_out)
        if w_hr is not None:
            h_t = h_t @ w_hr.t()  # (N, P)
        h_t = _zoned(h_t, h, _keep_rate(zoneout_h, t))
        c_t = _zoned(c_t, c, _keep_rate(zoneout_c, t))
        valid_t = None if valid is None else valid[t]
        h, c = _keep(valid_t, h_t, h), _keep(valid_t, c_t, c)
        h_states[leaving], c_states[leaving] = h, c
        output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
    last = 0 if reverse else steps
    return (output, h_states[last].clone(), c_states[last].clone(), h_states, c_states, gates,
            c_new, norm_hh.normalised, norm_hh.rstd, norm_c.normalised, norm_c.rstd, mean_ih,
            rstd_ih)


def _input_rows(pre_x: Tensor, gain_ih: Tensor | None, bias_ih: Tensor | None,
                valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The gates' starting values ``(T, N, 4H)``, a new tensor: ``pre_x`` (+ ``bias_ih``), or
    with ``gain_ih`` ``γ_ih ⊙ LN(pre_x) (+ bias_ih)``; and LN's mean and rstd ``(T, N)``
    (zero in held rows; empty without ``gain_ih``)."""
    if gain_ih is None:
        gates = pre_x.clone() if bias_ih is None else pre_x + bias_ih
        return gates, _empty(pre_x), _empty(pre_x)
    _, mean, rstd = torch.native_layer_norm(pre_x, pre_x.shape[-1:], None, None, EPS)
    mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
    if valid is not None:
        held = ~valid.squeeze(2)
        mean, rstd = mean.masked_fill(held, 0.0), rstd.masked_fill(held, 0.0)
    gates = _input_normalised(pre_x, mean, rstd) * gain_ih
    return (gates if bias_ih is None else gates.add_(bias_ih)), mean, rstd


def _input_normalised(pre_x: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """x̂_ih ``(T, N, 4H)`` from the raw product and its kept moments."""
    return (pre_x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def lstm_backward(d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new, normalised_hh,
                  rstd_hh, normalised_c, rstd_c, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch,
                  recurrent_mask, zoneout_h, zoneout_c, lengths, reverse: bool, pre_x=None,
                  mean_ih=None, rstd_ih=None, gain_ih=None):
    """Returns ``d_pre_x (T, N, 4H)`` (the gates before their nonlinearities, which is also the
    gradient of u), ``d_product (T, N, 4H)`` (of v; empty without layer norm), ``d_h0 (N, P)``,
    ``d_c0 (N, H)``, ``d_w_hr (P, H)`` (empty without a projection) and ``d_cell_norm (T, N,
    H)`` (of LN(c̃)'s output; empty without layer norm); then the folded input norm's sums
    over steps and rows, each empty unless ``gain_ih`` is given (with the forward's raw
    ``pre_x``, ``mean_ih``, ``rstd_ih``): ``d_gain_ih = Σ dA ⊙ x̂_ih``, ``d_bias_ih = Σ dA``,
    ``d_gain_hh = Σ dA ⊙ x̂_hh``, ``d_gain_c``, ``d_shift_c`` (with ``gain_c``) and ``d_w_ch``
    (with ``w_ch``). Folded, ``d_pre_x`` is the raw product's gradient ``LN_back(dA; γ_ih)``."""
    steps = gates.shape[0]
    valid = valid_steps(lengths, steps)
    d_pre_x = torch.empty_like(gates)
    d_product = torch.empty_like(gates) if gain_hh is not None else _empty(gates)
    d_cell_norm = torch.empty_like(c_new) if gain_c is not None else _empty(gates)
    projected = w_hr is not None
    d_h_raw_all = torch.empty_like(d_output) if projected else None  # (T, N, P)
    m_all = torch.empty_like(c_new) if projected else None  # (T, N, H): o ⊙ tanh(LN(c̃))
    peephole = None if w_ch is None else w_ch.chunk(3)
    hidden = c_new.shape[2]
    d_h, d_c = d_h_n, d_c_n
    for t in reversed(_time_order(steps, reverse)):
        entering, _ = _positions(steps, t, reverse)
        valid_t = None if valid is None else valid[t]
        d_h_through, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
        d_c_through = d_c if valid_t is None else torch.where(valid_t, d_c, 0.0)
        d_h_raw, d_h_direct = _split_zoned_grad(d_h_through, _keep_rate(zoneout_h, t))
        d_c_t, d_c_direct = _split_zoned_grad(d_c_through, _keep_rate(zoneout_c, t))
        o, d_o = gates[t][:, 3 * hidden :], d_pre_x[t][:, 3 * hidden :]
        c_t = c_new[t]
        cell_out = c_t if gain_c is None else torch.addcmul(shift_c, normalised_c[t], gain_c)
        tanh_out = torch.tanh(cell_out)
        if projected:
            d_h_raw_all[t] = d_h_raw
            m_all[t] = o * tanh_out
            d_m = d_h_raw @ w_hr  # (N, H)
        else:
            d_m = d_h_raw
        torch.mul(d_m * tanh_out, o * (1 - o), out=d_o)
        d_cell_out = d_m * o * (1 - tanh_out * tanh_out)
        if gain_c is None:
            d_c_t = d_c_t + d_cell_out
        else:
            d_cell_norm[t] = d_cell_out
            d_c_t = d_c_t + normalised_backward(d_cell_out, gain_c, normalised_c[t], rstd_c[t])
        if peephole is not None:
            d_c_t = d_c_t + d_o * peephole[2]
        d_c_old = lstm_cell_update_backward(d_c_t, gates[t], d_pre_x[t], c_states[entering],
                                            peephole)
        if valid_t is not None:
            # Rows past a sequence's end contribute nothing to the weight gradients.
            d_pre_x[t].masked_fill_(~valid_t, 0.0)
            if gain_c is not None:
                d_cell_norm[t].masked_fill_(~valid_t, 0.0)
        d_v = _product_grad(d_pre_x[t], gain_hh, normalised_hh, rstd_hh, t, d_product)
        d_h_old = _plus(_entering(d_v @ w_hh, recurrent_mask), d_h_direct)
        d_h = _rejoin(valid_t, d_h_old, d_h_skip)
        d_c = _rejoin(valid_t, _plus(d_c_old, d_c_direct), d_c)
    d_w_hr = (d_h_raw_all.flatten(0, 1).t() @ m_all.flatten(0, 1)) if projected else _empty(gates)
    sums = [_empty(gates) for _ in range(6)]  # outputs may not alias one another
    if gain_ih is not None:
        x_hat_ih = _input_normalised(pre_x, mean_ih, rstd_ih)  # (T, N, 4H)
        sums = _folded_sums(d_pre_x, x_hat_ih, normalised_hh, d_cell_norm, normalised_c,
                            c_states, c_new, gain_c is not None, w_ch is not None, reverse)
        d_pre_x = normalised_backward(d_pre_x.flatten(0, 1), gain_ih, x_hat_ih.flatten(0, 1),
                                      rstd_ih.flatten()).view_as(gates)
    return (d_pre_x, d_product, d_h, d_c, d_w_hr, d_cell_norm, *sums)


def _folded_sums(d_a, x_hat_ih, normalised_hh, d_cell_norm, normalised_c, c_states, c_new,
                 cell_normed: bool, peephole: bool, reverse: bool) -> list:
    """The sums over steps and rows of `lstm_backward` with the input norm folded in (held rows
    have dA = 0 and add nothing)."""
    def total(grad: Tensor, factor: Tensor | None = None) -> Tensor:
        return (grad if factor is None else grad * factor).sum((0, 1))

    sums = [total(d_a, x_hat_ih), total(d_a), total(d_a, normalised_hh)]
    sums += ([total(d_cell_norm, normalised_c), total(d_cell_norm)] if cell_normed
             else [_empty(d_a), _empty(d_a)])
    c_prev = c_states[1:] if reverse else c_states[:-1]  # the cells entering each step
    sums.append(peephole_grad(d_a, c_prev, c_new) if peephole else _empty(d_a))
    return sums


# ---- GRU ------------------------------------------------------------------------------------
# r, z, n from pre_x + u (reset after: n = tanh(a_n + r ⊙ (u_n + b_hn))); h̃ = n + z (h - n).

def gru_forward(pre_x, h0, w_hh, b_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                reverse: bool, reset_after: bool):
    """Returns ``output (T, N, H), h_n (N, H), states (T + 1, N, H), gates (T, N, 3H)``
    activated (r | z | n), ``n_input (T, N, H)`` (what r multiplies: ``u_n + b_hn`` reset after,
    ``r ⊙ hm`` reset before), ``normalised_hh (T, N, 3H)`` and ``rstd_hh (T, N)`` (empty
    without layer norm, which needs reset_after)."""
    steps, batch = pre_x.shape[:2]
    hidden = pre_x.shape[-1] // 3
    _check("fused_gru_recurrence", pre_x, {
        "pre_x": (pre_x, (steps, batch, 3 * hidden)), "h0": (h0, (batch, hidden)),
        "w_hh": (w_hh, (3 * hidden, hidden)), "b_hh": (b_hh, (3 * hidden,)),
        "gain_hh": (gain_hh, (3 * hidden,)), "recurrent_mask": (recurrent_mask, (batch, hidden))},
        {"zoneout_h": (zoneout_h, (steps, batch, hidden))}, lengths)
    if not reset_after and (b_hh is not None or gain_hh is not None):
        raise ValueError("fused_gru_recurrence: with reset_after=False, b_hh and gain_hh must be "
                         "None (pre_x holds both biases; layer norm needs reset_after=True)")
    valid = valid_steps(lengths, steps)
    gates = pre_x.clone()  # (T, N, 3H), becomes (r | z | n)
    new = pre_x.new_empty
    states, output, n_input = (new(steps + 1, batch, hidden), new(steps, batch, hidden),
                               new(steps, batch, hidden))
    norm_hh = _Buffers(pre_x, steps, batch, 3 * hidden, gain_hh is not None)
    w_hh_t, w_rz_t, w_n_t = w_hh.t(), w_hh[: 2 * hidden].t(), w_hh[2 * hidden :].t()
    states[steps if reverse else 0] = h0
    h = h0
    for t in _time_order(steps, reverse):
        _, leaving = _positions(steps, t, reverse)
        a = gates[t]
        rz, n = a[:, : 2 * hidden], a[:, 2 * hidden :]
        entering = _entering(h, recurrent_mask)
        if reset_after:
            u = _recurrent_sum(entering @ w_hh_t, gain_hh, norm_hh, t)  # (N, 3H)
            if b_hh is not None:
                u = u + b_hh
            rz.add_(u[:, : 2 * hidden]).sigmoid_()
            n_input[t] = u[:, 2 * hidden :]
            n.addcmul_(rz[:, :hidden], n_input[t]).tanh_()
        else:
            rz.addmm_(entering, w_rz_t).sigmoid_()
            torch.mul(rz[:, :hidden], entering, out=n_input[t])
            n.addmm_(n_input[t], w_n_t).tanh_()
        h_t = torch.addcmul(n, rz[:, hidden:], h - n)  # (1 - z) n + z h
        h_t = _zoned(h_t, h, _keep_rate(zoneout_h, t))
        valid_t = None if valid is None else valid[t]
        h = _keep(valid_t, h_t, h)
        states[leaving] = h
        output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
    return (output, states[0 if reverse else steps].clone(), states, gates, n_input,
            norm_hh.normalised, norm_hh.rstd)


def gru_backward(d_output, d_h_n, states, gates, n_input, normalised_hh, rstd_hh, w_hh,
                 gain_hh, recurrent_mask, zoneout_h, lengths, reverse: bool, reset_after: bool):
    """Returns ``d_pre_x (T, N, 3H)`` (r, z, n before their nonlinearities), ``d_hidden (T, N,
    3H)`` = du = (d_r, d_z, r ⊙ d_n) (reset after; empty reset before), ``d_product (T, N,
    3H)`` (of v; empty without layer norm) and ``d_h0 (N, H)``."""
    steps = gates.shape[0]
    hidden = states.shape[2]
    valid = valid_steps(lengths, steps)
    w_rz, w_n = w_hh[: 2 * hidden], w_hh[2 * hidden :]
    d_pre_x = torch.empty_like(gates)
    d_hidden = torch.empty_like(gates) if reset_after else _empty(gates)
    d_product = torch.empty_like(gates) if gain_hh is not None else _empty(gates)
    d_h = d_h_n
    for t in reversed(_time_order(steps, reverse)):
        entering, _ = _positions(steps, t, reverse)
        valid_t = None if valid is None else valid[t]
        d_h_through, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
        d_h_raw, d_h_direct = _split_zoned_grad(d_h_through, _keep_rate(zoneout_h, t))
        r, z, n = gates[t].chunk(3, dim=1)
        d_r, d_z, d_n = d_pre_x[t].chunk(3, dim=1)
        h_old = states[entering]
        torch.mul(d_h_raw * (h_old - n), z * (1 - z), out=d_z)
        torch.mul(d_h_raw * (1 - z), 1 - n * n, out=d_n)
        d_h_old = d_h_raw * z
        if reset_after:
            torch.mul(d_n * n_input[t], r * (1 - r), out=d_r)
            if valid_t is not None:
                d_pre_x[t].masked_fill_(~valid_t, 0.0)
            d_u = d_hidden[t]
            d_u[:, : 2 * hidden] = d_pre_x[t][:, : 2 * hidden]
            torch.mul(d_n, r, out=d_u[:, 2 * hidden :])
            d_v = _product_grad(d_u, gain_hh, normalised_hh, rstd_hh, t, d_product)
            d_entering = d_v @ w_hh
        else:
            d_rh = d_n @ w_n  # (N, H): gradient of r ⊙ hm
            torch.mul(d_rh * _entering(h_old, recurrent_mask), r * (1 - r), out=d_r)
            if valid_t is not None:
                d_pre_x[t].masked_fill_(~valid_t, 0.0)
            d_entering = torch.addmm(d_rh * r, d_pre_x[t][:, : 2 * hidden], w_rz)
        d_h_old = _plus(d_h_old + _entering(d_entering, recurrent_mask), d_h_direct)
        d_h = _rejoin(valid_t, d_h_old, d_h_skip)
    return d_pre_x, d_hidden, d_product, d_h


# ---- Elman RNN ------------------------------------------------------------------------------
# h̃ = act(pre_x + u), act = tanh or relu; zoneout.

def rnn_forward(pre_x, h0, w_hh, gain_hh, recurrent_mask, zoneout_h, lengths, reverse: bool,
                relu: bool):
    """Returns ``output (T, N, H), h_n (N, H), states (T + 1, N, H), raw (T, N, H)`` (each
    step's act(...) before zoneout), ``normalised_hh (T, N, H)`` and ``rstd_hh (T, N)``
    (empty without layer norm)."""
    steps, batch = pre_x.shape[:2]
    hidden = pre_x.shape[-1]
    _check("fused_rnn_recurrence", pre_x, {
        "h0": (h0, (batch, hidden)), "w_hh": (w_hh, (hidden, hidden)),
        "gain_hh": (gain_hh, (hidden,)), "recurrent_mask": (recurrent_mask, (batch, hidden))},
        {"zoneout_h": (zoneout_h, (steps, batch, hidden))}, lengths)
    valid = valid_steps(lengths, steps)
    raw = pre_x.clone()  # (T, N, H), activated in place
    states, output = pre_x.new_empty(steps + 1, batch, hidden), torch.empty_like(pre_x)
    norm_hh = _Buffers(pre_x, steps, batch, hidden, gain_hh is not None)
    w_hh_t = w_hh.t()
    states[steps if reverse else 0] = h0
    h = h0
    for t in _time_order(steps, reverse):
        _, leaving = _positions(steps, t, reverse)
        v = _entering(h, recurrent_mask) @ w_hh_t
        h_t = raw[t].add_(_recurrent_sum(v, gain_hh, norm_hh, t))
        if relu:
            h_t.relu_()
        else:
            h_t.tanh_()
        h_t = _zoned(h_t, h, _keep_rate(zoneout_h, t))
        valid_t = None if valid is None else valid[t]
        h = _keep(valid_t, h_t, h)
        states[leaving] = h
        output[t] = h_t if valid_t is None else h_t.masked_fill(~valid_t, 0.0)
    return (output, states[0 if reverse else steps].clone(), states, raw, norm_hh.normalised,
            norm_hh.rstd)


def rnn_backward(d_output, d_h_n, states, raw, normalised_hh, rstd_hh, w_hh, gain_hh,
                 recurrent_mask, zoneout_h, lengths, reverse: bool, relu: bool):
    """Returns ``d_pre_x (T, N, H)`` (before the nonlinearity), ``d_product (T, N, H)`` (of v;
    empty without layer norm) and ``d_h0 (N, H)``."""
    steps = raw.shape[0]
    valid = valid_steps(lengths, steps)
    d_pre_x = torch.empty_like(raw)
    d_product = torch.empty_like(raw) if gain_hh is not None else _empty(raw)
    d_h = d_h_n
    for t in reversed(_time_order(steps, reverse)):
        valid_t = None if valid is None else valid[t]
        d_h_through, d_h_skip = _step_output_grad(valid_t, d_h, d_output[t])
        d_h_raw, d_h_direct = _split_zoned_grad(d_h_through, _keep_rate(zoneout_h, t))
        if relu:
            # As autograd's threshold_backward: zero where the output is <= 0.
            d_pre_x[t].copy_(d_h_raw).masked_fill_(raw[t] <= 0, 0.0)
        else:
            torch.mul(d_h_raw, 1 - raw[t] * raw[t], out=d_pre_x[t])
        if valid_t is not None:
            d_pre_x[t].masked_fill_(~valid_t, 0.0)
        d_v = _product_grad(d_pre_x[t], gain_hh, normalised_hh, rstd_hh, t, d_product)
        d_h_old = _plus(_entering(d_v @ w_hh, recurrent_mask), d_h_direct)
        d_h = _rejoin(valid_t, d_h_old, d_h_skip)
    return d_pre_x, d_product, d_h
