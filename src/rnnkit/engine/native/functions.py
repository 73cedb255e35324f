"""The native operators' CPU implementations: products over all steps here, time loops in C++.

`rnnkit.engine.ops` registers these functions as the ``rnnkit::native_*`` operators. Per layer
and direction the forward is one input projection (every step at once, biases folded in; the
LSTM kernel adds its biases itself as it reads each step) and one kernel call (the recurrent
loop, `kernels.cpp`); an LSTM whose input is narrower than its state, from batch 4, projects
the input inside its loop instead (`kernels.lstm_projects_input` states when). The backward is
one kernel call (the reverse loop, giving the gate gradients of every step); the weight
gradients are then one product each over all steps, taken by the operators' autograd formula.
The kernels keep states in a ``(T + 1, N, H)`` buffer in time order (the state entering step t
is at index t going forward and t + 1 going backward). Without lengths the output is that
buffer's last (forward) or first (reverse) ``T`` slots: the operators return the buffer and an
empty output, and the caller takes the view, since an operator's outputs may not alias each
other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor

from rnnkit.engine.native import build
from rnnkit.engine.products import summed_bias
from rnnkit.engine.slstm import heads_first
from rnnkit.engine.steps import Family

# Up to this many rows (steps x batch), the input projection uses the kernels' own product:
# ATen's costs tens of microseconds at one row (a streamed step) with MKL on this CPU class.
SMALL_PROJECTION_ROWS = 16

T = TypeVar("T")


def _kernels():
    kernels = build.kernels()
    if kernels is None:  # the engine seam checks first; this is for direct calls of the op
        raise RuntimeError(
            f"rnnkit's native kernels are not available ({build.failure()}); run the layer "
            f"with backend='fused' or 'auto'"
        )
    return kernels


def with_subnormals_flushed(compute: Callable[[], T]) -> T:
    """``compute()`` with subnormal floats flushed to zero on this thread, as the kernels run
    (`kernels.cpp`, "subnormal floats"), the caller's mode restored after: for the products over
    all steps taken here from a kernel's gradients, whose smallest normal values times states
    below 1 would otherwise write subnormal partial products, each a slow microcode assist."""
    return _kernels().call_flushed(compute)


def bernoulli_mask(shape: list[int], p: float, seed: Tensor, float64: bool) -> Tensor:
    """0/1 entries of ``shape``, 1 with probability ``p``, from SplitMix64 started at the 0-dim
    int64 ``seed`` (`rnnkit.engine.masks`); float64 if ``float64``, else float32."""
    return _kernels().bernoulli_mask([int(size) for size in shape], p, seed, float64)


def _project(kernels, x: Tensor, weight: Tensor, bias: Tensor | None,
             second_bias: Tensor | None = None) -> Tensor:
    """x W^T + b (+ b2) for every step at once, ``(T, N, I) -> (T, N, G)``, a new tensor."""
    if x.shape[0] * x.shape[1] <= SMALL_PROJECTION_ROWS:
        return kernels.linear(x.contiguous(), weight.contiguous(), _contiguous(bias),
                              _contiguous(second_bias))
    return F.linear(x, weight, summed_bias(bias, second_bias)).contiguous()


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    """The kernels read raw pointers: every tensor reaching them is made contiguous here (a
    parameter may be an expanded or strided view), and they check it at their entry."""
    return None if tensor is None else tensor.contiguous()


def _final(states: Tensor, reverse: bool) -> Tensor:
    """The state after the last step run (step 0 when reversed), as a tensor of its own."""
    return (states[0] if reverse else states[-1]).clone()


def _own_output(output: Tensor, lengths: Tensor | None) -> Tensor:
    """The kernel's output with lengths; without, an empty stand-in (the output is a view)."""
    return output if lengths is not None else output.new_empty(0)


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse: bool, relu: bool,
                layer_outputs_only: bool = False):
    """h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh). Returns ``states (T + 1, N, H)``,
    ``output (T, N, H)`` (empty without lengths), ``h_n (N, H)``, ``raw (T, N, H)`` (each
    step's act(...), which the backward reads); with ``layer_outputs_only`` (nothing to
    differentiate), ``output, h_n`` alone, the output a view of the states buffer."""
    kernels = _kernels()
    pre = _project(kernels, x, w_ih, b_ih, b_hh)  # (T, N, H), activated by the kernel
    output, states = kernels.rnn_forward(pre, h0.contiguous(), w_hh.contiguous(),
                                         _contiguous(lengths), reverse, relu)
    if layer_outputs_only:
        return output, _final(states, reverse)
    return states, _own_output(output, lengths), _final(states, reverse), pre


