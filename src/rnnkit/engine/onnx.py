"""ONNX export: the engine the exporters trace while an export runs, and `export_onnx`.

While an ONNX export runs, `rnnkit.engine.run_direction` sends every layer and direction here
instead of to the fast engines (whose kernels a tracer cannot see into). What the graph holds
depends on the exporter, and every route is correct for any sequence length ``T`` and batch
``N`` (both may be dynamic); none unrolls the time loop to the traced length:

================================  =====================  ==========================  ========
variant                           `export_onnx`          torch.onnx.export           legacy
                                                         (dynamo=True)               exporter
================================  =====================  ==========================  ========
LSTM (plain, peephole)            ONNX ``LSTM``          ``Scan``                    ``LSTM``
LSTM with proj_size               ``Scan``               ``Scan``                    refused
GRU reset_after=True / False      ONNX ``GRU``,          ``Scan``                    ``GRU``
                                  linear_before_reset                                (True
                                  1 / 0                                              only)
RNN tanh / relu                   ONNX ``RNN``           ``Scan``                    ``RNN``
reverse direction                 ``direction=reverse``  ``Scan`` (reversed)         flipped
lengths                           ``sequence_lens``      masked inside ``Scan``      refused
learned initial state             the ops' initial state (a parameter expanded over N), any route
layer_norm / zoneout, evaluation  ``Scan``               ``Scan``                    refused
recurrent_dropout / weight_drop,  as the plain layer (the identity in evaluation mode), any
evaluation                        route
recurrent_dropout / zoneout,      ``ValueError``         ``ValueError``              ``ValueError``
training
================================  =====================  ==========================  ========

("legacy exporter": ``torch.onnx.export(..., dynamo=False)``; "refused": an
`UnsupportedExport` naming the variant and the route that exports it, at export time.)

Layer norm and zoneout in evaluation mode (``model.eval()``, where they are deterministic) go
through the ``Scan`` route on both dynamo routes, combined with any variant above: ONNX's
recurrent operators have no place for the normalisations, nor for zoneout's expectation
``h_t = p h_{t-1} + (1 - p) h̃_t``. The loop's body is the spec's step itself (`cell_step` with
the layer-norm gains that `CellWeights` carries, then `rnnkit.engine.steps.zoneout` with the
0-dim probabilities the layer hands over in evaluation), the reference engine's step. In training
mode recurrent dropout and zoneout draw their masks per call, and a graph would freeze the
example's draws: every route refuses them with a ``ValueError`` saying to call ``model.eval()``
(the legacy exporter puts a model in evaluation mode itself unless given ``training=``).

Why three routes:

- torch's own recurrent ATen ops (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``) cannot be
  used under torch.export in torch 2.13: their shapes are computed by running the op's
  decomposition, a loop over the traced steps, so ``T`` is specialised to the traced length
  (``torch.export`` raises a constraint violation; ``torch.onnx.export`` quietly exports a
  fixed-length graph: even ``torch.nn.LSTM`` exports that way). `export_onnx` therefore traces
  small operators of its own (``rnnkit_onnx::lstm|gru|rnn``, with symbolic shapes) and gives the
  exporter their ONNX translations (`onnx_translations`): the native ONNX recurrent operators,
  which also hold the variants torch lacks (peephole weights ``P`` in ONNX's order i, o, f;
  GRU's ``linear_before_reset=0``; ``sequence_lens``; a reverse direction). ONNX's gate orders
  are LSTM ``i, o, f, c`` (torch ``i, f, g, o``) and GRU ``z, r, h`` (torch ``r, z, n``).
- A plain ``torch.onnx.export(model, dynamo=True)`` call cannot be given those translations by
  a library (the exporter has no public registry), so it traces the spec's step
  (`rnnkit.engine.steps.cell_step`) inside ``torch.ops.higher_order.scan``, which it exports as
  an ONNX ``Scan`` loop. The same holds for the LSTM projection under `export_onnx`, which ONNX's
  ``LSTM`` cannot express.
- The legacy (TorchScript) exporter traces eagerly and has no loop construct to offer, but it
  translates ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu`` into the ONNX ops:
  the plain variants run through them (a reverse direction on the flipped sequence); the others
  are refused. (That exporter passes a ``forward``'s keyword-only parameters positionally, so a
  layer itself fails there with "forward() takes from 2 to 3 positional arguments"; export a
  module that calls it, as any model does.)

Use `export_onnx` (``rnnkit.export_onnx``): it also traces with ``torch.export`` first, so a
model whose code fixes a dynamic dimension fails with torch's constraint message instead of
exporting a graph that only takes the traced shape.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from rnnkit.engine.steps import CellKind, CellWeights, Masks, State, cell_step, output_of, zoneout

INSTALL_HINT = 'pip install "rnnkit[onnx]"'
NAMESPACE = "rnnkit_onnx"


class UnsupportedExport(NotImplementedError):
    """A layer's variant that the running exporter cannot express; the message names the route
    that exports it."""


_native_operators = False  # True while `export_onnx` traces: its translations will be given


def is_exporting() -> bool:
    """Whether an ONNX export is tracing the model (either exporter, or `export_onnx`)."""
    if _native_operators:
        return True
    # Every layer call asks, and torch.onnx.is_in_onnx_export costs microseconds (it imports on
    # each call): it is asked only while a tracer runs, as in every ONNX export (the legacy
    # exporter traces with torch.jit, the dynamo one with torch.export).
    if not (torch.jit.is_tracing() or _is_compiling()):
        return False
    return torch.onnx.is_in_onnx_export()


# torch.compiler.is_compiling is torch 2.3+; before it, no exporter traces through torch.export.
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
    masks: Masks | None = None,
) -> tuple[Tensor, State]:
    """One layer in one direction, as the running exporter can express it (module docstring).

    The contract is `rnnkit.engine.reference.run_direction`'s: ``x (T, N, I)``, state
    ``h (N, H_out)`` or ``(h, c)``, ``lengths (N,)`` int64 or None, ``masks`` those of
    evaluation mode (zoneout's probabilities, 0-dim; the caller refuses per-call masks);
    returns ``output (T, N, H_out)``, zero past each sequence's end, and the final state.
    """
    if masks is not None and masks.empty:
        masks = None
    if masks is not None and any(mask is not None and mask.dim() > 0 for mask in masks):
        raise ValueError("per-step masks (recurrent dropout or zoneout in training mode) have "
                         "no ONNX form: export the model in evaluation mode (model.eval())")
    if not _is_compiling():  # the legacy exporter traces eager execution
        return _run_torch_op(kind, x, state, weights, lengths, reverse, masks)
    if _native_operators and weights.weight_hr is None and not weights.layer_norm \
            and masks is None:
        return _run_native_operator(kind, x, state, weights, lengths, reverse)
    return _run_scan(kind, x, state, weights, lengths, reverse, masks)


def _describe(kind: CellKind, weights: CellWeights, lengths: Tensor | None,
              masks: Masks | None = None) -> str | None:
    """The variant the legacy exporter cannot express, in words; None for a plain layer."""
    family = ("a " if kind.family == "gru" else "an ") + kind.family.upper()
    switches = [name for name, on in (
        ("layer_norm=True", weights.layer_norm),
        ("recurrent_dropout", masks is not None and masks.recurrent is not None),
        ("zoneout", masks is not None and (masks.zoneout_h is not None
                                           or masks.zoneout_c is not None))) if on]
    if switches:
        return f"{family} with {' and '.join(switches)}"
    if weights.weight_hr is not None:
        return "an LSTM with proj_size"
    if weights.weight_ch is not None:
        return "a peephole LSTM"
    if kind.family == "gru" and not kind.reset_after:
        return "a GRU with reset_after=False"
    if lengths is not None:
        return f"{family} with lengths"
    return None


def _run_torch_op(
    kind: CellKind, x: Tensor, state: State, weights: CellWeights, lengths: Tensor | None,
    reverse: bool, masks: Masks | None = None,
) -> tuple[Tensor, State]:
    """The legacy exporter's route: torch's recurrent op, which it translates to ONNX's."""
    variant = _describe(kind, weights, lengths, masks)
    if variant is not None:
        raise UnsupportedExport(
            f"the legacy ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot export "
            f"{variant}: it has no ONNX form there; use rnnkit.export_onnx(model, args, path, "
            "dynamic_shapes=...) (or torch.onnx.export(..., dynamo=True)), which export every "
            "variant" + (" (layer_norm, zoneout in evaluation mode: model.eval())"
                         if weights.layer_norm or masks is not None else ""))
    has_biases = weights.bias_ih is not None
    flat = [weights.weight_ih, weights.weight_hh]
    flat += [weights.bias_ih, weights.bias_hh] if has_biases else []
    # One direction of one layer: torch's op runs forward only, so reverse runs it on the
    # flipped sequence (without lengths every sequence ends at T, so that is the same thing).
    sequence = x.flip(0) if reverse else x
    arguments = (flat, has_biases, 1, 0.0, False, False, False)
    if kind.family == "lstm":
        h, c = state  # type: ignore[misc]
        output, h_n, c_n = torch.lstm(sequence, (h.unsqueeze(0), c.unsqueeze(0)), *arguments)
        final: State = (h_n.squeeze(0), c_n.squeeze(0))
    else:
        op = {"gru": torch.gru, "tanh": torch.rnn_tanh, "relu": torch.rnn_relu}[
            "gru" if kind.family == "gru" else kind.nonlinearity]
        output, h_n = op(sequence, state.unsqueeze(0), *arguments)  # type: ignore[union-attr]
        final = h_n.squeeze(0)
    return (output.flip(0) if reverse else output), final


def _run_scan(
    kind: CellKind, x: Tensor, state: State, weights: CellWeights, lengths: Tensor | None,
    reverse: bool, masks: Masks | None = None,
) -> tuple[Tensor, State]:
    """The spec's step (`cell_step`, layer norm included) in a ``scan`` over time, with
    evaluation-mode zoneout (`zoneout`: the expectation ``p h_{t-1} + (1 - p) h̃_t``) after it,
    as the reference engine runs them: exported as one ONNX ``Scan``."""
    from torch._higher_order_ops.scan import scan

    recurrent = None if masks is None else masks.recurrent
    keep_h, keep_c = (None, None) if masks is None else masks.zoneout_at(0)  # 0-dim: every step
    zoned = keep_h is not None or keep_c is not None

    def step(carry: State, inputs: tuple[Tensor, Tensor]) -> tuple[State, Tensor]:
        x_t, t = inputs  # (N, I), () the step's index in the sequence
        new = cell_step(kind, x_t, carry, weights, recurrent)
        if zoned:
            new = zoneout(new, carry, keep_h, keep_c)
        if lengths is None:
            return new, output_of(new).clone()  # an output may not alias the carry
        # As in the reference engine: past a sequence's end its state is held (going backward:
        # it stays initial until the last valid step) and its output is zero.
        valid = (lengths > t).unsqueeze(1)  # (N, 1)
        if isinstance(new, tuple):
            new = tuple(torch.where(valid, n, o) for n, o in zip(new, carry, strict=True))
        else:
            new = torch.where(valid, new, carry)
        return new, output_of(new).masked_fill(~valid, 0.0)

    steps = torch.arange(x.shape[0], device=x.device)  # (T,)
    # The carry starts as a fresh dense tensor: a learned initial state comes expanded over the
    # batch (stride 0), and the scan's tracer would guard on a view's offset into its base (the
    # states of all layers), which ties the batch size to the traced one.
    fresh = tuple(s.clone(memory_format=torch.contiguous_format) for s in state) \
        if isinstance(state, tuple) else state.clone(memory_format=torch.contiguous_format)
    final, output = scan(step, fresh, (x, steps), reverse=reverse)
    return output, final  # (T, N, H_out), state


# ---- minGRU, minLSTM and sLSTM ----------------------------------------------------------------
# Their fast paths are operators (`rnnkit::linear_scan`, `rnnkit::log_scan`,
# `rnnkit::{fused,native}_slstm`) that ONNX has no translation for, and ONNX has no operator for
# their recurrences either (minGRU/minLSTM: no CumProd and no LogCumSumExp, so neither the
# paper's log-space scan nor a cumulative-product form exports; the doubling scan's rounds
# depend on T, which a graph must not fix). Every exporter that traces with dynamo (`export_onnx`,
# ``torch.onnx.export(..., dynamo=True)``) therefore runs them as the sequential loop in a
# ``scan`` (one ONNX ``Scan``, any T and N), the reference engine's step; in evaluation mode and
# in training mode alike, since these cells draw nothing per call.

def is_capturing() -> bool:
    """`is_exporting`, or dynamo's own strict capture inside ``torch.onnx.export`` (the
    exporter retries a failed non-strict capture with it, and dynamo reads
    ``torch.onnx.is_in_onnx_export()`` as False while tracing: its flag, read here directly,
    keeps its value)."""
    if is_exporting():
        return True
    if not _is_compiling():
        return False
    try:
        from torch.onnx._internal.exporter import _flags  # private: absent, nothing to see
    except ImportError:
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def _require_dynamo_route(family: str) -> None:
    if not _is_compiling():  # the legacy exporter traces eager execution: no loop to offer
        raise UnsupportedExport(
            f"the legacy ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot export "
            f"{family}: its recurrence has no ONNX operator, and that exporter has no loop "
            "construct; use rnnkit.export_onnx(model, args, path, dynamic_shapes=...) (or "
            "torch.onnx.export(..., dynamo=True)), which export it as an ONNX Scan")


def run_linear_recurrence(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """``h (T, N, H)`` with ``h_t = a_t ⊙ h_{t-1} + b_t`` (minGRU's and minLSTM's recurrence,
    `rnnkit.engine.scan.scan_linear`'s contract) as a loop over time in a ``scan``: an ONNX
    ``Scan`` whose body is one multiply-add. Lengths are the caller's (``a = 1, b = 0`` past an
    end), as for the scans."""
    from torch._higher_order_ops.scan import scan

    _require_dynamo_route("minGRU or minLSTM")

    def step(h: Tensor, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a_t, b_t = inputs  # (N, H) each
        new = a_t * h + b_t
        return new, new.clone()  # an output may not alias the carry

    _, states = scan(step, h0.clone(memory_format=torch.contiguous_format), (a, b))
    return states


def run_slstm_direction(x: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor],
                        weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                        lengths: Tensor | None, reverse: bool, exp_forget: bool):
    """One sLSTM layer in one direction as a ``scan`` over the spec's gate math
    (`rnnkit.engine.slstm.gate_step`, the reference engine's), held past each sequence's end as
    the reference holds it; contract of `rnnkit.engine.run_slstm_direction`."""
    from torch._higher_order_ops.scan import scan

    from rnnkit.engine import slstm

    _require_dynamo_route("an sLSTM")

    # The input side of every step at once, and R as one dense matrix: the loop's body then
    # multiplies by static shapes only (the ONNX exporter's decompositions of the heads'
    # reshapes by a symbolic batch inside a scan body fail in torch 2.13).
    pre_x = torch.nn.functional.linear(x, weight_ih, bias_ih)  # (T, N, 4H)
    recurrent = slstm.block_diagonal(weight_hh)  # (4H, H)

    def step(carry, inputs):
        pre_x_t, t = inputs  # (N, 4H), () the step's index in the sequence
        pre = pre_x_t + torch.nn.functional.linear(carry[0], recurrent)
        new = slstm.gate_step(pre, carry, exp_forget)
        if lengths is None:
            return new, new[0].clone()
        valid = (lengths > t).unsqueeze(1)  # (N, 1)
        new = tuple(torch.where(valid, n, o) for n, o in zip(new, carry, strict=True))
        return new, new[0].masked_fill(~valid, 0.0)

    steps = torch.arange(x.shape[0], device=x.device)  # (T,)
    fresh = tuple(s.clone(memory_format=torch.contiguous_format) for s in state)
    final, output = scan(step, fresh, (pre_x, steps), reverse=reverse)
    return output, tuple(final)


# ---- the operators export_onnx traces, and their ONNX translations -------------------------

@functools.cache
def _operators():
    """``rnnkit_onnx::lstm|gru|rnn``, defined at first use (torch.library.custom_op is torch
    2.4+; importing rnnkit needs no more than torch 2.1).

    Each is one layer in one direction with symbolic output shapes, run by the reference engine
    when executed; its ONNX translation is in `onnx_translations`.
    """
    from rnnkit.engine import reference

    def run(kind, x, state, weights, lengths, reverse):
        output, final = reference.run_direction(kind, x, state, weights, lengths, reverse)
        # An operator's outputs may not alias its inputs (the state, when lengths hold it).
        finals = final if isinstance(final, tuple) else (final,)
        return (output, *(s.clone() for s in finals))

    @torch.library.custom_op(f"{NAMESPACE}::lstm", mutates_args=())
    def lstm(
        x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
        bias_ih: Tensor | None, bias_hh: Tensor | None, weight_ch: Tensor | None,
        lengths: Tensor | None, reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        weights = CellWeights(weight_ih, weight_hh, bias_ih, bias_hh, None, weight_ch)
        return run(CellKind("lstm"), x, (h0, c0), weights, lengths, reverse)

    @lstm.register_fake
    def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, lengths, reverse):
        return x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), torch.empty_like(h0), \
            torch.empty_like(c0)

    @torch.library.custom_op(f"{NAMESPACE}::gru", mutates_args=())
    def gru(
        x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
        bias_hh: Tensor | None, lengths: Tensor | None, reverse: bool, reset_after: bool,
    ) -> tuple[Tensor, Tensor]:
        weights = CellWeights(weight_ih, weight_hh, bias_ih, bias_hh)
        kind = CellKind("gru", reset_after=reset_after)
        return run(kind, x, h0, weights, lengths, reverse)

    @torch.library.custom_op(f"{NAMESPACE}::rnn", mutates_args=())
    def rnn(
        x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
        bias_hh: Tensor | None, lengths: Tensor | None, reverse: bool, nonlinearity: str,
    ) -> tuple[Tensor, Tensor]:
        weights = CellWeights(weight_ih, weight_hh, bias_ih, bias_hh)
        kind = CellKind("rnn", nonlinearity=nonlinearity)
        return run(kind, x, h0, weights, lengths, reverse)

    for operator in (gru, rnn):
        @operator.register_fake
        def _(x, h0, *rest):
            return x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), torch.empty_like(h0)

    return lstm, gru, rnn


