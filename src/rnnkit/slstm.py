r"""xLSTM's sLSTM (Beck et al. 2024, section 2.2): a cell for stepping and a sequence layer, on
the step equations and loops of `rnnkit.engine.slstm`.

An LSTM with an exponential input gate, a sigmoid or exponential forget gate, a normaliser
state ``n`` dividing the cell, a stabiliser state ``m`` that keeps the exponentials finite,
and a recurrence block-diagonal over ``num_heads`` (spec: "sLSTM (Beck et al. 2024)"). The
layer takes torch.nn's layer arguments and input forms; the cell is one step of the same
equations, for constant-memory streaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit import engine
from rnnkit._checks import (
    describe,
    require_allocatable,
    require_bool,
    require_choice,
    require_factory,
    require_int,
    require_shape,
    require_sizes,
    require_tensor,
)
from rnnkit.cells import BackendSetting, _SimpleCell
from rnnkit.engine import slstm
from rnnkit.engine.slstm import FORGET_GATES, GATES, SLSTMState
from rnnkit.layers import _SimpleLayer
from rnnkit.stream import SLSTMStream, StepKernels, slstm_step_kernels

_STATE_PARTS = ("h_0", "c_0", "n_0", "m_0")


class _SLSTMBackendSetting(BackendSetting):
    """``backend`` of `SLSTM`, checked at assignment against `slstm.BACKENDS`."""

    def __set__(self, module: nn.Module, value: object) -> None:
        module.__dict__[self.name] = require_choice(f"{type(module).__name__} {self.name}",
                                                    value, slstm.BACKENDS)


def _check_heads(name: str, hidden_size: int, num_heads: object) -> int:
    """``num_heads``, an int >= 1 that divides ``hidden_size`` (heads of equal size)."""
    heads = require_int(f"{name} num_heads", num_heads, minimum=1)
    if hidden_size % heads:
        divisors = [k for k in range(1, hidden_size + 1) if hidden_size % k == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise ValueError(f"{name} num_heads must divide hidden_size={hidden_size} (every head "
                         f"has hidden_size / num_heads units), got num_heads={heads}; "
                         f"accepted: {shown}")
    return heads


def _check_state(name: str, hx: object, shape: tuple[int, ...], meaning: str,
                 like: Tensor) -> SLSTMState:
    """``hx``, a tuple ``(h, c, n, m)`` of tensors of ``shape``, checked; ``m`` taken as
    ``-inf`` where ``n = 0`` (`slstm.empty_where_no_mass`)."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 4 or not all(
            isinstance(t, Tensor) for t in hx):
        raise TypeError(f"{name} hx must be a tuple (h_0, c_0, n_0, m_0) of four Tensors of "
                        f"shape {meaning} = {shape}, got {describe(hx)}")
    parts = []
    for part, tensor in zip(_STATE_PARTS, hx, strict=True):
        require_tensor(f"{name} hx ({part})", tensor, dtype=like.dtype, device=like.device)
        require_shape(f"{name} hx ({part})", tensor, shape, meaning)
        parts.append(tensor)
    h, c, n, m = parts
    return h, c, n, slstm.empty_where_no_mass(n, m)


def _empty_state(shape: tuple[int, ...], like: Tensor) -> SLSTMState:
    """The default state: ``h = c = n = 0``, ``m = -inf`` (spec)."""
    zeros = like.new_zeros(shape)
    return zeros, zeros, zeros, like.new_full(shape, float("-inf"))


