r"""Conversions between rnnkit layers and Keras 3 recurrent layers, weights included.

``from_keras(layer)`` builds the rnnkit twin of a built Keras 3 ``keras.layers.LSTM``, ``GRU``
(``reset_after=True`` or ``False``) or ``SimpleRNN``, or of a ``keras.layers.Bidirectional``
wrapping one of them; ``to_keras(module)`` goes back. Keras is optional: this module never imports
it at import time; ``from_keras`` only reads the layer it is given, and ``to_keras`` imports Keras
when called (``pip install "rnnkit[keras]"``).

Weight layouts. Keras multiplies a row vector by its kernels, ``x @ kernel``, so its matrices are
the transposes of torch.nn's: ``kernel (H_in, G*H)`` is ``weight_ih.T`` and
``recurrent_kernel (H, G*H)`` is ``weight_hh.T``, with ``G`` gate blocks of ``H`` columns:

    =========  ======================  ======================  =====================================
    layer      Keras gate order        rnnkit / torch.nn       Keras bias
    =========  ======================  ======================  =====================================
    LSTM       i, f, c, o              i, f, g, o (the same)   (4H,)  one per gate
    GRU        z, r, h                 r, z, n (z, r swapped)  reset_after=True: (2, 3H), rows
                                                               input bias, recurrent bias;
                                                               reset_after=False: (3H,) input only
    SimpleRNN  (one block)             (one block)             (H,)
    =========  ======================  ======================  =====================================

A Keras layer with one bias per gate becomes an rnnkit layer with that bias in ``bias_ih`` and
``bias_hh = 0``; the other way, Keras gets ``bias_ih + bias_hh`` (the gates only ever see the sum).
So keras -> rnnkit -> keras returns the very same weights, while rnnkit -> keras -> rnnkit returns
the same function with the recurrent bias folded into the input bias.

The equations agree, Keras' source (``keras/src/layers/rnn/gru.py``, ``GRUCell.call``) read side by
side with ``rnnkit.GRU`` (``../shared/spec/cells.md``, GRU section):

    both:              z  = σ(x W_z + b_z + h U_z (+ b_hz)),  r likewise,
                       h' = z ⊙ h + (1 - z) ⊙ n               (z weighs the old state in both)
    reset_after=True:  n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     (Keras: two bias rows)
    reset_after=False: n  = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)     (Keras has no b_hn:
                       the reset gate multiplies h *before* the recurrent product in both, and
                       rnnkit's b_hn = 0 is Keras' form exactly; a nonzero b_hn, like every other
                       recurrent bias, only adds to the input bias, so to_keras folds it in.)

Keras options rnnkit cannot express raise ``ValueError`` naming the option and its value:
``activation`` other than tanh (tanh or relu for SimpleRNN), ``recurrent_activation`` other than
sigmoid, ``go_backwards=True`` (outside a Bidirectional's backward layer), ``stateful=True``,
``dropout`` or ``recurrent_dropout`` > 0, and ``merge_mode`` other than ``"concat"``. Options that
do not change the function are ignored: initialisers (``unit_forget_bias`` included: the weights
are copied), regularisers, constraints, ``unroll``, ``return_sequences``/``return_state`` (rnnkit
always returns both). rnnkit options Keras cannot express make ``to_keras`` raise the same way:
``num_layers > 1`` (stack Keras layers yourself; a stacked rnnkit layer has no single Keras
counterpart with states), ``proj_size``, ``peephole``, ``learn_initial_state`` and any other
variant the layer reports.

Example (Keras on its torch backend, the one rnnkit users already have)::

    import os
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is first imported
    import keras, numpy as np, torch, rnnkit

    layer = keras.layers.GRU(20, return_sequences=True)
    layer.build((None, None, 10))                    # or call it once: weights exist when built
    gru = rnnkit.from_keras(layer)                   # rnnkit.GRU(10, 20, batch_first=True)
    output, h_n = gru(torch.randn(3, 5, 10))         # (3, 5, 20), (1, 3, 20)
    back = rnnkit.to_keras(gru)                      # keras GRU, return_sequences + return_state
    sequence, h = back(np.zeros((3, 5, 10), "float32"))   # (3, 5, 20), (3, 20)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit._checks import describe
from rnnkit.layers import GRU, LSTM, RNN

KERAS_INSTALL_HINT = 'pip install "rnnkit[keras]"'
_KERAS_NAMES = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": RNN}
_ACCEPTED = ("a built Keras 3 keras.layers.LSTM, GRU or SimpleRNN, or a keras.layers.Bidirectional "
             "wrapping one")


# ---- layouts: Keras' kernels and biases <-> rnnkit's parameters, for one layer and direction ----
def _gate_order(family: str, gates: int) -> list[int]:
    """Positions of rnnkit's gate blocks in Keras' order. GRU swaps the first two (Keras z, r, h;
    rnnkit r, z, n); a swap is its own inverse, so the same list converts both ways."""
    return [1, 0, 2] if family == "gru" else list(range(gates))


def _reorder_gates(tensor: Tensor, family: str, gates: int) -> Tensor:
    """Reorder the G gate blocks along dim 0 (rnnkit rows / Keras columns after a transpose)."""
    blocks = tensor.chunk(gates, dim=0)
    return torch.cat([blocks[k] for k in _gate_order(family, gates)], dim=0)


def _as_tensor(array: object, dtype: torch.dtype) -> Tensor:
    """A Keras weight (already NumPy) as a torch tensor of ``dtype``. Through float64: exact for
    every float dtype, and it also reads bfloat16 arrays (ml_dtypes), which torch.from_numpy
    cannot."""
    return torch.from_numpy(np.asarray(array).astype(np.float64)).to(dtype)


def _as_array(tensor: Tensor) -> np.ndarray:
    """A torch tensor as float64 NumPy (exact); Keras casts it to the variable's dtype."""
    return tensor.detach().to("cpu", torch.float64).numpy()