def _run_native_operator(
    kind: CellKind, x: Tensor, state: State, weights: CellWeights, lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, State]:
    """`export_onnx`'s route: one ``rnnkit_onnx`` operator, translated to ONNX's own."""
    lstm, gru, rnn = _operators()
    w = weights
    if kind.family == "lstm":
        h, c = state  # type: ignore[misc]
        output, h_n, c_n = lstm(x, h, c, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh,
                                w.weight_ch, lengths, reverse)
        return output, (h_n, c_n)
    if kind.family == "gru":
        output, h_n = gru(x, state, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, lengths,
                          reverse, kind.reset_after)
    else:
        output, h_n = rnn(x, state, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, lengths,
                          reverse, kind.nonlinearity)
    return output, h_n


def onnx_translations() -> dict[Callable, Callable]:
    """The ONNX Script translations of the ``rnnkit_onnx`` operators, for ``torch.onnx.export``'s
    ``custom_translation_table`` (`export_onnx` passes them; they matter only for a program that
    `export_onnx`'s tracing produced, since plain exports never emit these operators).

    Each builds one ONNX recurrent node for one direction (``num_directions = 1``): weights
    reordered into ONNX's gate order, the two biases concatenated as ONNX's ``B = [Wb, Rb]``,
    ``lengths`` as ``sequence_lens`` (int32), the state with a leading direction axis.
    """
    _require_onnx()
    import onnx
    from onnxscript import opset18 as op

    lstm, gru, rnn = _operators()

    def reorder(tensor, hidden: int, order: list[int]):
        """Gate blocks of ``hidden`` rows, concatenated in ``order`` (torch's index of each)."""
        blocks = [op.Slice(tensor, [k * hidden], [(k + 1) * hidden], [0]) for k in order]
        return op.Concat(*blocks, axis=0)

    def onnx_inputs(weight_ih, weight_hh, bias_ih, bias_hh, lengths, order):
        hidden = weight_hh.shape[1]  # without a projection, H_out = H
        w = op.Unsqueeze(reorder(weight_ih, hidden, order), [0])  # (1, G*H, I)
        r = op.Unsqueeze(reorder(weight_hh, hidden, order), [0])  # (1, G*H, H)
        b = None if bias_ih is None else op.Unsqueeze(op.Concat(
            reorder(bias_ih, hidden, order), reorder(bias_hh, hidden, order), axis=0), [0])
        sequence_lens = None if lengths is None else op.Cast(lengths, to=onnx.TensorProto.INT32)
        return hidden, w, r, b, sequence_lens

    def direction(reverse: bool) -> str:
        return "reverse" if reverse else "forward"

    def lstm_onnx(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, lengths,
                  reverse):
        # torch i, f, g, o -> ONNX i, o, f, c
        hidden, w, r, b, sequence_lens = onnx_inputs(
            weight_ih, weight_hh, bias_ih, bias_hh, lengths, [0, 3, 1, 2])
        # torch's peepholes are i, f, o; ONNX's P is i, o, f
        p = None if weight_ch is None else op.Unsqueeze(reorder(weight_ch, hidden, [0, 2, 1]),
                                                         [0])
        y, y_h, y_c = op.LSTM(x, w, r, b, sequence_lens, op.Unsqueeze(h0, [0]),
                              op.Unsqueeze(c0, [0]), p, hidden_size=hidden,
                              direction=direction(reverse))
        return op.Squeeze(y, [1]), op.Squeeze(y_h, [0]), op.Squeeze(y_c, [0])

    def gru_onnx(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, reset_after):
        # torch r, z, n -> ONNX z, r, h
        hidden, w, r, b, sequence_lens = onnx_inputs(
            weight_ih, weight_hh, bias_ih, bias_hh, lengths, [1, 0, 2])
        y, y_h = op.GRU(x, w, r, b, sequence_lens, op.Unsqueeze(h0, [0]), hidden_size=hidden,
                        direction=direction(reverse), linear_before_reset=int(reset_after))
        return op.Squeeze(y, [1]), op.Squeeze(y_h, [0])

    def rnn_onnx(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse,
                 nonlinearity):
        hidden, w, r, b, sequence_lens = onnx_inputs(
            weight_ih, weight_hh, bias_ih, bias_hh, lengths, [0])
        y, y_h = op.RNN(x, w, r, b, sequence_lens, op.Unsqueeze(h0, [0]), hidden_size=hidden,
                        direction=direction(reverse), activations=[nonlinearity.capitalize()])
        return op.Squeeze(y, [1]), op.Squeeze(y_h, [0])

    return {lstm._opoverload: lstm_onnx, gru._opoverload: gru_onnx, rnn._opoverload: rnn_onnx}


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}, which are not installed; "
                          f"install them with: {INSTALL_HINT}")