class SLSTMCell(_SimpleCell[SLSTMState]):
    r"""An sLSTM cell (Beck et al. 2024, section 2.2), one time step, stabilised.

    .. math::
        \begin{aligned}
        \tilde\imath, \tilde f, \tilde z, \tilde o &= W x + R h + b \\
        m' &= \max(\log f + m,\ \tilde\imath) \qquad
              \log f = \log\sigma(\tilde f) \text{ or } \tilde f \\
        i' &= \exp(\tilde\imath - m') \qquad f' = \exp(\log f + m - m') \\
        c' &= f' \odot c + i' \odot \tanh(\tilde z) \qquad n' = f' \odot n + i' \\
        h' &= \sigma(\tilde o) \odot c' / n'
        \end{aligned}

    ``σ`` is the sigmoid, ``⊙`` the elementwise product. Unstabilised, the gates are ``i =
    exp(ĩ)`` and ``f = σ(f̃)`` or ``exp(f̃)``; ``m`` is the logarithm of the scale dividing ``c``
    and ``n``, which cancels in ``h``, so ``h`` is the same while ``exp`` cannot overflow
    (``|h| < 1`` for any input). ``R`` is block-diagonal: each of ``num_heads`` heads of ``d =
    H / num_heads`` units reads only its own part of ``h``.

    Args:
        input_size: features in ``x`` (``I``).
        hidden_size: features in ``h`` (``H``).
        bias: if ``False``, no ``bias_ih``. Default ``True``.
        num_heads (keyword): heads of the block-diagonal recurrence; must divide
            ``hidden_size``. Default 1 (a dense recurrence).
        forget_gate (keyword): ``"sigmoid"`` (default, as the paper's reference code) or
            ``"exp"``.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx`` a tuple ``(h, c, n, m)``, each ``(N, H)``
    or ``(H,)``; if omitted ``h = c = n = 0`` and ``m = -inf`` (the empty memory). Where ``n =
    0``, ``m`` is taken as ``-inf``, so all-zero states act as the default.
    Output: ``(h', c', n', m')``, each ``(N, H)`` or ``(H,)``.

    Execution: where nothing is to be differentiated (no_grad, or no tensor requiring a
    gradient), in plain eager mode (no compile, trace, autocast or torch.func), on the CPU in
    float32/float64 with the native kernels built, with at most
    ``rnnkit.engine.SLSTM_STEP_KERNEL_MAX_BATCH`` (16) rows of contiguous tensors, a step is one
    call of the native sLSTM step kernel (both products and the stabilised gate math;
    `rnnkit.engine.slstm_inference_step`); ``RNNKIT_BACKEND`` set to ``"fused"`` or
    ``"reference"`` turns it off. Everywhere else the step runs on autograd
    (`rnnkit.engine.slstm.step`). Both give the same values.

    Parameters: ``weight_ih (4H, I)`` as ``(W_i|W_f|W_z|W_o)``, ``weight_hh (num_heads, 4d,
    d)`` as head ``k``'s ``(R_i|R_f|R_z|R_o)``, ``bias_ih (4H,)``; all ``U(-1/sqrt(H),
    1/sqrt(H))``. The state dict is one layer and direction of `SLSTM`'s without ``_l0``.

    Example::

        >>> cell = rnnkit.SLSTMCell(10, 20, num_heads=4)
        >>> state = cell(torch.randn(3, 10))           # (h, c, n, m), each (3, 20)
        >>> state = cell(torch.randn(3, 10), state)    # the next step
    """

    _weight_names = ("weight_ih", "weight_hh", "bias_ih")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, num_heads: int = 1, forget_gate: str = "sigmoid") -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size, self.hidden_size = require_sizes(name, input_size, hidden_size)
        self.num_heads = _check_heads(name, hidden_size, num_heads)
        self.forget_gate = require_choice(f"{name} forget_gate", forget_gate, FORGET_GATES)
        self.bias = require_bool(f"{name} bias", bias)
        factory = require_factory(name, device, dtype)
        width = hidden_size // self.num_heads
        require_allocatable(name, f"input_size={input_size}, hidden_size={hidden_size}",
                            GATES * hidden_size * (input_size + width + (1 if bias else 0)),
                            **factory)
        self.weight_ih = nn.Parameter(torch.empty(GATES * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(self.num_heads, GATES * width, width,
                                                  **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(GATES * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
        self.reset_parameters()

    def forward(self, input: Tensor, hx: SLSTMState | None = None) -> SLSTMState:
        """One step; shapes in the class docstring. Unbatched input gives an unbatched state.
        A streamed step's short way first (`_inference_step`); else the cells' checks and
        autocast rule (`_SimpleCell.forward`), then `_step`."""
        new = self._inference_step(input, hx)
        if new is not None:
            return new
        return super().forward(input, hx)

    def _step(self, x: Tensor, hx: object) -> SLSTMState:
        """``(h', c', n', m')`` from the checked input; ``hx`` checked here (or the empty
        state)."""
        name = type(self).__name__
        shape = (*x.shape[:-1], self.hidden_size)
        if hx is None:
            state = _empty_state(shape, x)
        else:
            state = _check_state(name, hx, shape, "(N, H)" if x.dim() == 2 else "(H,)", x)
        exp_forget = self.forget_gate == "exp"
        # The step kernel where it applies (unbatched: on one row), for what the short way
        # declined only by its form (an unbatched input, a list for hx, a zero-row batch).
        batched = x.dim() == 2
        new = engine.slstm_inference_step(
            x if batched else x.unsqueeze(0),
            state if batched else tuple(s.unsqueeze(0) for s in state), *self._weights(),
            exp_forget) if x.numel() else None
        if new is not None:
            return new if batched else tuple(s.squeeze(0) for s in new)
        return slstm.step(x, state, self.weight_ih, self.weight_hh, self.bias_ih, exp_forget)

    def _inference_step(self, x: object, hx: object) -> SLSTMState | None:
        """A streamed step's short way: the step kernel straight away
        (`engine.slstm_inference_step`) when the input is a batched tensor of the right size
        and the state None or four tensors of exactly its shape, and the engine's conditions
        hold; else None, and `forward` checks everything and runs the general way, which gives
        the errors. Where ``n = 0`` the kernel takes ``m`` as ``-inf``, as the general way."""
        if (type(x) is not Tensor or x.dim() != 2 or x.shape[1] != self.input_size
                or x.shape[0] == 0):
            return None
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            state = _empty_state(shape, x)
        elif (type(hx) is tuple and len(hx) == 4
              and all(type(t) is Tensor and t.shape == shape for t in hx)):
            state = hx
        else:
            return None
        return engine.slstm_inference_step(x, state, *self._weights(),
                                           self.forget_gate == "exp")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        s += "" if self.bias else ", bias=False"
        s += f", num_heads={self.num_heads}" if self.num_heads != 1 else ""
        return s + (f", forget_gate={self.forget_gate!r}" if self.forget_gate != "sigmoid"
                    else "")


class SLSTM(_SimpleLayer[SLSTMState]):
    r"""A multi-layer sLSTM (Beck et al. 2024, section 2.2): torch.nn's layer interface.

    For each element of the input sequence, each layer computes

    .. math::
        \begin{aligned}
        \tilde\imath_t, \tilde f_t, \tilde z_t, \tilde o_t &= W x_t + R h_{t-1} + b \\
        i_t &= \exp(\tilde\imath_t) \qquad f_t = \sigma(\tilde f_t) \text{ or }
               \exp(\tilde f_t) \\
        z_t &= \tanh(\tilde z_t) \qquad o_t = \sigma(\tilde o_t) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot z_t \qquad n_t = f_t \odot n_{t-1} + i_t \\
        h_t &= o_t \odot c_t / n_t
        \end{aligned}

    computed in the stabilised form: ``m_t = max(log f_t + m_{t-1}, ĩ_t)``, ``i'_t = exp(ĩ_t -
    m_t)``, ``f'_t = exp(log f_t + m_{t-1} - m_t)`` in place of ``i_t, f_t`` (the stored ``c_t,
    n_t`` are the above times ``exp(-m_t)``, which cancels in ``h_t``). ``x_t`` is the input at
    time ``t``, ``R`` block-diagonal over ``num_heads`` heads. The cell only: the paper's block
    around it (layer norm, convolution, group norm, MLP, residual) composes from torch.nn.

    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0
        (between layers, training only), bidirectional=False, device=None, dtype=None: as
        torch.nn's layers, in the same positional order.
        num_heads (keyword): heads of the block-diagonal recurrence; must divide
            ``hidden_size``. Default 1.
        forget_gate (keyword): ``"sigmoid"`` (default, as the reference code) or ``"exp"``.
        backend (keyword): ``"auto"`` (default: ``"native"`` on the CPU in float32/float64
            with the kernels built, else ``"fused"``), ``"native"`` (the
            ``rnnkit::native_slstm`` operator: the time loop in C++, forward and backward),
            ``"fused"`` (the ``rnnkit::fused_slstm`` operator: preallocated buffers, one
            batched product per step, hand-written backward) or ``"reference"`` (the step
            loop on autograd); settable later as ``layer.backend``. All give the same
            results. A one-step sequence without ``lengths`` (a streamed step; see also
            `stream`) with nothing to differentiate runs under ``"auto"`` and ``"native"`` on
            the native sLSTM step kernel instead (both products and the stabilised gate math in
            one call; CPU, float32/float64, at most
            ``rnnkit.engine.SLSTM_STEP_KERNEL_MAX_BATCH`` (16) rows, plain eager mode:
            `rnnkit.engine.slstm_inference_step`).

    Inputs: ``input, hx`` (optional), ``lengths`` (optional; by keyword, or third by position)
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first=True``, unbatched
          ``(L, H_in)``, or a ``PackedSequence`` (then the output is packed too).
        - **hx**: a tuple ``(h_0, c_0, n_0, m_0)``, each ``(D*num_layers, N, H)`` (unbatched
          ``(D*num_layers, H)``); if omitted ``h_0 = c_0 = n_0 = 0``, ``m_0 = -inf``. Where
          ``n_0 = 0``, ``m_0`` is taken as ``-inf``.
        - **lengths**: ``(N,)`` integer tensor or list of ints in ``[1, L]``, any order, for
          padded batched input. Outputs past a sequence's end are zero; its final state is the
          state after its own last step; the reverse direction runs over the valid steps only.

    Outputs: ``output, (h_n, c_n, n_n, m_n)``: ``output (L, N, D*H)`` (``(N, L, D*H)`` with
    ``batch_first``), the ``h_t`` of the last layer; each final state part ``(D*num_layers,
    N, H)`` whether or not ``batch_first``.

    Legend: ``N`` batch size, ``L`` sequence length, ``D`` 2 if bidirectional else 1,
    ``H_in`` input_size, ``H`` hidden_size, ``d = H / num_heads``. Layer ``k > 0`` reads layer
    ``k-1``'s output, both directions concatenated (``H_in = D*H``).

    Parameters: ``weight_ih_l{k} (4H, H_in)`` as ``(W_i|W_f|W_z|W_o)``, ``weight_hh_l{k}
    (num_heads, 4d, d)`` as head ``k``'s ``(R_i|R_f|R_z|R_o)``, ``bias_ih_l{k} (4H,)`` (one
    bias per gate); suffix ``_reverse`` for the backward direction. All ``U(-1/sqrt(H),
    1/sqrt(H))``.

    Example::

        >>> slstm = rnnkit.SLSTM(10, 20, num_layers=2, num_heads=4, batch_first=True)
        >>> output, (h_n, c_n, n_n, m_n) = slstm(torch.randn(3, 5, 10))  # (3, 5, 20), (2, 3, 20)
    """

    backend = _SLSTMBackendSetting()
    _option_defaults = {"num_heads": 1, "forget_gate": "sigmoid"}
    _state_parts = 4  # (h, c, n, m)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        num_heads: int = 1,
        forget_gate: str = "sigmoid",
        backend: str = "auto",
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend, num_heads=num_heads,
                         forget_gate=forget_gate)

    def _set_options(self, *, num_heads: object, forget_gate: object) -> None:
        name = type(self).__name__
        self.num_heads = _check_heads(name, self.hidden_size, num_heads)
        self.forget_gate = require_choice(f"{name} forget_gate", forget_gate, FORGET_GATES)

    def _shapes(self, layer_input: int) -> dict[str, tuple[int, ...] | None]:
        """``weight_ih (4H, H_in)``, ``weight_hh (num_heads, 4d, d)``, ``bias_ih (4H,)``."""
        gates, width = GATES * self.hidden_size, self.hidden_size // self.num_heads
        return {"weight_ih": (gates, layer_input),
                "weight_hh": (self.num_heads, GATES * width, width),
                "bias_ih": (gates,) if self.bias else None}

    def stream(self, hx: SLSTMState | None = None) -> SLSTMStream:
        """A handle that runs this layer one time step per call, keeping the state between
        calls (streaming inference): ``stream(x_t)`` equals ``forward`` on the one-step
        sequence from the state so far, which starts at ``hx`` (``forward``'s form; None: the
        empty state). Checks once, then each layer's step is one call of the sLSTM step kernel
        where nothing is differentiated (`rnnkit.stream.SLSTMStream`). Unidirectional layers
        only."""
        return SLSTMStream(self, hx)

    def _step_kernels(self, x: Tensor, states: list[SLSTMState]) -> StepKernels | None:
        return slstm_step_kernels(self, x, states)

    def _step_settings(self) -> tuple:
        """The simple layers' step settings, and the forget gate."""
        return (*super()._step_settings(), self.forget_gate)

    def _run_direction(self, sequence: Tensor, state: SLSTMState, layer: int, direction: int,
                       lengths: Tensor | None) -> tuple[Tensor, SLSTMState]:
        return engine.run_slstm_direction(
            sequence, state, *self.weights(layer, direction), lengths, direction == 1,
            self.forget_gate == "exp", self.backend)

    def _empty_state(self, shape: tuple[int, ...], like: Tensor) -> SLSTMState:
        return _empty_state(shape, like)

    def _check_state(self, hx: object, shape: tuple[int, ...], meaning: str,
                     like: Tensor) -> SLSTMState:
        return _check_state(type(self).__name__, hx, shape, meaning, like)