def rnn_backward(d_output, d_h_n, raw, w_hh, lengths, reverse: bool, relu: bool):
    """Returns ``d_pre (T, N, H)`` and ``d_h0 (N, H)``."""
    d_pre, d_h0 = _kernels().rnn_backward(d_output.contiguous(), d_h_n.contiguous(), raw,
                                          w_hh.contiguous(), _contiguous(lengths), reverse, relu)
    return d_pre, d_h0


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse: bool,
                 layer_outputs_only: bool = False):
    """The spec's LSTM with optional peephole (w_ch) and projection (w_hr). Returns
    ``h_states (T + 1, N, P)``, ``c_states (T + 1, N, H)``, ``output (T, N, P)`` (empty
    without lengths), ``h_n (N, P)``, ``c_n (N, H)``, ``gates (T, N, 4H)`` activated and an
    empty stand-in for each step's new cell, which is the state each step leaves (c_states
    past the entering one: `rnnkit.engine.ops._leaving`, also with lengths, where the held cell
    is both); with ``layer_outputs_only``, ``output, h_n, c_n`` alone."""
    kernels = _kernels()
    steps, batch = x.shape[0], x.shape[1]
    if w_hr is None and kernels.lstm_projects_input(steps, batch, x.shape[2], w_hh.shape[1],
                                                     False, x.element_size()):
        # The resident loop's tiles project x_t themselves: no (T, N, 4H) projection written
        # before the loop and read back in it (gates: empty without a backward to come)
        output, h_states, c_states, gates = kernels.lstm_forward_input(
            x.contiguous(), w_ih.contiguous(), _contiguous(summed_bias(b_ih, b_hh)),
            h0.contiguous(), c0.contiguous(), w_hh.contiguous(), _contiguous(w_ch),
            _contiguous(lengths), reverse, not layer_outputs_only,
        )
    else:
        if steps * batch <= SMALL_PROJECTION_ROWS:
            gates, bias = _project(kernels, x, w_ih, b_ih, b_hh), None
        else:  # the kernel adds the biases as it reads each step: no pass over (T, N, 4H)
            gates, bias = _project(kernels, x, w_ih, None), _contiguous(summed_bias(b_ih, b_hh))
        output, h_states, c_states = kernels.lstm_forward(
            gates, bias, h0.contiguous(), c0.contiguous(), w_hh.contiguous(), _contiguous(w_hr),
            _contiguous(w_ch), _contiguous(lengths), reverse, not layer_outputs_only,
        )
    if layer_outputs_only:  # no gates kept
        return output, _final(h_states, reverse), _final(c_states, reverse)
    return (h_states, c_states, _own_output(output, lengths), _final(h_states, reverse),
            _final(c_states, reverse), gates, c_states.new_empty(0))


