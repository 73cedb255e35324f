"""Sequence layers RNN, LSTM, GRU: validation, stacking, directions and lengths around the engine;
and `_SimpleLayer`, the same for the layers without torch.nn's variants (MinGRU, MinLSTM, SLSTM).

A layer owns the parameters (torch.nn's names and shapes, plus the variants'), turns every accepted
input form (batched, unbatched, ``batch_first``, ``PackedSequence``, padded + ``lengths``) into one
time-major padded tensor with optional lengths, and hands each layer and direction of the stack to
`rnnkit.engine.run_direction`.

`forward` is three public steps, open to code that reads a stack (rnnkit.diagnostics):
`prepare` (input forms and initial states -> `PreparedInput`), `run_stack` (the layers bottom
to top, optionally only the first few) and `run_direction` (one layer and direction). The
members of torch.nn.RNNBase that code written for torch.nn touches are here too
(`flatten_parameters`, `all_weights`, `_flat_weights`, `_flat_weights_names`, `mode`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import ClassVar, Generic, NamedTuple, NoReturn, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit import engine
from rnnkit._checks import (
    check_lengths,
    describe,
    require_allocatable,
    require_bool,
    require_choice,
    require_factory,
    require_int,
    require_layer_arguments,
    require_shape,
    require_tensor,
    warn_unused_dropout,
)
from rnnkit.cells import (
    BackendSetting,
    _check_forget_bias,
    _init_lstm_variants,
    _inverted_dropout_mask,
    _rate,
    _refuse_scripting,
    _reset_uniform,
    _zoneout_keeps,
    _zoneout_rates,
    _zoneout_setting,
)
from rnnkit.engine import precision
from rnnkit.engine.steps import (
    NONLINEARITIES,
    CellKind,
    CellWeights,
    Family,
    Masks,
    State,
    output_of,
)
from rnnkit.stream import (
    KeepsStepKernels,
    LayerStream,
    StepKernels,
    kept_step_kernels,
    one_step_input,
    step_kernels,
)


def _stack(states: list[Tensor]) -> Tensor:
    """torch.stack, without its cost for the one-state case (a streamed single layer)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _require_index(name: str, value: object, count: int) -> int:
    """An int in ``[0, count)``; TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [0, {count - 1}], got {describe(value)}")
    if not 0 <= value < count:
        raise ValueError(f"{name} must be an int in [0, {count - 1}], got {value}")
    return value


def prepare_sequence(
    name: str, input: object, lengths: object, *, input_size: int, batch_first: bool,
    parameter: Tensor,
) -> tuple[Tensor, Tensor | None, bool]:
    """A sequence layer's input, checked, in the form its stack runs on (every layer family).

    ``input``: ``(L, N, input_size)`` (``(N, L, input_size)`` with ``batch_first``), unbatched
    ``(L, input_size)`` or a ``PackedSequence``, of ``parameter``'s dtype and device;
    ``lengths`` for padded batched input. Returns ``x (T, N, I)`` time-major with the padding
    past each length zeroed, ``lengths (N,)`` int64 on x's device (None when every sequence
    has all T steps) and whether the input was batched. Errors name ``name``'s argument.
    """
    param = parameter
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError(
                f"{name} lengths must be None when input is a PackedSequence (it carries its "
                f"own lengths), got {describe(lengths)}"
            )
        data = require_tensor(
            f"{name} input (PackedSequence.data)", input.data,
            dtype=param.dtype, device=param.device,
        )
        if data.dim() != 2 or data.shape[1] != input_size:
            raise ValueError(
                f"{name} input (PackedSequence.data) must have shape (sum of lengths, "
                f"input_size={input_size}), got {tuple(data.shape)}"
            )
        x, packed_lengths = pad_packed_sequence(input)  # (T, N, I), lengths in input order
        return x, packed_lengths.to(x.device), True

    x = require_tensor(f"{name} input", input, dtype=param.dtype, device=param.device)
    layout = "(N, L, H_in)" if batch_first else "(L, N, H_in)"
    if x.dim() not in (2, 3) or x.shape[-1] != input_size:
        raise ValueError(
            f"{name} input must have shape {layout} or unbatched (L, H_in), with "
            f"H_in = input_size = {input_size}; got {tuple(x.shape)}"
        )
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
    elif batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[:2]
    if steps == 0:
        # An empty batch (N = 0) is fine, as in torch.nn; a sequence without steps is not.
        raise ValueError(
            f"{name} input must have at least one time step (L >= 1, as torch.nn requires), "
            f"got shape {tuple(input.shape)}"
        )
    if lengths is None:
        return x, None, batched
    if not batched:
        raise ValueError(
            f"{name} lengths applies to batched input only; unbatched input (L, H_in) uses "
            f"all its L steps; got lengths={describe(lengths)}"
        )
    # Traced for ONNX, lengths is a graph input whose values are not known: only its form
    # is checked, and the full-length shortcut (a branch on those values) is not taken.
    exporting = engine.is_exporting()
    lengths = check_lengths(lengths, steps=steps, batch=batch, device=x.device,
                            symbolic=exporting)
    # Full-length sequences need no masking: the unmasked loop is the same computation.
    # (Not decided while tracing for compile/export: the values are unknown then.)
    if not exporting and (batch == 0 or (not torch.compiler.is_compiling()
                                         and int(lengths.min()) == steps)):
        return x, None, batched
    # Engines compute the steps past a sequence's end and discard them, but a NaN or inf
    # there would still reach the gradients (0 * NaN in the products over all steps). Zeroed
    # once here, the padding is finite for every engine and its gradient is zero, as with a
    # PackedSequence (whose padding pad_packed_sequence fills with zeros).
    valid = torch.arange(steps, device=x.device).unsqueeze(1) < lengths  # (T, N)
    return x.masked_fill(~valid.unsqueeze(2), 0.0), lengths, batched


class PreparedInput(NamedTuple):
    """A layer's input in the form its stack runs on, as `prepare` makes it."""

    x: Tensor  # (T, N, H_in) time-major, padding past each length zeroed
    lengths: Tensor | None  # (N,) int64 on x's device; None when every sequence has T steps
    initial: list[Tensor | tuple[Tensor, ...]]  # per layer and direction (layer * D + direction)
    batched: bool  # False for unbatched (L, H_in) input, run as N = 1


