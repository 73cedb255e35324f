"""The spec's equations (shared/spec/cells.md) written again, independently of rnnkit's code.

Used to check variants torch.nn lacks. Deliberately plain: explicit gate slices, explicit
matrix products, no shared helpers with rnnkit.
"""

from __future__ import annotations

import torch


def lstm_peephole_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr=None):
    """One step of the peephole LSTM: i, f look at the old cell, o at the new one."""
    hidden = c.shape[-1]
    pre = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    slices = {name: pre[:, k * hidden : (k + 1) * hidden] for k, name in enumerate("ifgo")}
    p_i, p_f, p_o = w_ch[:hidden], w_ch[hidden : 2 * hidden], w_ch[2 * hidden :]
    i = torch.sigmoid(slices["i"] + p_i * c)
    f = torch.sigmoid(slices["f"] + p_f * c)
    g = torch.tanh(slices["g"])
    c_new = f * c + i * g
    o = torch.sigmoid(slices["o"] + p_o * c_new)
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


def gru_reset_before_step(x, h, w_ih, w_hh, b_ih, b_hh):
    """One step of the original GRU: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)."""
    hidden = h.shape[-1]
    W_ir, W_iz, W_in = w_ih[:hidden], w_ih[hidden : 2 * hidden], w_ih[2 * hidden :]
    W_hr, W_hz, W_hn = w_hh[:hidden], w_hh[hidden : 2 * hidden], w_hh[2 * hidden :]
    b_ir, b_iz, b_in = b_ih[:hidden], b_ih[hidden : 2 * hidden], b_ih[2 * hidden :]
    b_hr, b_hz, b_hn = b_hh[:hidden], b_hh[hidden : 2 * hidden], b_hh[2 * hidden :]
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
    n = torch.tanh(x @ W_in.T + b_in + (r * h) @ W_hn.T + b_hn)
    return (1 - z) * n + z * h
