"""A recurrent layer run one time step at a time, its state kept between calls.

Streaming inference (a token, a sample, a frame at a time) calls a layer once per step. Through
``forward`` every call checks the input and the state, splits and stacks the state and runs a
one-step sequence; `LayerStream` checks once, keeps each layer's state as the step kernels
return it, and runs each layer's step on `rnnkit.engine.inference_step` (one native call per
layer: both products and the gate math). Where that does not apply (something to
differentiate, a mask to draw, layer norm, another device, compile, ...) a call runs the
layer's ``forward`` on the one-step sequence: every call gives what ``forward`` gives.
`SLSTMStream` is the same handle for `rnnkit.SLSTM`, its steps on
`rnnkit.engine.slstm_step_kernel` (the sLSTM's step kernel), and `MinimalStream` for
`rnnkit.MinGRU` and `rnnkit.MinLSTM`, on `rnnkit.engine.min_step_kernel`. The functions
`step_kernels`, `slstm_step_kernels` and `min_step_kernels` bind a whole stack's kernels
(`StepKernels`); `KeptStepKernels` keeps them between steps while the layer's parameters, mode
and settings stay the same, so a step checks little and calls the kernels. Each stream has
one, and so has each layer for its one-step calls (``layer(x_t.unsqueeze(0), state)``, the
layers' short way: `kept_step_kernels`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from rnnkit import engine
from rnnkit._checks import require_tensor
from rnnkit.engine import ops
from rnnkit.engine.steps import Family, State, output_of

if TYPE_CHECKING:  # the layers import this module
    from rnnkit.layers import RecurrentLayer
    from rnnkit.minimal import _MinimalLayer
    from rnnkit.slstm import SLSTM

SLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]


class LayerStream:
    r"""Steps of a unidirectional `rnnkit.RNN`, `rnnkit.LSTM` or `rnnkit.GRU`, one call each.

    .. math::
        y_t,\ s_t = \mathrm{layer}(x_t,\ s_{t-1}),\qquad s_0 = \texttt{hx}
        \text{ (zeros, or the learned initial state, when None)}

    ``stream(x_t)`` equals ``layer(x_t.unsqueeze(0), s)`` (``unsqueeze(1)`` with
    ``batch_first``): its output's one step, and the stream's state becomes its final state.

    Inputs: ``x_t (N, H_in)`` or unbatched ``(H_in,)``; the first call fixes which, and the
    batch ``N`` (with ``hx``, its batch). Output: ``y_t (N, H_out)`` or ``(H_out,)``, the top
    layer's ``h_t``. ``state``: the final state as ``forward`` returns it, ``h_n (L, N, H_out)``
    (and ``c_n (L, N, H)`` for an LSTM), or None before the first call.

    Example::

        >>> lstm = rnnkit.LSTM(10, 20, num_layers=2).eval()
        >>> stream = lstm.stream()
        >>> with torch.no_grad():
        ...     y = [stream(x_t) for x_t in torch.randn(5, 3, 10)]    # each (3, 20)
        >>> h_n, c_n = stream.state                                     # (2, 3, 20) each
    """

    def __init__(self, layer: RecurrentLayer, hx: State | None = None) -> None:
        name = type(layer).__name__
        if layer.bidirectional:
            raise ValueError(f"{name}.stream needs a unidirectional layer: the reverse "
                             "direction reads each sequence from its last step; got "
                             "bidirectional=True (run forward on whole sequences instead)")
        self.layer = layer
        self._hx = hx  # checked at the first call, which tells the batch
        self._states: list[State] | None = None  # per layer, contiguous, batched
        self._batched = True
        self._input_shape: tuple[int, ...] = ()
        self._kept = KeptStepKernels()  # copied and pickled empty

    @property
    def state(self) -> State | None:
        """The final state after the steps so far, as the layer's ``forward`` returns it."""
        if self._states is None:
            return None
        return self.layer._stack_states(self._states, self._batched)

    def __getstate__(self) -> dict:
        """Copied (``copy.copy`` too, which shares the layer: a fork of the stream) and pickled
        with kept kernels of its own, empty: a kept plan holds only while its stream's states
        are the kernels' own (`KeptStepKernels.run`, no ``given``), which a shared plan would
        not know of the other stream's (a state from ``forward`` that tracks a gradient)."""
        return {**self.__dict__, "_kept": KeptStepKernels()}

    def __call__(self, input: Tensor) -> Tensor:
        """One step: ``x_t (N, H_in)`` or ``(H_in,)`` -> ``y_t (N, H_out)`` or ``(H_out,)``."""
        states = self._states
        if states is not None and type(input) is Tensor and input.shape == self._input_shape:
            output = self._kernel_step(input if self._batched else input.unsqueeze(0), states)
            if output is not None:
                return output if self._batched else output.squeeze(0)
        return self._general_step(input)

    def _kernel_step(self, x: Tensor, states: list) -> Tensor | None:
        """Every layer's step on its step kernels, kept between steps (`KeptStepKernels`), or
        None (nothing changed) where they do not apply: a step then checks the input, the mode
        and that the layer still has the same parameter tensors, and calls the kernels, instead
        of gathering the weights and checking every tensor again (the streamed step's Python
        cost, issue 19)."""
        if _runs_hooks(self.layer):  # forward's call runs them; the kernels would not
            self._kept.plan = None
            return None
        stepped = self._kept.run(self.layer, x, states)
        if stepped is None:
            return None
        output, self._states = stepped
        # A copy: the state is the kernel's h itself, and forward's output never aliases its
        # final state either (an in-place change of the output must not change the stream).
        return output.clone()

    def _general_step(self, input: object) -> Tensor:
        """The step through ``forward`` on a one-step sequence: its checks, its engines."""
        self._kept.plan = None  # forward's state may be one to differentiate
        layer = self.layer
        name = type(layer).__name__
        param = layer.weight_ih_l0
        x = require_tensor(f"{name} stream input", input, dtype=param.dtype,
                           device=param.device)
        if x.dim() not in (1, 2) or x.shape[-1] != layer.input_size:
            raise ValueError(f"{name} stream input must have shape (N, H_in) or unbatched "
                             f"(H_in,), with H_in = input_size = {layer.input_size}; got "
                             f"{tuple(x.shape)}")
        if self._states is not None and x.shape != self._input_shape:
            raise ValueError(f"{name} stream input must keep the shape of the stream's first "
                             f"step, {self._input_shape}; got {tuple(x.shape)} (open a new "
                             "stream for another batch)")
        batched = x.dim() == 2
        sequence = x.unsqueeze(1 if batched and layer.batch_first else 0)
        output, final = layer(sequence, self.state if self._states is not None else self._hx)
        if self._states is None:
            self._batched, self._input_shape = batched, tuple(x.shape)
        self._states = self._split_final(final, batched)
        if not batched:
            return output[0]
        return output[:, 0] if layer.batch_first else output[0]  # (N, H_out)

    def _split_final(self, final: State, batched: bool) -> list[State]:
        """``forward``'s final state -> the per-layer states the steps carry."""
        return _final_states(self.layer, final, batched)


