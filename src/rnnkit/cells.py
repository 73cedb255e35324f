"""The cell modules RNNCell, LSTMCell, GRUCell: one time step each, on the layers' engines.

The step equations themselves live in `rnnkit.engine.steps` (the spec, shared/spec/cells.md, in
PyTorch ops); a cell holds the parameters, checks its input and hands a one-step sequence to
`rnnkit.engine.run_direction`.
"""

from __future__ import annotations

import math
from typing import Generic, NoReturn, TypeVar

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
    require_probability,
    require_real,
    require_shape,
    require_sizes,
    require_tensor,
)
from rnnkit.engine import precision
from rnnkit.engine.masks import bernoulli
from rnnkit.engine.steps import NONLINEARITIES, CellKind, CellWeights, Family, Masks, State


class BackendSetting:
    """The ``backend`` attribute of cells and layers, checked when it is set.

    ``module.backend = "gpu"`` fails at the assignment, naming the accepted values, instead of
    inside a later forward; reading it stays a dictionary look-up, so a step pays nothing.
    The value lives in the instance dictionary under the same name, as a plain attribute did,
    so modules pickled before this check load unchanged.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None):
        if module is None:
            return self
        return module.__dict__.get(self.name, "auto")

    def __set__(self, module: nn.Module, value: object) -> None:
        module.__dict__[self.name] = require_choice(
            f"{type(module).__name__} {self.name}", value, engine.BACKENDS
        )


def _refuse_scripting(module: nn.Module) -> NoReturn:
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and on each of its
    submodules first: rnnkit's modules answer with this error, naming what works instead,
    rather than TorchScript's complaint about a line deep in the input handling."""
    name = type(module).__name__
    raise RuntimeError(
        f"torch.jit.script cannot compile rnnkit.{name}: TorchScript does not compile its "
        "Python input handling and engine dispatch (and PyTorch deprecates TorchScript). "
        "Use torch.compile(model) to compile, or torch.export.export(model, args) to export "
        "a graph."
    )


def _reset_uniform(module: nn.Module) -> None:
    """Every parameter of ``module`` ``U(-1/sqrt(H), 1/sqrt(H))``, torch.nn's rule, in
    registration order (the order fixes which draws each parameter gets from a seed)."""
    bound = 1.0 / math.sqrt(module.hidden_size)
    for parameter in module.parameters():
        nn.init.uniform_(parameter, -bound, bound)


def _step_input(cell: nn.Module, input: object) -> Tensor:
    """A cell's ``input`` checked: a tensor of its parameters' dtype and device, ``(N, I)`` or
    unbatched ``(I,)``; errors name the cell, the shape given and the one accepted."""
    name, param = type(cell).__name__, cell.weight_ih
    x = require_tensor(f"{name} input", input, dtype=param.dtype, device=param.device)
    if x.dim() not in (1, 2) or x.shape[-1] != cell.input_size:
        raise ValueError(
            f"{name} input must have shape (N, {cell.input_size}) or ({cell.input_size},) "
            f"(input_size={cell.input_size}), got {tuple(x.shape)}"
        )
    return x


_State = TypeVar("_State")