def _parameters_from_keras(
    family: str, gates: int, kernel: Tensor, recurrent_kernel: Tensor, bias: Tensor | None,
    suffix: str,
) -> dict[str, Tensor]:
    """One direction's Keras weights -> rnnkit parameters named as in its state dict."""
    parameters = {
        f"weight_ih_l0{suffix}": _reorder_gates(kernel.T, family, gates),  # (G*H, H_in)
        f"weight_hh_l0{suffix}": _reorder_gates(recurrent_kernel.T, family, gates),  # (G*H, H)
    }
    if bias is not None:
        if bias.dim() == 2:  # GRU reset_after=True: rows are the input and the recurrent bias
            bias_ih, bias_hh = bias[0], bias[1]
        else:  # one bias per gate: it is all input bias, the recurrent one is zero
            bias_ih, bias_hh = bias, torch.zeros_like(bias)
        parameters[f"bias_ih_l0{suffix}"] = _reorder_gates(bias_ih, family, gates)  # (G*H,)
        parameters[f"bias_hh_l0{suffix}"] = _reorder_gates(bias_hh, family, gates)  # (G*H,)
    return parameters


def _keras_weights(module: nn.Module, suffix: str) -> list[np.ndarray]:
    """One direction's rnnkit parameters -> Keras' [kernel, recurrent_kernel(, bias)]."""
    family, gates = module.family, module.gate_count
    state = module.state_dict()
    weights = [
        _as_array(_reorder_gates(state[f"weight_ih_l0{suffix}"], family, gates).T),  # (H_in, G*H)
        _as_array(_reorder_gates(state[f"weight_hh_l0{suffix}"], family, gates).T),  # (H, G*H)
    ]
    if module.bias:
        bias_ih = _reorder_gates(state[f"bias_ih_l0{suffix}"], family, gates)
        bias_hh = _reorder_gates(state[f"bias_hh_l0{suffix}"], family, gates)
        if family == "gru" and module.reset_after:
            weights.append(_as_array(torch.stack([bias_ih, bias_hh])))  # (2, 3H)
        else:  # Keras keeps one bias per gate; the gates only see the sum
            weights.append(_as_array(bias_ih + bias_hh))  # (G*H,)
    return weights


