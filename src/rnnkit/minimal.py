r"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): cells for stepping and
sequence layers, on the recurrence and scans of `rnnkit.engine.scan`.

The gates read the input only, never the state, so ``h_t = a_t ⊙ h_{t-1} + b_t`` is linear in
``h`` and a whole sequence runs as one scan (spec: "minGRU and minLSTM"). The layers take
torch.nn's layer arguments and input forms; a cell is one step of the same equations, for
constant-memory streaming.
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
    require_non_negative,
    require_shape,
    require_sizes,
    require_tensor,
)
from rnnkit.cells import BackendSetting, _SimpleCell
from rnnkit.engine import scan
from rnnkit.engine.scan import GATE_COUNT, MinFamily
from rnnkit.layers import _SimpleLayer
from rnnkit.stream import MinimalStream, StepKernels, min_step_kernels

_LOG_SPACE_STATE = ("log_space=True keeps h >= 0; h_0 enters the scan linearly, so 0, the "
                    "default, is accepted")


class _MinimalBackendSetting(BackendSetting):
    """``backend`` of the minimal layers, checked at assignment against `scan.BACKENDS`."""

    def __set__(self, module: nn.Module, value: object) -> None:
        name = f"{type(module).__name__} {self.name}"
        require_choice(name, value, scan.BACKENDS)
        if value == "log_scan" and not module.log_space:
            raise ValueError(f"{name} 'log_scan' needs log_space=True (the linear variant's b "
                             "can be negative: it has no real logarithm); got log_space=False, "
                             "use 'scan'")
        module.__dict__[self.name] = value


class _MinimalCell(_SimpleCell[Tensor]):
    """Parameters and input checks shared by MinGRUCell and MinLSTMCell: one step each."""

    family: MinFamily = MinFamily.GRU

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, log_space: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size, self.hidden_size = require_sizes(name, input_size, hidden_size)
        self.bias = require_bool(f"{name} bias", bias)
        self.log_space = require_bool(f"{name} log_space", log_space)
        factory = require_factory(name, device, dtype)
        gates = GATE_COUNT[self.family] * hidden_size
        require_allocatable(name, f"input_size={input_size}, hidden_size={hidden_size}",
                            gates * (input_size + (1 if bias else 0)), **factory)
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """One step; shapes in the class docstring. Unbatched input gives an unbatched state.
        A streamed step's short way first (`_inference_step`); else the cells' checks and
        autocast rule (`_SimpleCell.forward`), then `_step`."""
        new = self._inference_step(input, hx)
        if new is not None:
            return new
        return super().forward(input, hx)

    def _step(self, x: Tensor, hx: object) -> Tensor:
        """``h'`` from the checked input; ``hx`` checked here (or zeros)."""
        name = type(self).__name__
        shape = (*x.shape[:-1], self.hidden_size)
        if hx is None:
            h = x.new_zeros(shape)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name} hx must be a Tensor of shape {shape}, got "
                                f"{describe(hx)}")
            h = require_tensor(f"{name} hx", hx, dtype=x.dtype, device=x.device)
            require_shape(f"{name} hx", h, shape, "(N, H)" if x.dim() == 2 else "(H,)")
            if self.log_space:
                require_non_negative(f"{name} hx", h, _LOG_SPACE_STATE)
        # The step kernel where it applies (unbatched: on one row), for what the short way
        # declined only by its form (an unbatched input, a strided tensor, a zero-row batch).
        batched = x.dim() == 2
        new = engine.min_inference_step(
            self.family, (x if batched else x.unsqueeze(0)).contiguous(),
            (h if batched else h.unsqueeze(0)).contiguous(), *self._weights(),
            self.log_space) if x.numel() else None
        if new is not None:
            return new if batched else new.squeeze(0)
        return scan.step(self.family, x, h, self.weight_ih, self.bias_ih, self.log_space)

    def _inference_step(self, x: object, hx: object) -> Tensor | None:
        """A streamed step's short way: the step kernel straight away
        (`engine.min_inference_step`) when the input is a batched tensor of the right size and
        ``hx`` None or a tensor of exactly its shape, and the engine's conditions hold; else
        None, and `forward` checks everything and runs the general way, which gives the errors
        (a log-space state with a negative entry too: the kernel declines it)."""
        if (type(x) is not Tensor or x.dim() != 2 or x.shape[1] != self.input_size
                or x.shape[0] == 0):
            return None
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            h = x.new_zeros(shape)
        elif type(hx) is Tensor and hx.shape == shape:
            h = hx
        else:
            return None
        return engine.min_inference_step(self.family, x, h, *self._weights(), self.log_space)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        s += "" if self.bias else ", bias=False"
        return s + (", log_space=True" if self.log_space else "")


