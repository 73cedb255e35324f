r"""xLSTM's sLSTM (Beck et al. 2024, section 2.2): a cell for stepping and a sequence layer, on
the step equations and loops of `rnnkit.engine.slstm`.

An LSTM with an exponential input gate, a sigmoid or exponential forget gate, a normaliser
state ``n`` dividing the cell, a stabiliser state ``m`` that keeps the exponentials finite,
and a recurrence block-diagonal over ``num_heads`` (spec: "sLSTM (Beck et al. 2024)"). The
layer takes torch.nn's layer arguments and input forms; the cell is one step of the same
equations, for constant-memory streaming.
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import engine
from rnnkit._checks import (
    describe,
    require_allocatable,
    require_bool,
    require_choice,
    require_factory,
    require_int,
    require_layer_arguments,
    require_shape,
    require_sizes,
    require_tensor,
    warn_unused_dropout,
)
from rnnkit.cells import BackendSetting, _refuse_scripting, _reset_uniform, _SimpleCell
from rnnkit.engine import precision, slstm
from rnnkit.engine.slstm import FORGET_GATES, GATES, SLSTMState
from rnnkit.layers import _repack, _stack, prepare_sequence
from rnnkit.stream import (
    SLSTMStream,
    one_step_input,
    slstm_inference_steps,
    stack_slstm_states,
)

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


class SLSTM(nn.Module):
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
        super().__init__()
        name = type(self).__name__
        (self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
         self.dropout, self.bidirectional) = require_layer_arguments(
            name, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        self.num_heads = _check_heads(name, hidden_size, num_heads)
        self.forget_gate = require_choice(f"{name} forget_gate", forget_gate, FORGET_GATES)
        self.backend = backend  # checked by _SLSTMBackendSetting
        warn_unused_dropout(name, dropout, num_layers, stacklevel=2)
        factory = require_factory(name, device, dtype)
        gates, width = GATES * hidden_size, hidden_size // self.num_heads
        upper_input = self.num_directions * hidden_size
        count = self.num_directions * gates * (
            input_size + (num_layers - 1) * upper_input + num_layers * (width + int(bias)))
        require_allocatable(name, f"input_size={input_size}, hidden_size={hidden_size}, "
                            f"num_layers={num_layers}", count, **factory)
        # Per layer and direction (index layer * D + direction): the parameters' names.
        self._parameter_names: list[tuple[str, str, str | None]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else upper_input
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + suffix,
                        nn.Parameter(torch.empty(gates, layer_input, **factory)))
                setattr(self, "weight_hh" + suffix, nn.Parameter(
                    torch.empty(self.num_heads, GATES * width, width, **factory)))
                if bias:
                    setattr(self, "bias_ih" + suffix, nn.Parameter(torch.empty(gates, **factory)))
                self._parameter_names.append(
                    ("weight_ih" + suffix, "weight_hh" + suffix, "bias_ih" + suffix if bias
                     else None))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, ``U(-1/sqrt(H), 1/sqrt(H))``, for every parameter."""
        _reset_uniform(self)

    def __prepare_scriptable__(self) -> NoReturn:
        _refuse_scripting(self)

    def weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(weight_ih, weight_hh, bias_ih)`` of one layer and direction (bias None with
        bias=False)."""
        names = self._parameter_names[layer * self.num_directions + direction]
        # The parameters themselves, looked up directly (a streamed step asks every call);
        # computed ones (parametrizations) through their attributes.
        parameters = {} if "parametrizations" in self._modules else self._parameters
        return tuple(None if name is None else parameters[name] if name in parameters
                     else getattr(self, name) for name in names)

    def stream(self, hx: SLSTMState | None = None) -> SLSTMStream:
        """A handle that runs this layer one time step per call, keeping the state between
        calls (streaming inference): ``stream(x_t)`` equals ``forward`` on the one-step
        sequence from the state so far, which starts at ``hx`` (``forward``'s form; None: the
        empty state). Checks once, then each layer's step is one call of the sLSTM step kernel
        where nothing is differentiated (`rnnkit.stream.SLSTMStream`). Unidirectional layers
        only."""
        return SLSTMStream(self, hx)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: SLSTMState | None = None,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, SLSTMState]:
        """Run the stack; shapes in the class docstring."""
        # float32 under autocast, the families' rule (engine/precision.py)
        if torch._C._is_any_autocast_enabled() and precision.autocasting(self.weight_ih_l0):
            param = self.weight_ih_l0
            with torch.autocast(param.device.type, enabled=False):
                return self.forward(precision.to_parameter_dtype(input, param),
                                    precision.to_parameter_dtype(hx, param), lengths=lengths)
        if lengths is None and type(input) is Tensor and input.dim() == 3:
            stepped = self._one_step(input, hx)
            if stepped is not None:
                return stepped
        x, lengths, batched = prepare_sequence(
            type(self).__name__, input, lengths, input_size=self.input_size,
            batch_first=self.batch_first, parameter=self.weight_ih_l0)
        initial = self._initial_states(hx, x, batched)
        exp_forget = self.forget_gate == "exp"
        layer_input = x
        finals: list[SLSTMState] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                output, final = engine.run_slstm_direction(
                    layer_input, initial[layer * self.num_directions + direction],
                    *self.weights(layer, direction), lengths, direction == 1, exp_forget,
                    self.backend)
                outputs.append(output)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        if isinstance(input, PackedSequence):
            output = _repack(output, input, lengths)
        elif not batched:
            output = output.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        state = tuple(_stack([final[part] for final in finals]) for part in range(4))
        return output, state if batched else tuple(s.squeeze(1) for s in state)

    def _one_step(self, input: Tensor, hx: object) -> tuple[Tensor, SLSTMState] | None:
        """`forward` on a one-step batched sequence from ``hx`` (None: the empty state), on the
        sLSTM step kernel (`rnnkit.stream.slstm_inference_steps`, as a stream's step): the same
        result without the general path's checks, reshaping and splitting (a loop that calls
        the layer once a step). None wherever the input differs from that plain case in any
        way (form, shape, a state that is not a tuple of four tensors of exactly its shape,
        gradient, dtype, device, compiler or tracer); forward then checks and runs it as any
        other, which gives the errors. Where ``n = 0`` the kernel takes ``m`` as ``-inf``, as
        the general path."""
        x = one_step_input(self, input)
        if x is None:
            return None
        shape = (self.num_layers, x.shape[0], self.hidden_size)
        if hx is None:
            parts = _empty_state(shape, x)
        elif (type(hx) is tuple and len(hx) == 4
              and all(type(t) is Tensor and t.shape == shape for t in hx)):
            parts = hx
        else:
            return None
        states = list(zip(*(part.unbind(0) for part in parts), strict=True))
        stepped = slstm_inference_steps(self, x, states)
        if stepped is None:
            return None
        top, finals = stepped
        # The output is the kernel's top h itself: stacking copies the states, so it never
        # aliases the final state (as forward's output never does).
        return top.unsqueeze(1 if self.batch_first else 0), stack_slstm_states(finals, True)

    def _initial_states(self, hx: object, x: Tensor, batched: bool) -> list[SLSTMState]:
        """``hx`` checked (or the empty state) and split per layer and direction: four
        ``(N, H)`` each."""
        states, batch = self.num_layers * self.num_directions, x.shape[1]
        if hx is None:
            parts = _empty_state((states, batch, self.hidden_size), x)
        else:
            shape, meaning = (((states, batch, self.hidden_size), "(D*num_layers, N, H)")
                              if batched else ((states, self.hidden_size),
                                               "(D*num_layers, H)"))
            parts = _check_state(type(self).__name__, hx, shape, meaning, x)
            if not batched:
                parts = tuple(t.unsqueeze(1) for t in parts)
        return list(zip(*(t.unbind(0) for t in parts), strict=True))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False, "num_heads": 1, "forget_gate": "sigmoid"}
        for key, default in defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        return s