def _runs_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks or pre-hooks, its own or global ones (the
    old ``torch.nn.utils.weight_norm`` and ``prune`` compute weights in a pre-hook)."""
    return bool(module._forward_pre_hooks or module._forward_hooks
                or _global_forward_pre_hooks or _global_forward_hooks)


class _StepPlan(NamedTuple):
    """Step kernels kept between steps (`KeptStepKernels`), with what they were bound under:
    the layer's parameter tensors (compared by identity), its step settings (the layer's
    ``_step_settings()``), the input's dtype and rows."""

    kernels: StepKernels
    parameters: tuple
    settings: tuple
    dtype: torch.dtype
    rows: int


class KeptStepKernels:
    """A layer's step kernels (`StepKernels`, bound by its ``_step_kernels``) kept from one step
    to the next while they are still that step's (`holds`): one per `LayerStream`, and one per
    layer for its one-step calls (`kept_step_kernels`). Copied and pickled empty: the kernels
    are bound to one layer's tensors, and a copy's layer has its own (it binds them at its
    next step)."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: _StepPlan | None = None

    def __reduce__(self):
        return KeptStepKernels, ()

    def run(self, layer, x: Tensor, states: list, given: tuple = ()
            ) -> tuple[Tensor, list] | None:
        """One step of ``layer``'s whole stack on its step kernels: ``x (N, H_in)`` and each
        layer's state -> the top layer's output and the new states, or None (nothing kept,
        nothing computed that matters) where the kernels do not apply. ``given``: state
        tensors the kernels have not made (a caller's), checked as the input is; a stream's
        states are the kernels' own since the plan was made. The kernels are bound anew where
        the kept ones do not hold; a kept kernel that refuses a weight changed in place under
        it (``param.data = ...`` of another dtype or device) gives None, and the caller's
        ``forward`` decides and names what is wrong."""
        plan = self.plan
        kept = plan is not None and self.holds(plan, layer, x, given)
        if kept:
            kernels = plan.kernels
        else:
            kernels = layer._step_kernels(x, states)
            if kernels is None:
                self.plan = None
                return None
            self.plan = _new_plan(layer, kernels, x)
        try:
            stepped = kernels.run(x, states)
        except RuntimeError:
            if not kept:
                raise
            stepped = None
        if stepped is None:
            self.plan = None
        return stepped

    @staticmethod
    def holds(plan: _StepPlan, layer, x: Tensor, given: tuple) -> bool:
        """Whether ``plan``'s kernels are still this step's: the layer with the same parameter
        tensors and step settings, ``x`` and the ``given`` states contiguous CPU tensors of the
        plan's dtype, ``x`` with the plan's rows, nothing to differentiate in plain eager mode
        (`ops.plain_eager`)."""
        parameters = layer._parameters
        dtype = plan.dtype
        return (x.dtype is dtype and x.is_cpu and x.is_contiguous() and x.shape[0] == plan.rows
                and len(parameters) == len(plan.parameters)
                and all(map(operator.is_, parameters.values(), plan.parameters))
                and layer._step_settings() == plan.settings
                and all(t.dtype is dtype and t.is_cpu and t.is_contiguous() for t in given)
                and ops.plain_eager(x, *given, *plan.kernels.weights))


def _new_plan(layer, kernels: StepKernels, x: Tensor) -> _StepPlan | None:
    """``kernels`` as a plan for the next steps, or None where they must be bound anew at every
    step: where a weight is not one of the layer's parameters (a parametrization computes it
    at every access)."""
    parameters = tuple(layer._parameters.values())
    known = {id(p) for p in parameters}
    if not all(id(w) in known for w in kernels.weights):
        return None
    return _StepPlan(kernels, parameters, layer._step_settings(), x.dtype, x.shape[0])


class KeepsStepKernels(torch.nn.Module):
    """The base of the layers whose one-step calls keep their kernels (`kept_step_kernels`):
    every change of an attribute (a parameter replaced, ``load_state_dict(assign=True)``, a
    setting) and every ``_apply`` (``.to``, ``.double()``, ...) drops the kept plan, so that it
    never holds tensors the layer no longer has (the plan's check would refuse them at the next
    call, but would keep them alive until then)."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        _drop_kept_plan(self)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _drop_kept_plan(self)

    def _apply(self, fn, recurse=True):
        _drop_kept_plan(self)
        return super()._apply(fn, recurse)