class MinGRUCell(_MinimalCell):
    r"""A minGRU cell (Feng et al. 2024, section 3.1), one time step: the gate reads ``x`` only.

    .. math::
        \begin{aligned}
        z &= \sigma(W_z x + b_z) \\
        \tilde h &= W_h x + b_h \qquad (\tilde h = g(W_h x + b_h) \text{ with log\_space}) \\
        h' &= (1 - z) \odot h + z \odot \tilde h
        \end{aligned}

    ``σ`` is the sigmoid, ``⊙`` the elementwise product, ``g(v) = v + 0.5`` for ``v >= 0`` and
    ``σ(v)`` below: with ``log_space=True``, ``h̃ > 0``, so ``h`` stays >= 0 from ``h >= 0``.

    Args:
        input_size: features in ``x`` (``I``).
        hidden_size: features in ``h`` (``H``).
        bias: if ``False``, no ``bias_ih``. Default ``True``.
        log_space (keyword): the paper's log-space variant, as above. Default ``False``.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx`` ``(N, H)`` or ``(H,)``, zeros if omitted
    (with ``log_space=True`` it must be >= 0 everywhere).
    Output: ``h'`` ``(N, H)`` or ``(H,)``.

    Execution: where nothing is to be differentiated (no_grad, or no tensor requiring a
    gradient), in plain eager mode (no compile, trace, autocast or torch.func), on the CPU in
    float32/float64 with the native kernels built, with at most
    ``rnnkit.engine.MIN_STEP_KERNEL_MAX_BATCH`` (8) rows, a step is one call of the native
    minimal step kernel (the projection and ``h' = a ⊙ h + b``;
    `rnnkit.engine.min_inference_step`). Everywhere else the step runs on autograd
    (`rnnkit.engine.scan.step`). Both give the same values.

    Parameters: ``weight_ih (2H, I)`` as ``(W_z|W_h)``, ``bias_ih (2H,)`` as ``(b_z|b_h)``,
    ``U(-1/sqrt(H), 1/sqrt(H))``. There is no recurrent weight; the state dict is the same as
    one layer and direction of `MinGRU` without the ``_l0`` suffix.

    Example::

        >>> cell = rnnkit.MinGRUCell(10, 20)
        >>> h = cell(torch.randn(3, 10))              # (3, 20)
        >>> h = cell(torch.randn(3, 10), h)           # the next step
    """

    family = MinFamily.GRU


class MinLSTMCell(_MinimalCell):
    r"""A minLSTM cell (Feng et al. 2024, section 3.2), one time step; no cell state, no output
    gate: the normalised gates make it time-independent in scale.

    .. math::
        \begin{aligned}
        f &= \sigma(W_f x + b_f) \qquad i = \sigma(W_i x + b_i) \\
        \tilde h &= W_h x + b_h \qquad (\tilde h = g(W_h x + b_h) \text{ with log\_space}) \\
        f' &= f / (f + i) \qquad i' = i / (f + i) \\
        h' &= f' \odot h + i' \odot \tilde h
        \end{aligned}

    Symbols, ``g`` and ``log_space`` as `MinGRUCell`.

    Args:
        input_size, hidden_size, bias=True, log_space=False (keyword): as `MinGRUCell`.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx`` ``(N, H)`` or ``(H,)``, zeros if omitted.
    Output: ``h'`` ``(N, H)`` or ``(H,)``.

    Execution: as `MinGRUCell` (the native step kernel where nothing is differentiated).

    Parameters: ``weight_ih (3H, I)`` as ``(W_f|W_i|W_h)``, ``bias_ih (3H,)``,
    ``U(-1/sqrt(H), 1/sqrt(H))``.

    Example::

        >>> cell = rnnkit.MinLSTMCell(10, 20, log_space=True)
        >>> h = cell(torch.randn(3, 10))              # (3, 20), all > 0
    """

    family = MinFamily.LSTM


