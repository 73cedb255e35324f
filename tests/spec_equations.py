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


def spec_gates(family, x, state, weights, nonlinearity="tanh", reset_after=True):
    """One step of any family from the spec, with its gates: a dict as rnnkit's diagnostics
    name them (LSTM i f g o c h; GRU r z n h; RNN h). ``weights`` is a dict with w_ih, w_hh,
    b_ih, b_hh (None without bias) and, for LSTM, w_ch (None: no peephole) and w_hr (None)."""
    w_ih, w_hh = weights["w_ih"], weights["w_hh"]
    b_ih = weights["b_ih"] if weights["b_ih"] is not None else torch.zeros(w_ih.shape[0],
                                                                             dtype=x.dtype)
    b_hh = weights["b_hh"] if weights["b_hh"] is not None else torch.zeros(w_hh.shape[0],
                                                                             dtype=x.dtype)
    if family == "rnn":
        pre = x @ w_ih.T + b_ih + state @ w_hh.T + b_hh
        return {"h": torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)}
    if family == "gru":
        h = state
        hidden = h.shape[-1]
        x_r, x_z, x_n = (x @ w_ih.T + b_ih).split(hidden, dim=-1)
        r = torch.sigmoid(x_r + h @ w_hh[:hidden].T + b_hh[:hidden])
        z = torch.sigmoid(x_z + h @ w_hh[hidden : 2 * hidden].T + b_hh[hidden : 2 * hidden])
        if reset_after:
            n = torch.tanh(x_n + r * (h @ w_hh[2 * hidden :].T + b_hh[2 * hidden :]))
        else:
            n = torch.tanh(x_n + (r * h) @ w_hh[2 * hidden :].T + b_hh[2 * hidden :])
        return {"r": r, "z": z, "n": n, "h": (1 - z) * n + z * h}
    h, c = state
    hidden = c.shape[-1]
    pre = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    pre_i, pre_f, pre_g, pre_o = pre.split(hidden, dim=-1)
    w_ch = weights.get("w_ch")
    p_i, p_f, p_o = (w_ch.split(hidden) if w_ch is not None else (0, 0, 0))
    i = torch.sigmoid(pre_i + p_i * c)
    f = torch.sigmoid(pre_f + p_f * c)
    g = torch.tanh(pre_g)
    c_new = f * c + i * g
    o = torch.sigmoid(pre_o + p_o * c_new)
    h_new = o * torch.tanh(c_new)
    if weights.get("w_hr") is not None:
        h_new = h_new @ weights["w_hr"].T
    return {"i": i, "f": f, "g": g, "o": o, "c": c_new, "h": h_new}