_LAYER_KEPT = "_kept_step_kernels"  # where a layer keeps its `KeptStepKernels` (its __dict__)


def _drop_kept_plan(layer) -> None:
    kept = layer.__dict__.get(_LAYER_KEPT)
    if kept is not None:
        kept.plan = None


def kept_step_kernels(layer) -> KeptStepKernels:
    """The `KeptStepKernels` of ``layer``'s one-step calls (made at the first; a layer built
    or unpickled without one gets one)."""
    kept = layer.__dict__.get(_LAYER_KEPT)
    if kept is None:
        kept = layer.__dict__[_LAYER_KEPT] = KeptStepKernels()
    return kept


class SLSTMStream(LayerStream):
    r"""Steps of a unidirectional `rnnkit.SLSTM`, one call each: `LayerStream`'s contract.

    ``stream(x_t)`` equals ``layer(x_t.unsqueeze(0), s)`` (``unsqueeze(1)`` with
    ``batch_first``), the stream's state becoming its final state ``(h_n, c_n, n_n, m_n)``,
    each ``(L, N, H)`` (unbatched ``(L, H)``); ``hx`` in ``forward``'s form (None: the empty
    state). Where nothing is differentiated and no dropout mask is drawn, each layer's step is
    one call of the sLSTM step kernel (`rnnkit.engine.slstm_inference_step`), on the CPU in
    float32/float64 with the kernels built and at most
    ``engine.SLSTM_STEP_KERNEL_MAX_BATCH`` (16) rows; elsewhere a step runs ``forward`` on the
    one-step sequence.

    Example::

        >>> slstm = rnnkit.SLSTM(10, 20, num_layers=2, num_heads=4).eval()
        >>> stream = slstm.stream()
        >>> with torch.no_grad():
        ...     y = [stream(x_t) for x_t in torch.randn(5, 3, 10)]    # each (3, 20)
        >>> h_n, c_n, n_n, m_n = stream.state                           # (2, 3, 20) each
    """

    layer: SLSTM

    @property
    def state(self) -> SLSTMState | None:
        """The final state after the steps so far, as the layer's ``forward`` returns it."""
        if self._states is None:
            return None
        stacked = tuple(torch.stack([state[part] for state in self._states])
                        for part in range(4))
        return stacked if self._batched else tuple(s.squeeze(1) for s in stacked)

    def _split_final(self, final, batched: bool) -> list:
        """``forward``'s ``(h_n, c_n, n_n, m_n)`` -> per layer ``(h, c, n, m)``, each ``(N, H)``,
        contiguous."""
        parts = final if batched else tuple(s.unsqueeze(1) for s in final)
        return [tuple(p.contiguous() for p in per_layer)
                for per_layer in zip(*parts, strict=True)]