class _MinimalLayer(_SimpleLayer[Tensor]):
    """The options, parameters, state and engine of MinGRU and MinLSTM."""

    family: MinFamily = MinFamily.GRU
    backend = _MinimalBackendSetting()
    _option_defaults = {"log_space": False}

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
        log_space: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend, log_space=log_space)

    def _set_options(self, *, log_space: object) -> None:
        self.log_space = require_bool(f"{type(self).__name__} log_space", log_space)

    def _shapes(self, layer_input: int) -> dict[str, tuple[int, ...] | None]:
        """``weight_ih (G*H, H_in)``, ``bias_ih (G*H,)`` for the family's ``G`` gates."""
        gates = GATE_COUNT[self.family] * self.hidden_size
        return {"weight_ih": (gates, layer_input), "bias_ih": (gates,) if self.bias else None}

    def stream(self, hx: Tensor | None = None) -> MinimalStream:
        """A handle that runs this layer one time step per call, keeping the state between
        calls (streaming inference): ``stream(x_t)`` equals ``forward`` on the one-step
        sequence from the state so far, which starts at ``hx`` (``forward``'s form; None:
        zeros). Checks once, then each layer's step is one call of the minimal step kernel
        where nothing is differentiated (`rnnkit.stream.MinimalStream`). Unidirectional layers
        only."""
        return MinimalStream(self, hx)

    def _step_kernels(self, x: Tensor, states: list[Tensor]) -> StepKernels | None:
        return min_step_kernels(self, x, states)

    def _step_settings(self) -> tuple:
        """The simple layers' step settings, and ``log_space``."""
        return (*super()._step_settings(), self.log_space)

    def _run_direction(self, sequence: Tensor, state: Tensor, layer: int, direction: int,
                       lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        return scan.run_direction(self.family, sequence, state, *self.weights(layer, direction),
                                  lengths, direction == 1, self.log_space, self.backend)

    def _empty_state(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return like.new_zeros(shape)

    def _check_state(self, hx: object, shape: tuple[int, ...], meaning: str,
                     like: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(hx, Tensor):
            raise TypeError(f"{name} hx must be a Tensor h_0 of shape {meaning} = {shape}, got "
                            f"{describe(hx)}")
        require_tensor(f"{name} hx (h_0)", hx, dtype=like.dtype, device=like.device)
        require_shape(f"{name} hx (h_0)", hx, shape, meaning)
        if self.log_space:
            require_non_negative(f"{name} hx (h_0)", hx, _LOG_SPACE_STATE)
        return hx


_MINIMAL_LAYER_SHAPES = """
    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0
        (between layers, training only), bidirectional=False, device=None, dtype=None: as
        torch.nn's layers, in the same positional order.
        log_space (keyword): the paper's log-space variant (``h̃ = g(W_h x + b_h)``, so
            ``h >= 0``). Default ``False``.
        backend (keyword): ``"auto"`` (default: ``"native"`` on the CPU in float32/float64
            with the kernels built, the fastest path at every size measured; elsewhere the
            linear-space scan, and a single step on the loop), ``"native"`` (a C++ loop over
            time, CPU), ``"scan"`` (the linear-space scan, both variants), ``"log_scan"`` (the
            paper's log-space scan; ``log_space=True`` only) or ``"reference"`` (the step
            loop); settable later as ``layer.backend``. All give the same results. Measured
            (docs/benchmarks.md, "minGRU and minLSTM: the native loop"; ``OMP_NUM_THREADS=1
            python benchmarks/minimal_scan.py --scans-only [--inference] 128 512 2048``,
            2026-12-06, 2-core Intel Xeon VM, one thread, N = 16, I = H = 256): a training
            step on ``"native"`` took 0.45-0.76x the time of ``"scan"`` (log-space variant
            0.35-0.60x; ``"log_scan"`` 1.6-2.3x the scan's), inference 0.30-0.65x, one streamed
            step (N = 1) 0.61-0.78x the scan's and 0.45-0.82x the loop's (one run of nine:
            1.06x). ``"native"`` that cannot run an input (another device, bfloat16) runs
            ``"scan"`` after one warning. A one-step sequence without ``lengths`` (a streamed
            step; see also `stream`) with nothing to differentiate runs under ``"auto"`` and
            ``"native"`` on the native minimal step kernel instead (the projection and ``h' =
            a ⊙ h + b`` in one call; CPU, float32/float64, at most
            ``rnnkit.engine.MIN_STEP_KERNEL_MAX_BATCH`` (8) rows, plain eager mode:
            `rnnkit.engine.min_inference_step`).

    Inputs: ``input, hx`` (optional), ``lengths`` (optional; by keyword, or third by position)
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first=True``, unbatched
          ``(L, H_in)``, or a ``PackedSequence`` (then the output is packed too).
        - **hx**: ``h_0 (D*num_layers, N, H)`` (unbatched ``(D*num_layers, H)``), zeros if
          omitted; with ``log_space=True`` every entry must be >= 0.
        - **lengths**: ``(N,)`` integer tensor or list of ints in ``[1, L]``, any order, for
          padded batched input. Outputs past a sequence's end are zero; its final state is the
          state after its own last step; the reverse direction runs over the valid steps only.

    Outputs: ``output, h_n``: ``output (L, N, D*H)`` (``(N, L, D*H)`` with ``batch_first``),
    ``h_n (D*num_layers, N, H)`` whether or not ``batch_first``.

    Legend: ``N`` batch size, ``L`` sequence length, ``D`` 2 if bidirectional else 1,
    ``H_in`` input_size, ``H`` hidden_size. Layer ``k > 0`` reads layer ``k-1``'s output, both
    directions concatenated (``H_in = D*H``).
"""


class MinGRU(_MinimalLayer):
    __doc__ = r"""A multi-layer minGRU (Feng et al. 2024): torch.nn's layer interface, a scan
    over time instead of a loop.

    For each element of the input sequence, each layer computes

    .. math::
        \begin{aligned}
        z_t &= \sigma(W_z x_t + b_z) \\
        \tilde h_t &= W_h x_t + b_h \qquad (g(W_h x_t + b_h) \text{ with log\_space}) \\
        h_t &= (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t
        \end{aligned}

    where ``x_t`` is the input at time ``t`` and ``g(v) = v + 0.5`` for ``v >= 0``, ``σ(v)``
    below. The gate does not read ``h_{t-1}``, so the recurrence is linear in ``h`` and all
    ``T`` steps run as one scan (`rnnkit.engine.scan`).
""" + _MINIMAL_LAYER_SHAPES + r"""
    Parameters: ``weight_ih_l{k} (2H, H_in)`` as ``(W_z|W_h)``, ``bias_ih_l{k} (2H,)``; suffix
    ``_reverse`` for the backward direction. All ``U(-1/sqrt(H), 1/sqrt(H))``.

    Example::

        >>> gru = rnnkit.MinGRU(10, 20, num_layers=2, batch_first=True)
        >>> output, h_n = gru(torch.randn(3, 5, 10))     # (3, 5, 20), (2, 3, 20)
    """

    family = MinFamily.GRU


class MinLSTM(_MinimalLayer):
    __doc__ = r"""A multi-layer minLSTM (Feng et al. 2024): torch.nn's layer interface, a scan
    over time instead of a loop. The state is ``h`` alone (no cell state, no output gate).

    For each element of the input sequence, each layer computes

    .. math::
        \begin{aligned}
        f_t &= \sigma(W_f x_t + b_f) \qquad i_t = \sigma(W_i x_t + b_i) \\
        \tilde h_t &= W_h x_t + b_h \qquad (g(W_h x_t + b_h) \text{ with log\_space}) \\
        f'_t &= f_t / (f_t + i_t) \qquad i'_t = i_t / (f_t + i_t) \\
        h_t &= f'_t \odot h_{t-1} + i'_t \odot \tilde h_t
        \end{aligned}

    symbols as `MinGRU`.
""" + _MINIMAL_LAYER_SHAPES + r"""
    Parameters: ``weight_ih_l{k} (3H, H_in)`` as ``(W_f|W_i|W_h)``, ``bias_ih_l{k} (3H,)``;
    suffix ``_reverse`` for the backward direction. All ``U(-1/sqrt(H), 1/sqrt(H))``.

    Example::

        >>> lstm = rnnkit.MinLSTM(10, 20, bidirectional=True, log_space=True)
        >>> output, h_n = lstm(torch.randn(5, 3, 10))    # (5, 3, 40), (2, 3, 20)
    """

    family = MinFamily.LSTM
