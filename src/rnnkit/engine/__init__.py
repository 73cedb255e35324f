"""How a layer runs: the one seam between sequence layers and the engines that execute them.

Layers call `run_direction` for each layer and direction of a stack, naming a backend:

- ``"reference"``: the readable per-step loop on autograd (`reference.py`); the spec every other
  backend is tested against.
- ``"fused"``: the ``rnnkit::fused_*`` operators (`ops.py`, math in `fused.py`; layer norm,
  recurrent dropout and zoneout in `fused_recurrence.py`): a hand-derived backward, pure
  PyTorch, any device and floating dtype, every variant.
- ``"native"``: the ``rnnkit::native_*`` operators: the same derivation with the time loops in
  C++ (`native/`), compiled at first use and cached; CPU tensors of float32 or float64.
- ``"auto"`` (default): the fastest correct backend for the input.

`engine_for` is the whole policy, in one place (with `runs_torch_lstm`, its one exception): an
empty input runs ``"reference"`` (nothing to compute; autograd gives torch.nn's shapes and zero
gradients); ``"auto"`` runs ``"native"`` where it can (CPU, float32/float64 -- or a lower
precision under ``torch.autocast``, where the operators compute in float32 --, kernels built:
it is the fastest there, see docs/benchmarks.md) and ``"fused"`` elsewhere; an explicit
``"native"`` that cannot run the input runs ``"fused"`` after one warning saying why (a failed
build has already warned); so does ``"reference"`` under ``torch.jit.trace``, which would
freeze its Python loop to one length.

The exception: ``"auto"`` runs a plain LSTM direction (no peephole, projection, layer norm or
masks; no lengths) on torch's own kernel (``torch.lstm``, oneDNN's fused LSTM on the CPU) when
nothing is to be differentiated, the input is float32 on the CPU, the batch has at least
`TORCH_LSTM_MIN_BATCH` sequences, and the hidden size is at least `TORCH_LSTM_MIN_HIDDEN` or
the batch holds at least `TORCH_LSTM_MIN_STATE_VALUES` state values (batch x hidden):
measured faster there than the native loop (docs/benchmarks.md, issue 19), while the native
loop is faster for smaller batches and at smaller sizes. On CPUs of the kernels' "other"
profile (not Intel's; measured on an AMD EPYC) also from smaller batches where a thread's share
of W_hh outgrows a core's L2 (`OTHER_CPU_TORCH_LSTM_MIN_BATCH`). On those CPUs, training too
(forward and backward on torch's kernel and its autograd) when the input's gradient is asked
for, from `OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH` sequences of at least
`OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS` steps with a hidden size of at least
`OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN` (not under a torch.func transform or a dispatch mode).
Not while compiling, tracing, exporting or under autocast, where the operators' own rules hold.

A streamed step (a cell's call, a layer's `rnnkit.stream.LayerStream` step, a one-step
sequence) with nothing to differentiate, at most `STEP_KERNEL_MAX_BATCH` rows and no layer norm
or masks, runs under "auto" and "native" on the native step kernels (`inference_step`): both
products and the gate math of a layer in one call. The sLSTM's streamed step (`SLSTMCell`, a
one-step `SLSTM` call, `SLSTM.stream`) runs on its own step kernel under the same conditions
(`slstm_inference_step`), up to `SLSTM_STEP_KERNEL_MAX_BATCH` rows; so do minGRU's and minLSTM's
(`MinGRUCell`, `MinLSTMCell`, a one-step `MinGRU`/`MinLSTM` call, their `stream`) on theirs
(`min_inference_step`), up to `MIN_STEP_KERNEL_MAX_BATCH` rows.

The environment variable ``RNNKIT_BACKEND`` forces one backend for every layer (for testing and
benchmarking without touching code).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rnnkit._checks import require_choice
from rnnkit.engine import native, onnx, ops, reference, slstm
from rnnkit.engine.native import functions as native_functions
from rnnkit.engine.onnx import is_exporting
from rnnkit.engine.steps import CellKind, CellWeights, Family, Masks, State, output_of

BACKENDS = ("auto", "native", "fused", "reference")
ENVIRONMENT_VARIABLE = "RNNKIT_BACKEND"
StepKernel = Callable[[Tensor, Any], Any]
"""A native step kernel with one layer's weights bound: ``run(x, state)`` -> the new state
(`step_kernel`, `slstm_step_kernel`, `min_step_kernel`)."""
_RUNNERS = {"native": ops.run_native, "fused": ops.run_fused,
            "reference": reference.run_direction}
_warned: set[str] = set()

TORCH_LSTM_MIN_BATCH = 24
"""From this batch on, plain LSTM inference under "auto" runs torch's kernel (`runs_torch_lstm`).
Since the native forward streams weights larger than a core's cache from its resident loop
(issue 19's eighth part, docs/benchmarks.md), the native loop took, against torch's kernel
through the layer (Intel Xeon VM, 2 threads, T = 50 and 100, one process, interleaved): at
H = 256 0.79-0.89x at batch 4-8, 0.92-0.94x at 16, 0.99-1.0x at 24-32, 1.01x at 64; at H = 512
0.56-0.80x at batch 4-8, 0.89-0.91x at 16, 1.00-1.02x at 24-32, 1.07x at 64; H = 768 0.97x at
batch 8, 1.16x at 24. (Before that change the native loop re-read a weight over 1 MiB through
ATen's mm at every step, and torch's kernel took 0.8-0.95x its time from batch 4.) At batch 1
the native loop takes 0.5-0.9x torch's."""

TORCH_LSTM_MIN_HIDDEN = 256
"""And from this hidden size on: since the LSTM's loops run on resident weights, the native
loop's inference took 0.94x torch's kernel's time at (T, N, H) = (100, 32, 64) and 0.86x at
(100, 16, 128), but 1.09-1.19x at H = 256 and 512 (Intel Xeon VM, 2 threads; sizes between 128
and 256 were not measured). Rechecked after the loop's prefetch and even tiles (issue 19's
fourth part): 0.99-1.00x at H = 64 and 128, 1.05-1.19x at H = 256 and 512."""

TORCH_LSTM_MIN_STATE_VALUES = 6144
"""And below `TORCH_LSTM_MIN_HIDDEN`, from this many state values (batch x hidden) on: the
native loop's inference against torch's kernel at T = 100 (Intel Xeon VM, 2 threads, each size
in a fresh process, issue 19's sixth part): H = 128 0.91x at batch 16, 0.94x at 32, 1.08x at
64, 1.19x at 128; H = 192 0.95x at 16, 1.13x at 32 (6144 values), 1.28x at 64; H = 64 1.00x at
64 and 128."""

OTHER_CPU_TORCH_LSTM_MIN_BATCH = 8
"""On CPUs of the kernels' "other" profile (`native.cpu_profile()`: every maker but Intel;
measured on the AMD EPYC VM, 512 KiB of L2 a core), plain LSTM inference runs torch's kernel
also from this batch where a thread's share of W_hh (4 H^2 values over the threads) is at least
a core's L2, and from `OTHER_CPU_TORCH_LSTM_MIN_BATCH_BEYOND_L2` where it is more than one L2
and at most `OTHER_CPU_TORCH_LSTM_MAX_SHARES`. There the native loop took, against torch.nn
(2 threads, T = 50 and 100, docs/benchmarks.md, issue 19's ninth part): at H = 256 (one L2)
0.75-0.93x at batch 4, 0.94-1.03x at 8, 1.07-1.17x at 16; at H = 320-640 (2-6 L2) 1.0-1.19x
at batch 4 and 1.05-1.4x at 8-16; at H = 768 (9 L2) 0.66-0.73x at batch 4, 0.88-1.10x at 8,
1.03-1.05x at 16; at H = 1024 0.55-0.58x at batch 4. The Intel Xeon VM's native loop was
faster than torch's kernel at all of these (`TORCH_LSTM_MIN_BATCH`)."""

OTHER_CPU_TORCH_LSTM_MIN_BATCH_BEYOND_L2 = 4
"""See `OTHER_CPU_TORCH_LSTM_MIN_BATCH`."""

OTHER_CPU_TORCH_LSTM_MAX_SHARES = 8
"""See `OTHER_CPU_TORCH_LSTM_MIN_BATCH`: beyond this many L2s a thread, batches below it stay on
the native loop."""


OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH = 16
"""On CPUs of the "other" profile, plain LSTM *training* with the input's gradient asked for
(every layer of a stack past the first, or an input that requires it) runs torch's kernel
(oneDNN's fused LSTM, forward and backward) from this batch on, with a hidden size of at least
`OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN`. The native loops' training step (T = 50) against
torch.nn's on the AMD EPYC VM (2 threads, one process, interleaved, 7-11 rounds;
docs/benchmarks.md, issue 19's tenth part), with the input's gradient: 0.98-1.19x at batch 16,
1.07-1.12x at 24, 1.01-1.28x at 32-256 (H = 256-1024); 0.89-1.08x at batch 8; 1.02-1.06x at
H = 128. Without the input's gradient, which torch's kernel computes anyway and the native
backward skips, the native loops took 0.78-1.12x at H = 256-512 and 0.93-1.24x at H = 768-1024
(1.00x against torch's kernel through the layer at (64, 768) and (256, 768)), so they stay."""

OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN = 256
"""See `OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH`."""

OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS = 50
"""And only for sequences of at least this many steps, the length where torch's kernel was
measured faster (`OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH`). Shorter ones stay native: at T = 10-30
(batch 16-64, H = 256-1024) torch's kernel through the layer took 0.84-1.21x torch.nn and the
native loops 0.79-1.24x, neither ahead; at T = 1 and 4 (a cell's step while training, the
gradient-flow diagnostic's per-step loop) torch's kernel took 1.35-1.59x the native loops', and
an LSTMCell loop 1.4-3.0x (AMD EPYC VM, 1-2 threads)."""


def _torch_lstm_trains_faster(steps: int, batch: int, hidden: int, input_grad: bool) -> bool:
    """Whether torch's kernel was measured faster than the native loops for float32 training
    (forward and backward; ``input_grad``: the input's gradient asked for too) of a plain LSTM
    of this length, batch and hidden size, here."""
    return (input_grad and native.cpu_profile() == "other"
            and steps >= OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS
            and batch >= OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH
            and hidden >= OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN)


def _torch_lstm_is_faster(batch: int, hidden: int) -> bool:
    """Whether torch's kernel was measured faster than the native loop for float32 inference of
    a plain LSTM of this batch and hidden size, here (module docstring)."""
    if batch >= TORCH_LSTM_MIN_BATCH and (hidden >= TORCH_LSTM_MIN_HIDDEN
                                          or batch * hidden >= TORCH_LSTM_MIN_STATE_VALUES):
        return True
    if batch < OTHER_CPU_TORCH_LSTM_MIN_BATCH_BEYOND_L2 or native.cpu_profile() != "other":
        return False
    shares = 4 * hidden * hidden * 4 / (torch.get_num_threads() * native.l2_cache_bytes())
    return ((batch >= OTHER_CPU_TORCH_LSTM_MIN_BATCH and shares >= 1)
            or 1 < shares <= OTHER_CPU_TORCH_LSTM_MAX_SHARES)


STEP_KERNEL_MAX_BATCH = 4
"""Up to this batch, a step without gradients runs on the step kernels (`inference_step`): on
the Intel Xeon VM (1 thread, H = 64 and 256) they took 0.34-0.84x the time of the sequence path
(input projection, then the recurrent kernel) up to batch 4, but 1.07x at batch 8 (H = 256) and
up to 2.3x at 128, where their dot tiles re-read the weights for every 3 rows while ATen's mm
blocks them (benchmarks/streamed_step_parts.py and docs/benchmarks.md, issue 19)."""


SLSTM_STEP_KERNEL_MAX_BATCH = 16
"""Up to this batch, an sLSTM step without gradients runs on its step kernel
(`slstm_inference_step`): at H = 256 (Intel Xeon VM, core 1 of 2, one thread, machine busy) the
kernel took 0.43-0.53x the time of the native sequence path on one step (`run_native_slstm`,
T = 1) at batch 1-4 and 0.79x / 0.90x at 8 / 16 with one head (0.16-0.56x with four), but 1.36x
at 32 with one head (0.85x with four), where its dot tiles re-read the weights every 6 rows while
the sequence path's products block them (docs/benchmarks.md, "sLSTM: the streamed step")."""


MIN_STEP_KERNEL_MAX_BATCH = 8
"""Up to this batch, a minGRU or minLSTM step without gradients runs on its step kernel
(`min_inference_step`). At I = H = 256 (Intel Xeon VM, core 1 of 2, one thread, the core
shared: ratios move by 10-30 % between runs) the kernel alone took 0.23-0.42x the time of the
native sequence path on one step (`scan.run_native`, T = 1: ATen's product, then the loop) at
batch 1 and 0.51-0.81x at 4; from 6 rows on the two are level within the noise (0.80-1.31x at
6-12 rows), and the kernel took 0.94-1.39x at 16 and 1.14-1.59x at 24-64: its dot tiles re-read
the weights every 3 rows while ATen's product blocks them (docs/benchmarks.md, "minGRU and
minLSTM: the streamed step")."""


class BackendWarning(UserWarning):
    """An explicitly requested backend cannot run an input; another one runs it."""


def resolve_backend(requested: str) -> str:
    """The backend asked for: ``RNNKIT_BACKEND`` if set, else ``requested``.

    "auto" stays "auto" here: what it runs depends on the input (see `engine_for`).
    """
    forced = os.environ.get(ENVIRONMENT_VARIABLE)
    if forced:
        requested = require_choice(f"environment variable {ENVIRONMENT_VARIABLE}", forced, BACKENDS)
    return requested


def engine_for(backend: str, x: Tensor) -> str:
    """The engine that runs ``x`` for a requested backend: the auto policy, stated once."""
    requested = resolve_backend(backend)
    if x.numel() == 0:
        return "reference"
    if requested == "reference" and torch.jit.is_tracing():
        # torch.jit.trace would unroll the reference's Python loop to the example's length
        # and replay that length for every input: a silently wrong module. The fused
        # operator is the same math, recorded as one node.
        _warn_once("backend='reference' is a Python loop over steps, which torch.jit.trace "
                   "would freeze to the example's length; tracing backend='fused' instead")
        return "fused"
    if requested in ("reference", "fused"):
        return requested
    why_not = native.why_not(x)
    if why_not is None:
        return "native"
    if requested == "native" and why_not != native.NOT_BUILT:
        _warn_once(f"backend='native' cannot run this input ({why_not}); running "
                   f"backend='fused' instead, which gives the same results")
    return "fused"


def _onnx_capture() -> bool:
    """Whether torch.onnx.export (dynamo) is capturing the model (`onnx.is_capturing`)."""
    return onnx.is_capturing()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"rnnkit: {message}", BackendWarning, stacklevel=5)