class _SimpleCell(nn.Module, Generic[_State]):
    """What the cells without torch.nn's variants (MinGRUCell, MinLSTMCell, SLSTMCell) share:
    every parameter ``U(-1/sqrt(H), 1/sqrt(H))``, TorchScript refused by name, and a `forward`
    that applies the families' autocast rule and checks the input, then runs the subclass's
    `_step`. A subclass registers ``weight_ih`` and its other parameters."""

    input_size: int
    hidden_size: int
    weight_ih: nn.Parameter
    # The parameters a step reads, in the step kernel's order (bias last; None without one).
    _weight_names: tuple[str, ...] = ("weight_ih", "bias_ih")

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, ``U(-1/sqrt(H), 1/sqrt(H))``, for every parameter."""
        _reset_uniform(self)

    def _weights(self) -> tuple[Tensor | None, ...]:
        """The `_weight_names` parameters: looked up directly (a streamed step asks every call),
        computed ones (parametrizations) through their attributes."""
        if "parametrizations" in self._modules:
            return tuple(getattr(self, name) for name in self._weight_names)
        parameters = self._parameters
        return tuple([parameters[name] for name in self._weight_names])

    def __prepare_scriptable__(self) -> NoReturn:
        _refuse_scripting(self)

    def forward(self, input: Tensor, hx: _State | None = None) -> _State:
        """One step; shapes in the class docstring. Unbatched input gives an unbatched state."""
        # float32 under autocast, the families' rule (engine/precision.py)
        if torch._C._is_any_autocast_enabled() and precision.autocasting(self.weight_ih):
            param = self.weight_ih
            with torch.autocast(param.device.type, enabled=False):
                return self.forward(precision.to_parameter_dtype(input, param),
                                    precision.to_parameter_dtype(hx, param))
        return self._step(_step_input(self, input), hx)

    def _step(self, x: Tensor, hx: object) -> _State:
        """One step from ``x`` (checked: ``(N, I)`` or ``(I,)``) and ``hx`` (to be checked)."""
        raise NotImplementedError


class _CellBase(nn.Module):
    """Parameters and input handling shared by the three cell modules.

    A step runs on the same engines as the layers (a one-step sequence): ``backend`` is
    ``"auto"`` unless set on the instance (``cell.backend = "reference"`` runs `cell_step` on
    autograd); ``RNNKIT_BACKEND`` overrides it as it does for layers.
    """

    gate_count: int = 1
    family: Family = Family.RNN
    backend = BackendSetting()  # "auto" until set

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        proj_size: int = 0,
        device=None,
        dtype=None,
        peephole: bool = False,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.layer_norm = require_bool(f"{name} layer_norm", layer_norm)
        self.recurrent_dropout = _rate(f"{name} recurrent_dropout", recurrent_dropout)
        self.zoneout = _zoneout_rates(f"{name} zoneout", zoneout, self.family)
        self.input_size, self.hidden_size = require_sizes(name, input_size, hidden_size)
        self.bias = require_bool(f"{name} bias", bias)
        self.proj_size = require_int(f"{name} proj_size", proj_size, minimum=0)
        self.peephole = require_bool(f"{name} peephole", peephole)
        if proj_size >= hidden_size:
            raise ValueError(
                f"{name} proj_size must be smaller than hidden_size ({hidden_size}), "
                f"got {proj_size}; use 0 for no projection"
            )
        factory = require_factory(name, device, dtype)
        gates = self.gate_count * hidden_size
        count = gates * (input_size + self.output_size + (2 if bias else 0))
        count += proj_size * hidden_size + (3 * hidden_size if peephole else 0)
        if self.layer_norm:
            count += 2 * gates + (2 * hidden_size if self.family == Family.LSTM else 0)
        require_allocatable(name, f"input_size={input_size}, hidden_size={hidden_size}"
                            + (f", proj_size={proj_size}" if proj_size else ""), count, **factory)
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, self.output_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if self.layer_norm:  # the spec's names, as the layers' without the layer suffix
            self.layer_norm_ih = nn.Parameter(torch.ones(gates, **factory))
            self.layer_norm_hh = nn.Parameter(torch.ones(gates, **factory))
            if self.family == Family.LSTM:
                self.layer_norm_c_weight = nn.Parameter(torch.ones(hidden_size, **factory))
                self.layer_norm_c_bias = nn.Parameter(torch.zeros(hidden_size, **factory))

    @property
    def output_size(self) -> int:
        """Size of ``h``: ``proj_size`` when projecting, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def __prepare_scriptable__(self) -> NoReturn:
        _refuse_scripting(self)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, ``U(-1/sqrt(H), 1/sqrt(H))``, in torch.nn's order.

        Variant parameters are registered after the torch.nn ones and set by the subclass, so
        that with the same seed a plain cell starts with the same weights as torch.nn's.
        """
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._torch_parameter_names():
            nn.init.uniform_(getattr(self, name), -bound, bound)
        if self.layer_norm:  # gain 1, no shift
            with torch.no_grad():
                for name in ("layer_norm_ih", "layer_norm_hh", "layer_norm_c_weight"):
                    if hasattr(self, name):
                        getattr(self, name).fill_(1.0)
                if hasattr(self, "layer_norm_c_bias"):
                    self.layer_norm_c_bias.zero_()

    def _torch_parameter_names(self) -> list[str]:
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        return names + (["weight_hr"] if self.proj_size else [])

    def weights(self) -> CellWeights:
        # Variant weights are read only when the cell has them: getattr(self, name, None) on a
        # Module builds an AttributeError for each absent one. The parameters themselves are
        # looked up directly (a streamed step asks every call: Module.__getattr__ costs ~0.3 µs
        # a name); computed ones (parametrizations: weight norm, ...) through their attributes.
        parameters = {} if "parametrizations" in self._modules else self._parameters

        def weight(name: str) -> Tensor | None:
            return parameters[name] if name in parameters else getattr(self, name)

        weights = CellWeights(
            weight("weight_ih"),
            weight("weight_hh"),
            weight("bias_ih"),
            weight("bias_hh"),
            weight("weight_hr") if self.proj_size else None,
            weight("weight_ch") if self.peephole else None,
        )
        if not self.layer_norm:
            return weights
        lstm = self.family == Family.LSTM
        return weights._replace(
            layer_norm_ih=weight("layer_norm_ih"), layer_norm_hh=weight("layer_norm_hh"),
            layer_norm_c_weight=weight("layer_norm_c_weight") if lstm else None,
            layer_norm_c_bias=weight("layer_norm_c_bias") if lstm else None)

    def recurrent_dropout_mask(self, batch: int | None = None) -> Tensor:
        """A variational recurrent dropout mask ``(N, H_out)`` (``(H_out,)`` for ``batch``
        None): entries 0 with probability ``recurrent_dropout``, else ``1 / (1 - p)``. Draw it
        once per sequence and pass it to every step (``cell(x_t, hx, recurrent_mask=mask)``)
        for Gal & Ghahramani's tied form."""
        shape = (self.output_size,) if batch is None else (batch, self.output_size)
        return _inverted_dropout_mask(shape, self.recurrent_dropout, self.weight_hh)

    def _check_recurrent_mask(self, recurrent_mask: object, x: Tensor, batched: bool) -> Tensor:
        """``recurrent_mask`` checked against the input ``x`` as the caller gave it (``(N, I)``
        or unbatched ``(I,)``): a tensor of the parameters' dtype and device, ``(N, H_out)`` or
        ``(H_out,)`` for batched input (``(1, H_out)`` broadcasts too), ``(H_out,)`` unbatched."""
        name = type(self).__name__
        require_tensor(f"{name} recurrent_mask", recurrent_mask, dtype=x.dtype, device=x.device)
        shape, size = tuple(recurrent_mask.shape), self.output_size
        if not batched:
            if shape != (size,):
                raise ValueError(f"{name} recurrent_mask must have shape ({size},) for unbatched "
                                 f"input (H_out = {size}), got {shape}")
        elif shape not in ((size,), (x.shape[0], size), (1, size)):
            raise ValueError(f"{name} recurrent_mask must have shape (N, {size}) with N = "
                             f"{x.shape[0]} (the input's batch), or ({size},) (H_out = {size}), "
                             f"got {shape}")
        return recurrent_mask

    def _masks(self, x: Tensor, recurrent_mask: Tensor | None) -> Masks | None:
        """The step's masks for ``x (1, N, I)`` (module doc of `rnnkit.engine.steps`): the
        given recurrent mask (checked by `_check_recurrent_mask`) in training, or one drawn
        for this step alone; none in evaluation (the spec: dropout is the identity there, so
        a loop that passes one mask every step runs unchanged in both modes); zoneout drawn
        per unit in training, its probability in evaluation."""
        batch = x.shape[1]
        if not self.training:
            recurrent_mask = None
        elif recurrent_mask is None and self.recurrent_dropout:
            recurrent_mask = self.recurrent_dropout_mask(batch)
        elif recurrent_mask is not None:
            # (H_out,) and (1, H_out) are accepted: the operators take (N, H_out) only.
            recurrent_mask = recurrent_mask.expand(batch, self.output_size)
        keeps = _zoneout_keeps(self.zoneout, (self.output_size, self.hidden_size), 1, batch,
                               self.training, x)
        masks = Masks(recurrent_mask, *keeps)
        return None if masks.empty else masks

    def kind(self) -> CellKind:
        return CellKind(self.family)

    def _state_shapes(self, batch: int | None) -> list[tuple[int, ...]]:
        lead = () if batch is None else (batch,)
        shapes = [lead + (self.output_size,)]
        if self.family == Family.LSTM:
            shapes.append(lead + (self.hidden_size,))
        return shapes

    def forward(self, input: Tensor, hx: State | None = None,
                recurrent_mask: Tensor | None = None) -> State:
        """One step. Shapes in the class docstring; unbatched (1-D) input gives unbatched state.

        ``recurrent_mask`` (``(N, H_out)``, with ``recurrent_dropout``): the variational mask
        of `recurrent_dropout_mask`, drawn once per sequence; without it a training step draws
        its own (dropout on this step alone). In evaluation mode the mask is checked and not
        applied (dropout is the identity there). Zoneout draws its masks per step."""
        if recurrent_mask is None:
            new = self._inference_step(input, hx)
            if new is not None:
                return new
        param = self.weight_ih
        # float32 under autocast (engine/precision.py); the C call first: a streamed step asks
        if torch._C._is_any_autocast_enabled() and precision.autocasting(param):
            with torch.autocast(param.device.type, enabled=False):
                return self.forward(precision.to_parameter_dtype(input, param),
                                    precision.to_parameter_dtype(hx, param),
                                    precision.to_parameter_dtype(recurrent_mask, param))
        x = _step_input(self, input)
        batched = x.dim() == 2
        batch = x.shape[0] if batched else None
        shapes = self._state_shapes(batch)
        state = self._check_state(hx, shapes, x)
        if recurrent_mask is not None:
            recurrent_mask = self._check_recurrent_mask(recurrent_mask, x, batched)
        if not batched:
            x = x.unsqueeze(0)
            state = tuple(s.unsqueeze(0) for s in state)
            if recurrent_mask is not None:
                recurrent_mask = recurrent_mask.unsqueeze(0)
        masks = None
        if recurrent_mask is not None or self.recurrent_dropout or any(self.zoneout):
            masks = self._masks(x.unsqueeze(0), recurrent_mask)
        _, new = engine.run_direction(
            self.kind(), x.unsqueeze(0), state if len(state) == 2 else state[0], self.weights(),
            None, False, self.backend, masks=masks,
        )
        if not batched:
            new = tuple(s.squeeze(0) for s in new) if isinstance(new, tuple) else new.squeeze(0)
        return new

    def _inference_step(self, x: object, hx: object) -> State | None:
        """A streamed step's short way: `engine.inference_step` straight away when the input is
        a batched tensor of the right size and the state is None or exactly of its shapes,
        and no mask is drawn (no layer norm or zoneout; recurrent dropout only in evaluation,
        where it is the identity). None when any of that, or the engine's own conditions
        (nothing to differentiate, contiguous CPU float32/float64 of one dtype, ...), does not
        hold: `forward` then checks everything and runs the general way, which gives the
        errors. The results are the same either way (tests/test_stream.py)."""
        if (type(x) is not Tensor or x.dim() != 2 or x.shape[1] != self.input_size
                or x.shape[0] == 0 or self.layer_norm or self.zoneout != (0.0, 0.0)
                or (self.training and self.recurrent_dropout)):
            return None
        batch = x.shape[0]
        lstm = self.family == Family.LSTM
        if hx is None:
            h = x.new_zeros(batch, self.output_size)
            state = (h, x.new_zeros(batch, self.hidden_size)) if lstm else h
        elif lstm:
            if (type(hx) is not tuple or len(hx) != 2 or type(hx[0]) is not Tensor
                    or type(hx[1]) is not Tensor
                    or hx[0].shape != (batch, self.output_size)
                    or hx[1].shape != (batch, self.hidden_size)):
                return None
            state = hx
        else:
            if type(hx) is not Tensor or hx.shape != (batch, self.hidden_size):
                return None
            state = hx
        return engine.inference_step(self.kind(), x, state, self.weights(), self.backend)

    def _check_state(self, hx: object, shapes: list[tuple[int, ...]], x: Tensor) -> tuple:
        name = type(self).__name__
        if hx is None:
            return tuple(x.new_zeros(shape) for shape in shapes)
        if self.family == Family.LSTM:
            if not isinstance(hx, tuple | list) or len(hx) != 2:
                raise TypeError(
                    f"{name} hx must be a tuple (h, c) of tensors with shapes {shapes[0]} and "
                    f"{shapes[1]}, got {describe(hx)}"
                )
            parts, labels = tuple(hx), ("hx[0] (h)", "hx[1] (c)")
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(
                    f"{name} hx must be a Tensor of shape {shapes[0]}, got {describe(hx)}"
                    + (" (a tuple (h, c) is for LSTMCell)" if isinstance(hx, tuple) else "")
                )
            parts, labels = (hx,), ("hx",)
        meanings = ("(N, H_out)", "(N, H)") if x.dim() == 2 else ("(H_out,)", "(H,)")
        for part, label, shape, meaning in zip(parts, labels, shapes, meanings, strict=False):
            require_tensor(f"{name} {label}", part, dtype=x.dtype, device=x.device)
            require_shape(f"{name} {label}", part, shape, meaning)
        return parts

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        for key, value in self._variant_switches().items():
            s += f", {key}={value!r}"
        return s

    def _variant_switches(self) -> dict[str, object]:
        """Layer norm, recurrent dropout and zoneout where set (torch.nn has none of them)."""
        switches: dict[str, object] = {"layer_norm": True} if self.layer_norm else {}
        if self.recurrent_dropout:
            switches["recurrent_dropout"] = self.recurrent_dropout
        if any(self.zoneout):
            switches["zoneout"] = _zoneout_setting(self.zoneout, self.family)
        return switches

    def _refuse_variant_switches(self) -> None:
        switches = self._variant_switches()
        if switches:
            settings = ", ".join(f"{k}={v!r}" for k, v in switches.items())
            raise ValueError(f"torch.nn.{type(self).__name__} has no equivalent of {settings}; "
                             "only a plain cell converts")


