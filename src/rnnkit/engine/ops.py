"""The engine's operators: the one boundary that torch.compile, torch.export, torch.func, autocast
and the autograd engine see.

Each family's time loops are ``torch.library`` custom operators in the ``rnnkit`` namespace, two
implementations per family behind one calling convention (`run_fused`, `run_native`):

==========================  ===============================================================
``rnnkit::fused_{rnn,lstm,gru}``   the portable implementation (`rnnkit.engine.fused`): pure
                                   PyTorch, any device and floating dtype
``rnnkit::native_{rnn,lstm,gru}``  the CPU kernels (`rnnkit.engine.native`), float32/float64
``*_backward``                     each one's reverse loop, itself an operator
``rnnkit::{fused,native}_*_recurrence``  layer norm, recurrent dropout and zoneout: the
                                   recurrence alone, its input side ``pre_x`` computed before
                                   by autograd ops (`steps.input_side`; the LSTM's take the
                                   bare ``W_ih x`` and normalise it in their loop); math in
                                   `rnnkit.engine.fused_recurrence`
``rnnkit::{fused,native}_slstm``   xLSTM's sLSTM (`run_fused_slstm`, `run_native_slstm`);
                                   math and the fused loops in `rnnkit.engine.slstm`
``rnnkit::{linear,log}_scan``      minGRU/minLSTM's scans, registered in `rnnkit.engine.scan`
                                   next to their kernels, with this module's helpers
                                   (`_register`, `_autograd`), so that nothing here imports
                                   the minimal cells; the backward is the linear scan itself
``rnnkit::native_min_scan``        minGRU/minLSTM's C++ loop (and ``*_backward``), registered
                                   in `rnnkit.engine.scan` the same way
==========================  ===============================================================

Every operator has:

- a **schema** (from the Python signature) and a **fake** implementation giving its output
  shapes from its input shapes, so compile and export trace it without running it, with any
  batch and length (dynamic shapes);
- an **autograd formula** (`register_autograd`): the backward operator gives the gradients of
  the gate pre-activations and of the initial state; the weight gradients are then one product
  each over all steps (`rnnkit.engine.products`), taken here in plain PyTorch ops, so they are
  traced, compiled and transformed like any other. Under ``create_graph=True`` (a gradient
  penalty, ``torch.func.grad``, ``gradgradcheck``) the formula instead differentiates the
  reference engine's loop on the saved inputs, so the gradient is itself differentiable: double
  backward is exact, at the reference's speed;
- an **autocast** rule: under ``torch.autocast`` (CPU or CUDA) the operators run in float32,
  whatever the low-precision dtype of their inputs (the recurrence accumulates over every step:
  bfloat16 states lose the signal within tens of steps), and return float32;
- a **vmap** rule: each vmapped slice runs the operator once (correct for any in_dims; the
  transforms are for analysis, not speed).

The operators' outputs may not alias each other, so the native ones, whose output without
lengths is a view of the states buffer, return the buffer and an empty output, and `run_native`
takes the view (the layer's output then shares the saved buffer's memory, as before).

In eager mode, with nothing to differentiate and no transform, tracer or autocast active, the
implementations are called directly rather than through the dispatcher: a streamed step's
kernels take about as long as the dispatcher's ~15 µs per call, and the result is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers  # what Function.apply calls

from rnnkit.engine import fused, fused_recurrence, reference, slstm
from rnnkit.engine.native import functions as native
from rnnkit.engine.products import input_side_grads, outer_sum, peephole_grad
from rnnkit.engine.steps import CellKind, CellWeights, Family, Masks, State, input_side

_Optional = Tensor | None


# ---- the eager shortcut ------------------------------------------------------------------------

def plain_eager(x: Tensor, *tensors: _Optional) -> bool:
    """True when calling an implementation directly is the same as calling its operator: no
    gradient to record (``x`` or any of ``tensors`` requiring one under grad mode), no compiler
    or tracer, no torch.func transform (its level), no dispatch mode (fake tensors, make_fx), no
    autocast, and ``x`` a plain tensor. Each test is one C call: a streamed step asks this on
    every call."""
    return not (
        torch.compiler.is_compiling()  # first: dynamo cannot trace the C calls after it
        or (torch.is_grad_enabled() and torch._C._any_requires_grad(x, *tensors))
        or not plain_context(x)
    )


def plain_context(x: Tensor) -> bool:
    """`plain_eager` less its gradient test (and its compiler test, which callers make first):
    no tracer, no torch.func transform, no dispatch mode, no autocast, ``x`` a plain tensor. Where
    this holds, autograd records plain eager calls (`rnnkit.engine.runs_torch_lstm`)."""
    return not (
        torch.jit.is_tracing()
        or torch._C._functorch.maybe_current_level() is not None
        or torch._C._len_torch_dispatch_stack() or torch._C._is_any_autocast_enabled()
        or type(x) is not Tensor
    )


def _short_name(op) -> str:
    """A custom operator's name in the ``rnnkit`` namespace: ``rnnkit::native_lstm`` ->
    ``native_lstm``, its attribute of ``torch.ops.rnnkit``."""
    return op._name.split("::")[-1]


def _call(op, *arguments):
    """``op(*arguments)``, a custom operator (`_call_named`)."""
    return _call_named(_short_name(op), *arguments)


def _call_named(name: str, *arguments):
    """``torch.ops.rnnkit.<name>(*arguments)``, a custom operator; on CPU tensors in plain eager
    mode (`plain_eager`: no gradient to record, no compiler, tracer, transform, dispatch mode or
    autocast) its Python implementation called directly. The same computation without the
    dispatcher's Python layers (custom_op's autograd and device wrappers, which bind the
    arguments to the schema on every call): at (T, N, H) = (50, 1, 64) the LSTM's forward took
    360-390 µs through them against 95-99 µs called directly, most of a small layer's training
    step (docs/benchmarks.md, issue 19's sixth part). The autograd.Functions below call their
    operator this way, and their backward formulas their backward operator; under the profiler
    the call keeps the operator's name. Written in plain Python: dynamo traces the operator, the
    first test (and the operator's short name, not its CustomOpDef, which dynamo cannot hold)."""
    if not torch.compiler.is_compiling():
        implementation = _IMPLEMENTATIONS.get(name)
        tensors = [a for a in arguments if type(a) is Tensor]
        if (implementation is not None and tensors and all(t.is_cpu for t in tensors)
                and plain_eager(*tensors)):
            if torch.autograd.profiler._is_profiler_enabled:
                with torch.profiler.record_function(f"rnnkit::{name}"):
                    return implementation(*arguments)
            return implementation(*arguments)
    return getattr(torch.ops.rnnkit, name)(*arguments)


def _apply(op, *arguments):
    """The operator with its autograd formula (through its autograd.Function) when a gradient is
    to be recorded, else the bare operator (`_call`): dynamo cannot trace an autograd.Function
    that has nothing to differentiate, and the operator alone is all a compiled inference graph
    needs.
    Written in plain Python (not C calls) so that dynamo traces it."""
    # torch.jit.trace re-traces under no_grad to check its graph: one path for it either way.
    if torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in arguments)):
        return _record(_FUNCTIONS[op], arguments)
    return _call(op, *arguments)


_FUNCTION_APPLY_IN_C = torch._C._FunctionBase.__dict__["apply"]
"""The C half of ``torch.autograd.Function.apply`` (a class method of its base)."""