def run_direction(
    kind: CellKind,
    x: Tensor,
    state: State,
    weights: CellWeights,
    lengths: Tensor | None,
    reverse: bool,
    backend: str = "auto",
    masks: Masks | None = None,
) -> tuple[Tensor, State]:
    """Run one layer in one direction; the contract is `reference.run_direction`'s.

    Layer norm, recurrent dropout and zoneout (``weights.layer_norm``, ``masks``) run on the
    ``*_recurrence`` operators (`ops.run_recurrence`): native or fused by the same policy as
    the plain layers, the reference loop when asked for. Weight drop needs nothing here: the
    layer hands the engine the dropped ``W_hh``, so every backend runs it.
    """
    if weights.layer_norm or masks is not None:
        return _run_variant(kind, x, state, weights, lengths, reverse, backend, masks)
    if is_exporting():  # ONNX: the exporters' own translation (see engine/onnx.py)
        return onnx.run_direction(kind, x, state, weights, lengths, reverse)
    if x.shape[0] == 1 and lengths is None and x.shape[1] > 0:  # a streamed step
        final = inference_step(kind, x[0], state, weights, backend)
        if final is not None:  # the output a copy: it never aliases the final state
            return output_of(final).unsqueeze(0).clone(), final
    if runs_torch_lstm(kind, x, state, weights, lengths, backend):
        return _torch_lstm_direction(x, state, weights, reverse)
    return _RUNNERS[engine_for(backend, x)](kind, x, state, weights, lengths, reverse)