class RNNCell(_CellBase):
    r"""An Elman RNN cell, one time step.

    .. math::
        h' = \mathrm{act}(W_{ih} x + b_{ih} + W_{hh} h + b_{hh}),\qquad \mathrm{act} = \tanh
        \text{ or ReLU}

    Args:
        input_size: features in the input ``x`` (``I``).
        hidden_size: features in the state ``h`` (``H``).
        bias: if ``False``, no ``b_ih``, ``b_hh``. Default ``True``.
        nonlinearity: ``'tanh'`` (default) or ``'relu'``.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx`` ``(N, H)`` or ``(H,)``, zeros if omitted.
    Output: ``h'`` ``(N, H)`` or ``(H,)``.

    Parameters (torch.nn's names and shapes): ``weight_ih (H, I)``, ``weight_hh (H, H)``,
    ``bias_ih (H,)``, ``bias_hh (H,)``, all ``U(-1/sqrt(H), 1/sqrt(H))``.

    Example::

        >>> cell = rnnkit.RNNCell(10, 20)
        >>> h = cell(torch.randn(3, 10))          # (3, 20)
    """

    gate_count = 1
    family = Family.RNN

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype,
                         layer_norm=layer_norm, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout)
        self.nonlinearity = require_choice("RNNCell nonlinearity", nonlinearity, NONLINEARITIES)
        self.reset_parameters()

    def kind(self) -> CellKind:
        return CellKind(Family.RNN, nonlinearity=self.nonlinearity)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")

    def to_torch(self) -> nn.RNNCell:
        """The equivalent ``torch.nn.RNNCell`` with the same weights (plain cells only)."""
        self._refuse_variant_switches()
        return _copy_into(
            self,
            nn.RNNCell(
                self.input_size, self.hidden_size, self.bias, self.nonlinearity, **_factory(self)
            ),
        )