def _record(function: type[torch.autograd.Function], arguments: tuple):
    """``function.apply(*arguments)``. Outside compiling, tracing and torch.func transforms its
    C half directly, after the same unwrapping of dead torch.func wrappers: what the Python
    ``Function.apply`` does there, without binding the arguments to ``forward``'s signature
    with `inspect.signature` on every call (``forward`` takes ``*arguments``, which binds to
    themselves). That binding was about 36 µs a call on this machine, 6 % of an LSTM training
    step at (T, N, H) = (50, 1, 64) (docs/benchmarks.md, issue 19's seventh part)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()):
        return function.apply(*arguments)
    return _FUNCTION_APPLY_IN_C.__get__(None, function)(*unwrap_dead_wrappers(arguments))


@torch.library.custom_op("rnnkit::native_bernoulli", mutates_args=(), device_types="cpu")
def native_bernoulli(seed: Tensor, shape: list[int], p: float, float64: bool) -> Tensor:
    """A 0/1 mask of ``shape``, 1 with probability ``p``: SplitMix64 from the 0-dim int64
    ``seed`` in C++ (`rnnkit.engine.masks`). An operator, so torch.compile and torch.export
    keep the call (the seed, drawn from torch's generator, is what the graph varies)."""
    return native.bernoulli_mask(shape, p, seed, float64)


@native_bernoulli.register_fake
def _fake_native_bernoulli(seed, shape, p, float64):
    return seed.new_empty(shape, dtype=torch.float64 if float64 else torch.float32)


# ---- helpers of the formulas -------------------------------------------------------------------

def _entering(states: Tensor, reverse: bool) -> Tensor:
    """States entering each step t, ``(T, N, H)``, from a ``(T + 1, N, H)`` buffer."""
    return states[1:] if reverse else states[:-1]


def _leaving(states: Tensor, reverse: bool) -> Tensor:
    """States leaving each step t, ``(T, N, H)``: the output without lengths."""
    return states[:-1] if reverse else states[1:]


def _or_zeros(grad: _Optional, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _native_output_grad(d_states: _Optional, d_output: _Optional, states: Tensor,
                        lengths: _Optional, reverse: bool) -> Tensor:
    """The gradient of the layer's output ``(T, N, H)``: its own without lengths, else the part
    of the states buffer's gradient that the output view received."""
    if lengths is not None:
        return _or_zeros(d_output, _leaving(states, reverse))
    return _leaving(_or_zeros(d_states, states), reverse)


def _summed_bias_grad(has_bias: bool, d_pre: Tensor) -> _Optional:
    return d_pre.sum((0, 1)) if has_bias else None


def _differentiable_backward(ctx, order: tuple[_Optional, ...], lengths: _Optional,
                             grads: tuple[Tensor, ...]) -> tuple:
    """The vector-Jacobian product through the reference loop, itself differentiable.

    Used when the backward is recorded (``create_graph=True``: double backward, and every
    torch.func transform): the hand-derived backward operators have no derivative of their own,
    and the reference is the spec. ``order`` is the operator's tensor inputs in its argument
    order, from ``ctx.saved_tensors`` (which torch.func re-wraps at its transform's level). The
    product is taken with ``torch.func.vjp``, which composes both with torch.func's levels and
    with autograd recording around it (``torch.autograd.grad`` would not see the former).
    """
    wanted = [index for index, (t, need) in enumerate(zip(order, ctx.needs_input_grad,
                                                          strict=False))
              if t is not None and need]

    def outputs_of(*chosen):
        tensors = list(order)
        for index, tensor in zip(wanted, chosen, strict=True):
            tensors[index] = tensor
        x, state, weights, masks = getattr(ctx, "reference_arguments",
                                           _reference_arguments)(ctx.kind, tensors)
        output, final = reference.run_direction(ctx.kind, x, state, weights, lengths,
                                                ctx.reverse, masks)
        return (output, *(final if isinstance(final, tuple) else (final,)))

    _, vjp = torch.func.vjp(outputs_of, *(order[index] for index in wanted))
    found = dict(zip(wanted, vjp(tuple(grads)), strict=True))
    return tuple(found.get(index) for index in range(len(order)))


def _reference_arguments(kind: CellKind, tensors: list[_Optional]):
    """(x, state, weights, masks) from an operator's tensor inputs in argument order."""
    if kind.family == Family.LSTM:
        x, h0, c0, *weights = tensors
        return x, (h0, c0), CellWeights(*weights), None
    x, h0, *weights = tensors
    return x, h0, CellWeights(*weights), None


# ---- registration ------------------------------------------------------------------------------

# Operator's short name -> the Python function it was defined from, which its kernel runs
# (`_call_named`). torch's CustomOpDef keeps it as ``_init_fn``; were that gone, every call would
# go through the dispatcher, as `_call_named` does outside plain eager mode.
_IMPLEMENTATIONS: dict = {}


def _register(op, fake: Callable, autocast: bool = False) -> None:
    implementation = getattr(op, "_init_fn", None)
    if callable(implementation):
        _IMPLEMENTATIONS[_short_name(op)] = implementation
    op.register_fake(fake)
    torch.library.register_vmap(op, _slice_by_slice(op))
    if autocast:
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(op, device, torch.float32)


def _slice_by_slice(op) -> Callable:
    """A vmap rule: run the operator on each slice of the vmapped dimension, stack the results."""

    def rule(info, in_dims, *arguments):
        results = []
        for index in range(info.batch_size):
            sliced = [a.select(d, index) if d is not None else a
                      for a, d in zip(arguments, in_dims, strict=True)]
            results.append(op(*sliced))
        stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
        return stacked, (0,) * len(stacked)

    return rule


def _empty_like_lengths(x: Tensor, lengths: _Optional, *shape) -> Tensor:
    """Fake of an output that exists only with lengths (an empty stand-in without)."""
    return x.new_empty(shape) if lengths is not None else x.new_empty(0)


# ---- Elman RNN ---------------------------------------------------------------------------------

@torch.library.custom_op("rnnkit::fused_rnn", mutates_args=())
def fused_rnn(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
              b_hh: _Optional, lengths: _Optional, reverse: bool, relu: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> output (T, N, H), h_n (N, H), raw (T, N, H), h_prev (T, N, H)."""
    return fused.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu)


@torch.library.custom_op("rnnkit::fused_rnn_backward", mutates_args=())
def fused_rnn_backward(d_output: Tensor, d_h_n: Tensor, raw: Tensor, w_hh: Tensor,
                       lengths: _Optional, reverse: bool, relu: bool) -> tuple[Tensor, Tensor]:
    """-> d_pre (T, N, H), d_h0 (N, H)."""
    return fused.rnn_backward(d_output, d_h_n, raw, w_hh, lengths, reverse, relu)


@torch.library.custom_op("rnnkit::native_rnn", mutates_args=(), device_types="cpu")
def native_rnn(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
               b_hh: _Optional, lengths: _Optional, reverse: bool, relu: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> states (T + 1, N, H), output (T, N, H) or empty, h_n (N, H), raw (T, N, H)."""
    return native.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu)


@torch.library.custom_op("rnnkit::native_rnn_backward", mutates_args=(), device_types="cpu")
def native_rnn_backward(d_output: Tensor, d_h_n: Tensor, raw: Tensor, w_hh: Tensor,
                        lengths: _Optional, reverse: bool, relu: bool) -> tuple[Tensor, Tensor]:
    """-> d_pre (T, N, H), d_h0 (N, H)."""
    return native.rnn_backward(d_output, d_h_n, raw, w_hh, lengths, reverse, relu)


def _fake_fused_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu):
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    return tuple(x.new_empty(steps, batch, hidden) if i != 1 else x.new_empty(batch, hidden)
                 for i in range(4))


def _fake_native_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu):
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    return (x.new_empty(steps + 1, batch, hidden),
            _empty_like_lengths(x, lengths, steps, batch, hidden),
            x.new_empty(batch, hidden), x.new_empty(steps, batch, hidden))


def _fake_rnn_backward(d_output, d_h_n, raw, w_hh, lengths, reverse, relu):
    return torch.empty_like(raw), torch.empty_like(d_h_n)


def _rnn_setup(ctx, inputs, output, native_layout: bool):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu = inputs
    if native_layout:
        states, _, _, raw = output
        h_prev = _entering(states, reverse)
    else:
        _, _, raw, h_prev = output
        states = None
    # The operator's tensor inputs first (the differentiable backward re-runs them), then what
    # the hand-derived backward reads.
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, raw, h_prev, states, lengths)
    ctx.reverse, ctx.relu, ctx.has_bias = reverse, relu, b_ih is not None
    ctx.kind = CellKind("rnn", "relu" if relu else "tanh")


def _rnn_backward(ctx, grads, native_layout: bool):
    x, h0, w_ih, w_hh, b_ih, b_hh, raw, h_prev, states, lengths = ctx.saved_tensors
    if native_layout:
        d_states, d_own_output, d_h_n, _ = grads
        d_output = _native_output_grad(d_states, d_own_output, states, lengths, ctx.reverse)
    else:
        d_output, d_h_n, _, _ = grads
        d_output = _or_zeros(d_output, raw)
    d_h_n = _or_zeros(d_h_n, h_prev[0])
    if torch.is_grad_enabled():
        return (*_differentiable_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh), lengths,
                                          (d_output, d_h_n)), None, None, None)
    backward = native_rnn_backward if native_layout else fused_rnn_backward
    d_pre, d_h0 = _call(backward, d_output, d_h_n, raw, w_hh, lengths, ctx.reverse, ctx.relu)
    d_x, d_w_ih = input_side_grads(ctx, d_pre, x, w_ih, 0, 2)
    d_b = _summed_bias_grad(ctx.has_bias, d_pre)
    return d_x, d_h0, d_w_ih, outer_sum(d_pre, h_prev), d_b, d_b, None, None, None


# ---- LSTM --------------------------------------------------------------------------------------

@torch.library.custom_op("rnnkit::fused_lstm", mutates_args=())
def fused_lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
               b_hh: _Optional, w_hr: _Optional, w_ch: _Optional, lengths: _Optional,
               reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                       Tensor]:
    """-> output, h_n, c_n, gates (T, N, 4H), c_raw, c_prev (T, N, H), h_prev (T, N, P),
    m (T, N, H) with a projection, else empty."""
    return fused.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse)