def inference_step(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
                   backend: str = "auto") -> State | None:
    """One step ``x (N, I)`` -> the new state on the native step kernels, or None where they
    do not apply (the caller then runs the step as a one-step sequence, `run_direction`):
    `step_kernel`'s kernel, called once."""
    run = step_kernel(kind, x, state, weights, backend)
    return None if run is None else run(x, state)


def step_kernel(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
                backend: str = "auto") -> StepKernel | None:
    """The native step kernel of one layer with ``weights`` bound, ``run(x, state)`` -> the
    new state, where it applies to a step of ``x (N, I)`` from ``state``; else None.

    It applies to batches of at most `STEP_KERNEL_MAX_BATCH` rows (a streamed step), under
    "auto" and "native" (after ``RNNKIT_BACKEND``), when nothing is to be
    differentiated, in plain eager mode (`ops.plain_eager`: no compiler, tracer, transform or
    autocast), to a cell without layer norm whose tensors are all contiguous, on the CPU and
    of the weights' float32 or float64 dtype, with the kernels built. The caller has checked
    the shapes (a kernel refuses a wrong one with an error, never reads past it). Masks
    (recurrent dropout in training, zoneout) are the caller's to rule out. A caller that keeps
    the kernel for later steps (`rnnkit.stream.LayerStream`) is the one to know that these
    conditions still hold.
    """
    if (torch.compiler.is_compiling()  # first: the rest is for eager tensors
            or weights.layer_norm_hh is not None or weights.weight_ih is None):
        return None
    tensors = (x, *state, *weights) if type(state) is tuple else (x, state, *weights)
    if (not _step_kernels_run(x, tensors, STEP_KERNEL_MAX_BATCH)
            or resolve_backend(backend) not in ("auto", "native")):
        return None
    return native_functions.step_kernel(kind, weights)