class _RecurrentLayer(KeepsStepKernels):
    """Parameters, input handling and the layer/direction loop shared by RNN, LSTM and GRU."""

    family: Family = Family.RNN
    gate_count: int = 1
    backend = BackendSetting()

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        peephole: bool = False,
        learn_initial_state: bool = False,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.layer_norm = require_bool(f"{name} layer_norm", layer_norm)
        self.recurrent_dropout = _rate(f"{name} recurrent_dropout", recurrent_dropout)
        self.zoneout = _zoneout_rates(f"{name} zoneout", zoneout, self.family)
        self.weight_drop = _rate(f"{name} weight_drop", weight_drop)
        self.backend = backend  # checked by BackendSetting
        (self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
         self.dropout, self.bidirectional) = require_layer_arguments(
            name, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        self.proj_size = require_int(f"{name} proj_size", proj_size, minimum=0)
        self.peephole = require_bool(f"{name} peephole", peephole)
        self.learn_initial_state = require_bool(
            f"{name} learn_initial_state", learn_initial_state
        )
        if proj_size >= hidden_size:
            raise ValueError(
                f"{name} proj_size must be smaller than hidden_size ({hidden_size}), "
                f"got {proj_size}; use 0 for no projection"
            )
        warn_unused_dropout(name, dropout, num_layers, stacklevel=3)

        factory = require_factory(name, device, dtype)
        require_allocatable(name, self._size_settings(), self._parameter_count(), **factory)
        gates = self.gate_count * hidden_size
        # Registration order is torch.nn's (w_ih, w_hh, b_ih, b_hh, w_hr per layer and direction)
        # so that parameters() lines up with torch.nn's; variant parameters follow each group.
        self._torch_parameter_names: list[str] = []
        self._cell_parameter_names: list[dict[str, str]] = []  # per layer * directions + direction
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else self.output_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {"weight_ih": (gates, layer_input), "weight_hh": (gates, self.output_size)}
                if bias:
                    shapes |= {"bias_ih": (gates,), "bias_hh": (gates,)}
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = {role: role + suffix for role in shapes}
                self._torch_parameter_names += names.values()
                if peephole:
                    shapes["weight_ch"] = (3 * hidden_size,)
                    names["weight_ch"] = "weight_ch" + suffix
                if self.layer_norm:  # the spec's names: layer_norm_ih_l{k}, ...
                    extra = {"layer_norm_ih": (gates,), "layer_norm_hh": (gates,)}
                    if self.family == Family.LSTM:
                        extra |= {"layer_norm_c_weight": (hidden_size,),
                                  "layer_norm_c_bias": (hidden_size,)}
                    shapes |= extra
                    names |= {role: role + suffix for role in extra}
                for role, shape in shapes.items():
                    setattr(self, names[role], nn.Parameter(torch.empty(shape, **factory)))
                self._cell_parameter_names.append(names)
        if learn_initial_state:
            states = self.num_layers * self.num_directions
            self.h0 = nn.Parameter(torch.empty(states, 1, self.output_size, **factory))
            if self.family == Family.LSTM:
                self.c0 = nn.Parameter(torch.empty(states, 1, hidden_size, **factory))

    # ---- shape facts -----------------------------------------------------------------------
    def _parameter_count(self) -> int:
        """Elements of every parameter the constructor will allocate, in Python ints (exact at
        any size, and without a loop over layers, so a huge num_layers is refused at once)."""
        gates, hidden, out = self.gate_count * self.hidden_size, self.hidden_size, self.output_size
        directions, layers = self.num_directions, self.num_layers

        def per_direction(layer_input: int) -> int:
            count = gates * (layer_input + out + (2 if self.bias else 0))
            norms = (2 * gates + (2 * hidden if self.family == Family.LSTM else 0)
                     if self.layer_norm else 0)
            return count + self.proj_size * hidden + (3 * hidden if self.peephole else 0) + norms

        count = directions * (per_direction(self.input_size)
                              + (layers - 1) * per_direction(directions * out))
        if self.learn_initial_state:
            count += layers * directions * (out + (hidden if self.family == Family.LSTM else 0))
        return count

    def _size_settings(self) -> str:
        """The constructor's size arguments, for an error message."""
        s = (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
             f"num_layers={self.num_layers}")
        s += f", proj_size={self.proj_size}" if self.proj_size else ""
        return s + (", bidirectional=True" if self.bidirectional else "")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Size of ``h`` per direction: ``proj_size`` when projecting, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    # ---- torch.nn.RNNBase's members that code written for torch.nn reads -------------------
    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters per layer and direction (index ``layer * D + direction``), each group in
        torch.nn's order ``[w_ih, w_hh, b_ih, b_hh(, w_hr)]``, variant parameters last."""
        return [[getattr(self, n) for n in names.values()] for names in self._cell_parameter_names]

    @property
    def _all_weights(self) -> list[list[str]]:
        """The names of `all_weights`, as torch.nn's ``_all_weights``."""
        return [list(names.values()) for names in self._cell_parameter_names]

    @property
    def _flat_weights_names(self) -> list[str]:
        """torch.nn's parameter names in torch.nn's order (``weight_ih_l0, weight_hh_l0, …``);
        variant parameters, which torch.nn's kernels cannot read, are not among them."""
        return list(self._torch_parameter_names)

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The tensors of `_flat_weights_names`, read at each access: always current after
        ``.to()``, a reassigned parameter or a parametrization (torch.nn keeps a cached list)."""
        return [getattr(self, name) for name in self._torch_parameter_names]

    @property
    def mode(self) -> str:
        """torch.nn's name of the cell: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``."""
        if self.family == Family.RNN:
            return "RNN_" + self.nonlinearity.upper()
        return self.family.value.upper()

    def __prepare_scriptable__(self) -> NoReturn:
        _refuse_scripting(self)

    def flatten_parameters(self) -> None:
        """A no-op, kept so code written for torch.nn runs unchanged (its word language model
        calls it in every forward). torch.nn copies its weights into one contiguous buffer for
        cuDNN; rnnkit's engines read each parameter where it is, so there is nothing to do."""
        return None


    def cell_kind(self) -> CellKind:
        """The parameter-free description of this layer's cell, as the engine reads it."""
        return CellKind(self.family)

    def cell_weights(self, layer: int, direction: int) -> CellWeights:
        """The parameters of one layer and direction of the stack."""
        names = self._cell_parameter_names[layer * self.num_directions + direction]
        if "parametrizations" in self._modules:  # computed weights: through the attributes
            return CellWeights(**{role: getattr(self, name) for role, name in names.items()})
        # The parameters themselves, looked up directly (a streamed step asks every call).
        parameters = self._parameters
        return CellWeights(**{role: parameters[name] if name in parameters
                              else getattr(self, name) for role, name in names.items()})

    # ---- initialisation --------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """torch.nn's ``U(-1/sqrt(H), 1/sqrt(H))`` in torch.nn's order; variants start neutral.

        Drawing only the torch.nn parameters, in its order, means that under the same seed a
        plain layer starts with exactly torch.nn's weights. Learned initial states start at
        zero, which is the state used when ``hx`` is not given.
        """
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._torch_parameter_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        with torch.no_grad():
            for name in ("h0", "c0"):
                if hasattr(self, name):
                    getattr(self, name).zero_()
            for names in self._cell_parameter_names:  # layer norm: gain 1, no shift
                for role, name in names.items():
                    if role.startswith("layer_norm"):
                        getattr(self, name).fill_(0.0 if role == "layer_norm_c_bias" else 1.0)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: State | None = None,
        lengths: Tensor | list[int] | None = None,
    ):
        """Run the stack; see the class docstring for shapes.

        ``lengths`` may be passed by position too (third, after ``hx``): tracers such as the
        legacy ONNX exporter hand every argument over positionally.
        """
        early = _autocast_or_one_step(self, input, hx, lengths)
        if early is not None:
            return early
        x, lengths, batched = self._prepare_input(input, lengths)
        initial = self._initial_states(hx, x, batched)
        output, finals = self._run_stack(x, initial, lengths, self.num_layers, self.training)
        return (_in_input_form(output, input, lengths, batched, self.batch_first),
                self._stack_states(finals, batched))

    def _one_step(self, input: Tensor, hx: object) -> tuple[Tensor, State] | None:
        """`forward` on a one-step batched sequence from a given state, on the step kernels
        (kept between calls, `rnnkit.stream.kept_step_kernels`, as a stream's are): the same
        result without the general path's reshaping and splitting (a loop that calls the layer
        once a step). None wherever the input differs from that plain case in any way (form,
        shape, state, gradient, compiler or tracer); forward then checks and runs it as any
        other."""
        x = one_step_input(self, input)
        if x is None:
            return None
        parts = hx if type(hx) is tuple else (hx,)
        shapes = self._state_shapes(x.shape[0])
        if len(parts) != len(shapes) or not all(
                type(part) is Tensor and part.shape == shape
                for part, (shape, _) in zip(parts, shapes, strict=True)):
            return None
        states = (list(zip(parts[0].unbind(0), parts[1].unbind(0), strict=True))
                  if len(parts) == 2 else list(parts[0].unbind(0)))
        stepped = kept_step_kernels(self).run(self, x, states, parts)
        if stepped is None:
            return None
        top, finals = stepped
        # A copy: with one layer h_n is a view of the top h, and forward's output never
        # aliases its final state.
        step_dim = 1 if self.batch_first else 0
        return top.unsqueeze(step_dim).clone(), self._stack_states(finals, True)

    def stream(self, hx: State | None = None) -> LayerStream:
        """A handle that runs this layer one time step per call, keeping the state between
        calls (streaming inference): ``stream(x_t)`` equals ``forward`` on the one-step
        sequence from the state so far, which starts at ``hx`` (``forward``'s form; None:
        zeros, or the learned initial state). Checks once, then each layer's step is one
        native call where nothing is differentiated (`rnnkit.stream.LayerStream`).
        Unidirectional layers only."""
        return LayerStream(self, hx)

    def _step_kernels(self, x: Tensor, states: list[State]) -> StepKernels | None:
        """The stack's step kernels for a step of ``x (N, H_in)`` from ``states``
        (`rnnkit.stream.step_kernels`), or None where they do not apply."""
        return step_kernels(self, x, states)

    def _step_settings(self) -> tuple:
        """What, besides the parameters, decides the step kernels and whether they run (kept
        kernels are dropped when it changes): the backend (the layer's and ``RNNKIT_BACKEND``),
        the cell (`cell_kind`: nonlinearity, ``reset_after``), the mode and the switches that
        draw masks in it."""
        return (self.backend, os.environ.get(engine.ENVIRONMENT_VARIABLE), self.cell_kind(),
                self.training, self.dropout, self.recurrent_dropout, self.weight_drop,
                self.zoneout)

    # ---- the stack, step by step: what forward does, open to diagnostics -------------------
    def prepare(
        self,
        input: Tensor | PackedSequence,
        hx: State | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
    ) -> PreparedInput:
        """Check ``input``, ``hx`` and ``lengths`` as `forward` does and bring them to the form
        the stack runs on: time-major ``x (T, N, H_in)`` with padding zeroed, ``lengths (N,)``
        (None when every sequence has all T steps) and the initial state of each layer and
        direction (``hx`` split, or zeros, or the learned state). See `PreparedInput`.
        """
        x, lengths, batched = self._prepare_input(input, lengths)
        return PreparedInput(x, lengths, self._initial_states(hx, x, batched), batched)

    def run_stack(
        self, prepared: PreparedInput, *, upto: int | None = None,
        apply_dropout: bool | None = None,
    ) -> tuple[Tensor, list[State]]:
        """Run layers ``0 … upto-1`` of the stack, bottom to top, on this layer's engine.

        Args:
            prepared: what `prepare` returned.
            upto: how many layers to run, in ``[0, num_layers]`` (default all). The output is
                then the input sequence of layer ``upto``; ``upto=0`` returns ``prepared.x``.
            apply_dropout: dropout between layers; default (None) as `forward`, in training
                mode only. ``False`` reads the stack as in evaluation without calling ``eval()``.

        Returns:
            ``output (T, N, D*H_out)`` time-major (``(T, N, H_in)`` for ``upto=0``), zero past
            each sequence's length, and the final states of the layers run, per layer and
            direction (index ``layer * D + direction``), as `run_direction` returns them.
        """
        name = type(self).__name__
        if not isinstance(prepared, PreparedInput):
            raise TypeError(f"{name}.run_stack prepared must be what {name}.prepare returns (a "
                            f"PreparedInput), got {describe(prepared)}")
        count = self.num_layers if upto is None else _require_index(
            f"{name}.run_stack upto", upto, self.num_layers + 1)
        if apply_dropout is not None:
            require_bool(f"{name}.run_stack apply_dropout", apply_dropout)
        training = self.training if apply_dropout is None else apply_dropout
        return self._run_stack(prepared.x, prepared.initial, prepared.lengths, count, training)

    def run_direction(
        self, layer: int, direction: int, x: Tensor, state: State,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        """One layer and direction of the stack on this layer's engine (``backend``).

        Args:
            layer: index in ``[0, num_layers)``.
            direction: 0 forward, 1 reverse (bidirectional only): the reverse direction runs
                each sequence from its last valid step to its first.
            x: the layer's input ``(T, N, H_in)`` for layer 0, else ``(T, N, D*H_out)``.
            state: its initial state, ``h (N, H_out)`` or ``(h (N, H_out), c (N, H_cell))``.
            lengths: ``(N,)`` int64 on ``x``'s device in ``[1, T]``, or None (all T steps).

        Returns:
            ``output (T, N, H_out)`` and the final state; the contract of
            `rnnkit.engine.run_direction`.
        """
        name = type(self).__name__
        layer = _require_index(f"{name}.run_direction layer", layer, self.num_layers)
        direction = _require_index(f"{name}.run_direction direction", direction,
                                   self.num_directions)
        weights, masks = self._direction_inputs(layer, direction, x, self.training)
        return engine.run_direction(self.cell_kind(), x, state, weights, lengths,
                                    reverse=direction == 1, backend=self.backend, masks=masks)

    @property
    def _regularised(self) -> bool:
        """Whether any of recurrent dropout, zoneout or weight drop is on."""
        return bool(self.recurrent_dropout or self.weight_drop or any(self.zoneout))

    def _direction_inputs(self, layer: int, direction: int, x: Tensor,
                          training: bool) -> tuple[CellWeights, Masks | None]:
        """One layer and direction's weights and masks for an input ``x (T, N, ·)``, drawn
        from torch's default generator (spec: "Normalisation and regularisation"):

        - weight drop (training): ``W_hh`` replaced by ``M ⊙ W_hh / (1 - p)``, one mask ``M``
          of its shape per call (the gradient reaches ``W_hh`` through it);
        - recurrent dropout (training): one inverted mask ``(N, H_out)`` for every step;
        - zoneout: per step, sample and unit 0/1 masks ``(T, N, ·)`` that keep the old value
          with probability ``p`` in training; the probability itself (0-dim) in evaluation.
        """
        weights = self.cell_weights(layer, direction)
        if not self._regularised:
            return weights, None
        w_hh = weights.weight_hh
        if training and self.weight_drop:
            weights = weights._replace(
                weight_hh=w_hh * _inverted_dropout_mask(w_hh.shape, self.weight_drop, w_hh))
        steps, batch = x.shape[0], x.shape[1]
        recurrent = None
        if training and self.recurrent_dropout:
            recurrent = _inverted_dropout_mask((batch, self.output_size), self.recurrent_dropout,
                                               x)
        keeps = _zoneout_keeps(self.zoneout, (self.output_size, self.hidden_size), steps, batch,
                               training, x)
        masks = Masks(recurrent, *keeps)
        return weights, None if masks.empty else masks

    def _run_stack(
        self, x: Tensor, initial: list[State], lengths: Tensor | None, upto: int, training: bool
    ) -> tuple[Tensor, list[State]]:
        """Layers ``0 … upto-1``, each direction through the engine: (T, N, I) -> (T, N, D*H_out).

        Unchecked: `forward` and `run_stack` check first, so a streamed step pays nothing more.
        """
        kind = self.cell_kind()
        backend = self.backend  # resolved by the engine (RNNKIT_BACKEND may override it)
        layer_input = x
        finals: list[State] = []
        for layer in range(upto):
            outputs = []
            for direction in range(self.num_directions):
                weights, masks = self._direction_inputs(layer, direction, layer_input, training)
                output, final = engine.run_direction(
                    kind,
                    layer_input,
                    initial[layer * self.num_directions + direction],
                    weights,
                    lengths,
                    reverse=direction == 1,
                    backend=backend,
                    masks=masks,
                )
                outputs.append(output)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout and training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, finals

    def _prepare_input(
        self, input: object, lengths: object
    ) -> tuple[Tensor, Tensor | None, bool]:
        """Any accepted input -> (x (T, N, I) time-major, lengths (N,) or None, batched)."""
        return prepare_sequence(type(self).__name__, input, lengths, input_size=self.input_size,
                                batch_first=self.batch_first, parameter=self.weight_ih_l0)

    def _state_shapes(self, batch: int | None) -> list[tuple[tuple[int, ...], str]]:
        """Expected (shape, meaning) of h_0 (and c_0) for a batch size (None: unbatched)."""
        states = self.num_layers * self.num_directions
        lead, meaning = ((states,), "(D*num_layers,") if batch is None else (
            (states, batch), "(D*num_layers, N,")
        result = [(lead + (self.output_size,), meaning + " H_out)")]
        if self.family == Family.LSTM:
            result.append((lead + (self.hidden_size,), meaning + " H_cell)"))
        return result

    def _initial_states(self, hx: object, x: Tensor, batched: bool) -> list[State]:
        """Validate hx (or make the default) and split it per layer and direction."""
        name = type(self).__name__
        batch = x.shape[1]
        shapes = self._state_shapes(batch if batched else None)
        if hx is None:
            if self.learn_initial_state:
                learned = [self.h0] + ([self.c0] if self.family == Family.LSTM else [])
                parts = [p.expand(-1, batch, -1) for p in learned]
            else:
                parts = [x.new_zeros(shape) for shape, _ in self._state_shapes(batch)]
        else:
            if self.family == Family.LSTM:
                if not isinstance(hx, tuple | list) or len(hx) != 2:
                    raise TypeError(
                        f"{name} hx must be a tuple (h_0, c_0) of tensors with shapes "
                        f"{shapes[0][0]} and {shapes[1][0]}, got {describe(hx)}"
                    )
                parts, labels = list(hx), ["hx[0] (h_0)", "hx[1] (c_0)"]
            else:
                if not isinstance(hx, Tensor):
                    raise TypeError(
                        f"{name} hx must be a Tensor h_0 of shape {shapes[0][0]}, got "
                        f"{describe(hx)}"
                        + (" (a tuple (h_0, c_0) is for LSTM)" if isinstance(hx, tuple) else "")
                    )
                parts, labels = [hx], ["hx (h_0)"]
            for part, label, (shape, meaning) in zip(parts, labels, shapes, strict=True):
                require_tensor(f"{name} {label}", part, dtype=x.dtype, device=x.device)
                require_shape(f"{name} {label}", part, shape, meaning)
            if not batched:
                parts = [p.unsqueeze(1) for p in parts]
        if self.family == Family.LSTM:
            return list(zip(parts[0].unbind(0), parts[1].unbind(0), strict=True))
        return list(parts[0].unbind(0))

    def _stack_states(self, finals: list[State], batched: bool):
        """Final states per layer and direction -> h_n (D*num_layers, N, H_out) [, c_n]."""
        if self.family == Family.LSTM:
            stacked = (_stack([s[0] for s in finals]), _stack([s[1] for s in finals]))
            return stacked if batched else tuple(s.squeeze(1) for s in stacked)
        h_n = _stack([output_of(s) for s in finals])
        return h_n if batched else h_n.squeeze(1)

    # ---- conversion and display ------------------------------------------------------------
    def _variant_settings(self) -> dict[str, object]:
        """Settings torch.nn has no equivalent for, with their values here (non-default only)."""
        settings = {"learn_initial_state": True} if self.learn_initial_state else {}
        if self.layer_norm:
            settings["layer_norm"] = True
        if self.recurrent_dropout:
            settings["recurrent_dropout"] = self.recurrent_dropout
        if any(self.zoneout):
            settings["zoneout"] = _zoneout_setting(self.zoneout, self.family)
        if self.weight_drop:
            settings["weight_drop"] = self.weight_drop
        return settings

    def _torch_arguments(self) -> dict[str, object]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
        }

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn module with the same weights (plain configurations only)."""
        variants = self._variant_settings()
        if variants:
            settings = ", ".join(f"{k}={v!r}" for k, v in variants.items())
            raise ValueError(
                f"torch.nn.{type(self).__name__} has no equivalent of {settings}; only a plain "
                f"configuration converts"
            )
        param = self.weight_ih_l0
        module = getattr(nn, type(self).__name__)(
            **self._torch_arguments(), device=param.device, dtype=param.dtype
        )
        module.load_state_dict(self.state_dict())
        return module

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"proj_size": 0, "num_layers": 1, "bias": True, "batch_first": False,
                    "dropout": 0.0, "bidirectional": False}
        for key, default in defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        for key, value in self._variant_settings().items():
            s += f", {key}={value!r}"
        return s


RecurrentLayer = _RecurrentLayer
"""The base of `RNN`, `LSTM` and `GRU`, for ``isinstance`` tests (apps ask it)."""


def _autocast_or_one_step(layer: nn.Module, input: object, hx: object,
                          lengths: object) -> tuple[object, object] | None:
    """What every layer's ``forward`` tries first: under autocast, ``forward`` again in float32
    (the families' rule, engine/precision.py; the C call first, as a streamed step asks); then
    a one-step sequence from a given state on the layer's short way (its ``_one_step``). None
    where neither applies: ``forward`` then checks and runs the input the general way."""
    if torch._C._is_any_autocast_enabled() and precision.autocasting(layer.weight_ih_l0):
        param = layer.weight_ih_l0
        with torch.autocast(param.device.type, enabled=False):
            return layer.forward(precision.to_parameter_dtype(input, param),
                                 precision.to_parameter_dtype(hx, param), lengths=lengths)
    if lengths is None and type(input) is Tensor and input.dim() == 3:
        return layer._one_step(input, hx)
    return None


def _in_input_form(output: Tensor, input: object, lengths: Tensor | None, batched: bool,
                   batch_first: bool) -> Tensor | PackedSequence:
    """A stack's time-major ``output (T, N, ·)`` in the form of the layer's ``input``: packed
    as a PackedSequence input, unbatched, or batch-first."""
    if isinstance(input, PackedSequence):
        return _repack(output, input, lengths)
    if not batched:
        return output.squeeze(1)
    return output.transpose(0, 1) if batch_first else output


def _repack(output: Tensor, packed_input: PackedSequence, lengths: Tensor) -> PackedSequence:
    """Padded output (T, N, H) in input order -> a PackedSequence laid out like the input."""
    sorted_indices = packed_input.sorted_indices
    if sorted_indices is not None:
        output = output.index_select(1, sorted_indices)
        lengths = lengths.index_select(0, sorted_indices)
    data = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data
    return PackedSequence(
        data, packed_input.batch_sizes, packed_input.sorted_indices, packed_input.unsorted_indices
    )


_SimpleState = TypeVar("_SimpleState", Tensor, tuple[Tensor, ...])


class _SimpleLayer(KeepsStepKernels, Generic[_SimpleState]):
    """What the layers without torch.nn's variants (MinGRU, MinLSTM, SLSTM) share, as
    `cells._SimpleCell` for their cells: torch.nn's layer arguments, checked; per layer and
    direction the parameters the subclass lists in `_shapes`, named as torch.nn names them
    (``weight_ih_l{k}``, suffix ``_reverse``) and all ``U(-1/sqrt(H), 1/sqrt(H))``; TorchScript
    refused by name; and a `forward` that applies the families' autocast rule, checks the input
    forms and runs the stack, each layer and direction on the subclass's `_run_direction`.

    A subclass gives its keyword options to ``__init__`` (checked by its `_set_options`, before
    ``backend``, whose check may read them), a `BackendSetting` as ``backend``, and the state's
    form: a tensor ``h`` or a tuple of parts, made by `_empty_state` and `_check_state`.
    """

    backend: BackendSetting  # the subclass's, checking the names its engine accepts
    # Keyword options and their defaults: extra_repr shows those set otherwise.
    _option_defaults: ClassVar[dict[str, object]] = {}
    # The state's form: None for one tensor h, else the number of parts of its tuple.
    _state_parts: ClassVar[int | None] = None

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool,
                 batch_first: bool, dropout: float, bidirectional: bool, device, dtype, *,
                 backend: str, **options: object) -> None:
        super().__init__()
        name = type(self).__name__
        (self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
         self.dropout, self.bidirectional) = require_layer_arguments(
            name, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        self._set_options(**options)
        self.backend = backend  # checked by the subclass's BackendSetting
        warn_unused_dropout(name, dropout, num_layers, stacklevel=3)
        factory = require_factory(name, device, dtype)
        upper_input = self.num_directions * hidden_size

        def elements(layer_input: int) -> int:  # of one layer and direction
            return sum(math.prod(shape) for shape in self._shapes(layer_input).values()
                       if shape is not None)

        # In Python ints, without a loop over layers: a huge num_layers is refused at once.
        count = self.num_directions * (elements(input_size)
                                       + (num_layers - 1) * elements(upper_input))
        require_allocatable(name, f"input_size={input_size}, hidden_size={hidden_size}, "
                            f"num_layers={num_layers}", count, **factory)
        # Per layer and direction (index layer * D + direction): the parameters' names in
        # `_shapes`' order, None for one this layer lacks (bias_ih with bias=False).
        self._parameter_names: list[tuple[str | None, ...]] = []
        for layer in range(num_layers):
            shapes = self._shapes(input_size if layer == 0 else upper_input)
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for role, shape in shapes.items():
                    if shape is not None:
                        setattr(self, role + suffix,
                                nn.Parameter(torch.empty(shape, **factory)))
                self._parameter_names.append(tuple(
                    None if shape is None else role + suffix for role, shape in shapes.items()))
        self.reset_parameters()

    def _set_options(self) -> None:
        """Check the subclass's keyword options and set them as attributes."""

    def _shapes(self, layer_input: int) -> dict[str, tuple[int, ...] | None]:
        """The parameters of one layer and direction reading ``layer_input`` features, in
        registration order: role (``"weight_ih"``, ...) -> shape, None where there is none."""
        raise NotImplementedError

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, ``U(-1/sqrt(H), 1/sqrt(H))``, for every parameter."""
        _reset_uniform(self)

    def __prepare_scriptable__(self) -> NoReturn:
        _refuse_scripting(self)

    def weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """The parameters of one layer and direction in `_shapes`' order, None for one this
        layer lacks (``bias_ih`` with bias=False)."""
        names = self._parameter_names[layer * self.num_directions + direction]
        # The parameters themselves, looked up directly (a streamed step asks every call);
        # computed ones (parametrizations) through their attributes.
        parameters = {} if "parametrizations" in self._modules else self._parameters
        return tuple(None if name is None else parameters[name] if name in parameters
                     else getattr(self, name) for name in names)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: _SimpleState | None = None,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, _SimpleState]:
        """Run the stack; shapes in the class docstring."""
        early = _autocast_or_one_step(self, input, hx, lengths)
        if early is not None:
            return early
        x, lengths, initial, batched = self._prepare(input, hx, lengths)
        layer_input = x
        finals: list[_SimpleState] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                output, final = self._run_direction(
                    layer_input, initial[layer * self.num_directions + direction], layer,
                    direction, lengths)
                outputs.append(output)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = _in_input_form(layer_input, input, lengths, batched, self.batch_first)
        if isinstance(finals[0], Tensor):
            state = _stack(finals)
        else:
            state = tuple(_stack(list(part)) for part in zip(*finals, strict=True))
        return output, state if batched else _each_part(state, lambda t: t.squeeze(1))

    def _one_step(self, input: Tensor, hx: object) -> tuple[Tensor, _SimpleState] | None:
        """`forward` on a one-step batched sequence from ``hx`` (None: the empty state), on the
        family's step kernels (the subclass's `_step_kernels`, kept between calls as a stream's
        are: `rnnkit.stream.kept_step_kernels`): the same
        result without the general path's checks, reshaping and splitting (a loop that calls
        the layer once a step). None wherever the input differs from that plain case in any
        way (form, shape, a state not of exactly its shape and form, gradient, dtype, device,
        compiler or tracer, or what the kernel declines); forward then checks and runs it as
        any other, which gives the errors."""
        x = one_step_input(self, input)
        if x is None:
            return None
        shape, parts = (self.num_layers, x.shape[0], self.hidden_size), self._state_parts
        if hx is None:
            state = self._empty_state(shape, x)
        elif parts is None and type(hx) is Tensor and hx.shape == shape:
            state = hx
        elif (parts is not None and type(hx) is tuple and len(hx) == parts
              and all(type(t) is Tensor and t.shape == shape for t in hx)):
            state = hx
        else:
            return None
        if parts is None:
            states = list(state.unbind(0))
        else:
            states = list(zip(*(t.unbind(0) for t in state), strict=True))
        stepped = kept_step_kernels(self).run(self, x, states,
                                              state if parts is not None else (state,))
        if stepped is None:
            return None
        top, finals = stepped
        if parts is None:
            final = _stack(finals)
        else:
            final = tuple(_stack(list(part)) for part in zip(*finals, strict=True))
        output = top.unsqueeze(1 if self.batch_first else 0)
        # Stacking two layers or more copies the states; one layer's final state is a view of
        # the kernel's top h, so the output is then a copy (forward's output never aliases its
        # final state).
        return (output.clone() if self.num_layers == 1 else output), final

    def _step_kernels(self, x: Tensor, states: list[_SimpleState]) -> StepKernels | None:
        """The family's step kernels for a step of ``x (N, H_in)`` from ``states``
        (`rnnkit.stream`'s ``*_step_kernels``), or None where they do not apply."""
        raise NotImplementedError

    def _step_settings(self) -> tuple:
        """What, besides the parameters, decides the step kernels and whether they run (kept
        kernels are dropped when it changes): the backend (the layer's, and ``RNNKIT_BACKEND``,
        which the sLSTM reads), the mode and dropout between layers; a subclass adds its
        cell's switches."""
        return (self.backend, os.environ.get(engine.ENVIRONMENT_VARIABLE), self.training,
                self.dropout)

    def _run_direction(self, sequence: Tensor, state: _SimpleState, layer: int,
                       direction: int, lengths: Tensor | None) -> tuple[Tensor, _SimpleState]:
        """One layer and direction of the stack on the layer's engine: ``sequence (T, N,
        H_in)`` from ``state`` (each part ``(N, H)``) -> output ``(T, N, H)``, final state."""
        raise NotImplementedError

    def _prepare(self, input: object, hx: object, lengths: object) -> PreparedInput:
        """`forward`'s arguments checked and in the form the stack runs on (diagnostics read
        the stack from here too)."""
        x, lengths, batched = prepare_sequence(
            type(self).__name__, input, lengths, input_size=self.input_size,
            batch_first=self.batch_first, parameter=self.weight_ih_l0)
        return PreparedInput(x, lengths, self._initial_states(hx, x, batched), batched)

    def _initial_states(self, hx: object, x: Tensor, batched: bool) -> list[_SimpleState]:
        """``hx`` checked (or the empty state) and split per layer and direction: each part
        ``(N, H)``."""
        states, batch = self.num_layers * self.num_directions, x.shape[1]
        if hx is None:
            state = self._empty_state((states, batch, self.hidden_size), x)
        else:
            shape, meaning = (((states, batch, self.hidden_size), "(D*num_layers, N, H)")
                              if batched else ((states, self.hidden_size),
                                               "(D*num_layers, H)"))
            state = self._check_state(hx, shape, meaning, x)
            if not batched:
                state = _each_part(state, lambda t: t.unsqueeze(1))
        if isinstance(state, Tensor):
            return list(state.unbind(0))
        return list(zip(*(t.unbind(0) for t in state), strict=True))

    def _empty_state(self, shape: tuple[int, ...], like: Tensor) -> _SimpleState:
        """The state when ``hx`` is omitted, each part of ``shape``, dtype and device of
        ``like``."""
        raise NotImplementedError

    def _check_state(self, hx: object, shape: tuple[int, ...], meaning: str,
                     like: Tensor) -> _SimpleState:
        """``hx`` checked against ``shape`` (named ``meaning`` in errors) and ``like``'s dtype
        and device."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False} | self._option_defaults
        for key, default in defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        return s


def _each_part(state: Tensor | tuple[Tensor, ...],
               function: Callable[[Tensor], Tensor]) -> Tensor | tuple[Tensor, ...]:
    """``function`` of a state that is one tensor, or of each of its parts."""
    return function(state) if isinstance(state, Tensor) else tuple(map(function, state))


_LAYER_SHAPES = """
    Inputs: ``input, hx`` (optional), ``lengths`` (optional; by keyword, or third by position)
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first=True``, unbatched
          ``(L, H_in)``, or a ``PackedSequence`` (then the output is packed too).
        - **lengths**: ``(N,)`` integer tensor (any device) or list of ints in ``[1, L]``, any
          order, for padded batched input. Outputs past a sequence's end are zero; its final
          state is the state after its own last step; the reverse direction runs over the valid
          steps only, last to first.

    Legend: ``N`` batch size, ``L`` sequence length, ``D`` 2 if bidirectional else 1,
    ``H_in`` input_size, ``H_cell`` hidden_size, ``H_out`` proj_size if > 0 else hidden_size.
    Final states are ``(D * num_layers, N, ·)`` whether or not ``batch_first`` (no ``N`` when
    unbatched); the output's last dimension is ``D * H_out``.
"""


INITS = ("default", "chrono")


def _check_init(owner: str, init: object, max_length: object, bias: object) -> int | None:
    """Validate ``init`` and ``chrono_max_length``; the length when chrono applies, else None."""
    require_choice(f"{owner} init", init, INITS)
    if init == "default":
        if max_length is not None:
            raise ValueError(f"{owner} chrono_max_length={max_length!r} goes with init='chrono'; "
                             "got init='default'")
        return None
    if max_length is None:
        raise ValueError(f"{owner} init='chrono' needs chrono_max_length (T_max, the longest "
                         "dependency to expect, in steps)")
    if bias is False:
        raise ValueError(f"{owner} init='chrono' sets gate biases, so it needs bias=True")
    return require_int(f"{owner} chrono_max_length", max_length, minimum=3)


def _chrono_biases(layer: _RecurrentLayer, max_length: int) -> None:
    """Chrono initialisation (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?").

    Per unit, ``b ~ log U(1, T_max - 1)``, so that the gate holds information for a time scale
    drawn up to ``T_max`` steps. LSTM: forget-gate bias ``b_f = b`` and input-gate bias
    ``b_i = -b``. GRU, where ``z`` weighs the old state (``h' = (1 - z) n + z h``): update-gate
    bias ``b_z = b``. The whole value goes into ``bias_ih``; the recurrent bias of those gates is
    set to zero, so the sum the gate sees is exactly ``b``.
    """
    hidden = layer.hidden_size
    with torch.no_grad():
        for index in range(layer.num_layers * layer.num_directions):
            weights = layer.cell_weights(index // layer.num_directions,
                                         index % layer.num_directions)
            scale = torch.empty(hidden, dtype=weights.bias_ih.dtype,
                                device=weights.bias_ih.device).uniform_(1, max_length - 1).log()
            if layer.family == Family.LSTM:  # gate order i, f, g, o
                weights.bias_ih[hidden : 2 * hidden] = scale
                weights.bias_ih[:hidden] = -scale
                weights.bias_hh[: 2 * hidden] = 0
            else:  # gru, gate order r, z, n
                weights.bias_ih[hidden : 2 * hidden] = scale
                weights.bias_hh[hidden : 2 * hidden] = 0


class RNN(_RecurrentLayer):
    __doc__ = r"""A multi-layer Elman RNN; drop-in for ``torch.nn.RNN``.

    For each element of the input sequence, each layer computes

    .. math::
        h_t = \mathrm{act}(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}),
        \qquad \mathrm{act} = \tanh \text{ or ReLU}

    where ``x_t`` is the input at time ``t`` (for layer ``k > 0``, the previous layer's output,
    both directions concatenated) and ``h_{t-1}`` the layer's state at ``t - 1``.

    Args:
        input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
        batch_first=False, dropout=0.0 (between layers, training only), bidirectional=False,
        device=None, dtype=None: as ``torch.nn.RNN``, in the same positional order.
        learn_initial_state (keyword): make ``h0 (D*num_layers, 1, H)`` a parameter,
            broadcast over the batch and used when ``hx`` is not given. Default ``False``.
""" + _LAYER_SHAPES + r"""
    Outputs: ``output, h_n``.

    Parameters: ``weight_ih_l{k}`` ``(H, H_in)`` for ``k = 0`` else ``(H, D*H)``,
    ``weight_hh_l{k} (H, H)``, ``bias_ih_l{k}``, ``bias_hh_l{k} (H,)``; suffix ``_reverse``
    for the backward direction. All ``U(-1/sqrt(H), 1/sqrt(H))``.

    Example::

        >>> rnn = rnnkit.RNN(10, 20, num_layers=2)
        >>> output, h_n = rnn(torch.randn(5, 3, 10))     # (5, 3, 20), (2, 3, 20)
    """

    family = Family.RNN
    gate_count = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        learn_initial_state: bool = False,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        checked_nonlinearity = require_choice("RNN nonlinearity", nonlinearity, NONLINEARITIES)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype, learn_initial_state=learn_initial_state, backend=backend,
            layer_norm=layer_norm, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
            weight_drop=weight_drop,
        )
        self.nonlinearity = checked_nonlinearity
        self.reset_parameters()

    def cell_kind(self) -> CellKind:
        return CellKind(Family.RNN, nonlinearity=self.nonlinearity)

    def _torch_arguments(self) -> dict[str, object]:
        return super()._torch_arguments() | {"nonlinearity": self.nonlinearity}

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")


class LSTM(_RecurrentLayer):
    __doc__ = r"""A multi-layer long short-term memory network; drop-in for ``torch.nn.LSTM``.

    For each element of the input sequence, each layer computes

    .. math::
        \begin{aligned}
        i_t &= \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi} + p_i \odot c_{t-1}) \\
        f_t &= \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf} + p_f \odot c_{t-1}) \\
        g_t &= \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t &= \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho} + p_o \odot c_t) \\
        h_t &= W_{hr} (o_t \odot \tanh(c_t))
        \end{aligned}

    ``i, f, g, o`` are the input, forget, cell and output gates, ``σ`` the sigmoid and ``⊙`` the
    elementwise product. The peephole terms ``p`` exist only with ``peephole=True``; ``W_hr`` only
    with ``proj_size > 0``. Without them this is exactly ``torch.nn.LSTM``.

    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, proj_size=0, device=None, dtype=None: as ``torch.nn.LSTM``.
        peephole (keyword): add ``weight_ch_l{k} (3H,)`` (order i, f, o), initialised to zero,
            so the layer starts as the plain LSTM. Default ``False``.
        forget_bias (keyword): added to ``b_if`` of every layer once, at initialisation.
            Default 0.0 (torch.nn's initialisation); 1.0 is Jozefowicz et al.'s advice.
        init, chrono_max_length (keyword): ``init="chrono"`` draws, per unit, the forget-gate
            bias ``b_f ~ log U(1, T_max - 1)`` and sets the input-gate bias ``b_i = -b_f``
            (Tallec & Ollivier 2018), with ``T_max = chrono_max_length``, the longest dependency
            to expect in steps (>= 3); the recurrent biases of those gates become zero. Default
            ``"default"``: torch.nn's initialisation.
        learn_initial_state (keyword): make ``h0 (D*num_layers, 1, H_out)`` and
            ``c0 (D*num_layers, 1, H_cell)`` parameters, used when ``hx`` is not given.
""" + _LAYER_SHAPES + r"""
        - **hx**: a tuple ``(h_0, c_0)``, ``h_0 (D*num_layers, N, H_out)``,
          ``c_0 (D*num_layers, N, H_cell)``; zeros (or the learned state) if omitted.

    Outputs: ``output, (h_n, c_n)``.

    Parameters: ``weight_ih_l{k} (4H, H_in)`` as ``(W_ii|W_if|W_ig|W_io)`` (``H_in = D*H_out``
    for ``k > 0``), ``weight_hh_l{k} (4H, H_out)``, ``bias_ih_l{k}, bias_hh_l{k} (4H,)``,
    ``weight_hr_l{k} (P, H)``, ``weight_ch_l{k} (3H,)``; suffix ``_reverse`` for the backward
    direction.

    Example::

        >>> lstm = rnnkit.LSTM(10, 20, num_layers=2, peephole=True, forget_bias=1.0)
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))   # (5, 3, 20), (2, 3, 20) x 2
    """

    family = Family.LSTM
    gate_count = 4

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        peephole: bool = False,
        forget_bias: float = 0.0,
        init: str = "default",
        chrono_max_length: int | None = None,
        learn_initial_state: bool = False,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        forget = _check_forget_bias("LSTM", forget_bias, bias if isinstance(bias, bool) else True)
        chrono = _check_init("LSTM", init, chrono_max_length, bias)
        if chrono is not None and forget:
            raise ValueError(f"LSTM init='chrono' sets the forget-gate bias itself; drop "
                             f"forget_bias={forget}")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size, device, dtype, peephole=peephole, learn_initial_state=learn_initial_state,
            backend=backend, layer_norm=layer_norm, recurrent_dropout=recurrent_dropout,
            zoneout=zoneout, weight_drop=weight_drop,
        )
        self.forget_bias = forget
        self.init, self.chrono_max_length = init, chrono
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        layers = [self.cell_weights(k, d) for k in range(self.num_layers)
                  for d in range(self.num_directions)]
        _init_lstm_variants(
            self.hidden_size, self.forget_bias,
            [w.bias_ih for w in layers], [w.weight_ch for w in layers],
        )
        if self.chrono_max_length is not None:
            _chrono_biases(self, self.chrono_max_length)

    def _torch_arguments(self) -> dict[str, object]:
        return super()._torch_arguments() | {"proj_size": self.proj_size}

    def _variant_settings(self) -> dict[str, object]:
        # forget_bias only changes the initial values, which torch.nn can hold: not a variant.
        return ({"peephole": True} if self.peephole else {}) | super()._variant_settings()

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", forget_bias={self.forget_bias}" if self.forget_bias else ""
        return s + (f", init='chrono', chrono_max_length={self.chrono_max_length}"
                    if self.chrono_max_length is not None else "")


class GRU(_RecurrentLayer):
    __doc__ = r"""A multi-layer gated recurrent unit network; drop-in for ``torch.nn.GRU``.

    For each element of the input sequence, each layer computes

    .. math::
        \begin{aligned}
        r_t &= \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
        z_t &= \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        n_t &= \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn}))
              &&\text{reset\_after=True (torch.nn's, the default)} \\
        n_t &= \tanh(W_{in} x_t + b_{in} + W_{hn} (r_t \odot h_{t-1}) + b_{hn})
              &&\text{reset\_after=False (Cho et al. 2014)} \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{aligned}

    ``r, z, n`` are the reset, update and new gates; ``z`` weighs the old state, as in torch.nn,
    cuDNN and Keras, so weights load unchanged.

    Args:
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, device=None, dtype=None: as ``torch.nn.GRU``.
        reset_after (keyword): where the reset gate acts, as above. Default ``True``.
        init, chrono_max_length (keyword): ``init="chrono"`` draws, per unit, the update-gate
            bias ``b_z ~ log U(1, T_max - 1)`` (Tallec & Ollivier 2018, in this convention where
            ``z`` keeps the old state), ``T_max = chrono_max_length`` (>= 3); the recurrent bias
            of ``z`` becomes zero. Default ``"default"``: torch.nn's initialisation.
        learn_initial_state (keyword): make ``h0 (D*num_layers, 1, H)`` a parameter, used when
            ``hx`` is not given. Default ``False``.
""" + _LAYER_SHAPES + r"""
    Outputs: ``output, h_n``.

    Parameters: ``weight_ih_l{k} (3H, H_in)`` as ``(W_ir|W_iz|W_in)``, ``weight_hh_l{k} (3H, H)``,
    ``bias_ih_l{k}, bias_hh_l{k} (3H,)``; suffix ``_reverse`` for the backward direction.

    Example::

        >>> gru = rnnkit.GRU(10, 20, batch_first=True, reset_after=False)
        >>> output, h_n = gru(torch.randn(3, 5, 10))     # (3, 5, 20), (1, 3, 20)
    """

    family = Family.GRU
    gate_count = 3

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
        reset_after: bool = True,
        init: str = "default",
        chrono_max_length: int | None = None,
        learn_initial_state: bool = False,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        chrono = _check_init("GRU", init, chrono_max_length, bias)
        if layer_norm is True and reset_after is False:
            raise ValueError("GRU layer_norm=True needs reset_after=True: with the reset gate "
                             "before W_hn there is no whole W_hh h to normalise (spec)")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype, learn_initial_state=learn_initial_state, backend=backend,
            layer_norm=layer_norm, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
            weight_drop=weight_drop,
        )
        self.reset_after = require_bool("GRU reset_after", reset_after)
        self.init, self.chrono_max_length = init, chrono
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "chrono_max_length", None) is not None:
            _chrono_biases(self, self.chrono_max_length)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", init='chrono', chrono_max_length={self.chrono_max_length}"
            if getattr(self, "chrono_max_length", None) is not None else "")

    def cell_kind(self) -> CellKind:
        return CellKind(Family.GRU, reset_after=self.reset_after)

    def _variant_settings(self) -> dict[str, object]:
        return ({} if self.reset_after else {"reset_after": False}) | super()._variant_settings()
