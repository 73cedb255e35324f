r"""xLSTM's sLSTM (Beck et al. 2024, section 2.2): the step equations, the reference loop on
autograd, and the fused loops (forward and hand-written backward) that `rnnkit.engine.ops`
registers as ``rnnkit::fused_slstm``.

The stabilised step (spec: "sLSTM (Beck et al. 2024)"), pre-activations
``ĩ, f̃, z̃, õ = W x_t + R h_{t-1} + b`` in gate order ``(i, f, z, o)``::

    log f_t = logσ(f̃_t)  (forget_gate "sigmoid")  or  f̃_t  ("exp")
    m_t  = max(log f_t + m_{t-1}, ĩ_t)
    i'_t = exp(ĩ_t - m_t)        f'_t = exp(log f_t + m_{t-1} - m_t)
    z_t  = tanh(z̃_t)             o_t  = σ(õ_t)
    c_t  = f'_t ⊙ c_{t-1} + i'_t ⊙ z_t        n_t = f'_t ⊙ n_{t-1} + i'_t
    h_t  = o_t ⊙ c_t / n_t

``R`` is block-diagonal over ``K`` heads of ``d = H / K`` units, stored as ``weight_hh (K, 4d,
d)`` (head ``k``'s rows ``(R_i|R_f|R_z|R_o)``); ``weight_ih (4H, I)`` and ``bias_ih (4H,)`` are
gate-major ``(W_i|W_f|W_z|W_o)``.

Layouts. The reference loop works in the public, gate-major layout, ``(N, 4H)``. The fused
loops work head-major: pre-activations ``(T, K, N, 4d)`` and states ``(K, N, d)``, so that each
step's recurrent product is one ``baddbmm`` with heads as the batch, added in place to that
step's input side; the input weights' rows are reordered once per call (`heads_first`), and
the outputs and final states turned back once at the end (`merge_heads`).

Nothing here imports the layers, or `rnnkit.engine.ops` (which imports this module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engine.fused import valid_steps
from rnnkit.engine.products import weight_product

GATES = 4
"""Rows of ``weight_ih`` per hidden unit: ``(W_i|W_f|W_z|W_o)``."""

FORGET_GATES = ("sigmoid", "exp")
"""``forget_gate``: ``f = σ(f̃)`` (the reference code's default) or ``f = exp(f̃)``."""

BACKENDS = ("auto", "native", "fused", "reference")
"""``backend`` of `rnnkit.SLSTM`: ``"reference"`` `run_reference`, ``"fused"`` the operator
(`rnnkit.engine.ops.run_fused_slstm`), ``"native"`` the C++ loops
(`rnnkit.engine.ops.run_native_slstm`); ``"auto"`` runs ``"native"`` where it can, else
``"fused"`` (`rnnkit.engine.slstm_engine_for`)."""

SLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(h, c, n, m)``, each ``(N, H)`` (or ``(H,)`` for one unbatched step)."""


# ---- the step equations --------------------------------------------------------------------
def log_forget(f_pre: Tensor, exp_forget: bool) -> Tensor:
    """``log f`` from the forget pre-activation: ``f̃`` itself, or ``logσ(f̃)`` (finite for
    every finite ``f̃``, where ``log(σ(f̃))`` underflows to ``-inf`` below -104 in float32)."""
    return f_pre if exp_forget else F.logsigmoid(f_pre)


def empty_where_no_mass(n: Tensor, m: Tensor) -> Tensor:
    """``m`` with ``-inf`` where ``n = 0``: a state without normaliser mass holds nothing, and its
    stabiliser is the logarithm of nothing, so that the next step's ``m`` is that step's ``ĩ``
    (the reference code's rule where ``n = 0``; spec, deviations). Applied once per call to an
    initial state, never inside the loop (from the first step on, ``n >= 1``)."""
    return m.masked_fill(n == 0, float("-inf"))


def recurrent_product(h: Tensor, weight_hh: Tensor) -> Tensor:
    """``R h`` for the block-diagonal ``R``: ``h (..., H)``, ``weight_hh (K, 4d, d)`` ->
    ``(..., 4H)`` gate-major ``(i|f|z|o)``: head ``k``'s units read head ``k``'s part of ``h``."""
    heads, rows, width = weight_hh.shape
    lead = h.shape[:-1]
    per_head = torch.einsum("kgd,...kd->...kg", weight_hh, h.reshape(*lead, heads, width))
    # (..., K, 4, d) -> (..., 4, K, d): each gate's H units in head order.
    return per_head.reshape(*lead, heads, GATES, width).transpose(-3, -2).reshape(
        *lead, GATES * heads * width)


def block_diagonal(weight_hh: Tensor) -> Tensor:
    """The block-diagonal ``R`` as one dense ``(4H, H)`` matrix, gate-major ``(R_i|R_f|R_z|R_o)``,
    from ``weight_hh (K, 4d, d)``: ``R h`` is then ``F.linear(h, R)``, `recurrent_product`'s
    value. Built from the weights' static sizes alone (for the ONNX route, whose loop body may
    not reshape by a symbolic batch); K times the products' work, so not for the fast paths."""
    heads, rows, width = weight_hh.shape
    per_gate = weight_hh.unflatten(1, (GATES, width))  # (K, 4, d, d)
    eye = torch.eye(heads, dtype=weight_hh.dtype, device=weight_hh.device)
    dense = torch.einsum("kgij,kl->gkilj", per_gate, eye)  # (4, K, d, K, d)
    return dense.reshape(GATES * heads * width, heads * width)


def step(x: Tensor, state: SLSTMState, weight_ih: Tensor, weight_hh: Tensor,
         bias_ih: Tensor | None, exp_forget: bool) -> SLSTMState:
    """One stabilised step on autograd: ``x (N, I)`` or ``(I,)``, ``state`` ``(h, c, n, m)``
    each ``(N, H)`` or ``(H,)`` -> the new ``(h, c, n, m)`` (`gate_step` after the products)."""
    pre = F.linear(x, weight_ih, bias_ih) + recurrent_product(state[0], weight_hh)  # (N, 4H)
    return gate_step(pre, state, exp_forget)


def gate_step(pre: Tensor, state: SLSTMState, exp_forget: bool) -> SLSTMState:
    """The step from its pre-activations ``pre = W x + R h + b`` ``(N, 4H)`` gate-major
    ``(ĩ|f̃|z̃|õ)``, on autograd: the new ``(h, c, n, m)`` of `step_values`."""
    values = step_values(pre, state, exp_forget)
    return values["h"], values["c"], values["n"], values["m"]


def step_values(pre: Tensor, state: SLSTMState, exp_forget: bool) -> dict[str, Tensor]:
    """Every quantity of one step, by its symbol, on autograd: the equations of the module
    docstring, line by line (`gate_step` keeps the new state; `rnnkit.diagnostics` the rest).

    ``"log i"`` ``ĩ``, ``"log f"`` ``log f``, ``"i'"``, ``"f'"`` the stabilised factors, ``"z"``,
    ``"o"``, and the new state ``"c"``, ``"n"``, ``"m"``, ``"h"``; each ``(N, H)``.
    """
    h, c, n, m = state
    i_pre, f_pre, z_pre, o_pre = pre.chunk(GATES, dim=-1)
    log_f = log_forget(f_pre, exp_forget)
    log_f_plus_m = log_f + m
    # max(log f + m, ĩ), the first branch on a tie (spec); where(), not maximum(), which would
    # split a tie's gradient between the branches.
    m_new = torch.where(log_f_plus_m >= i_pre, log_f_plus_m, i_pre)
    i = torch.exp(i_pre - m_new)
    f = torch.exp(log_f_plus_m - m_new)
    z = torch.tanh(z_pre)
    o = torch.sigmoid(o_pre)
    c_new = f * c + i * z
    n_new = f * n + i
    h_new = o * c_new / n_new
    return {"log i": i_pre, "log f": log_f, "i'": i, "f'": f, "z": z, "o": o, "c": c_new,
            "n": n_new, "m": m_new, "h": h_new}


def run_reference(x: Tensor, state: SLSTMState, weight_ih: Tensor, weight_hh: Tensor,
                  bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
                  exp_forget: bool) -> tuple[Tensor, SLSTMState]:
    """One layer in one direction, `step` by step on autograd: the spec every other path is
    tested against. Arguments and results as `rnnkit.engine.run_slstm_direction`."""
    steps = x.shape[0]
    outputs: list[Tensor | None] = [None] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        new_state = step(x[t], state, weight_ih, weight_hh, bias_ih, exp_forget)
        if lengths is not None:
            # Past a sequence's end the state (all four parts) is held: going forward it keeps
            # the value after the last valid step, going backward it stays the initial state
            # until the last valid step.
            valid = (lengths > t).unsqueeze(1)  # (N, 1)
            new_state = tuple(torch.where(valid, new, old)
                              for new, old in zip(new_state, state, strict=True))
            outputs[t] = new_state[0].masked_fill(~valid, 0.0)
        else:
            outputs[t] = new_state[0]
        state = new_state  # type: ignore[assignment]
    return torch.stack(outputs), state  # type: ignore[arg-type]


# ---- layouts of the fused loops ------------------------------------------------------------
def heads_first(rows: Tensor, heads: int) -> Tensor:
    """Gate-major rows ``(4H, ...)``, ``(i|f|z|o)`` of ``H = K d`` units each, reordered
    head-major: head ``k``'s ``(i|f|z|o)`` of its ``d`` units, ``(K 4d, ...)``."""
    rest = rows.shape[1:]
    return rows.reshape(GATES, heads, -1, *rest).transpose(0, 1).reshape(rows.shape)


def gates_first(rows: Tensor, heads: int) -> Tensor:
    """The inverse of `heads_first`: head-major rows ``(K 4d, ...)`` back to gate-major."""
    rest = rows.shape[1:]
    return rows.reshape(heads, GATES, -1, *rest).transpose(0, 1).reshape(rows.shape)


def split_heads(state: Tensor, heads: int) -> Tensor:
    """``(N, H)`` -> ``(K, N, d)``, a view."""
    return state.unflatten(1, (heads, -1)).transpose(0, 1)


def merge_heads(state: Tensor) -> Tensor:
    """``(..., K, N, d)`` -> ``(..., N, K d)``, always a new tensor (an operator's outputs may
    not alias its buffers, and with ``K = 1`` a reshape would be a view)."""
    moved = state.transpose(-3, -2)
    return moved.clone(memory_format=torch.contiguous_format).flatten(-2)


def entering(states: Tensor, reverse: bool) -> Tensor:
    """States entering each step, ``(T, ...)`` from a ``(T + 1, ...)`` buffer whose initial
    state sits at index 0 going forward and at index T going backward."""
    return states[1:] if reverse else states[:-1]


def leaving(states: Tensor, reverse: bool) -> Tensor:
    """States leaving each step, ``(T, ...)``, from the same buffer."""
    return states[:-1] if reverse else states[1:]


# ---- the fused loops -----------------------------------------------------------------------
def fused_forward(x: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor, weight_ih: Tensor,
                  weight_hh: Tensor, bias_ih: Tensor | None, lengths: Tensor | None,
                  reverse: bool, exp_forget: bool):
    """The time loop with preallocated buffers. ``x (T, N, I)``, states ``(N, H)``.

    Returns the layer's results, ``output (T, N, H)``, ``h_n, c_n, n_n, m_n (N, H)``, and what
    `fused_backward` reads, head-major: ``pre (T, K, N, 4d)`` the full pre-activations
    ``(ĩ|f̃|z̃|õ)``, ``gates (T, K, N, 4d)`` the values ``(i'|f'|z|o)``, ``h_tilde (T, K, N, d)``
    ``c_t / n_t`` and ``n_new (T, K, N, d)`` ``n_t`` (both before the lengths' masking, so
    finite at every step), and the state buffers ``h, c, n, m (T + 1, K, N, d)`` (`entering`,
    `leaving`), held past each sequence's end.
    """
    steps, batch = x.shape[:2]
    heads, _, width = weight_hh.shape
    valid = valid_steps(lengths, steps)  # (T, N, 1)
    valid = None if valid is None else valid.unsqueeze(1)  # (T, 1, N, 1): all heads
    pre = F.linear(x, heads_first(weight_ih, heads),
                   None if bias_ih is None else heads_first(bias_ih, heads))  # (T, N, K 4d)
    pre = pre.unflatten(2, (heads, GATES * width)).transpose(1, 2).contiguous()  # (T,K,N,4d)
    weight_hh_t = weight_hh.transpose(1, 2)  # (K, d, 4d)
    gates = torch.empty_like(pre)
    new = x.new_empty
    h_states, c_states, n_states, m_states = (new(steps + 1, heads, batch, width)
                                              for _ in range(4))
    h_tilde = new(steps, heads, batch, width)
    n_new = new(steps, heads, batch, width)
    output = new(steps, heads, batch, width) if valid is not None else None
    first = steps if reverse else 0
    for buffer, initial in zip((h_states, c_states, n_states, m_states), (h0, c0, n0, m0),
                               strict=True):
        buffer[first] = split_heads(initial, heads)
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        old, now = (t + 1, t) if reverse else (t, t + 1)
        h, c, n, m = h_states[old], c_states[old], n_states[old], m_states[old]  # (K, N, d)
        a = pre[t].baddbmm_(h, weight_hh_t)  # (K, N, 4d): W x + b + R h
        i_pre, f_pre, z_pre, o_pre = a.split(width, dim=2)
        i, f, z, o = gates[t].split(width, dim=2)
        log_f_plus_m = torch.add(log_forget(f_pre, exp_forget), m)
        m_new = torch.where(log_f_plus_m >= i_pre, log_f_plus_m, i_pre, out=m_states[now])
        torch.sub(i_pre, m_new, out=i).exp_()
        torch.sub(log_f_plus_m, m_new, out=f).exp_()
        torch.tanh(z_pre, out=z)
        torch.sigmoid(o_pre, out=o)
        c_new = torch.mul(f, c, out=c_states[now]).addcmul_(i, z)
        torch.mul(f, n, out=n_new[t]).add_(i)
        n_states[now] = n_new[t]
        torch.div(c_new, n_new[t], out=h_tilde[t])
        h_new = torch.mul(o, h_tilde[t], out=h_states[now])
        if valid is not None:
            valid_t = valid[t]
            for buffer in (h_states, c_states, n_states, m_states):
                buffer[now] = torch.where(valid_t, buffer[now], buffer[old])
            output[t] = h_new.masked_fill(~valid_t, 0.0)
    output = leaving(h_states, reverse) if output is None else output
    finals = (merge_heads(s[0 if reverse else steps])
              for s in (h_states, c_states, n_states, m_states))
    return (merge_heads(output), *finals, pre, gates, h_tilde, n_new, h_states, c_states,
            n_states, m_states)


def fused_backward(d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, d_n_n: Tensor,
                   d_m_n: Tensor, pre: Tensor, gates: Tensor, h_tilde: Tensor, n_new: Tensor,
                   c_states: Tensor, n_states: Tensor, m_states: Tensor, weight_hh: Tensor,
                   lengths: Tensor | None, reverse: bool, exp_forget: bool):
    """The reverse loop: the exact derivative of `fused_forward`, the path through ``m``
    included (spec). ``d_output (T, N, H)``, ``d_* (N, H)``, buffers as `fused_forward`'s.

    Returns ``d_pre (T, K, N, 4d)``, the gradients of ``(ĩ|f̃|z̃|õ)`` head-major, zero past each
    sequence's end, and ``d_h0, d_c0, d_n0, d_m0 (N, H)``. Per step, with ``u = log f + m_{t-1}``
    and ``m_t = u`` where ``u >= ĩ`` (else ``ĩ``)::

        dõ = dh ⊙ h̃ ⊙ o (1 - o)           dh̃ = dh ⊙ o
        dc += dh̃ / n_t                    dn -= dh̃ ⊙ h̃ / n_t
        df' = dc ⊙ c_{t-1} + dn ⊙ n_{t-1}  di' = dc ⊙ z + dn        dz̃ = dc ⊙ i' (1 - z²)
        dm_t (total) = dm - df' f' - di' i'                          (f', i' = exp(· - m_t))
        du = df' f' + [u >= ĩ] dm_t        dĩ = di' i' + [u < ĩ] dm_t
        df̃ = du ⊙ σ(-f̃) (sigmoid) or du (exp)
        dc_{t-1} = dc ⊙ f'   dn_{t-1} = dn ⊙ f'   dm_{t-1} = du   dh_{t-1} = R^T d(pre)
    """
    steps = pre.shape[0]
    heads, _, width = weight_hh.shape
    valid = valid_steps(lengths, steps)
    valid = None if valid is None else valid.unsqueeze(1)  # (T, 1, N, 1)
    d_out = d_output.unflatten(2, (heads, width)).transpose(1, 2)  # (T, K, N, d), a view
    d_h, d_c, d_n, d_m = (split_heads(g, heads) for g in (d_h_n, d_c_n, d_n_n, d_m_n))
    d_pre = torch.empty_like(pre)
    for t in range(steps) if reverse else range(steps - 1, -1, -1):
        old = t + 1 if reverse else t
        valid_t = None if valid is None else valid[t]
        d_h_t = d_h + d_out[t]
        d_c_t, d_n_t, d_m_t = d_c, d_n, d_m
        if valid_t is not None:  # a step past the end: its gradients are zero
            d_h_t, d_c_t, d_n_t, d_m_t = (torch.where(valid_t, g, 0.0)
                                          for g in (d_h_t, d_c_t, d_n_t, d_m_t))
        i, f, z, o = gates[t].split(width, dim=2)
        i_pre, f_pre, _, _ = pre[t].split(width, dim=2)
        d_i, d_f, d_z, d_o = d_pre[t].split(width, dim=2)
        h_t, n_t = h_tilde[t], n_new[t]
        torch.mul(d_h_t * h_t, o * (1 - o), out=d_o)
        d_h_tilde = d_h_t * o
        d_c_t = d_c_t + d_h_tilde / n_t
        d_n_t = d_n_t - d_h_tilde * h_t / n_t
        d_f_prime = d_c_t * c_states[old] + d_n_t * n_states[old]
        d_i_prime = d_c_t * z + d_n_t
        torch.mul(d_c_t * i, 1 - z * z, out=d_z)
        through_f = d_f_prime * f  # ∂/∂(u - m_t)
        through_i = d_i_prime * i  # ∂/∂(ĩ - m_t)
        d_m_total = d_m_t - through_f - through_i
        past = torch.add(log_forget(f_pre, exp_forget), m_states[old]) >= i_pre
        d_u = through_f + torch.where(past, d_m_total, 0.0)
        torch.add(through_i, torch.where(past, 0.0, d_m_total), out=d_i)
        if exp_forget:
            d_f.copy_(d_u)
        else:
            torch.mul(d_u, torch.sigmoid(-f_pre), out=d_f)  # d logσ(f̃) / df̃ = σ(-f̃)
        if valid_t is not None:
            # Rows past a sequence's end add nothing to the weights' gradients.
            d_pre[t].masked_fill_(~valid_t, 0.0)
        d_h_old = torch.bmm(d_pre[t], weight_hh)  # (K, N, d)
        d_c_old, d_n_old, d_m_old = d_c_t * f, d_n_t * f, d_u
        if valid_t is None:
            d_h, d_c, d_n, d_m = d_h_old, d_c_old, d_n_old, d_m_old
        else:  # the held state passes its gradient around the step
            d_h, d_c, d_n, d_m = (torch.where(valid_t, through, held) for through, held in
                                  ((d_h_old, d_h), (d_c_old, d_c), (d_n_old, d_n),
                                   (d_m_old, d_m)))
    return (d_pre, *(merge_heads(g) for g in (d_h, d_c, d_n, d_m)))


def weight_gradients(d_pre: Tensor, x: Tensor, h_entering: Tensor, weight_ih: Tensor,
                     needs: tuple[bool, bool, bool, bool]):
    """``(d x, d weight_ih, d weight_hh, d bias_ih)`` from ``d_pre (T, K, N, 4d)``, each one
    product over all steps, in the public layouts; ``h_entering (T, K, N, d)``; ``needs`` says
    which are wanted (None for the others)."""
    steps, heads, batch, rows = d_pre.shape
    flat = d_pre.transpose(1, 2).reshape(steps * batch, heads * rows)  # (T N, K 4d)
    d_x = d_w_ih = d_w_hh = d_b = None
    if needs[0]:
        d_x = (flat @ heads_first(weight_ih, heads)).unflatten(0, (steps, batch))
    if needs[1]:
        d_w_ih = gates_first(weight_product(flat, x.flatten(0, 1)), heads)
    if needs[2]:
        # Head k's (4d, d) block is one product over the T N rows, each operand read in place
        # through a (T N, ·) view (the native buffers' rows are K heads wide, so that view has
        # a row stride, which BLAS takes). einsum did the same product after a transposing
        # copy of d_pre, (T, K, N, 4d) -> (K, 4d, N, T): 0.7-0.9 s of a 1.9 s training step at
        # T = 1000, N = 50, H = 128 (docs/benchmarks.md, issue 20).
        d_w_hh = torch.stack([d_pre[:, k].flatten(0, 1).t() @ h_entering[:, k].flatten(0, 1)
                              for k in range(heads)])  # (K, 4d, d)
    if needs[3]:
        d_b = gates_first(flat.sum(0), heads)
    return d_x, d_w_ih, d_w_hh, d_b