def _step_kernels_run(x: Tensor, tensors: tuple, max_batch: int) -> bool:
    """The step kernels' conditions shared by every family (`inference_step`,
    `slstm_inference_step`, `min_inference_step`), after the caller's backend test: at most
    ``max_batch`` rows of ``x``, every tensor (None: an absent bias) contiguous on the CPU and
    of ``x``'s float32 or float64 dtype, plain eager mode with nothing to differentiate
    (`ops.plain_eager`), and the kernels built. The caller has ruled out compiling (asked
    first)."""
    dtype = x.dtype
    if dtype not in native.SUPPORTED_DTYPES or x.shape[0] > max_batch:
        return False
    if not all(t is None or (t.dtype is dtype and t.is_cpu and t.is_contiguous())
               for t in tensors):
        return False
    return ops.plain_eager(*tensors) and native.available()


def runs_torch_lstm(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
                    lengths: Tensor | None, backend: str) -> bool:
    """Whether "auto" hands this plain LSTM direction to torch's own kernel (module docstring)."""
    if (kind.family != Family.LSTM or weights.weight_ch is not None
            or weights.weight_hr is not None or weights.weight_ih is None
            or lengths is not None or x.dim() != 3
            or x.dtype != torch.float32 or not x.is_cpu or x.shape[0] == 0):
        return False
    if resolve_backend(backend) != "auto" or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    tensors = (x, *state, *(w for w in weights if w is not None))
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        # Training: eager autograd only (no torch.func transform, dispatch mode or tensor
        # subclass), where torch's own backward runs; the operators keep everything else.
        return (ops.plain_context(x)
                and all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)
                and _torch_lstm_trains_faster(x.shape[0], x.shape[1],
                                              weights.weight_hh.shape[1], x.requires_grad))
    return _torch_lstm_is_faster(x.shape[1], weights.weight_hh.shape[1])