def lstm_backward(d_output, d_h_n, d_c_n, gates, c_states, c_new, w_hh, w_hr, w_ch, lengths,
                  reverse: bool):
    """Returns ``d_gates (T, N, 4H)``, ``d_h0 (N, P)``, ``d_c0 (N, H)``, ``d_w_hr (P, H)``
    (empty without a projection) and ``d_bias (4H,)``, the gate gradients summed over steps and
    rows (the gradient of each bias)."""
    d_gates, d_h0, d_c0, d_w_hr, d_bias = _kernels().lstm_backward(
        d_output.contiguous(), d_h_n.contiguous(), d_c_n.contiguous(), gates, c_states, c_new,
        w_hh.contiguous(), _contiguous(w_hr), _contiguous(w_ch), _contiguous(lengths), reverse,
    )
    return (d_gates, d_h0, d_c0, d_w_hr if w_hr is not None else d_gates.new_empty(0),
            d_bias)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse: bool, reset_after: bool,
                layer_outputs_only: bool = False):
    """The spec's GRU. Returns ``states (T + 1, N, H)``, ``output (T, N, H)`` (empty without
    lengths), ``h_n (N, H)``, ``gates (T, N, 3H)`` activated (r | z | n) and ``n_input
    (T, N, H)``: what r multiplies, ``W_hn h + b_hn`` (reset after) or ``r ⊙ h`` (before);
    with ``layer_outputs_only``, ``output, h_n`` alone."""
    kernels = _kernels()
    # Reset before W_hn: every recurrent bias sits outside r's product and folds into b_ih.
    # Reset after: b_hn is multiplied by r, so the recurrent biases stay in the loop.
    gates = _project(kernels, x, w_ih, b_ih, None if reset_after else b_hh)
    output, states, n_input = kernels.gru_forward(
        gates, h0.contiguous(), w_hh.contiguous(), _contiguous(b_hh) if reset_after else None,
        _contiguous(lengths), reverse, reset_after,
    )
    if layer_outputs_only:
        return output, _final(states, reverse)
    return states, _own_output(output, lengths), _final(states, reverse), gates, n_input


def gru_backward(d_output, d_h_n, gates, states, n_input, w_hh, lengths, reverse: bool,
                 reset_after: bool):
    """Returns ``d_x_gates (T, N, 3H)``, ``d_hn (T, N, H)`` (reset after; else empty) and
    ``d_h0 (N, H)``, as `rnnkit.engine.fused.gru_backward`."""
    d_x_gates, d_hn, d_h0 = _kernels().gru_backward(
        d_output.contiguous(), d_h_n.contiguous(), gates, states, n_input, w_hh.contiguous(),
        _contiguous(lengths), reverse, reset_after,
    )
    return d_x_gates, d_hn if reset_after else d_x_gates.new_empty(0), d_h0



def slstm_forward(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse: bool, exp_forget: bool,
                  layer_outputs_only: bool = False):
    """xLSTM's sLSTM (`rnnkit.engine.slstm`), one layer direction: ``x (T, N, I)``, the initial
    ``h0, c0, n0, m0 (N, H)``, ``w_ih (4H, I)`` and ``b_ih (4H,)`` gate-major, ``w_hh (K, 4d,
    d)``. The input projection writes each row head-major (``slstm.heads_first`` of the weight
    rows and bias), the layout of the kernel's buffers. Returns ``h_states (T + 1, N, H)``,
    ``output (T, N, H)`` (empty without lengths), ``h_n, c_n, n_n, m_n (N, H)``, ``pre (T, N,
    4H)`` (rows head-major, ``(ĩ|f̃|z|o)``: the input and forget gates' full pre-activations and
    the activated z and o, all the backward reads of a step's gates; it recomputes i' and f'
    from them and the m states) and ``c_states, n_states, m_states (T + 1, N, H)``; with
    ``layer_outputs_only`` (nothing to differentiate), ``output`` (a view of the h states
    without lengths) and the final ``(h, c, n, m)``."""
    kernels = _kernels()
    heads = w_hh.shape[0]
    pre = _project(kernels, x, heads_first(w_ih, heads),
                   None if b_ih is None else heads_first(b_ih, heads))  # (T, N, 4H)
    output, *states = kernels.slstm_forward(
        pre, h0.contiguous(), c0.contiguous(), n0.contiguous(), m0.contiguous(),
        w_hh.contiguous(), _contiguous(lengths), reverse, exp_forget, not layer_outputs_only)
    finals = tuple(_final(s, reverse) for s in states)
    if layer_outputs_only:
        return output, finals
    h_states, c_states, n_states, m_states = states
    return (h_states, _own_output(output, lengths), *finals, pre, c_states, n_states, m_states)