class MinimalStream(LayerStream):
    r"""Steps of a unidirectional `rnnkit.MinGRU` or `rnnkit.MinLSTM`, one call each:
    `LayerStream`'s contract.

    ``stream(x_t)`` equals ``layer(x_t.unsqueeze(0), s)`` (``unsqueeze(1)`` with
    ``batch_first``), the stream's state becoming its final state ``h_n (L, N, H)`` (unbatched
    ``(L, H)``); ``hx`` in ``forward``'s form (None: zeros; with ``log_space=True`` every entry
    >= 0, checked at the first step). Where nothing is differentiated and no dropout mask is
    drawn, each layer's step is one call of the minimal step kernel
    (`rnnkit.engine.min_inference_step`: the projection and ``h' = a ⊙ h + b``), under the
    backends ``"auto"`` and ``"native"``, on the CPU in float32/float64 with the kernels built
    and at most ``engine.MIN_STEP_KERNEL_MAX_BATCH`` (8) rows; elsewhere a step runs
    ``forward`` on the one-step sequence.

    Example::

        >>> gru = rnnkit.MinGRU(10, 20, num_layers=2).eval()
        >>> stream = gru.stream()
        >>> with torch.no_grad():
        ...     y = [stream(x_t) for x_t in torch.randn(5, 3, 10)]    # each (3, 20)
        >>> h_n = stream.state                                          # (2, 3, 20)
    """

    layer: _MinimalLayer

    @property
    def state(self) -> Tensor | None:
        """The final state after the steps so far, as the layer's ``forward`` returns it."""
        if self._states is None:
            return None
        stacked = torch.stack(self._states)
        return stacked if self._batched else stacked.squeeze(1)

    def _split_final(self, final, batched: bool) -> list:
        """``forward``'s ``h_n`` -> per layer ``h (N, H)``, contiguous."""
        h_n = final if batched else final.unsqueeze(1)
        return [h.contiguous() for h in h_n]


class StepKernels(NamedTuple):
    """One step of a unidirectional layer's whole stack on its native step kernels, each
    bound to its layer's weights (`engine.step_kernel` and its kin): ``kernels[k](x, state)``
    is layer ``k``'s new state (None: declined), ``top(new)`` its output and the next layer's
    input, ``weights`` every tensor they read."""

    kernels: tuple[engine.StepKernel, ...]
    weights: tuple[Tensor, ...]
    top: Callable

    def run(self, x: Tensor, states: list) -> tuple[Tensor, list] | None:
        """``x (N, H_in)`` and each layer's state -> the top layer's output and the new states,
        or None (nothing kept) where a kernel declines."""
        new_states, layer_input = [], x
        for kernel, state in zip(self.kernels, states, strict=True):
            new = kernel(layer_input, state)
            if new is None:
                return None
            new_states.append(new)
            layer_input = self.top(new)
        return layer_input, new_states


def _bind_each(states: list, bind: Callable, top: Callable) -> StepKernels | None:
    """`StepKernels` from ``bind(index, state)`` -> (layer ``index``'s kernel or None, the
    tensors it reads); None where any layer's is None. The kernels apply under the same
    conditions to every layer (they decide on the stack's input ``x``, its dtype and batch)."""
    kernels, weights = [], []
    for index, state in enumerate(states):
        kernel, tensors = bind(index, state)
        if kernel is None:
            return None
        kernels.append(kernel)
        weights += [t for t in tensors if t is not None]
    return StepKernels(tuple(kernels), tuple(weights), top)