def _torch_lstm_direction(x: Tensor, state: State, weights: CellWeights,
                          reverse: bool) -> tuple[Tensor, State]:
    """One plain LSTM direction on ``torch.lstm`` (one layer, forward; a reversed direction
    runs on the time-reversed input). The same equations and weight layout as the spec's."""
    h0, c0 = state
    has_biases = weights.bias_ih is not None
    parameters = [weights.weight_ih, weights.weight_hh]
    if has_biases:
        parameters += [weights.bias_ih, weights.bias_hh]
    steps = x.flip(0) if reverse else x
    output, h_n, c_n = torch.lstm(steps, (h0.unsqueeze(0), c0.unsqueeze(0)), parameters,
                                  has_biases, 1, 0.0, False, False, False)
    return (output.flip(0) if reverse else output), (h_n[0], c_n[0])


def _run_variant(kind: CellKind, x: Tensor, state: State, weights: CellWeights,
                 lengths: Tensor | None, reverse: bool, backend: str,
                 masks: Masks | None) -> tuple[Tensor, State]:
    """Layer norm, recurrent dropout, zoneout: the recurrence operators or the reference; the
    ONNX routes in evaluation mode (`onnx.run_direction`)."""
    per_step_masks = masks is not None and any(
        mask is not None and mask.dim() > 0 for mask in masks)
    exporting = is_exporting() or _onnx_capture()
    if exporting and per_step_masks:
        # Drawn in Python once per call: a graph would hold the example's masks (and shape)
        # for every input, a deterministic model that is neither training nor evaluation.
        raise ValueError("recurrent_dropout and zoneout do not export to ONNX in training mode "
                         "(their masks are drawn per call, and a graph would freeze them); "
                         "export the model in evaluation mode (model.eval()), where they are "
                         "deterministic")
    if exporting:
        return onnx.run_direction(kind, x, state, weights, lengths, reverse, masks)
    if torch.jit.is_tracing() and per_step_masks:
        # The masks are drawn in Python at the example's batch and length: a trace would
        # replay those shapes (and those very masks) for every input.
        raise ValueError("torch.jit.trace cannot record recurrent_dropout or zoneout in "
                         "training mode (their masks are drawn per call at the example's "
                         "shape); trace the model in evaluation mode (model.eval()), or use "
                         "torch.compile(model)")
    engine_name = engine_for(backend, x)
    if engine_name == "reference" or (masks is not None and any(
            mask is not None and mask.requires_grad for mask in masks)):
        # A mask that asks for its own gradient (a cell's recurrent_mask given by the
        # caller) is differentiated by autograd: the operators treat masks as constants.
        return reference.run_direction(kind, x, state, weights, lengths, reverse, masks)
    return ops.run_recurrence(kind, x, state, weights, lengths, reverse, masks,
                              native_kernels=engine_name == "native")