def slstm_backward(d_output, d_h_n, d_c_n, d_n_n, d_m_n, pre, c_states, n_states, m_states, w_hh,
                   lengths, reverse: bool, exp_forget: bool):
    """Returns ``d_pre (T, N, 4H)`` (rows head-major, zero past each sequence's end) and
    ``d_h0, d_c0, d_n0, d_m0 (N, H)``; arguments as `slstm_forward` returned them."""
    d_pre, d_h0, d_c0, d_n0, d_m0 = _kernels().slstm_backward(
        d_output.contiguous(), d_h_n.contiguous(), d_c_n.contiguous(), d_n_n.contiguous(),
        d_m_n.contiguous(), pre, c_states, n_states, m_states, w_hh.contiguous(),
        _contiguous(lengths), reverse, exp_forget)
    return d_pre, d_h0, d_c0, d_n0, d_m0

# ---- one streamed step (inference only) -------------------------------------------------------
#
# One kernel call per layer and step: both products and the gate math in one pass over the
# weights (`kernels.cpp`, "one streamed step"). Every argument must already be contiguous and of
# one dtype on the CPU (`rnnkit.engine.inference_step` makes sure); nothing is saved for a
# backward, so these are only called when nothing is differentiated.


def step_kernel(kind, weights):
    """``run(x, state)``: the state after one step of ``x (N, I)`` from ``state`` (``h (N,
    H_out)``, or ``(h, c)`` for an LSTM), with ``weights`` (`rnnkit.engine.steps.CellWeights`, no
    layer norm) bound once: a stream's steps call it without gathering the weights again."""
    kernels = _kernels()
    w = weights
    if kind.family == Family.LSTM:
        lstm_step = kernels.lstm_step
        rest = (w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, w.weight_hr, w.weight_ch)

        def run_lstm(x: Tensor, state):
            h_new, c_new = lstm_step(x, *state, *rest)
            return h_new, c_new
        return run_lstm
    if kind.family == Family.GRU:
        gru_step = kernels.gru_step
        rest = (w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, kind.reset_after)
        return lambda x, h: gru_step(x, h, *rest)
    rnn_step = kernels.rnn_step
    rest = (w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, kind.nonlinearity == "relu")
    return lambda x, h: rnn_step(x, h, *rest)


def slstm_step_kernel(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, exp_forget: bool):
    """``run(x, state)``: the sLSTM's ``(h, c, n, m)`` after one step of ``x (N, I)`` from
    ``state`` (each ``(N, H)``; ``m`` taken as ``-inf`` where ``n = 0``), with ``w_ih (4H, I)``
    and ``b_ih (4H,)`` gate-major and ``w_hh (K, 4d, d)`` bound once: both products and the
    stabilised gate math in one call (`kernels.cpp`, "sLSTM: one streamed step")."""
    slstm_step = _kernels().slstm_step
    return lambda x, state: tuple(slstm_step(x, *state, w_ih, w_hh, b_ih, exp_forget))


# ---- the recurrence operators: layer norm, recurrent dropout, zoneout -----------------------
#
# The input side ``pre_x (T, N, G*H)`` comes computed (on autograd) and is only read; the kernels
# run the recurrence (the contract: /work/recurrence-contract.md, the math of `steps`). Absent
# per-step buffers (no layer norm, no projection) are empty tensors; every reduction over the
# batch (weight, gain and bias gradients) is left to the caller.