# ---- from Keras ----------------------------------------------------------------------------------
def _keras_module():
    """The Keras already imported by the caller, or None: a Keras layer cannot exist without it,
    and from_keras must not import it (nor fail when it is absent)."""
    keras = sys.modules.get("keras")
    return keras if keras is not None and hasattr(keras, "layers") else None


def _rnnkit_settings(keras, layer, backward: bool) -> dict[str, object]:
    """The rnnkit class and constructor settings of one built Keras recurrent layer (one
    direction); ValueError naming any option rnnkit's layer cannot express."""
    kind = f"keras.layers.{type(layer).__name__} {layer.name!r}"
    activations = {"tanh": keras.activations.tanh}
    if type(layer).__name__ == "SimpleRNN":
        activations["relu"] = keras.activations.relu
    nonlinearity = next((name for name, fn in activations.items() if layer.activation is fn), None)
    if nonlinearity is None:
        accepted = " or ".join(repr(name) for name in activations)
        raise ValueError(
            f"from_keras: {kind} has activation={_function_name(layer.activation)!r}; rnnkit "
            f"accepts {accepted} there"
        )
    recurrent_activation = getattr(layer, "recurrent_activation", keras.activations.sigmoid)
    if recurrent_activation is not keras.activations.sigmoid:
        raise ValueError(
            f"from_keras: {kind} has recurrent_activation={_function_name(recurrent_activation)!r};"
            f" rnnkit's gates use 'sigmoid' (the logistic function) only"
        )
    if layer.go_backwards != backward:
        raise ValueError(
            f"from_keras: {kind} has go_backwards={layer.go_backwards}, which rnnkit converts only "
            "as the backward layer of a keras.layers.Bidirectional (on its own, such a layer "
            "returns its outputs last step first); use go_backwards=False, or wrap the layer in "
            "Bidirectional"
            if not backward else
            f"from_keras: {kind}, the backward layer of a Bidirectional, has go_backwards=False; "
            "rnnkit's backward direction reads the sequence last to first (go_backwards=True)"
        )
    if layer.stateful:
        raise ValueError(
            f"from_keras: {kind} has stateful=True; rnnkit layers keep no state between calls "
            "(pass hx, the previous call's final state, instead): use stateful=False"
        )
    for option in ("dropout", "recurrent_dropout"):
        if getattr(layer, option):
            raise ValueError(
                f"from_keras: {kind} has {option}={getattr(layer, option)}; rnnkit's layers have "
                f"no equivalent of Keras' per-gate input and recurrent dropout: use {option}=0"
            )
    settings = {"class": _KERAS_NAMES[type(layer).__name__],
                "input_size": layer.cell.kernel.shape[0], "hidden_size": layer.units,
                "bias": layer.use_bias, "dtype": getattr(torch, layer.cell.kernel.dtype)}
    if type(layer).__name__ == "GRU":
        settings["reset_after"] = layer.reset_after
    if type(layer).__name__ == "SimpleRNN":
        settings["nonlinearity"] = nonlinearity
    return settings


def _function_name(function: object) -> str:
    return getattr(function, "__name__", repr(function))