def slstm_engine_for(backend: str, x: Tensor) -> str:
    """The path that runs an sLSTM direction (`rnnkit.engine.slstm.BACKENDS`): the families'
    policy (`engine_for`), stated once for both. ``RNNKIT_BACKEND`` forces a backend here too;
    an empty input runs ``"reference"``; ``"auto"`` runs ``"native"`` (the C++ loops,
    ``rnnkit::native_slstm``) on the CPU in float32/float64 with the kernels built, and
    ``"fused"`` elsewhere (measured faster at every size tried: a training step on the native
    loop took 0.10x the fused one's time at N = 1, H = 64, 0.22-0.26x at N = 16, H = 64,
    0.61-0.72x at N = 16, H = 256 and 0.75-0.83x at N = 32, H = 512, T = 64-256, 1 and 4
    heads, on the 2-core Intel Xeon VM, one thread; benchmarks/slstm_step.py). An explicit
    ``"native"`` that cannot run the input runs ``"fused"`` after one warning; under
    ``torch.jit.trace`` ``"reference"`` runs ``"fused"`` (a traced Python loop would freeze
    the example's length)."""
    return engine_for(backend, x)


def run_slstm_direction(x: Tensor, state: slstm.SLSTMState, weight_ih: Tensor,
                        weight_hh: Tensor, bias_ih: Tensor | None, lengths: Tensor | None,
                        reverse: bool, exp_forget: bool, backend: str = "auto"
                        ) -> tuple[Tensor, slstm.SLSTMState]:
    """Run one sLSTM layer in one direction over a padded, time-major sequence.

    Args:
        x: input ``(T, N, I)``, padding past each length zeroed.
        state: ``(h_0, c_0, n_0, m_0)``, each ``(N, H)`` (``m_0`` already ``-inf`` where
            ``n_0 = 0``: `slstm.empty_where_no_mass`).
        weight_ih: ``(4H, I)`` as ``(W_i|W_f|W_z|W_o)``; weight_hh ``(K, 4d, d)``; bias_ih
            ``(4H,)`` or None.
        lengths: ``(N,)`` int64 on ``x``'s device, each in ``[1, T]``, or None (all T steps).
        reverse: run from the last valid step of each sequence to its first.
        exp_forget: ``f = exp(f̃)`` instead of ``σ(f̃)``.
        backend: one of `slstm.BACKENDS` (`slstm_engine_for`).

    Returns:
        ``output (T, N, H)``, zero at ``t >= lengths[n]``, and the final ``(h, c, n, m)``, each
        ``(N, H)``, after each sequence's own last step (reversed: after its step 0).
    """
    if onnx.is_capturing():  # ONNX: the step in a Scan loop (engine/onnx.py)
        return onnx.run_slstm_direction(x, state, weight_ih, weight_hh, bias_ih, lengths,
                                        reverse, exp_forget)
    if x.shape[0] == 1 and lengths is None and x.shape[1] > 0:  # a streamed step
        final = slstm_inference_step(x[0], state, weight_ih, weight_hh, bias_ih, exp_forget,
                                     backend)
        if final is not None:  # the output a copy: it never aliases the final state
            return final[0].unsqueeze(0).clone(), final
    run = _SLSTM_RUNNERS[slstm_engine_for(backend, x)]
    return run(x, state, weight_ih, weight_hh, bias_ih, lengths, reverse, exp_forget)