def step_kernels(layer: RecurrentLayer, x: Tensor, states: list[State]) -> StepKernels | None:
    """A unidirectional `rnnkit.RNN`, `rnnkit.LSTM` or `rnnkit.GRU`'s step kernels
    (`engine.step_kernel`) for a step of ``x (N, H_in)`` from each layer's state (``h (N,
    H_out)`` or ``(h, c)``), or None where they do not apply: in training with dropout between
    layers or a regularisation switch, with zoneout, or where the engine declines (it decides
    before any work, the same for every layer). Shapes are the caller's to have checked."""
    if layer.training and (layer._regularised or (layer.dropout and layer.num_layers > 1)):
        return None
    if any(layer.zoneout):  # evaluation's expectation is a mask too
        return None
    kind, backend = layer.cell_kind(), layer.backend

    def bind(index: int, state: State):
        weights = layer.cell_weights(index, 0)
        return engine.step_kernel(kind, x, state, weights, backend), weights
    return _bind_each(states, bind, output_of)


def slstm_step_kernels(layer: SLSTM, x: Tensor, states: list[SLSTMState]) -> StepKernels | None:
    """A unidirectional `rnnkit.SLSTM`'s step kernels (`engine.slstm_step_kernel`) for a step
    of ``x (N, H_in)`` from each layer's ``(h, c, n, m)`` (each ``(N, H)``), or None where they
    do not apply: in training with dropout between layers, or where the engine declines.
    Shapes are the caller's to have checked."""
    if layer.training and layer.dropout and layer.num_layers > 1:
        return None
    exp_forget, backend = layer.forget_gate == "exp", layer.backend

    def bind(index: int, state: SLSTMState):
        weights = layer.weights(index, 0)
        return engine.slstm_step_kernel(x, state, *weights, exp_forget, backend), weights
    return _bind_each(states, bind, lambda new: new[0])


def min_step_kernels(layer: _MinimalLayer, x: Tensor, states: list[Tensor]
                     ) -> StepKernels | None:
    """A unidirectional `rnnkit.MinGRU` or `rnnkit.MinLSTM`'s step kernels
    (`engine.min_step_kernel`) for a step of ``x (N, H_in)`` from each layer's ``h (N, H)``, or
    None where they do not apply: in training with dropout between layers, or where the engine
    declines (a log-space layer's state with a negative entry is declined by its kernel when
    its turn comes). Shapes are the caller's to have checked."""
    if layer.training and layer.dropout and layer.num_layers > 1:
        return None
    family, log_space, backend = layer.family, layer.log_space, layer.backend

    def bind(index: int, h: Tensor):
        weights = layer.weights(index, 0)
        return engine.min_step_kernel(family, x, h, *weights, log_space, backend), weights
    return _bind_each(states, bind, lambda new: new)


def one_step_input(layer, input: Tensor) -> Tensor | None:
    """``x (N, H_in)`` of a layer call's ``input``, a 3-dimensional tensor, when it is one time
    step of a batched sequence the layer's short way can run (`RecurrentLayer._one_step`,
    `_SimpleLayer._one_step`): unidirectional, one step, ``H_in`` the
    layer's ``input_size``, at least one row, eager (no compiler or tracer). Else None, and the
    layer's ``forward`` checks and runs it the general way."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or layer.bidirectional:
        return None
    step_dim = 1 if layer.batch_first else 0
    if (input.shape[step_dim] != 1 or input.shape[2] != layer.input_size
            or input.shape[1 - step_dim] == 0):
        return None
    return input[:, 0] if layer.batch_first else input[0]


def _final_states(layer: RecurrentLayer, final: State, batched: bool) -> list[State]:
    """``forward``'s final state -> per layer ``h (N, H_out)`` or ``(h, c)``, contiguous."""
    if layer.family == Family.LSTM:
        h_n, c_n = final
        if not batched:
            h_n, c_n = h_n.unsqueeze(1), c_n.unsqueeze(1)
        return [(h.contiguous(), c.contiguous()) for h, c in zip(h_n, c_n, strict=True)]
    h_n = final if batched else final.unsqueeze(1)
    return [h.contiguous() for h in h_n]


__all__ = ["KeepsStepKernels", "KeptStepKernels", "LayerStream", "MinimalStream", "SLSTMStream",
           "StepKernels", "kept_step_kernels", "min_step_kernels", "one_step_input",
           "slstm_step_kernels", "step_kernels"]