def _cell_weights(keras, layer, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    cell = layer.cell
    kernel = _as_tensor(keras.ops.convert_to_numpy(cell.kernel), dtype)
    recurrent = _as_tensor(keras.ops.convert_to_numpy(cell.recurrent_kernel), dtype)
    bias = _as_tensor(keras.ops.convert_to_numpy(cell.bias), dtype) if cell.use_bias else None
    return kernel, recurrent, bias


def from_keras(layer: object) -> nn.Module:
    r"""The rnnkit layer equivalent to a built Keras 3 recurrent layer, with its weights.

    ``keras.layers.LSTM`` -> `rnnkit.LSTM`, ``GRU`` -> `rnnkit.GRU` (same ``reset_after``),
    ``SimpleRNN`` -> `rnnkit.RNN` (tanh or relu), ``Bidirectional(...)`` (``merge_mode="concat"``)
    -> the same with ``bidirectional=True``. Always ``num_layers=1`` and ``batch_first=True``, as
    Keras is batch-major; ``bias`` follows ``use_bias``; on the CPU in the weights' dtype; the
    parameters are trainable when the layer is. The rnnkit layer returns what a Keras layer built
    with ``return_sequences=True, return_state=True`` returns: the output ``(N, L, D*H)`` and the
    final state ``h_n`` (``(h_n, c_n)`` for LSTM), ``(D, N, H)`` where Keras gives ``D`` tensors
    ``(N, H)``, forward direction first. A mixed-precision dtype policy (float32 weights, float16
    compute) gives a layer that computes in float32. See the module docstring for the weight
    layouts and the options that are refused (``ValueError`` naming the option and value).

    Args:
        layer: a built (called once, or ``build`` called) Keras 3 layer of a kind above.

    Example::

        >>> layer = keras.layers.LSTM(20); layer.build((None, None, 10))
        >>> lstm = rnnkit.from_keras(layer)       # rnnkit.LSTM(10, 20, batch_first=True)
    """
    keras = _keras_module()
    classes = tuple(getattr(keras.layers, name) for name in _KERAS_NAMES) if keras else ()
    bidirectional = keras is not None and type(layer) is keras.layers.Bidirectional
    inner = [layer.forward_layer, layer.backward_layer] if bidirectional else [layer]
    if keras is None or any(type(part) not in classes for part in inner):
        raise TypeError(f"from_keras expects {_ACCEPTED}, got {describe(layer)}")
    if bidirectional and layer.merge_mode != "concat":
        raise ValueError(
            f"from_keras: the Bidirectional {layer.name!r} has merge_mode={layer.merge_mode!r}; "
            "rnnkit concatenates the directions, so only merge_mode='concat' converts"
        )
    if not layer.built or not all(part.built for part in inner):
        raise ValueError(
            f"from_keras: keras.layers.{type(layer).__name__} {layer.name!r} is not built, so it "
            "has no weights yet: call it on an input once, or layer.build((None, None, "
            "input_features)), first"
        )
    forward, *backward = [_rnnkit_settings(keras, part, backward=d == 1)
                          for d, part in enumerate(inner)]
    if backward and backward[0] != forward:
        def shown(settings):
            return ", ".join(f"{key}={getattr(value, '__name__', value)}"
                             for key, value in settings.items())

        raise ValueError(
            f"from_keras: the Bidirectional {layer.name!r} has a forward layer with "
            f"{shown(forward)} and a backward one with {shown(backward[0])}; rnnkit's two "
            "directions share one configuration"
        )
    factory = forward.pop("class")
    twin = factory(**forward, batch_first=True, bidirectional=bidirectional)
    parameters: dict[str, Tensor] = {}
    for direction, part in enumerate(inner):
        parameters |= _parameters_from_keras(
            twin.family, twin.gate_count, *_cell_weights(keras, part, forward["dtype"]),
            suffix="_reverse" if direction else "",
        )
    twin.load_state_dict(parameters)  # strict: every parameter, shapes checked
    return twin.requires_grad_(bool(layer.trainable))


# ---- to Keras ------------------------------------------------------------------------------------
def _import_keras():
    """Keras 3, imported now, or ImportError saying how to get it."""
    try:
        import keras
    except ImportError as error:
        if error.name == "keras":
            raise ImportError(f"to_keras needs Keras 3: {KERAS_INSTALL_HINT}") from None
        raise ImportError(
            f"to_keras: keras is installed but could not load its backend ({error}); set "
            "KERAS_BACKEND=torch (the backend rnnkit's own torch provides) before keras is first "
            "imported, or install that backend"
        ) from error
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise ImportError(f"to_keras needs Keras 3, found keras {version}: {KERAS_INSTALL_HINT}")
    return keras


def to_keras(module: nn.Module):
    r"""The Keras 3 layer equivalent to an rnnkit layer, built, with its weights.

    `rnnkit.LSTM` -> ``keras.layers.LSTM``, `rnnkit.GRU` -> ``keras.layers.GRU`` (same
    ``reset_after``), `rnnkit.RNN` -> ``keras.layers.SimpleRNN`` (``activation`` = its
    nonlinearity); ``bidirectional=True`` wraps it in ``keras.layers.Bidirectional`` with
    ``merge_mode="concat"``. The layer has ``return_sequences=True, return_state=True``, so it
    returns ``[output (N, L, D*H), h (N, H)(, c (N, H))]``, the states per direction, forward
    first. It is batch-major whatever the module's ``batch_first``; ``use_bias`` follows ``bias``,
    its dtype the parameters'. Where Keras keeps one bias per gate it gets
    ``bias_ih + bias_hh``.

    Raises:
        TypeError: not an rnnkit RNN, LSTM or GRU.
        ValueError: a setting Keras cannot express (``num_layers > 1``, ``proj_size``,
            ``peephole``, ``learn_initial_state``, ...), named with its value.
        ImportError: Keras 3 is missing (``pip install "rnnkit[keras]"``).

    Example::

        >>> layer = rnnkit.to_keras(rnnkit.LSTM(10, 20))
        >>> output, h, c = layer(np.zeros((3, 5, 10), "float32"))   # (3, 5, 20), (3, 20) x 2
    """
    if not isinstance(module, RNN | LSTM | GRU):
        raise TypeError(f"to_keras expects an rnnkit RNN, LSTM or GRU, got {describe(module)}")
    kind = type(module).__name__
    if module.num_layers != 1:
        raise ValueError(
            f"to_keras: rnnkit.{kind} has num_layers={module.num_layers}; a Keras recurrent layer "
            "is one layer, so only num_layers=1 converts (stack Keras layers yourself)"
        )
    unsupported = dict(module._variant_settings())
    if isinstance(module, GRU):
        unsupported.pop("reset_after", None)  # Keras has reset_after=False too
    if module.proj_size:
        unsupported = {"proj_size": module.proj_size} | unsupported
    if unsupported:
        settings = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
        raise ValueError(
            f"to_keras: Keras has no equivalent of rnnkit.{kind}'s {settings}; only plain "
            "configurations convert (and GRU's reset_after=False)"
        )
    keras = _import_keras()
    dtype = str(module.weight_ih_l0.dtype).removeprefix("torch.")
    # The weights are overwritten below, so the layer is built with zero initialisers: Keras'
    # default orthogonal one costs a QR per layer and has no bfloat16 kernel on torch's CPU. The
    # defaults are put back after building, so the config (and a clone) initialise as Keras does.
    options = {"use_bias": module.bias, "return_sequences": True, "return_state": True,
               "dtype": dtype, "kernel_initializer": "zeros", "recurrent_initializer": "zeros"}
    if isinstance(module, LSTM):
        layer = keras.layers.LSTM(module.hidden_size, **options)
    elif isinstance(module, GRU):
        layer = keras.layers.GRU(module.hidden_size, reset_after=module.reset_after, **options)
    else:
        layer = keras.layers.SimpleRNN(module.hidden_size, activation=module.nonlinearity,
                                       **options)
    if module.bidirectional:
        layer = keras.layers.Bidirectional(layer, merge_mode="concat", dtype=dtype)
    layer.build((None, None, module.input_size))
    inner = [layer.forward_layer, layer.backward_layer] if module.bidirectional else [layer]
    for direction, part in enumerate(inner):
        part.cell.kernel_initializer = keras.initializers.get("glorot_uniform")
        part.cell.recurrent_initializer = keras.initializers.get("orthogonal")
        variables = [part.cell.kernel, part.cell.recurrent_kernel]
        variables += [part.cell.bias] if module.bias else []
        for variable, value in zip(
            variables, _keras_weights(module, "_reverse" if direction else ""), strict=True
        ):
            variable.assign(value)
    return layer