def slstm_inference_step(x: Tensor, state: slstm.SLSTMState, weight_ih: Tensor,
                         weight_hh: Tensor, bias_ih: Tensor | None, exp_forget: bool,
                         backend: str = "auto") -> slstm.SLSTMState | None:
    """One sLSTM step ``x (N, I)`` -> the new ``(h, c, n, m)`` on the native step kernel, or
    None where it does not apply (the caller then runs the general path): `slstm_step_kernel`'s
    kernel, called once."""
    run = slstm_step_kernel(x, state, weight_ih, weight_hh, bias_ih, exp_forget, backend)
    return None if run is None else run(x, state)


def slstm_step_kernel(x: Tensor, state: slstm.SLSTMState, weight_ih: Tensor,
                      weight_hh: Tensor, bias_ih: Tensor | None, exp_forget: bool,
                      backend: str = "auto") -> StepKernel | None:
    """The sLSTM's native step kernel with its weights bound (``slstm_step``: both products and
    the stabilised gate math in one call), ``run(x, state)`` -> the new ``(h, c, n, m)``, where
    it applies to a step of ``x (N, I)`` from ``state``; else None. The conditions of
    `step_kernel` (at most `SLSTM_STEP_KERNEL_MAX_BATCH` rows, "auto" or "native" after
    ``RNNKIT_BACKEND``, nothing to differentiate, plain eager mode, contiguous CPU tensors of
    one float32/float64 dtype, the kernels built). ``m`` is taken as ``-inf`` where ``n = 0``
    (`slstm.empty_where_no_mass`, applied by the kernel). The caller has checked the shapes
    (the kernel refuses a wrong one with an error naming the argument)."""
    if torch.compiler.is_compiling():  # first: the rest is for eager tensors
        return None
    if (not _step_kernels_run(x, (x, *state, weight_ih, weight_hh, bias_ih),
                              SLSTM_STEP_KERNEL_MAX_BATCH)
            or resolve_backend(backend) not in ("auto", "native")):
        return None
    return native_functions.slstm_step_kernel(weight_ih, weight_hh, bias_ih, exp_forget)