class LSTMCell(_CellBase):
    r"""A long short-term memory cell, one time step, with optional projection and peepholes.

    .. math::
        \begin{aligned}
        i &= \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi} + p_i \odot c) \\
        f &= \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf} + p_f \odot c) \\
        g &= \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}) \\
        c' &= f \odot c + i \odot g \\
        o &= \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho} + p_o \odot c') \\
        h' &= W_{hr}\,(o \odot \tanh(c'))
        \end{aligned}

    The ``p`` terms exist only with ``peephole=True`` and ``W_hr`` only with ``proj_size > 0``;
    without them this is exactly ``torch.nn.LSTMCell``. ``σ`` is the logistic sigmoid and ``⊙``
    the elementwise product.

    Args:
        input_size: features in ``x`` (``I``).
        hidden_size: features in the cell ``c`` (``H``).
        bias: if ``False``, no biases. Default ``True``.
        proj_size: if ``> 0``, ``h`` is projected to this size ``P < H``. Default 0.
        peephole: add the diagonal peephole weights ``weight_ch (3H,)`` (order i, f, o),
            initialised to zero. Default ``False``.
        forget_bias: added to ``b_if`` once at initialisation (1.0 is Jozefowicz et al.'s
            recommendation). Default 0.0, torch.nn's initialisation.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx = (h, c)`` with ``h (N, H_out)``,
    ``c (N, H)`` (or unbatched), zeros if omitted. ``H_out = P`` if ``proj_size > 0`` else ``H``.
    Output: ``(h', c')`` with the same shapes.

    Parameters: ``weight_ih (4H, I)`` as ``(W_ii|W_if|W_ig|W_io)``, ``weight_hh (4H, H_out)``,
    ``bias_ih (4H,)``, ``bias_hh (4H,)``, ``weight_hr (P, H)``, ``weight_ch (3H,)``.

    Example::

        >>> cell = rnnkit.LSTMCell(10, 20, peephole=True)
        >>> h, c = cell(torch.randn(3, 10))       # (3, 20), (3, 20)
    """

    gate_count = 4
    family = Family.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,
        peephole: bool = False,
        forget_bias: float = 0.0,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, proj_size, device, dtype, peephole,
                         layer_norm=layer_norm, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout)
        factory = _factory(self)
        self.forget_bias = _check_forget_bias("LSTMCell", forget_bias, bias)
        if self.proj_size:
            self.weight_hr = nn.Parameter(torch.empty(self.proj_size, hidden_size, **factory))
        if peephole:
            self.weight_ch = nn.Parameter(torch.empty(3 * hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _init_lstm_variants(self.hidden_size, self.forget_bias, [self.bias_ih],
                            [getattr(self, "weight_ch", None)])

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", proj_size={self.proj_size}" if self.proj_size else ""
        s += ", peephole=True" if self.peephole else ""
        return s + (f", forget_bias={self.forget_bias}" if self.forget_bias else "")

    def to_torch(self) -> nn.LSTMCell:
        """The equivalent ``torch.nn.LSTMCell``; plain cells only (torch.nn has no variants)."""
        self._refuse_variant_switches()
        if self.proj_size or self.peephole:
            raise ValueError(
                "torch.nn.LSTMCell has no equivalent of proj_size or peephole; got "
                f"proj_size={self.proj_size}, peephole={self.peephole} (accepted: 0, False)"
            )
        return _copy_into(
            self, nn.LSTMCell(self.input_size, self.hidden_size, self.bias, **_factory(self))
        )


class GRUCell(_CellBase):
    r"""A gated recurrent unit cell, one time step; ``z`` weighs the old state (torch.nn's form).

    .. math::
        \begin{aligned}
        r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n &= \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn}))
             &&\text{reset\_after=True (torch.nn, cuDNN, Keras default)} \\
        n &= \tanh(W_{in} x + b_{in} + W_{hn} (r \odot h) + b_{hn})
             &&\text{reset\_after=False (Cho et al. 2014)} \\
        h' &= (1 - z) \odot n + z \odot h
        \end{aligned}

    Args:
        input_size: features in ``x`` (``I``).
        hidden_size: features in ``h`` (``H``).
        bias: if ``False``, no biases. Default ``True``.
        reset_after: where the reset gate acts, as above. Default ``True``.

    Inputs: ``input`` ``(N, I)`` or ``(I,)``; ``hx`` ``(N, H)`` or ``(H,)``, zeros if omitted.
    Output: ``h'`` ``(N, H)`` or ``(H,)``.

    Parameters: ``weight_ih (3H, I)`` as ``(W_ir|W_iz|W_in)``, ``weight_hh (3H, H)``,
    ``bias_ih (3H,)``, ``bias_hh (3H,)``; the same names and shapes for both forms.

    Example::

        >>> cell = rnnkit.GRUCell(10, 20, reset_after=False)
        >>> h = cell(torch.randn(3, 10))          # (3, 20)
    """

    gate_count = 3
    family = Family.GRU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        if layer_norm is True and reset_after is False:
            raise ValueError("GRUCell layer_norm=True needs reset_after=True: with the reset "
                             "gate before W_hn there is no whole W_hh h to normalise (spec)")
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype,
                         layer_norm=layer_norm, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout)
        self.reset_after = require_bool("GRUCell reset_after", reset_after)
        self.reset_parameters()

    def kind(self) -> CellKind:
        return CellKind(Family.GRU, reset_after=self.reset_after)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def to_torch(self) -> nn.GRUCell:
        """The equivalent ``torch.nn.GRUCell``; only for ``reset_after=True``, plain cells."""
        self._refuse_variant_switches()
        if not self.reset_after:
            raise ValueError(
                "torch.nn.GRUCell has no reset_after=False form; got reset_after=False "
                "(accepted: True)"
            )
        return _copy_into(
            self, nn.GRUCell(self.input_size, self.hidden_size, self.bias, **_factory(self))
        )


def _rate(name: str, value: object) -> float:
    """A dropout-like probability: a number in [0, 1) (at 1 nothing would be kept)."""
    rate = require_probability(name, value)
    if rate >= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value}: at 1 nothing is kept")
    return rate