def _or_empty(tensor: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if tensor is None else tensor


def _when(given: Tensor | None, tensor: Tensor | None) -> Tensor | None:
    """``tensor`` made contiguous when ``given`` (its switch) is set, else None: the forward's
    empty stand-ins for absent buffers never reach the kernels."""
    return None if given is None else _contiguous(tensor)


def lstm_recurrence_forward(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch,
                            recurrent_mask, zoneout_h, zoneout_c, lengths, reverse: bool,
                            gain_ih=None, bias_ih=None):
    """The LSTM recurrence. Returns ``output (T, N, P)``, ``h_n (N, P)``, ``c_n (N, H)``,
    ``h_states (T + 1, N, P)``, ``c_states (T + 1, N, H)``, ``gates (T, N, 4H)`` activated,
    ``c_new (T, N, H)`` (un-zoned new cells), ``normalised_hh (T, N, 4H)`` and ``rstd_hh
    (T, N)`` (empty without ``gain_hh``), ``normalised_c (T, N, H)`` and ``rstd_c (T, N)``
    (empty without ``gain_c``), ``mean_ih`` and ``rstd_ih (T, N)`` (empty without
    ``gain_ih``).

    With ``gain_ih`` (the input side's layer norm folded in; needs ``gain_hh``) ``pre_x`` is
    the raw product ``W_ih x`` and the kernel normalises each row; ``bias_ih (4H,)``, when
    given, is added to every row."""
    (output, h_states, c_states, gates, c_new, normalised_hh, rstd_hh, normalised_c,
     rstd_c, mean_ih, rstd_ih) = _kernels().lstm_recurrence_forward(
        _contiguous(pre_x), h0.contiguous(), c0.contiguous(), w_hh.contiguous(),
        _contiguous(gain_hh), _contiguous(gain_c), _contiguous(shift_c), _contiguous(w_hr),
        _contiguous(w_ch), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(zoneout_c), _contiguous(lengths), reverse, _contiguous(gain_ih),
        _contiguous(bias_ih),
    )
    return (output, _final(h_states, reverse), _final(c_states, reverse), h_states, c_states,
            gates, c_new, _or_empty(normalised_hh, pre_x), _or_empty(rstd_hh, pre_x),
            _or_empty(normalised_c, pre_x), _or_empty(rstd_c, pre_x),
            _or_empty(mean_ih, pre_x), _or_empty(rstd_ih, pre_x))


def lstm_recurrence_backward(d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new,
                             normalised_hh, rstd_hh, normalised_c, rstd_c, w_hh, gain_hh, gain_c,
                             shift_c, w_hr, w_ch, recurrent_mask, zoneout_h, zoneout_c, lengths,
                             reverse: bool, pre_x=None, mean_ih=None, rstd_ih=None,
                             gain_ih=None):
    """Returns ``d_pre_x (T, N, 4H)`` (the gate pre-activation gradients), ``d_product
    (T, N, 4H)`` (the gradient of ``hm W_hh^T``; empty without ``gain_hh``), ``d_h0 (N, P)``,
    ``d_c0 (N, H)``, ``d_w_hr (P, H)`` (empty without a projection), ``d_cell_norm
    (T, N, H)`` (the gradient of LN(c̃)'s output; empty without ``gain_c``), and the sums of
    the folded input norm (each empty unless ``gain_ih`` is given, with the forward's
    ``pre_x``, ``mean_ih``, ``rstd_ih``): ``d_gain_ih``, ``d_bias_ih``, ``d_gain_hh`` (4H,),
    ``d_gain_c``, ``d_shift_c`` (H,) (with ``gain_c``), ``d_w_ch`` (3H,) (with ``w_ch``).
    Folded, ``d_pre_x`` is the gradient of the raw product ``W_ih x``."""
    (d_pre_x, d_product, d_h0, d_c0, d_w_hr, d_cell_norm,
     *sums) = _kernels().lstm_recurrence_backward(
        d_output.contiguous(), d_h_n.contiguous(), d_c_n.contiguous(), h_states.contiguous(),
        c_states.contiguous(), gates.contiguous(), c_new.contiguous(),
        _when(gain_hh, normalised_hh), _when(gain_hh, rstd_hh), _when(gain_c, normalised_c),
        _when(gain_c, rstd_c), w_hh.contiguous(), _contiguous(gain_hh), _contiguous(gain_c),
        _contiguous(shift_c), _contiguous(w_hr), _contiguous(w_ch), _contiguous(recurrent_mask),
        _contiguous(zoneout_h), _contiguous(zoneout_c), _contiguous(lengths), reverse,
        _when(gain_ih, pre_x), _when(gain_ih, mean_ih), _when(gain_ih, rstd_ih),
        _contiguous(gain_ih),
    )
    return (d_pre_x, _or_empty(d_product, d_pre_x), d_h0, d_c0, _or_empty(d_w_hr, d_pre_x),
            _or_empty(d_cell_norm, d_pre_x), *(_or_empty(s, d_pre_x) for s in sums))


def gru_recurrence_forward(pre_x, h0, w_hh, b_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                           reverse: bool, reset_after: bool):
    """The GRU recurrence. Returns ``output (T, N, H)``, ``h_n (N, H)``, ``states
    (T + 1, N, H)``, ``gates (T, N, 3H)`` activated (r | z | n), ``n_input (T, N, H)`` (what r
    multiplies: ``u_n`` reset after, ``r ⊙ hm`` before), ``normalised_hh (T, N, 3H)`` and
    ``rstd_hh (T, N)`` (empty without ``gain_hh``)."""
    output, states, gates, n_input, normalised_hh, rstd_hh = _kernels().gru_recurrence_forward(
        _contiguous(pre_x), h0.contiguous(), w_hh.contiguous(), _contiguous(b_hh),
        _contiguous(gain_hh), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(lengths), reverse, reset_after,
    )
    return (output, _final(states, reverse), states, gates, n_input,
            _or_empty(normalised_hh, pre_x), _or_empty(rstd_hh, pre_x))


def gru_recurrence_backward(d_output, d_h_n, states, gates, n_input, normalised_hh, rstd_hh, w_hh,
                            gain_hh, recurrent_mask, zoneout_h, lengths, reverse: bool,
                            reset_after: bool):
    """Returns ``d_pre_x (T, N, 3H)`` (r, z, n pre-activation gradients), ``d_hidden
    (T, N, 3H)`` (``(d_r, d_z, d_n ⊙ r)``, reset after; else empty), ``d_product (T, N, 3H)``
    (empty without ``gain_hh``) and ``d_h0 (N, H)``."""
    d_pre_x, d_hidden, d_product, d_h0 = _kernels().gru_recurrence_backward(
        d_output.contiguous(), d_h_n.contiguous(), states.contiguous(), gates.contiguous(),
        n_input.contiguous(), _when(gain_hh, normalised_hh), _when(gain_hh, rstd_hh),
        w_hh.contiguous(), _contiguous(gain_hh), _contiguous(recurrent_mask),
        _contiguous(zoneout_h), _contiguous(lengths), reverse, reset_after,
    )
    return d_pre_x, _or_empty(d_hidden, d_pre_x), _or_empty(d_product, d_pre_x), d_h0


def rnn_recurrence_forward(pre_x, h0, w_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                           reverse: bool, relu: bool):
    """The Elman recurrence. Returns ``output (T, N, H)``, ``h_n (N, H)``, ``states
    (T + 1, N, H)``, ``raw (T, N, H)`` (each step's un-zoned ``h̃``), ``normalised_hh
    (T, N, H)`` and ``rstd_hh (T, N)`` (empty without ``gain_hh``)."""
    output, states, raw, normalised_hh, rstd_hh = _kernels().rnn_recurrence_forward(
        _contiguous(pre_x), h0.contiguous(), w_hh.contiguous(), _contiguous(gain_hh),
        _contiguous(recurrent_mask), _contiguous(zoneout_h), _contiguous(lengths), reverse, relu,
    )
    return (output, _final(states, reverse), states, raw, _or_empty(normalised_hh, pre_x),
            _or_empty(rstd_hh, pre_x))


def rnn_recurrence_backward(d_output, d_h_n, states, raw, normalised_hh, rstd_hh, w_hh, gain_hh,
                            recurrent_mask, zoneout_h, lengths, reverse: bool, relu: bool):
    """Returns ``d_pre_x (T, N, H)``, ``d_product (T, N, H)`` (empty without ``gain_hh``) and
    ``d_h0 (N, H)``."""
    d_pre_x, d_product, d_h0 = _kernels().rnn_recurrence_backward(
        d_output.contiguous(), d_h_n.contiguous(), states.contiguous(), raw.contiguous(),
        _when(gain_hh, normalised_hh), _when(gain_hh, rstd_hh), w_hh.contiguous(),
        _contiguous(gain_hh), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(lengths), reverse, relu,
    )
    return d_pre_x, _or_empty(d_product, d_pre_x), d_h0


# ---- minGRU and minLSTM: the linear recurrence in one pass ------------------------------------
#
# The input projection ``W_ih x + b_ih`` of every step comes computed (on autograd, so its weight,
# bias and input gradients are autograd's); the kernels run the coefficients and the recurrence
# (`kernels.cpp`, "minGRU and minLSTM"), and in the backward give the projection's gradient.


def min_scan_forward(projected: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool,
                     family: str, log_space: bool, layer_outputs_only: bool = False):
    """``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a, b`` from ``projected (T, N, G*H)`` (`family`
    ``"mingru"`` ``(k_z|v)`` or ``"minlstm"`` ``(k_f|k_i|v)``, `rnnkit.engine.scan.coefficients`)
    and ``h0 (N, H)``. Returns ``states (T + 1, N, H)``, ``output (T, N, H)`` (empty without
    lengths: a view of the states) and ``h_n (N, H)``; with ``layer_outputs_only``, ``output``
    (the view without lengths) and ``h_n``."""
    output, states = _kernels().min_scan_forward(
        projected.contiguous(), h0.contiguous(), _contiguous(lengths), reverse,
        family == "minlstm", log_space)
    if layer_outputs_only:
        return output, _final(states, reverse)
    return states, _own_output(output, lengths), _final(states, reverse)


def min_scan_backward(d_output: Tensor, d_h_n: Tensor, projected: Tensor, states: Tensor,
                      lengths: Tensor | None, reverse: bool, family: str, log_space: bool):
    """Returns ``d_projected (T, N, G*H)`` (zero past each sequence's end) and ``d_h0 (N, H)``;
    arguments as `min_scan_forward` took and returned them."""
    d_projected, d_h0 = _kernels().min_scan_backward(
        d_output.contiguous(), d_h_n.contiguous(), projected.contiguous(), states,
        _contiguous(lengths), reverse, family == "minlstm", log_space)
    return d_projected, d_h0


def min_step_kernel(weight_ih: Tensor, bias_ih: Tensor | None, family: str, log_space: bool):
    """``run(x, h)``: ``h'`` after one step of ``x (N, I)`` from ``h (N, H)``, with ``weight_ih
    (G*H, I)`` and ``bias_ih (G*H,)`` or None bound once (`family` as `min_scan_forward`): the
    projection and ``h' = a ⊙ h + b`` in one call (`kernels.cpp`, "minGRU and minLSTM: one
    streamed step"); None with ``log_space`` where ``h`` has a negative entry (the kernel
    declines a state the variant refuses). Arguments contiguous, of one dtype, on the CPU, as
    for `step_kernel`."""
    min_step, minlstm = _kernels().min_step, family == "minlstm"
    return lambda x, h: min_step(x, h, weight_ih, bias_ih, minlstm, log_space)