def min_inference_step(family: str, x: Tensor, h: Tensor, weight_ih: Tensor,
                       bias_ih: Tensor | None, log_space: bool,
                       backend: str = "auto") -> Tensor | None:
    """One minGRU or minLSTM step ``x (N, I)``, ``h (N, H)`` -> ``h' (N, H)`` on the native
    step kernel, or None where it does not apply (the caller then runs the scan's step,
    `scan.step`, or a one-step sequence): `min_step_kernel`'s kernel, called once."""
    run = min_step_kernel(family, x, h, weight_ih, bias_ih, log_space, backend)
    return None if run is None else run(x, h)


def min_step_kernel(family: str, x: Tensor, h: Tensor, weight_ih: Tensor,
                    bias_ih: Tensor | None, log_space: bool,
                    backend: str = "auto") -> StepKernel | None:
    """The native step kernel of a minGRU or minLSTM layer (``family`` ``"mingru"`` or
    ``"minlstm"``, as `rnnkit.engine.scan.MinFamily`) with its weights bound (``min_step``: the
    projection and ``h' = a ⊙ h + b`` in one call), ``run(x, h)`` -> ``h' (N, H)``, where it
    applies to a step of ``x (N, I)`` from ``h (N, H)``; else None. It applies under the minimal
    layers' ``"auto"`` and ``"native"`` (their backends, which ``RNNKIT_BACKEND`` does not set:
    it names the other families' engines), at most `MIN_STEP_KERNEL_MAX_BATCH` rows, and under
    the conditions of `step_kernel` (nothing to differentiate, plain eager mode, contiguous CPU
    tensors of one float32/float64 dtype, the kernels built). With ``log_space`` the kernel
    returns None for a state with a negative entry (the caller's checked way refuses it by
    name). The caller has checked the shapes (the kernel refuses a wrong one with an error
    naming the argument)."""
    if torch.compiler.is_compiling() or backend not in ("auto", "native"):
        return None
    if not _step_kernels_run(x, (x, h, weight_ih, bias_ih), MIN_STEP_KERNEL_MAX_BATCH):
        return None
    return native_functions.min_step_kernel(weight_ih, bias_ih, family, log_space)


_SLSTM_RUNNERS = {"native": ops.run_native_slstm, "fused": ops.run_fused_slstm,
                  "reference": slstm.run_reference}


__all__ = ["BACKENDS", "MIN_STEP_KERNEL_MAX_BATCH", "SLSTM_STEP_KERNEL_MAX_BATCH",
           "OTHER_CPU_TORCH_LSTM_MAX_SHARES", "OTHER_CPU_TORCH_LSTM_MIN_BATCH",
           "OTHER_CPU_TORCH_LSTM_MIN_BATCH_BEYOND_L2", "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_BATCH",
           "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_HIDDEN", "OTHER_CPU_TORCH_LSTM_TRAIN_MIN_STEPS",
           "STEP_KERNEL_MAX_BATCH", "TORCH_LSTM_MIN_BATCH", "TORCH_LSTM_MIN_HIDDEN",
           "TORCH_LSTM_MIN_STATE_VALUES",
           "BackendWarning",
           "StepKernel", "engine_for", "inference_step", "is_exporting", "min_inference_step",
           "min_step_kernel", "resolve_backend", "run_direction", "run_slstm_direction",
           "runs_torch_lstm", "slstm_engine_for", "slstm_inference_step", "slstm_step_kernel",
           "step_kernel"]