@torch.library.custom_op("rnnkit::fused_lstm_backward", mutates_args=())
def fused_lstm_backward(d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, gates: Tensor,
                        c_raw: Tensor, c_prev: Tensor, m: Tensor, w_hh: Tensor,
                        w_hr: _Optional, w_ch: _Optional, lengths: _Optional, reverse: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> d_gates (T, N, 4H), d_h0 (N, P), d_c0 (N, H), d_w_hr (P, H) or empty."""
    return fused.lstm_backward(d_output, d_h_n, d_c_n, gates, c_raw, c_prev, m, w_hh, w_hr,
                               w_ch, lengths, reverse)


@torch.library.custom_op("rnnkit::native_lstm", mutates_args=(), device_types="cpu")
def native_lstm(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
                b_hh: _Optional, w_hr: _Optional, w_ch: _Optional, lengths: _Optional,
                reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h_states (T + 1, N, P), c_states (T + 1, N, H), output (T, N, P) or empty, h_n, c_n,
    gates (T, N, 4H), empty (each step's new cell is the state it leaves in c_states)."""
    return native.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse)


@torch.library.custom_op("rnnkit::native_lstm_backward", mutates_args=(), device_types="cpu")
def native_lstm_backward(d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, gates: Tensor,
                         c_states: Tensor, c_new: Tensor, w_hh: Tensor, w_hr: _Optional,
                         w_ch: _Optional, lengths: _Optional, reverse: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> d_gates (T, N, 4H), d_h0 (N, P), d_c0 (N, H), d_w_hr (P, H) or empty, d_bias (4H,)
    (d_gates summed over steps and rows)."""
    return native.lstm_backward(d_output, d_h_n, d_c_n, gates, c_states, c_new, w_hh, w_hr,
                                w_ch, lengths, reverse)


def _lstm_sizes(x, w_hh, w_hr):
    hidden = w_hh.shape[0] // 4
    return x.shape[0], x.shape[1], hidden, (w_hr.shape[0] if w_hr is not None else hidden)


def _fake_fused_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse):
    steps, batch, hidden, out = _lstm_sizes(x, w_hh, w_hr)
    new = x.new_empty
    return (new(steps, batch, out), new(batch, out), new(batch, hidden),
            new(steps, batch, 4 * hidden), new(steps, batch, hidden), new(steps, batch, hidden),
            new(steps, batch, out), new(steps, batch, hidden) if w_hr is not None else new(0))


def _fake_native_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse):
    steps, batch, hidden, out = _lstm_sizes(x, w_hh, w_hr)
    new = x.new_empty
    return (new(steps + 1, batch, out), new(steps + 1, batch, hidden),
            _empty_like_lengths(x, lengths, steps, batch, out), new(batch, out),
            new(batch, hidden), new(steps, batch, 4 * hidden), new(0))


def _fake_lstm_backward(d_output, d_h_n, d_c_n, gates, *rest):
    w_hr = rest[-4]
    return (torch.empty_like(gates), torch.empty_like(d_h_n), torch.empty_like(d_c_n),
            gates.new_empty(w_hr.shape) if w_hr is not None else gates.new_empty(0))


def _fake_native_lstm_backward(d_output, d_h_n, d_c_n, gates, *rest):
    return (*_fake_lstm_backward(d_output, d_h_n, d_c_n, gates, *rest),
            gates.new_empty(gates.shape[-1]))


def _lstm_setup(ctx, inputs, output, native_layout: bool):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, lengths, reverse = inputs
    if native_layout:
        h_states, c_states, _, _, _, gates, _ = output
        h_prev, c_prev, m = _entering(h_states, reverse), _entering(c_states, reverse), None
        c_raw = _leaving(c_states, reverse)  # each step's new cell (the kernel's docstring)
    else:
        _, _, _, gates, c_raw, c_prev, h_prev, m = output
        h_states = c_states = None
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, gates, c_raw, c_prev,
                          h_prev, m, h_states, c_states, lengths)
    ctx.reverse, ctx.has_bias, ctx.kind = reverse, b_ih is not None, CellKind("lstm")


def _lstm_backward(ctx, grads, native_layout: bool):
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch, gates, c_raw, c_prev, h_prev, m, h_states,
     c_states, lengths) = ctx.saved_tensors
    if native_layout:
        d_h_states, _, d_own_output, d_h_n, d_c_n = grads[:5]
        d_output = _native_output_grad(d_h_states, d_own_output, h_states, lengths,
                                       ctx.reverse)
    else:
        d_output, d_h_n, d_c_n = grads[:3]
        d_output = _or_zeros(d_output, h_prev)
    d_h_n, d_c_n = _or_zeros(d_h_n, h_prev[0]), _or_zeros(d_c_n, c_prev[0])
    if torch.is_grad_enabled():
        inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch)
        return (*_differentiable_backward(ctx, inputs, lengths, (d_output, d_h_n, d_c_n)),
                None, None)
    if native_layout:  # the kernel sums the bias gradient while it has the gate gradients
        d_gates, d_h0, d_c0, d_w_hr, d_gates_sum = _call(
            native_lstm_backward, d_output, d_h_n, d_c_n, gates, c_states, c_raw, w_hh, w_hr,
            w_ch, lengths, ctx.reverse)
        d_b = d_gates_sum if ctx.has_bias else None
    else:
        d_gates, d_h0, d_c0, d_w_hr = _call(
            fused_lstm_backward, d_output, d_h_n, d_c_n, gates, c_raw, c_prev, m, w_hh, w_hr,
            w_ch, lengths, ctx.reverse)
        d_b = _summed_bias_grad(ctx.has_bias, d_gates)
    d_x, d_w_ih = input_side_grads(ctx, d_gates, x, w_ih, 0, 3)
    d_w_ch = peephole_grad(d_gates, c_prev, c_raw) if w_ch is not None else None
    return (d_x, d_h0, d_c0, d_w_ih, outer_sum(d_gates, h_prev), d_b, d_b,
            d_w_hr if w_hr is not None else None, d_w_ch, None, None)


# ---- GRU ---------------------------------------------------------------------------------------

@torch.library.custom_op("rnnkit::fused_gru", mutates_args=())
def fused_gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
              b_hh: _Optional, lengths: _Optional, reverse: bool, reset_after: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> output (T, N, H), h_n (N, H), gates (T, N, 3H), h_prev, n_input (T, N, H)."""
    return fused.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after)


@torch.library.custom_op("rnnkit::fused_gru_backward", mutates_args=())
def fused_gru_backward(d_output: Tensor, d_h_n: Tensor, gates: Tensor, h_prev: Tensor,
                       n_input: Tensor, w_hh: Tensor, lengths: _Optional, reverse: bool,
                       reset_after: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> d_x_gates (T, N, 3H), d_hn (T, N, H) or empty, d_h0 (N, H)."""
    return fused.gru_backward(d_output, d_h_n, gates, h_prev, n_input, w_hh, lengths, reverse,
                              reset_after)


@torch.library.custom_op("rnnkit::native_gru", mutates_args=(), device_types="cpu")
def native_gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: _Optional,
               b_hh: _Optional, lengths: _Optional, reverse: bool, reset_after: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> states (T + 1, N, H), output (T, N, H) or empty, h_n (N, H), gates (T, N, 3H),
    n_input (T, N, H)."""
    return native.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after)