def _zoneout_rates(name: str, value: object, family: Family) -> tuple[float, float]:
    """``(p_h, p_c)`` of ``zoneout``: one number for both (c only exists for LSTM), or an LSTM's
    ``(p_h, p_c)`` pair."""
    if isinstance(value, (tuple, list)):
        if family != Family.LSTM or len(value) != 2:
            accepted = ("a number or a pair (p_h, p_c)" if family == Family.LSTM
                        else "a number (a pair (p_h, p_c) is for LSTM's two states)")
            raise ValueError(f"{name} must be {accepted} in [0, 1), got {value!r}")
        return _rate(f"{name} p_h", value[0]), _rate(f"{name} p_c", value[1])
    rate = _rate(name, value)
    return rate, rate if family == Family.LSTM else 0.0


def _inverted_dropout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A dropout mask of ``shape`` (``like``'s dtype and device, torch's default generator):
    0 with probability ``p``, else ``1 / (1 - p)``."""
    keep = 1 - p
    return bernoulli(shape, keep, like) / keep


def _zoneout_keeps(rates: tuple[float, float], sizes: tuple[int, int], steps: int, batch: int,
                   training: bool, like: Tensor) -> list[Tensor | None]:
    """Zoneout's ``d`` for h and c (`rnnkit.engine.steps.Masks`): per step, sample and unit
    0/1 masks ``(steps, batch, size)`` keeping the old value with probability ``p`` in
    training, the probability itself (0-dim) in evaluation; None where the rate is 0."""
    return [None if not rate else
            bernoulli((steps, batch, size), rate, like) if training else
            torch.tensor(rate, dtype=like.dtype, device=like.device)
            for rate, size in zip(rates, sizes, strict=True)]


def _zoneout_setting(rates: tuple[float, float], family: Family) -> float | tuple[float, float]:
    """``zoneout`` as it was given: one number, or an LSTM's differing ``(p_h, p_c)``."""
    p_h, p_c = rates
    return p_h if family != Family.LSTM or p_h == p_c else (p_h, p_c)


def _check_forget_bias(owner: str, forget_bias: object, bias: bool) -> float:
    value = require_real(f"{owner} forget_bias", forget_bias)
    if value != 0.0 and not bias:
        raise ValueError(
            f"{owner} forget_bias={value} needs bias=True (it is added to the forget-gate bias); "
            "got bias=False"
        )
    return value


def _init_lstm_variants(
    hidden_size: int, forget_bias: float, biases_ih: list, peepholes: list
) -> None:
    """Zero the peephole weights (so the cell starts as the plain LSTM) and add ``forget_bias``."""
    with torch.no_grad():
        for bias_ih in biases_ih:
            if bias_ih is not None and forget_bias:
                bias_ih[hidden_size : 2 * hidden_size] += forget_bias
        for weight_ch in peepholes:
            if weight_ch is not None:
                weight_ch.zero_()


def _factory(module: nn.Module) -> dict:
    param = next(module.parameters())
    return {"device": param.device, "dtype": param.dtype}


def _copy_into(source: nn.Module, target: nn.Module) -> nn.Module:
    """Load ``source``'s state dict into ``target`` (strict: names and shapes must agree)."""
    target.load_state_dict(source.state_dict())
    return target