@contextlib.contextmanager
def _tracing_native_operators() -> Iterator[None]:
    global _native_operators
    previous, _native_operators = _native_operators, True
    try:
        yield
    finally:
        _native_operators = previous


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    path: str | Path,
    *,
    kwargs: dict | None = None,
    dynamic_shapes: dict | tuple | list | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    optimize: bool = True,
) -> torch.onnx.ONNXProgram:
    """Export ``model`` (any module holding rnnkit layers) to the ONNX file ``path``.

    Recurrent layers become ONNX ``LSTM``/``GRU``/``RNN`` nodes where ONNX has the variant, else
    a ``Scan`` loop (module docstring); both run any sequence length and batch that
    ``dynamic_shapes`` leaves free. The model is traced by ``torch.export.export(model, args,
    kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)`` (same meaning as there, e.g.
    ``({0: torch.export.Dim("T"), 1: torch.export.Dim("N")},)`` for one ``(T, N, I)`` input),
    which raises if the model's code fixes a dimension marked dynamic, then translated by
    ``torch.onnx.export`` with `onnx_translations`. Call ``model.eval()`` first for inference
    (dropout between layers is exported as it runs; recurrent dropout and zoneout export in
    evaluation mode only, a ``ValueError`` in training mode).

    Returns the ``torch.onnx.ONNXProgram`` (already saved to ``path``). Needs ``onnx`` and
    ``onnxscript`` (``pip install "rnnkit[onnx]"``).

    Example::

        >>> lstm = rnnkit.LSTM(10, 20, peephole=True).eval()
        >>> T, N = torch.export.Dim("T"), torch.export.Dim("N")
        >>> rnnkit.export_onnx(lstm, (torch.randn(5, 3, 10),), "lstm.onnx",
        ...                    dynamic_shapes=({0: T, 1: N},))
    """
    _require_onnx()
    translations = onnx_translations()
    with _tracing_native_operators():
        program = torch.export.export(
            model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return torch.onnx.export(
        program, f=str(path), dynamo=True, custom_translation_table=translations,
        input_names=input_names, output_names=output_names, optimize=optimize,
        external_data=False, verbose=False)


__all__ = ["UnsupportedExport", "export_onnx", "is_capturing", "is_exporting",
           "onnx_translations", "run_direction", "run_linear_recurrence", "run_slstm_direction"]