@torch.library.custom_op("rnnkit::native_gru_backward", mutates_args=(), device_types="cpu")
def native_gru_backward(d_output: Tensor, d_h_n: Tensor, gates: Tensor, states: Tensor,
                        n_input: Tensor, w_hh: Tensor, lengths: _Optional, reverse: bool,
                        reset_after: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> d_x_gates (T, N, 3H), d_hn (T, N, H) or empty, d_h0 (N, H)."""
    return native.gru_backward(d_output, d_h_n, gates, states, n_input, w_hh, lengths, reverse,
                               reset_after)


def _fake_fused_gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after):
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    new = x.new_empty
    return (new(steps, batch, hidden), new(batch, hidden), new(steps, batch, 3 * hidden),
            new(steps, batch, hidden), new(steps, batch, hidden))


def _fake_native_gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after):
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    new = x.new_empty
    return (new(steps + 1, batch, hidden), _empty_like_lengths(x, lengths, steps, batch, hidden),
            new(batch, hidden), new(steps, batch, 3 * hidden), new(steps, batch, hidden))


def _fake_gru_backward(d_output, d_h_n, gates, states, n_input, w_hh, lengths, reverse,
                       reset_after):
    d_hn = torch.empty_like(n_input) if reset_after else gates.new_empty(0)
    return torch.empty_like(gates), d_hn, torch.empty_like(d_h_n)


def _gru_setup(ctx, inputs, output, native_layout: bool):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after = inputs
    if native_layout:
        states, _, _, gates, n_input = output
        h_prev = _entering(states, reverse)
    else:
        _, _, gates, h_prev, n_input = output
        states = None
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, gates, h_prev, n_input, states,
                          lengths)
    ctx.reverse, ctx.reset_after, ctx.has_bias = reverse, reset_after, b_ih is not None
    ctx.kind = CellKind("gru", reset_after=reset_after)


def _gru_backward(ctx, grads, native_layout: bool):
    x, h0, w_ih, w_hh, b_ih, b_hh, gates, h_prev, n_input, states, lengths = ctx.saved_tensors
    if native_layout:
        d_states, d_own_output, d_h_n = grads[:3]
        d_output = _native_output_grad(d_states, d_own_output, states, lengths, ctx.reverse)
    else:
        d_output, d_h_n = grads[:2]
        d_output = _or_zeros(d_output, h_prev)
    d_h_n = _or_zeros(d_h_n, h_prev[0])
    if torch.is_grad_enabled():
        return (*_differentiable_backward(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh), lengths,
                                          (d_output, d_h_n)), None, None, None)
    backward = native_gru_backward if native_layout else fused_gru_backward
    saved_states = states if native_layout else h_prev
    d_x_gates, d_hn, d_h0 = _call(backward, d_output, d_h_n, gates, saved_states, n_input,
                                  w_hh, lengths, ctx.reverse, ctx.reset_after)
    hidden = h_prev.shape[2]
    d_x, d_w_ih = input_side_grads(ctx, d_x_gates, x, w_ih, 0, 2)
    d_rz = d_x_gates[:, :, : 2 * hidden]  # r and z: the same on both sides of the sums
    # n's recurrent side: r ⊙ dn multiplies W_hn h (reset after); dn multiplies W_hn (r ⊙ h).
    d_n_recurrent, n_recurrent_input = (
        (d_hn, h_prev) if ctx.reset_after else (d_x_gates[:, :, 2 * hidden :], n_input))
    d_w_hh = torch.cat([outer_sum(d_rz, h_prev), outer_sum(d_n_recurrent, n_recurrent_input)])
    d_b_ih = d_x_gates.sum((0, 1)) if ctx.has_bias else None
    d_b_hh = (torch.cat([d_rz.sum((0, 1)), d_n_recurrent.sum((0, 1))])
              if ctx.has_bias else None)
    return d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None, None, None


# ---- the recurrence operators: layer norm, recurrent dropout, zoneout -------------------------
# The layer's input side pre_x (LN(W_ih x) plus the biases outside the recurrence) is computed
# before, by ordinary autograd ops (`steps.input_side`); these operators run the rest, with the
# masks the layer drew (`rnnkit.engine.fused_recurrence` has the math and the buffers).

@torch.library.custom_op("rnnkit::fused_lstm_recurrence", mutates_args=())
def fused_lstm_recurrence(
    pre_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, gain_hh: _Optional, gain_c: _Optional,
    shift_c: _Optional, w_hr: _Optional, w_ch: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, zoneout_c: _Optional, lengths: _Optional, reverse: bool,
    gain_ih: _Optional = None, bias_ih: _Optional = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor]:
    """-> output, h_n, c_n, h_states, c_states, gates, c_new, normalised_hh, rstd_hh,
    normalised_c, rstd_c, mean_ih, rstd_ih (`fused_recurrence.lstm_forward`; with ``gain_ih``
    pre_x is the raw ``W_ih x``, normalised per row inside)."""
    return fused_recurrence.lstm_forward(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr,
                                         w_ch, recurrent_mask, zoneout_h, zoneout_c, lengths,
                                         reverse, gain_ih, bias_ih)


@torch.library.custom_op("rnnkit::native_lstm_recurrence", mutates_args=(), device_types="cpu")
def native_lstm_recurrence(
    pre_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, gain_hh: _Optional, gain_c: _Optional,
    shift_c: _Optional, w_hr: _Optional, w_ch: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, zoneout_c: _Optional, lengths: _Optional, reverse: bool,
    gain_ih: _Optional = None, bias_ih: _Optional = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor]:
    """The same in C++ (`native.lstm_recurrence_forward`)."""
    return native.lstm_recurrence_forward(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr,
                                          w_ch, recurrent_mask, zoneout_h, zoneout_c, lengths,
                                          reverse, gain_ih, bias_ih)


@torch.library.custom_op("rnnkit::fused_lstm_recurrence_backward", mutates_args=())
def fused_lstm_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, h_states: Tensor, c_states: Tensor,
    gates: Tensor, c_new: Tensor, normalised_hh: Tensor, rstd_hh: Tensor, normalised_c: Tensor,
    rstd_c: Tensor, w_hh: Tensor, gain_hh: _Optional, gain_c: _Optional, shift_c: _Optional,
    w_hr: _Optional, w_ch: _Optional, recurrent_mask: _Optional, zoneout_h: _Optional,
    zoneout_c: _Optional, lengths: _Optional, reverse: bool, pre_x: _Optional = None,
    mean_ih: _Optional = None, rstd_ih: _Optional = None, gain_ih: _Optional = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor]:
    """-> d_pre_x, d_product, d_h0, d_c0, d_w_hr, d_cell_norm, and with ``gain_ih`` (the input
    norm folded in) d_gain_ih, d_bias_ih, d_gain_hh, d_gain_c, d_shift_c, d_w_ch."""
    return fused_recurrence.lstm_backward(
        d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new, normalised_hh, rstd_hh,
        normalised_c, rstd_c, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, recurrent_mask,
        zoneout_h, zoneout_c, lengths, reverse, pre_x, mean_ih, rstd_ih, gain_ih)


@torch.library.custom_op("rnnkit::native_lstm_recurrence_backward", mutates_args=(),
                         device_types="cpu")
def native_lstm_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, h_states: Tensor, c_states: Tensor,
    gates: Tensor, c_new: Tensor, normalised_hh: Tensor, rstd_hh: Tensor, normalised_c: Tensor,
    rstd_c: Tensor, w_hh: Tensor, gain_hh: _Optional, gain_c: _Optional, shift_c: _Optional,
    w_hr: _Optional, w_ch: _Optional, recurrent_mask: _Optional, zoneout_h: _Optional,
    zoneout_c: _Optional, lengths: _Optional, reverse: bool, pre_x: _Optional = None,
    mean_ih: _Optional = None, rstd_ih: _Optional = None, gain_ih: _Optional = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor]:
    """The same in C++."""
    return native.lstm_recurrence_backward(
        d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new, normalised_hh, rstd_hh,
        normalised_c, rstd_c, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, recurrent_mask,
        zoneout_h, zoneout_c, lengths, reverse, pre_x, mean_ih, rstd_ih, gain_ih)


def _fake_lstm_recurrence(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch,
                          recurrent_mask, zoneout_h, zoneout_c, lengths, reverse, gain_ih=None,
                          bias_ih=None):
    steps, batch, hidden, out = pre_x.shape[0], pre_x.shape[1], c0.shape[1], h0.shape[1]
    new = pre_x.new_empty
    return (new(steps, batch, out), new(batch, out), new(batch, hidden),
            new(steps + 1, batch, out), new(steps + 1, batch, hidden),
            new(steps, batch, 4 * hidden), new(steps, batch, hidden),
            *_fake_norm(pre_x, gain_hh, steps, batch, 4 * hidden),
            *_fake_norm(pre_x, gain_c, steps, batch, hidden),
            *(_fake_norm(pre_x, gain_ih, steps, batch, 0)[1] for _ in range(2)))  # mean, rstd


def _fake_norm(like, gain, steps, batch, width):
    """normalised (T, N, K) and rstd (T, N) of a layer norm, or two empty stand-ins."""
    if gain is None:
        return like.new_empty(0), like.new_empty(0)
    return like.new_empty(steps, batch, width), like.new_empty(steps, batch)


def _fake_lstm_recurrence_backward(d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new,
                                   normalised_hh, rstd_hh, normalised_c, rstd_c, w_hh, gain_hh,
                                   gain_c, shift_c, w_hr, w_ch, recurrent_mask, zoneout_h,
                                   zoneout_c, lengths, reverse, pre_x=None, mean_ih=None,
                                   rstd_ih=None, gain_ih=None):
    hidden, folded = c_new.shape[2], gain_ih is not None

    def empty() -> Tensor:  # one each: outputs may not alias one another
        return gates.new_empty(0)

    def summed(wanted: bool, width: int) -> Tensor:
        return gates.new_empty(width) if folded and wanted else empty()

    return (torch.empty_like(gates),
            torch.empty_like(gates) if gain_hh is not None else empty(),
            torch.empty_like(d_h_n), torch.empty_like(d_c_n),
            gates.new_empty(w_hr.shape) if w_hr is not None else empty(),
            torch.empty_like(c_new) if gain_c is not None else empty(),
            summed(True, 4 * hidden), summed(True, 4 * hidden), summed(True, 4 * hidden),
            summed(gain_c is not None, hidden), summed(gain_c is not None, hidden),
            summed(w_ch is not None, 3 * hidden))


def _recurrence_weights(kind: CellKind, tensors: list[_Optional]):
    """(pre_x, state, weights, masks) for the reference loop from a recurrence operator's
    tensor inputs in argument order: the weights hold no W_ih (`steps.input_side`)."""
    if kind.family == Family.LSTM:  # lengths and reverse (None here) sit before gain_ih, bias_ih
        (pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask, zoneout_h,
         zoneout_c, _, _, gain_ih, bias_ih) = tensors
        weights = CellWeights(None, w_hh, bias_ih=bias_ih, weight_hr=w_hr, weight_ch=w_ch,
                              layer_norm_ih=gain_ih, layer_norm_hh=gain_hh,
                              layer_norm_c_weight=gain_c, layer_norm_c_bias=shift_c)
        return pre_x, (h0, c0), weights, Masks(mask, zoneout_h, zoneout_c)
    if kind.family == Family.GRU:
        pre_x, h0, w_hh, b_hh, gain_hh, mask, zoneout_h = tensors
        weights = CellWeights(None, w_hh, bias_hh=b_hh, layer_norm_hh=gain_hh)
        return pre_x, h0, weights, Masks(mask, zoneout_h)
    pre_x, h0, w_hh, gain_hh, mask, zoneout_h = tensors
    return pre_x, h0, CellWeights(None, w_hh, layer_norm_hh=gain_hh), Masks(mask, zoneout_h)


def _entering_masked(states: Tensor, reverse: bool, mask: _Optional) -> Tensor:
    """The states entering each step as the recurrent product sees them: ``m ⊙ h``."""
    entering = _entering(states, reverse)
    return entering if mask is None else entering * mask


def _summed(needed: bool, grad: Tensor, factor: _Optional = None) -> _Optional:
    """``Σ_{t,n} grad (⊙ factor)``, a gain's or a bias's gradient, when it is needed."""
    if not needed:
        return None
    if factor is None:
        return grad.sum((0, 1))
    grad, factor = grad.flatten(0, 1), factor.flatten(0, 1)  # (T·N, K)
    if torch.compiler.is_compiling() or not isinstance(grad.shape[0], int):
        return (grad * factor).sum(0)  # traced: one graph for any length
    rows = max(1, (1 << 16) // max(1, grad.shape[1]))  # 256 KB of float32 at a time
    if grad.shape[0] <= 4 * rows:  # in cache anyway: one product, one reduction
        return (grad * factor).sum(0)
    # Large: a chunk at a time, so the products stay in cache; a whole (T, N, K) product in
    # memory cost a layer-norm training step 5 % at (100, 32, 256).
    return sum((grad[start:start + rows] * factor[start:start + rows]).sum(0)
               for start in range(0, grad.shape[0], rows))


def _lstm_recurrence_setup(ctx, inputs, output, native_layout: bool):
    (pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask, zoneout_h, zoneout_c,
     lengths, reverse, gain_ih, bias_ih) = inputs
    ctx.save_for_backward(pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask,
                          zoneout_h, zoneout_c, lengths, gain_ih, bias_ih, *output[3:])
    ctx.reverse, ctx.kind = reverse, CellKind("lstm")
    ctx.reference_arguments = _recurrence_weights


def _lstm_recurrence_backward(ctx, grads, native_layout: bool):
    (pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask, zoneout_h, zoneout_c,
     lengths, gain_ih, bias_ih, h_states, c_states, gates, c_new, normalised_hh, rstd_hh,
     normalised_c, rstd_c, mean_ih, rstd_ih) = ctx.saved_tensors
    d_output, d_h_n, d_c_n = grads[:3]
    d_output = _or_zeros(d_output, _leaving(h_states, ctx.reverse))
    d_h_n, d_c_n = _or_zeros(d_h_n, h0), _or_zeros(d_c_n, c0)
    if torch.is_grad_enabled():
        inputs = (pre_x, h0, c0, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask, zoneout_h,
                  zoneout_c, None, None, gain_ih, bias_ih)  # in argument order
        return _differentiable_backward(ctx, inputs, lengths, (d_output, d_h_n, d_c_n))
    backward = (native_lstm_recurrence_backward if native_layout
                else fused_lstm_recurrence_backward)
    folded = gain_ih is not None
    (d_pre_x, d_product, d_h0, d_c0, d_w_hr, d_cell_norm, *sums) = _call(
        backward,
        d_output, d_h_n, d_c_n, h_states, c_states, gates, c_new, normalised_hh, rstd_hh,
        normalised_c, rstd_c, w_hh, gain_hh, gain_c, shift_c, w_hr, w_ch, mask, zoneout_h,
        zoneout_c, lengths, ctx.reverse, *((pre_x, mean_ih, rstd_ih, gain_ih) if folded else ()))
    needs = ctx.needs_input_grad
    d_v = d_product if gain_hh is not None else d_pre_x
    d_w_hh = outer_sum(d_v, _entering_masked(h_states, ctx.reverse, mask)) if needs[3] else None
    if folded:  # the kernel summed them (d_pre_x is then W_ih x's gradient, not dA's)
        d_gain_ih, d_bias_ih, d_gain_hh, d_gain_c, d_shift_c, d_w_ch = (
            s if s.numel() else None for s in sums)
        d_bias_ih = d_bias_ih if bias_ih is not None else None
        return (d_pre_x, d_h0, d_c0, d_w_hh, d_gain_hh, d_gain_c, d_shift_c,
                d_w_hr if w_hr is not None else None, d_w_ch, None, None, None, None, None,
                d_gain_ih, d_bias_ih)
    d_gain_hh = _summed(gain_hh is not None and needs[4], d_pre_x, normalised_hh)
    d_gain_c = _summed(gain_c is not None and needs[5], d_cell_norm, normalised_c)
    d_shift_c = _summed(gain_c is not None and needs[6], d_cell_norm)
    d_w_ch = (peephole_grad(d_pre_x, _entering(c_states, ctx.reverse), c_new)
              if w_ch is not None and needs[8] else None)
    d_bias_ih = _summed(bias_ih is not None and needs[15], d_pre_x)
    return (d_pre_x, d_h0, d_c0, d_w_hh, d_gain_hh, d_gain_c, d_shift_c,
            d_w_hr if w_hr is not None else None, d_w_ch, None, None, None, None, None, None,
            d_bias_ih)


@torch.library.custom_op("rnnkit::fused_gru_recurrence", mutates_args=())
def fused_gru_recurrence(
    pre_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: _Optional, gain_hh: _Optional,
    recurrent_mask: _Optional, zoneout_h: _Optional, lengths: _Optional, reverse: bool,
    reset_after: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> output, h_n, states, gates, n_input, normalised_hh, rstd_hh
    (`fused_recurrence.gru_forward`)."""
    return fused_recurrence.gru_forward(pre_x, h0, w_hh, b_hh, gain_hh, recurrent_mask,
                                        zoneout_h, lengths, reverse, reset_after)


@torch.library.custom_op("rnnkit::native_gru_recurrence", mutates_args=(), device_types="cpu")
def native_gru_recurrence(
    pre_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: _Optional, gain_hh: _Optional,
    recurrent_mask: _Optional, zoneout_h: _Optional, lengths: _Optional, reverse: bool,
    reset_after: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The same in C++ (`native.gru_recurrence_forward`)."""
    return native.gru_recurrence_forward(pre_x, h0, w_hh, b_hh, gain_hh, recurrent_mask,
                                         zoneout_h, lengths, reverse, reset_after)


@torch.library.custom_op("rnnkit::fused_gru_recurrence_backward", mutates_args=())
def fused_gru_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, states: Tensor, gates: Tensor, n_input: Tensor,
    normalised_hh: Tensor, rstd_hh: Tensor, w_hh: Tensor, gain_hh: _Optional,
    recurrent_mask: _Optional, zoneout_h: _Optional, lengths: _Optional, reverse: bool,
    reset_after: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> d_pre_x, d_hidden, d_product, d_h0."""
    return fused_recurrence.gru_backward(d_output, d_h_n, states, gates, n_input, normalised_hh,
                                         rstd_hh, w_hh, gain_hh, recurrent_mask, zoneout_h,
                                         lengths, reverse, reset_after)


@torch.library.custom_op("rnnkit::native_gru_recurrence_backward", mutates_args=(),
                         device_types="cpu")
def native_gru_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, states: Tensor, gates: Tensor, n_input: Tensor,
    normalised_hh: Tensor, rstd_hh: Tensor, w_hh: Tensor, gain_hh: _Optional,
    recurrent_mask: _Optional, zoneout_h: _Optional, lengths: _Optional, reverse: bool,
    reset_after: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same in C++."""
    return native.gru_recurrence_backward(d_output, d_h_n, states, gates, n_input,
                                          normalised_hh, rstd_hh, w_hh, gain_hh, recurrent_mask,
                                          zoneout_h, lengths, reverse, reset_after)


def _fake_gru_recurrence(pre_x, h0, w_hh, b_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                         reverse, reset_after):
    steps, batch, hidden = pre_x.shape[0], pre_x.shape[1], h0.shape[1]
    new = pre_x.new_empty
    return (new(steps, batch, hidden), new(batch, hidden), new(steps + 1, batch, hidden),
            new(steps, batch, 3 * hidden), new(steps, batch, hidden),
            *_fake_norm(pre_x, gain_hh, steps, batch, 3 * hidden))


def _fake_gru_recurrence_backward(d_output, d_h_n, states, gates, n_input, normalised_hh,
                                  rstd_hh, w_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                                  reverse, reset_after):
    return (torch.empty_like(gates),
            torch.empty_like(gates) if reset_after else gates.new_empty(0),
            torch.empty_like(gates) if gain_hh is not None else gates.new_empty(0),
            torch.empty_like(d_h_n))


def _gru_recurrence_setup(ctx, inputs, output, native_layout: bool):
    (pre_x, h0, w_hh, b_hh, gain_hh, mask, zoneout_h, lengths, reverse, reset_after) = inputs
    ctx.save_for_backward(pre_x, h0, w_hh, b_hh, gain_hh, mask, zoneout_h, lengths,
                          *output[2:])
    ctx.reverse, ctx.reset_after = reverse, reset_after
    ctx.kind = CellKind("gru", reset_after=reset_after)
    ctx.reference_arguments = _recurrence_weights


def _gru_recurrence_backward(ctx, grads, native_layout: bool):
    (pre_x, h0, w_hh, b_hh, gain_hh, mask, zoneout_h, lengths, states, gates, n_input,
     normalised_hh, rstd_hh) = ctx.saved_tensors
    d_output = _or_zeros(grads[0], _leaving(states, ctx.reverse))
    d_h_n = _or_zeros(grads[1], h0)
    if torch.is_grad_enabled():
        inputs = (pre_x, h0, w_hh, b_hh, gain_hh, mask, zoneout_h)
        return (*_differentiable_backward(ctx, inputs, lengths, (d_output, d_h_n)),
                None, None, None)
    backward = (native_gru_recurrence_backward if native_layout
                else fused_gru_recurrence_backward)
    d_pre_x, d_hidden, d_product, d_h0 = _call(
        backward,
        d_output, d_h_n, states, gates, n_input, normalised_hh, rstd_hh, w_hh, gain_hh, mask,
        zoneout_h, lengths, ctx.reverse, ctx.reset_after)
    needs = ctx.needs_input_grad
    entering = _entering_masked(states, ctx.reverse, mask)
    hidden = h0.shape[1]
    if ctx.reset_after:
        d_v = d_product if gain_hh is not None else d_hidden
        d_w_hh = outer_sum(d_v, entering) if needs[2] else None
    else:  # W_hn multiplies r ⊙ hm, which the forward kept as n_input
        d_w_hh = torch.cat([outer_sum(d_pre_x[:, :, : 2 * hidden], entering),
                            outer_sum(d_pre_x[:, :, 2 * hidden :], n_input)]) if needs[2] else None
    d_b_hh = _summed(b_hh is not None and needs[3], d_hidden)
    d_gain_hh = _summed(gain_hh is not None and needs[4], d_hidden, normalised_hh)
    return d_pre_x, d_h0, d_w_hh, d_b_hh, d_gain_hh, None, None, None, None, None


@torch.library.custom_op("rnnkit::fused_rnn_recurrence", mutates_args=())
def fused_rnn_recurrence(
    pre_x: Tensor, h0: Tensor, w_hh: Tensor, gain_hh: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, lengths: _Optional, reverse: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> output, h_n, states, raw, normalised_hh, rstd_hh (`fused_recurrence.rnn_forward`)."""
    return fused_recurrence.rnn_forward(pre_x, h0, w_hh, gain_hh, recurrent_mask, zoneout_h,
                                        lengths, reverse, relu)


@torch.library.custom_op("rnnkit::native_rnn_recurrence", mutates_args=(), device_types="cpu")
def native_rnn_recurrence(
    pre_x: Tensor, h0: Tensor, w_hh: Tensor, gain_hh: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, lengths: _Optional, reverse: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The same in C++ (`native.rnn_recurrence_forward`)."""
    return native.rnn_recurrence_forward(pre_x, h0, w_hh, gain_hh, recurrent_mask, zoneout_h,
                                         lengths, reverse, relu)


@torch.library.custom_op("rnnkit::fused_rnn_recurrence_backward", mutates_args=())
def fused_rnn_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, states: Tensor, raw: Tensor, normalised_hh: Tensor,
    rstd_hh: Tensor, w_hh: Tensor, gain_hh: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, lengths: _Optional, reverse: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> d_pre_x, d_product, d_h0."""
    return fused_recurrence.rnn_backward(d_output, d_h_n, states, raw, normalised_hh, rstd_hh,
                                         w_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                                         reverse, relu)


@torch.library.custom_op("rnnkit::native_rnn_recurrence_backward", mutates_args=(),
                         device_types="cpu")
def native_rnn_recurrence_backward(
    d_output: Tensor, d_h_n: Tensor, states: Tensor, raw: Tensor, normalised_hh: Tensor,
    rstd_hh: Tensor, w_hh: Tensor, gain_hh: _Optional, recurrent_mask: _Optional,
    zoneout_h: _Optional, lengths: _Optional, reverse: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same in C++."""
    return native.rnn_recurrence_backward(d_output, d_h_n, states, raw, normalised_hh, rstd_hh,
                                          w_hh, gain_hh, recurrent_mask, zoneout_h, lengths,
                                          reverse, relu)


def _fake_rnn_recurrence(pre_x, h0, w_hh, gain_hh, recurrent_mask, zoneout_h, lengths, reverse,
                         relu):
    steps, batch, hidden = pre_x.shape[0], pre_x.shape[1], h0.shape[1]
    new = pre_x.new_empty
    return (new(steps, batch, hidden), new(batch, hidden), new(steps + 1, batch, hidden),
            new(steps, batch, hidden), *_fake_norm(pre_x, gain_hh, steps, batch, hidden))


def _fake_rnn_recurrence_backward(d_output, d_h_n, states, raw, normalised_hh, rstd_hh, w_hh,
                                  gain_hh, *rest):
    return (torch.empty_like(raw),
            torch.empty_like(raw) if gain_hh is not None else raw.new_empty(0),
            torch.empty_like(d_h_n))


def _rnn_recurrence_setup(ctx, inputs, output, native_layout: bool):
    pre_x, h0, w_hh, gain_hh, mask, zoneout_h, lengths, reverse, relu = inputs
    ctx.save_for_backward(pre_x, h0, w_hh, gain_hh, mask, zoneout_h, lengths, *output[2:])
    ctx.reverse, ctx.relu = reverse, relu
    ctx.kind = CellKind("rnn", "relu" if relu else "tanh")
    ctx.reference_arguments = _recurrence_weights


def _rnn_recurrence_backward(ctx, grads, native_layout: bool):
    (pre_x, h0, w_hh, gain_hh, mask, zoneout_h, lengths, states, raw, normalised_hh,
     rstd_hh) = ctx.saved_tensors
    d_output = _or_zeros(grads[0], raw)
    d_h_n = _or_zeros(grads[1], h0)
    if torch.is_grad_enabled():
        inputs = (pre_x, h0, w_hh, gain_hh, mask, zoneout_h)
        return (*_differentiable_backward(ctx, inputs, lengths, (d_output, d_h_n)),
                None, None, None)
    backward = (native_rnn_recurrence_backward if native_layout
                else fused_rnn_recurrence_backward)
    d_pre_x, d_product, d_h0 = _call(backward, d_output, d_h_n, states, raw, normalised_hh,
                                     rstd_hh, w_hh, gain_hh, mask, zoneout_h, lengths,
                                     ctx.reverse, ctx.relu)
    needs = ctx.needs_input_grad
    d_v = d_product if gain_hh is not None else d_pre_x
    d_w_hh = outer_sum(d_v, _entering_masked(states, ctx.reverse, mask)) if needs[2] else None
    d_gain_hh = _summed(gain_hh is not None and needs[3], d_pre_x, normalised_hh)
    return d_pre_x, d_h0, d_w_hh, d_gain_hh, None, None, None, None, None


# ---- registering it all ------------------------------------------------------------------------

def _autograd(op, setup, backward, native_layout: bool) -> type[torch.autograd.Function]:
    """Register the formula on the operator, and return it as an autograd.Function too.

    The layers call the Function: torch.library's generated autograd wrapper is an old-style
    Function (``forward(ctx, ...)``) that torch.func transforms refuse; this one has
    ``setup_context``, and its vmap rule is generated through ``forward``, which calls the
    operator (whose own vmap rule then runs). Direct callers of ``torch.ops.rnnkit.*`` get the
    same formula through the registration.
    """

    def formula(ctx, *grads):
        return backward(ctx, grads, native_layout)

    def setup_context(ctx, inputs, output):
        # The intermediates are outputs that nothing downstream uses: materialising their
        # (absent) gradients would allocate zeros of every saved buffer, (T, N, 4H) included.
        ctx.set_materialize_grads(False)
        setup(ctx, inputs, output, native_layout)

    op.register_autograd(formula, setup_context=setup_context)
    name = _short_name(op)
    return type(f"rnnkit_{name}", (torch.autograd.Function,), {
        "__doc__": f"``{op._name}`` with its autograd formula, for torch.func as well.",
        "generate_vmap_rule": True,
        # Through torch.ops (not the closure's CustomOpDef), which dynamo knows how to trace;
        # in plain eager mode the implementation directly.
        "forward": staticmethod(lambda *arguments: _call_named(name, *arguments)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(formula),
    })



_FUNCTIONS: dict = {}  # forward operator -> its autograd.Function
for _op, _fake, _setup, _backward, _native in (
    (fused_rnn, _fake_fused_rnn, _rnn_setup, _rnn_backward, False),
    (native_rnn, _fake_native_rnn, _rnn_setup, _rnn_backward, True),
    (fused_lstm, _fake_fused_lstm, _lstm_setup, _lstm_backward, False),
    (native_lstm, _fake_native_lstm, _lstm_setup, _lstm_backward, True),
    (fused_gru, _fake_fused_gru, _gru_setup, _gru_backward, False),
    (native_gru, _fake_native_gru, _gru_setup, _gru_backward, True),
    (fused_lstm_recurrence, _fake_lstm_recurrence, _lstm_recurrence_setup,
     _lstm_recurrence_backward, False),
    (native_lstm_recurrence, _fake_lstm_recurrence, _lstm_recurrence_setup,
     _lstm_recurrence_backward, True),
    (fused_gru_recurrence, _fake_gru_recurrence, _gru_recurrence_setup,
     _gru_recurrence_backward, False),
    (native_gru_recurrence, _fake_gru_recurrence, _gru_recurrence_setup,
     _gru_recurrence_backward, True),
    (fused_rnn_recurrence, _fake_rnn_recurrence, _rnn_recurrence_setup,
     _rnn_recurrence_backward, False),
    (native_rnn_recurrence, _fake_rnn_recurrence, _rnn_recurrence_setup,
     _rnn_recurrence_backward, True),
):
    _register(_op, _fake, autocast=True)
    _FUNCTIONS[_op] = _autograd(_op, _setup, _backward, _native)
for _op, _fake in (
    (fused_rnn_backward, _fake_rnn_backward), (native_rnn_backward, _fake_rnn_backward),
    (fused_lstm_backward, _fake_lstm_backward),
    (native_lstm_backward, _fake_native_lstm_backward),
    (fused_gru_backward, _fake_gru_backward), (native_gru_backward, _fake_gru_backward),
    (fused_lstm_recurrence_backward, _fake_lstm_recurrence_backward),
    (native_lstm_recurrence_backward, _fake_lstm_recurrence_backward),
    (fused_gru_recurrence_backward, _fake_gru_recurrence_backward),
    (native_gru_recurrence_backward, _fake_gru_recurrence_backward),
    (fused_rnn_recurrence_backward, _fake_rnn_recurrence_backward),
    (native_rnn_recurrence_backward, _fake_rnn_recurrence_backward),
):
    _register(_op, _fake)


# ---- the engines' calling convention -----------------------------------------------------------

def _lengths(lengths: _Optional) -> _Optional:
    return None if lengths is None else lengths.to(torch.int64)


def run_fused(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
              lengths: _Optional, reverse: bool) -> tuple[Tensor, State]:
    """The fused operators; same contract as `rnnkit.engine.reference.run_direction`."""
    w, lengths = weights, _lengths(lengths)
    if kind.family == Family.LSTM:
        h0, c0 = state  # type: ignore[misc]
        arguments = (x, h0, c0, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, w.weight_hr,
                     w.weight_ch, lengths, reverse)
        eager = plain_eager(*arguments[:10])
        output, h_n, c_n, *_ = (fused.lstm_forward(*arguments) if eager
                                else _apply(fused_lstm, *arguments))
        return output, (h_n, c_n)
    switch = kind.reset_after if kind.family == Family.GRU else kind.nonlinearity == "relu"
    arguments = (x, state, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, lengths, reverse,
                 switch)
    implementation, op = ((fused.gru_forward, fused_gru) if kind.family == Family.GRU
                          else (fused.rnn_forward, fused_rnn))
    eager = plain_eager(*arguments[:7])
    output, h_n, *_ = implementation(*arguments) if eager else _apply(op, *arguments)
    return output, h_n


def run_native(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
               lengths: _Optional, reverse: bool) -> tuple[Tensor, State]:
    """The native operators (CPU, float32/float64, kernels built); same contract.

    In the eager shortcut the implementation returns the layer's outputs alone (the output a
    view of the states buffer): a streamed step pays for nothing else.
    """
    w, lengths = weights, _lengths(lengths)
    if kind.family == Family.LSTM:
        h0, c0 = state  # type: ignore[misc]
        arguments = (x, h0, c0, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, w.weight_hr,
                     w.weight_ch, lengths, reverse)
        if plain_eager(*arguments[:10]):
            output, h_n, c_n = native.lstm_forward(*arguments, layer_outputs_only=True)
            return output, (h_n, c_n)
        h_states, _, output, h_n, c_n, _, _ = _apply(native_lstm, *arguments)
        return _native_output(output, h_states, lengths, reverse), (h_n, c_n)
    switch = kind.reset_after if kind.family == Family.GRU else kind.nonlinearity == "relu"
    arguments = (x, state, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh, lengths, reverse,
                 switch)
    implementation, op = ((native.gru_forward, native_gru) if kind.family == Family.GRU
                          else (native.rnn_forward, native_rnn))
    if plain_eager(*arguments[:7]):
        return implementation(*arguments, layer_outputs_only=True)
    states, output, h_n, *_ = _apply(op, *arguments)
    return _native_output(output, states, lengths, reverse), h_n


def run_recurrence(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
                   lengths: _Optional, reverse: bool, masks: Masks | None,
                   native_kernels: bool) -> tuple[Tensor, State]:
    """Layer norm, recurrent dropout and zoneout: the input side by autograd ops
    (`steps.input_side`), the recurrence by the ``*_recurrence`` operators, native or fused;
    same contract as `rnnkit.engine.reference.run_direction`.

    The LSTM's operators take the input side's layer norm too (``gain_ih``, ``bias_ih``): its
    row moments while each row is in cache, and in the backward its gradient and the gain and
    bias sums, instead of separate passes over the ``(T, N, 4H)`` product."""
    lstm = kind.family == Family.LSTM
    # The LSTM's operators normalise the input product themselves (`steps.input_side`).
    pre_x, w = input_side(kind, x, weights, fold_layer_norm=lstm)
    masks, lengths = masks or Masks(), _lengths(lengths)
    if lstm:
        h0, c0 = state  # type: ignore[misc]
        arguments = (pre_x, h0, c0, w.weight_hh, w.layer_norm_hh, w.layer_norm_c_weight,
                     w.layer_norm_c_bias, w.weight_hr, w.weight_ch, masks.recurrent,
                     masks.zoneout_h, masks.zoneout_c, lengths, reverse, w.layer_norm_ih,
                     w.bias_ih)
        implementation, op = ((native.lstm_recurrence_forward, native_lstm_recurrence)
                              if native_kernels else
                              (fused_recurrence.lstm_forward, fused_lstm_recurrence))
        eager = plain_eager(*arguments[:13], *arguments[14:])
        output, h_n, c_n, *_ = implementation(*arguments) if eager else _apply(op, *arguments)
        return output, (h_n, c_n)
    if kind.family == Family.GRU:
        arguments = (pre_x, state, w.weight_hh, w.bias_hh, w.layer_norm_hh, masks.recurrent,
                     masks.zoneout_h, lengths, reverse, kind.reset_after)
        implementation, op = ((native.gru_recurrence_forward, native_gru_recurrence)
                              if native_kernels else
                              (fused_recurrence.gru_forward, fused_gru_recurrence))
    else:
        arguments = (pre_x, state, w.weight_hh, w.layer_norm_hh, masks.recurrent,
                     masks.zoneout_h, lengths, reverse, kind.nonlinearity == "relu")
        implementation, op = ((native.rnn_recurrence_forward, native_rnn_recurrence)
                              if native_kernels else
                              (fused_recurrence.rnn_forward, fused_rnn_recurrence))
    eager = plain_eager(*arguments[:-3])
    output, h_n, *_ = implementation(*arguments) if eager else _apply(op, *arguments)
    return output, h_n


def _native_output(output: Tensor, states: Tensor, lengths: _Optional, reverse: bool) -> Tensor:
    return output if lengths is not None else _leaving(states, reverse)


# ---- sLSTM (Beck et al. 2024) ------------------------------------------------------------------
# The math and the fused buffers' layouts are in `rnnkit.engine.slstm`; the native kernels keep
# (T, N, 4H) rows head-major and (T + 1, N, H) states (`kernels.cpp`, "sLSTM"). The weight
# gradients, one product each over all steps, are taken here for both (`slstm.weight_gradients`,
# which reads the native buffers as strided (T, K, N, ...) views), as for the families above.

@torch.library.custom_op("rnnkit::fused_slstm", mutates_args=())
def fused_slstm(x: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor, w_ih: Tensor,
                w_hh: Tensor, b_ih: _Optional, lengths: _Optional, reverse: bool,
                exp_forget: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                           Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                           Tensor]:
    """-> output (T, N, H), h_n, c_n, n_n, m_n (N, H), pre, gates (T, K, N, 4d), h_tilde,
    n_new (T, K, N, d), h, c, n, m states (T + 1, K, N, d) (`slstm.fused_forward`)."""
    return slstm.fused_forward(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse,
                               exp_forget)


@torch.library.custom_op("rnnkit::fused_slstm_backward", mutates_args=())
def fused_slstm_backward(d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, d_n_n: Tensor,
                         d_m_n: Tensor, pre: Tensor, gates: Tensor, h_tilde: Tensor,
                         n_new: Tensor, c_states: Tensor, n_states: Tensor, m_states: Tensor,
                         w_hh: Tensor, lengths: _Optional, reverse: bool, exp_forget: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> d_pre (T, K, N, 4d), d_h0, d_c0, d_n0, d_m0 (N, H) (`slstm.fused_backward`)."""
    return slstm.fused_backward(d_output, d_h_n, d_c_n, d_n_n, d_m_n, pre, gates, h_tilde,
                                n_new, c_states, n_states, m_states, w_hh, lengths, reverse,
                                exp_forget)


def _fake_fused_slstm(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse, exp_forget):
    steps, batch = x.shape[0], x.shape[1]
    heads, rows, width = w_hh.shape
    new = x.new_empty
    return (new(steps, batch, heads * width), *(new(batch, heads * width) for _ in range(4)),
            new(steps, heads, batch, rows), new(steps, heads, batch, rows),
            new(steps, heads, batch, width), new(steps, heads, batch, width),
            *(new(steps + 1, heads, batch, width) for _ in range(4)))


def _fake_slstm_backward(d_output, d_h_n, d_c_n, d_n_n, d_m_n, pre, *rest):
    return (torch.empty_like(pre), *(torch.empty_like(d_h_n) for _ in range(4)))


@torch.library.custom_op("rnnkit::native_slstm", mutates_args=(), device_types="cpu")
def native_slstm(x: Tensor, h0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor, w_ih: Tensor,
                 w_hh: Tensor, b_ih: _Optional, lengths: _Optional, reverse: bool,
                 exp_forget: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                            Tensor, Tensor, Tensor, Tensor]:
    """-> h_states (T + 1, N, H), output (T, N, H) or empty, h_n, c_n, n_n, m_n (N, H), pre
    (T, N, 4H) rows head-major (ĩ|f̃|z|o), c, n, m states (T + 1, N, H)
    (`native.slstm_forward`)."""
    return native.slstm_forward(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse,
                                exp_forget)


@torch.library.custom_op("rnnkit::native_slstm_backward", mutates_args=(), device_types="cpu")
def native_slstm_backward(d_output: Tensor, d_h_n: Tensor, d_c_n: Tensor, d_n_n: Tensor,
                          d_m_n: Tensor, pre: Tensor, c_states: Tensor, n_states: Tensor,
                          m_states: Tensor, w_hh: Tensor, lengths: _Optional,
                          reverse: bool, exp_forget: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> d_pre (T, N, 4H) rows head-major, d_h0, d_c0, d_n0, d_m0 (N, H)
    (`native.slstm_backward`)."""
    return native.slstm_backward(d_output, d_h_n, d_c_n, d_n_n, d_m_n, pre, c_states, n_states,
                                 m_states, w_hh, lengths, reverse, exp_forget)


def _fake_native_slstm(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse, exp_forget):
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[0] * w_hh.shape[2]
    new = x.new_empty
    return (new(steps + 1, batch, hidden), _empty_like_lengths(x, lengths, steps, batch, hidden),
            *(new(batch, hidden) for _ in range(4)), new(steps, batch, 4 * hidden),
            *(new(steps + 1, batch, hidden) for _ in range(3)))


def _slstm_setup(ctx, inputs, output, native_layout: bool):
    x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, reverse, exp_forget = inputs
    if native_layout:  # rows head-major (T, N, 4H), states (T + 1, N, H)
        (h_states, _, _, _, _, _, pre, c_states, n_states, m_states) = output
        # The native backward reads c_t and n_t from the states, and recomputes i' and f'.
        gates = h_tilde = n_new = None
    else:  # head-major buffers (T, K, N, ...)
        (_, _, _, _, _, pre, gates, h_tilde, n_new, h_states, c_states, n_states,
         m_states) = output
    ctx.save_for_backward(x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, pre, gates, h_tilde,
                          n_new, h_states, c_states, n_states, m_states)
    ctx.reverse, ctx.exp_forget = reverse, exp_forget


def _slstm_backward(ctx, grads, native_layout: bool):
    (x, h0, c0, n0, m0, w_ih, w_hh, b_ih, lengths, pre, gates, h_tilde, n_new, h_states,
     c_states, n_states, m_states) = ctx.saved_tensors
    if native_layout:
        d_output = _native_output_grad(grads[0], grads[1], h_states, lengths, ctx.reverse)
        d_finals = tuple(_or_zeros(g, h0) for g in grads[2:6])
    else:
        d_output = _or_zeros(grads[0], x.new_empty(x.shape[0], x.shape[1], h0.shape[1]))
        d_finals = tuple(_or_zeros(g, h0) for g in grads[1:5])
    if torch.is_grad_enabled():
        # Recorded (double backward, torch.func): the reference loop's vector-Jacobian product,
        # itself differentiable, as `_differentiable_backward` does for the other families.
        order = (x, h0, c0, n0, m0, w_ih, w_hh, b_ih)
        wanted = [k for k, (t, need) in enumerate(zip(order, ctx.needs_input_grad,
                                                      strict=False))
                  if t is not None and need]

        def outputs_of(*chosen):
            tensors = list(order)
            for index, tensor in zip(wanted, chosen, strict=True):
                tensors[index] = tensor
            output, final = slstm.run_reference(
                tensors[0], tuple(tensors[1:5]), tensors[5], tensors[6], tensors[7], lengths,
                ctx.reverse, ctx.exp_forget)
            return (output, *final)

        _, vjp = torch.func.vjp(outputs_of, *(order[k] for k in wanted))
        found = dict(zip(wanted, vjp((d_output, *d_finals)), strict=True))
        return (*(found.get(k) for k in range(len(order))), None, None, None)
    h_entering = slstm.entering(h_states, ctx.reverse)
    if native_layout:
        d_pre, d_h0, d_c0, d_n0, d_m0 = _call(
            native_slstm_backward,
            d_output, *d_finals, pre, c_states, n_states, m_states, w_hh, lengths, ctx.reverse,
            ctx.exp_forget)
        # (T, N, K 4d) and (T, N, K d) seen as (T, K, N, ...): views, no copies; the products
        # below read them as they lie.
        heads, rows, width = w_hh.shape
        d_pre = d_pre.unflatten(2, (heads, rows)).transpose(1, 2)
        h_entering = h_entering.unflatten(2, (heads, width)).transpose(1, 2)
    else:
        d_pre, d_h0, d_c0, d_n0, d_m0 = _call(
            fused_slstm_backward,
            d_output, *d_finals, pre, gates, h_tilde, n_new, c_states, n_states, m_states,
            w_hh, lengths, ctx.reverse, ctx.exp_forget)
    needs = ctx.needs_input_grad
    wanted = (needs[0], needs[5], needs[6], b_ih is not None and needs[7])

    def weight_gradients():
        return slstm.weight_gradients(d_pre, x, h_entering, w_ih, wanted)

    # The native kernel's gate gradients decay through the subnormal range in long sequences
    # (issue 20); in eager mode their products then run flushed as the kernel did (a C call a
    # tracer cannot follow: traced, they run as written). The fused path is portable PyTorch
    # and runs in the caller's mode.
    flushed = native_layout and plain_eager(d_pre, x, h_entering, w_ih)
    d_x, d_w_ih, d_w_hh, d_b = (native.with_subnormals_flushed(weight_gradients) if flushed
                                else weight_gradients())
    return d_x, d_h0, d_c0, d_n0, d_m0, d_w_ih, d_w_hh, d_b, None, None, None


for _op, _fake, _native in ((fused_slstm, _fake_fused_slstm, False),
                           (native_slstm, _fake_native_slstm, True)):
    _register(_op, _fake, autocast=True)
    _FUNCTIONS[_op] = _autograd(_op, _slstm_setup, _slstm_backward, _native)
_register(fused_slstm_backward, _fake_slstm_backward)
_register(native_slstm_backward, _fake_slstm_backward)


def run_fused_slstm(x: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor], w_ih: Tensor,
                    w_hh: Tensor, b_ih: _Optional, lengths: _Optional, reverse: bool,
                    exp_forget: bool) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``rnnkit::fused_slstm``; same contract as `rnnkit.engine.slstm.run_reference`."""
    arguments = (x, *state, w_ih, w_hh, b_ih, _lengths(lengths), reverse, exp_forget)
    if plain_eager(*arguments[:8]):
        results = slstm.fused_forward(*arguments)
    else:
        results = _apply(fused_slstm, *arguments)
    return results[0], tuple(results[1:5])


def run_native_slstm(x: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor], w_ih: Tensor,
                     w_hh: Tensor, b_ih: _Optional, lengths: _Optional, reverse: bool,
                     exp_forget: bool) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``rnnkit::native_slstm`` (CPU, float32/float64, kernels built); same contract as
    `rnnkit.engine.slstm.run_reference`. In the eager shortcut the kernel stores no gates and
    returns the layer's outputs alone."""
    lengths = _lengths(lengths)
    arguments = (x, *state, w_ih, w_hh, b_ih, lengths, reverse, exp_forget)
    if plain_eager(*arguments[:8]):
        return native.slstm_forward(*arguments, layer_outputs_only=True)
    results = _apply(native_slstm, *arguments)
    return _native_output(results[1], results[0], lengths, reverse), tuple(results[2:6])


__all__ = ["run_fused", "run_fused_slstm", "run_native", "run_native_slstm", "run_recurrence"]
