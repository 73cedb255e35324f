r"""The minimal recurrences of Feng et al. 2024 (minGRU, minLSTM) and the three ways to run them.

Both cells reduce to a recurrence that is linear in the state, with coefficients that depend on
the input alone (spec: "minGRU and minLSTM")::

    h_t = a_t ⊙ h_{t-1} + b_t          a_t in (0, 1), a_t and b_t functions of x_t only

minGRU (`coefficients`, family ``"mingru"``), ``weight_ih = (W_z|W_h)``::

    z_t = σ(W_z x_t + b_z)      h̃_t = W_h x_t + b_h       a_t = 1 - z_t      b_t = z_t ⊙ h̃_t

minLSTM (family ``"minlstm"``), ``weight_ih = (W_f|W_i|W_h)``::

    f_t = σ(W_f x_t + b_f)      i_t = σ(W_i x_t + b_i)     h̃_t = W_h x_t + b_h
    a_t = f'_t = f_t / (f_t + i_t)                         b_t = i'_t ⊙ h̃_t,  i'_t = 1 - f'_t

Log-space variant (``log_space=True``): ``h̃_t = g(W_h x_t + b_h)`` with ``g(v) = v + 0.5`` for
``v >= 0`` and ``σ(v)`` otherwise, so ``b_t > 0`` and ``h_t >= 0`` whenever ``h_0 >= 0``.

Four execution paths, one function each, all with the signature of `run_direction`:

- `run_reference`: the step equations in a loop over time, on autograd (the spec in code);
- `run_linear_scan` (``backend="scan"``, both variants): all steps at once with `scan_linear`,
  doubling (Hillis-Steele) rounds over ``(a, b)`` pairs for short sequences, sqrt(T) blocks for
  long ones;
- `run_log_scan` (log-space variant only, ``backend="log_scan"``): the paper's scan,
  ``log h_t = log A_t + logcumsumexp_s(log b_s - log A_s)`` with ``log A_t = cumsum log a``, in
  `scan_log`: chunked and accumulated in float64, which bounds the cancellation between the
  two large terms;
- `run_native` (``backend="native"``, both variants; CPU, float32/float64): the input
  projection of all steps by one product, then a C++ loop over time (``rnnkit::native_min_scan``,
  `kernels.cpp` "minGRU and minLSTM") that computes each step's ``a, b`` in registers, parallel
  over the units, and its adjoint backward; ``"auto"`` runs it where it can (`engine_for`).

A streamed step with nothing to differentiate (a cell's call, a one-step sequence, a layer's
stream) runs under "auto" and "native" on the step kernel instead (`kernels.cpp` "minGRU and
minLSTM: one streamed step", `rnnkit.engine.min_inference_step`): the projection and the step's
coefficients in one call; `step` is the reference it is tested against.

Both scans are operators (``rnnkit::linear_scan``, ``rnnkit::log_scan``, registered below
with `rnnkit.engine.ops`' helpers: fake shapes, autocast, vmap), so torch.compile and
torch.export see one node with a dynamic length; their hand-written backward is the adjoint
recurrence run by the linear scan backward in time (`_adjoint`).

Nothing here imports the layers or cells: they import this module.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engine import _warn_once, min_inference_step, native, onnx, ops
from rnnkit.engine.native import functions as native_functions
from rnnkit.engine.products import project_all_steps


class MinFamily(str, enum.Enum):
    """The two minimal cells. A ``str`` mixin, as `rnnkit.engine.steps.Family`."""

    GRU = "mingru"
    LSTM = "minlstm"

    def __str__(self) -> str:
        return self.value


GATE_COUNT = {MinFamily.GRU: 2, MinFamily.LSTM: 3}
"""Rows of ``weight_ih`` per hidden unit: (W_z|W_h) for minGRU, (W_f|W_i|W_h) for minLSTM."""

BACKENDS = ("auto", "reference", "scan", "log_scan", "native")
"""``backend`` of the minimal layers, one path each: ``"reference"`` `run_reference`,
``"scan"`` `run_linear_scan` (both variants), ``"log_scan"`` `run_log_scan` (the log-space
variant only), ``"native"`` `run_native` (both variants, CPU); ``"auto"`` chooses
(`engine_for`)."""

LOG_SCAN_CHUNK = 64
"""Steps per block of `scan_log`: the cancellation in ``log A_t + logcumsumexp(log b - log A)``
grows with ``|log A_t|``, which a block bounds by ``64 * 708`` (``log a`` is clamped at the
float64 underflow, where ``a`` is 0 anyway): a relative error of at most ~5e-12 in float64."""

_LOG_TINY = -708.0
"""Just above ``log`` of float64's smallest normal number (-708.4): a decay below it is zero."""

_LOG_ZERO = -1.0e4
"""``log b`` of a held step (b = 0): ``exp(-1e4)`` is 0 in every precision, and unlike -inf it
keeps every intermediate (``log b - log A``, ...) finite."""


# ---- the step equations -------------------------------------------------------------------
def g(v: Tensor) -> Tensor:
    """The paper's positive activation: ``v + 0.5`` for ``v >= 0``, ``σ(v)`` below (continuous at
    0, where both are 0.5)."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_g(v: Tensor) -> Tensor:
    """``log g(v)``, finite with a finite gradient everywhere (both branches are, so the
    unselected one cannot put a NaN into ``torch.where``'s backward)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), F.logsigmoid(v))


def coefficients(family: MinFamily, projected: Tensor, log_space: bool) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of ``h' = a ⊙ h + b`` from ``projected = W_ih x + b_ih`` ``(..., G*H)``.

    ``1 - z`` is computed as ``σ(-k_z)`` and ``f / (f + i)`` as ``σ(log f - log i)``: the same
    values, without the cancellation of ``1 - z`` when ``z`` is near 1, or the 0 / 0 when ``f``
    and ``i`` both underflow.
    """
    if family == MinFamily.GRU:
        k_z, v_h = projected.chunk(2, dim=-1)  # (..., H) each
        z = torch.sigmoid(k_z)
        h_tilde = g(v_h) if log_space else v_h
        return torch.sigmoid(-k_z), z * h_tilde  # a = 1 - z, b = z ⊙ h̃
    k_f, k_i, v_h = projected.chunk(3, dim=-1)
    log_f_over_i = F.logsigmoid(k_f) - F.logsigmoid(k_i)
    f_prime = torch.sigmoid(log_f_over_i)  # f / (f + i)
    i_prime = torch.sigmoid(-log_f_over_i)  # i / (f + i)
    h_tilde = g(v_h) if log_space else v_h
    return f_prime, i_prime * h_tilde


def log_coefficients(family: MinFamily, projected: Tensor) -> tuple[Tensor, Tensor]:
    """``(log a, log b)`` of the log-space variant (where ``b > 0``), as the paper computes
    them: ``log(1 - z) = -softplus(k_z)``, ``log z = -softplus(-k_z)``, ``log f' =
    logσ(log f - log i)``, ``log h̃ = log g(W_h x + b_h)``."""
    if family == MinFamily.GRU:
        k_z, v_h = projected.chunk(2, dim=-1)
        return F.logsigmoid(-k_z), F.logsigmoid(k_z) + log_g(v_h)
    k_f, k_i, v_h = projected.chunk(3, dim=-1)
    log_f_over_i = F.logsigmoid(k_f) - F.logsigmoid(k_i)
    return F.logsigmoid(log_f_over_i), F.logsigmoid(-log_f_over_i) + log_g(v_h)


def step(family: MinFamily, x: Tensor, h: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
         log_space: bool) -> Tensor:
    """One step, ``x (N, I)``, ``h (N, H)`` -> ``h' = a ⊙ h + b`` ``(N, H)``."""
    a, b = coefficients(family, F.linear(x, weight_ih, bias_ih), log_space)
    return a * h + b


# ---- the three execution paths ------------------------------------------------------------
def run_reference(family: MinFamily, x: Tensor, h0: Tensor, weight_ih: Tensor,
                  bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
                  log_space: bool) -> tuple[Tensor, Tensor]:
    """One layer in one direction, step by step on autograd: the spec every scan is tested
    against. Arguments and results as `run_direction`."""
    steps = x.shape[0]
    outputs: list[Tensor | None] = [None] * steps
    h = h0
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        new_h = step(family, x[t], h, weight_ih, bias_ih, log_space)
        if lengths is not None:
            # Past a sequence's end the state is held: going forward it keeps the value after
            # the last valid step, going backward it stays h_0 until the last valid step.
            valid = (lengths > t).unsqueeze(1)  # (N, 1)
            new_h = torch.where(valid, new_h, h)
            outputs[t] = new_h.masked_fill(~valid, 0.0)
        else:
            outputs[t] = new_h
        h = new_h
    return torch.stack(outputs), h  # type: ignore[arg-type]


def _valid_steps(lengths: Tensor | None, steps: int, like: Tensor) -> Tensor | None:
    """``(T, N, 1)`` True where step t lies within sequence n, or None without lengths."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=like.device).unsqueeze(1) < lengths).unsqueeze(2)


def _finish(h: Tensor, valid: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
    """States ``h (T, N, H)`` in reversed time order if ``reverse`` -> output zeroed past each
    end, and the final state (after step 0 going backward, after step T-1 going forward, where
    the steps past a sequence's end held the state after its last valid step)."""
    if reverse:
        h = h.flip(0)
    final = h[0] if reverse else h[-1]
    return (h if valid is None else h.masked_fill(~valid, 0.0)), final


def run_linear_scan(family: MinFamily, x: Tensor, h0: Tensor, weight_ih: Tensor,
                    bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
                    log_space: bool) -> tuple[Tensor, Tensor]:
    """Every step at once: the input projection for all T, then `scan_linear`. Past a
    sequence's end ``a = 1, b = 0``, so the state is held there; the reverse direction scans
    the time-flipped sequence, whose padding then comes first and holds ``h_0``."""
    return _scan_projection(family, project_all_steps(x, weight_ih, bias_ih), h0, lengths, reverse,
                            log_space)


def _scan_projection(family: MinFamily, projected: Tensor, h0: Tensor, lengths: Tensor | None,
                     reverse: bool, log_space: bool) -> tuple[Tensor, Tensor]:
    """`run_linear_scan` from the projection ``W_ih x + b_ih`` ``(T, N, G*H)``: differentiable
    to any order (`scan_linear`'s backward is itself a scan), so the native operator's
    recorded backward differentiates it too."""
    a, b = coefficients(family, projected, log_space)  # (T, N, H) each
    valid = _valid_steps(lengths, projected.shape[0], projected)
    if valid is not None:
        a = a.masked_fill(~valid, 1.0)
        b = b.masked_fill(~valid, 0.0)
    if reverse:
        a, b = a.flip(0), b.flip(0)
    if onnx.is_capturing():  # ONNX has no form of the scans: the loop (engine/onnx.py)
        return _finish(onnx.run_linear_recurrence(a, b, h0), valid, reverse)
    return _finish(scan_linear(a, b, h0), valid, reverse)


def run_log_scan(family: MinFamily, x: Tensor, h0: Tensor, weight_ih: Tensor,
                 bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
                 log_space: bool) -> tuple[Tensor, Tensor]:
    """The paper's log-space scan (`scan_log`), for the log-space variant only (it needs
    ``b > 0``). Past a sequence's end ``log a = 0`` and ``log b`` is `_LOG_ZERO` (a = 1, b = 0)."""
    if not log_space:
        raise ValueError("run_log_scan needs log_space=True: the linear variant's b (z h̃ or "
                         "i' h̃) can be negative, and a negative number has no real logarithm")
    log_a, log_b = log_coefficients(family, project_all_steps(x, weight_ih, bias_ih))
    valid = _valid_steps(lengths, x.shape[0], x)
    if valid is not None:
        log_a = log_a.masked_fill(~valid, 0.0)
        log_b = log_b.masked_fill(~valid, _LOG_ZERO)
    if reverse:
        log_a, log_b = log_a.flip(0), log_b.flip(0)
    return _finish(scan_log(log_a, log_b, h0), valid, reverse)


def run_native(family: MinFamily, x: Tensor, h0: Tensor, weight_ih: Tensor,
               bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
               log_space: bool) -> tuple[Tensor, Tensor]:
    """The C++ loop (``rnnkit::native_min_scan``; CPU, float32/float64, kernels built): the
    input projection of all steps by one product on autograd, then one pass over time that
    computes each step's ``a, b`` in registers and ``h_t = a_t ⊙ h_{t-1} + b_t``, parallel
    over the units; the backward is the adjoint recurrence in C++ (`kernels.cpp`, "minGRU and
    minLSTM"). Lengths hold the state past each end, as `run_linear_scan`."""
    projected = project_all_steps(x, weight_ih, bias_ih)  # (T, N, G*H)
    lengths = None if lengths is None else lengths.to(torch.int64)
    arguments = (projected, h0, lengths, reverse, str(family), log_space)
    if ops.plain_eager(projected, h0):
        return native_functions.min_scan_forward(*arguments, layer_outputs_only=True)
    states, output, final = ops._apply(native_min_scan, *arguments)
    return (output if lengths is not None else ops._leaving(states, reverse)), final


def engine_for(backend: str, log_space: bool, x: Tensor) -> str:
    """The path a ``backend`` runs for the input ``x (T, N, I)``: the auto policy, stated once.

    ``"auto"`` runs ``"native"`` (`run_native`, the C++ loop) wherever it can: a CPU input of
    float32 or float64 with the kernels built. It was the fastest path at every size measured,
    training and inference, both variants, a single streamed step included (docs/benchmarks.md,
    "minGRU and minLSTM: the native loop"; ``OMP_NUM_THREADS=1 python
    benchmarks/minimal_scan.py --scans-only [--inference] [--batch N] T ...``). Elsewhere it
    runs the linear-space scan, for both variants (0.3-0.5x the log-space scan's time: torch's
    CPU ``logcumsumexp`` costs ~25 ``exp``; the log-space variant's coefficients are positive
    reals, which the linear scan runs as exactly), except a single step, which the loop runs
    with less set-up than the scan. An explicit ``"native"`` that cannot run the input runs
    the linear scan after one warning saying why (a failed build has already warned once);
    an empty input runs the scan, which gives torch.nn's shapes.
    """
    if backend == "log_scan":
        if not log_space:
            raise ValueError("backend 'log_scan' needs log_space=True: the linear variant's "
                             "b (z h̃ or i' h̃) can be negative, and has no real logarithm; "
                             "use 'scan'")
        return "log_scan"
    if backend == "reference":
        return "reference"
    if backend == "scan":
        return "linear_scan"
    if x.numel() == 0:  # nothing to compute: the scan gives torch.nn's shapes
        return "linear_scan"
    why_not = native.why_not(x)
    if why_not is None:
        return "native"
    if backend == "native" and why_not != native.NOT_BUILT:  # a failed build has warned
        _warn_once(f"backend='native' cannot run this input ({why_not}); running "
                   f"backend='scan' instead, which gives the same results")
    return "reference" if x.shape[0] == 1 else "linear_scan"


_RUNNERS = {"reference": run_reference, "linear_scan": run_linear_scan,
            "log_scan": run_log_scan, "native": run_native}


def run_direction(family: MinFamily, x: Tensor, h0: Tensor, weight_ih: Tensor,
                  bias_ih: Tensor | None, lengths: Tensor | None, reverse: bool,
                  log_space: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Run one layer in one direction over a padded, time-major sequence.

    Args:
        family: minGRU or minLSTM.
        x: input ``(T, N, I)``, padding past each length zeroed.
        h0: initial state ``(N, H)``.
        weight_ih: ``(G*H, I)``, ``(W_z|W_h)`` or ``(W_f|W_i|W_h)``; bias_ih ``(G*H,)`` or None.
        lengths: ``(N,)`` int64 on ``x``'s device, each in ``[1, T]``, or None (all T steps).
        reverse: run from the last valid step of each sequence to its first.
        log_space: the log-space variant (``h̃ = g(W_h x + b_h)``).
        backend: one of `BACKENDS` (`engine_for`).

    Returns:
        ``output (T, N, H)``, zero at ``t >= lengths[n]``, and the final state ``(N, H)``.

    A one-step sequence without lengths (a streamed step) with nothing to differentiate runs
    on the minimal step kernel where it applies (`rnnkit.engine.min_inference_step`, under
    "auto" and "native"), as the other families' streamed steps.
    """
    if onnx.is_capturing():
        # An ONNX export: every backend as `run_linear_scan`, whose scan becomes a Scan loop
        # over a multiply-add (`onnx.run_linear_recurrence`): ONNX has neither CumProd nor
        # LogCumSumExp for the log-space scan, and the reference's Python loop would fix T.
        # The same values (the log-space variant's a and b are positive reals).
        return run_linear_scan(family, x, h0, weight_ih, bias_ih, lengths, reverse, log_space)
    if x.shape[0] == 1 and lengths is None and x.shape[1] > 0:  # a streamed step
        final = min_inference_step(family, x[0], h0, weight_ih, bias_ih, log_space, backend)
        if final is not None:  # the output a copy: it never aliases the final state
            return final.unsqueeze(0).clone(), final
    return _RUNNERS[engine_for(backend, log_space, x)](
        family, x, h0, weight_ih, bias_ih, lengths, reverse, log_space)


# ---- the scans ----------------------------------------------------------------------------
def _doubling_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """``h_t = a_t h_{t-1} + b_t`` for ``a, b (T, ...)``, ``h0 (...)``, without autograd.

    Hillis-Steele: after the round with offset ``s``, ``(a_t, b_t)`` hold the composition of
    the steps ``t - 2s + 1 … t``, ``h = (∏ a) h_start + Σ (∏ later a) b``; ``h_0`` is folded
    into step 0 first. ``ceil(log2 T)`` rounds of products and sums, no division and no
    logarithm: values that underflow are ones whose true contribution is below the smallest
    float. For short sequences (`_blocked_scan` runs the long ones).
    """
    steps = a.shape[0]
    a = a.clone()
    b = b.clone()
    b[0] += a[0] * h0
    offset = 1
    while offset < steps:
        # Right-hand sides first (new tensors), then written: the slices overlap.
        b[offset:] += a[offset:] * b[:-offset]
        if 2 * offset < steps:  # the last round's products are never read
            a[offset:] = a[offset:] * a[:-offset]
        offset *= 2
    return b


DOUBLING_MAX_STEPS = 64
"""Up to this length `_scan_values` runs the doubling rounds (at most 6, a few dozen small
operations); beyond, `_blocked_scan`, whose passes over the data do not grow with log T."""


def _scan_values(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """``h_t = a_t h_{t-1} + b_t`` without autograd: `_doubling_scan` for short sequences,
    `_blocked_scan` for long ones (the same values up to rounding)."""
    if a.shape[0] <= DOUBLING_MAX_STEPS:
        return _doubling_scan(a, b, h0)
    return _blocked_scan(a, b, h0)


def _blocked_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """The same recurrence in ``B ≈ sqrt(T)`` blocks of ``C = ceil(T / B)`` steps: a loop over
    the C positions advances every block at once (from a zero start, keeping each block's
    decay ``∏ a``), the states entering the blocks come from the same recurrence over the
    blocks' ends (`_scan_values`, recursively), and one pass adds them in.

    About six passes over ``(T, ...)`` and ``2C`` operations, where the doubling rounds make
    ``4 log2 T`` passes: measured in docs/benchmarks.md ("minGRU and minLSTM").
    """
    steps, rest = a.shape[0], a.shape[1:]
    block = math.isqrt(steps - 1) + 1  # C = ceil(sqrt(T)): as many blocks as steps per block
    blocks = -(-steps // block)
    padding = blocks * block - steps
    if padding:  # held steps (a = 1, b = 0), dropped at the end
        a = torch.cat([a, a.new_ones((padding, *rest))])
        b = torch.cat([b, b.new_zeros((padding, *rest))])
    a = a.reshape(blocks, block, *rest)
    b = b.reshape(blocks, block, *rest)
    decay = torch.empty_like(a)  # ∏ a from each block's start
    local = torch.empty_like(b)  # h from a zero state at each block's start
    decay[:, 0] = a[:, 0]
    local[:, 0] = b[:, 0]
    for j in range(1, block):
        torch.mul(a[:, j], decay[:, j - 1], out=decay[:, j])
        torch.addcmul(b[:, j], a[:, j], local[:, j - 1], out=local[:, j])
    ends = _scan_values(decay[:, -1], local[:, -1], h0)  # (blocks, ...): h after each block
    starts = torch.cat([h0.unsqueeze(0), ends[:-1]]).unsqueeze(1)  # (blocks, 1, ...)
    return local.addcmul_(decay, starts).reshape(blocks * block, *rest)[:steps]


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are scanned in float32 (log2 T roundings of 2^-8 would show)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- the scans as operators --------------------------------------------------------------
# ``rnnkit::linear_scan`` and ``rnnkit::log_scan``: registered here, next to their kernels, with
# the registration helpers of `rnnkit.engine.ops` (the boundary compile, export, autocast and
# torch.func see; it imports nothing of the minimal cells). As operators with fake shapes,
# torch.export keeps the sequence length dynamic (the kernels' Python loops over T would
# otherwise specialise it) and torch.compile traces them whole.

def _linear_scan_values(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    dtype = _scan_dtype(a.dtype)
    return _scan_values(a.to(dtype), b.to(dtype), h0.to(dtype)).to(a.dtype)


def _log_scan_values(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    wide = log_a.to(torch.float64).clamp(min=_LOG_TINY)
    return _scan_log_blocks(wide, log_b.to(torch.float64), h0.to(torch.float64)).to(log_a.dtype)


@torch.library.custom_op("rnnkit::linear_scan", mutates_args=())
def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """-> h (T, N, H), ``h_t = a_t ⊙ h_{t-1} + b_t`` (`scan_linear`)."""
    return _linear_scan_values(a, b, h0)


@torch.library.custom_op("rnnkit::log_scan", mutates_args=())
def log_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """-> h (T, N, H) from ``log a, log b`` (`scan_log`)."""
    return _log_scan_values(log_a, log_b, h0)


def _fake_scan(first: Tensor, second: Tensor, h0: Tensor) -> Tensor:
    return torch.empty_like(first)


def _adjoint(a: Tensor, grad_h: Tensor, h: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of ``h_t = a_t ⊙ h_{t-1} + b_t``: ``(γ, h_{t-1})`` with ``γ_t = ∂L/∂h_t
    + a_{t+1} γ_{t+1}`` (``γ`` past the end 0), the same recurrence backward in time, so
    ``∂L/∂b_t = γ_t``, ``∂L/∂a_t = γ_t ⊙ h_{t-1}``, ``∂L/∂h_0 = a_0 ⊙ γ_0``.

    γ is itself `scan_linear` of the flipped sequence: when the backward is recorded
    (``create_graph=True``, torch.func) that scan records its own formula, so the gradient is
    differentiable again, exactly."""
    a_next = torch.cat([a[1:], torch.ones_like(a[:1])])  # a_{t+1}; the last unused
    gamma = scan_linear(a_next.flip(0), grad_h.flip(0), torch.zeros_like(h0)).flip(0)
    return gamma, torch.cat([h0.unsqueeze(0), h[:-1]])


def _linear_scan_setup(ctx, inputs, output, native_layout: bool) -> None:
    a, _, h0 = inputs
    ctx.save_for_backward(a, output, h0)


def _linear_scan_backward(ctx, grads, native_layout: bool):
    """Saves ``a``, ``h`` and ``h_0``: O(T N H) memory, where autograd through the doubling
    rounds would keep log2 T copies."""
    a, h, h0 = ctx.saved_tensors
    (grad_h,) = grads
    if grad_h is None:
        return None, None, None
    gamma, h_previous = _adjoint(a, grad_h, h, h0)
    return gamma * h_previous, gamma, a[0] * gamma[0]


def _log_scan_setup(ctx, inputs, output, native_layout: bool) -> None:
    log_a, log_b, h0 = inputs
    ctx.save_for_backward(log_a, log_b, output, h0)


def _log_scan_backward(ctx, grads, native_layout: bool):
    """The exact derivative by `_adjoint`: ``∂L/∂log b_t = γ_t b_t``, ``∂L/∂log a_t = γ_t a_t
    h_{t-1}``. Not autograd through ``logcumsumexp``: its backward splits the gradient by sign
    into two log-space sums and subtracts them, which at T = 10,000 lost ~1e-10 of the weight
    gradients in float64 (measured against the reference); the adjoint loses ~1e-15."""
    log_a, log_b, h, h0 = ctx.saved_tensors
    (grad_h,) = grads
    if grad_h is None:
        return None, None, None
    a = log_a.exp()
    gamma, h_previous = _adjoint(a, grad_h, h, h0)
    return gamma * a * h_previous, gamma * log_b.exp(), a[0] * gamma[0]


for _op, _setup, _backward in ((linear_scan, _linear_scan_setup, _linear_scan_backward),
                               (log_scan, _log_scan_setup, _log_scan_backward)):
    # Autocast: the scans run in float32 at least and return float32, as the other operators
    # (a state accumulated over every step in bfloat16 would lose the signal).
    ops._register(_op, _fake_scan, autocast=True)
    ops._FUNCTIONS[_op] = ops._autograd(_op, _setup, _backward, False)


def scan_linear(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """``h (T, N, H)`` with ``h_t = a_t ⊙ h_{t-1} + b_t`` from ``a, b (T, N, H)`` and ``h0 (N, H)``;
    any real ``a``, ``b``; differentiable in all three (``rnnkit::linear_scan``: forward
    `_scan_values` in float32 at least, backward `_adjoint`)."""
    if ops.plain_eager(a, b, h0):
        return _linear_scan_values(a, b, h0)
    return ops._apply(linear_scan, a, b, h0)


def scan_log(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """``h (T, N, H)`` with ``h_t = a_t ⊙ h_{t-1} + b_t`` from ``log a, log b (T, N, H)`` (the
    paper's log-space scan) and ``h0 (N, H)``; differentiable in all three
    (``rnnkit::log_scan``: forward `_scan_log_blocks`, backward the exact adjoint).

    With ``log A_t = Σ_{s<=t} log a_s``, the paper's ``log h_t = log A_t + logcumsumexp_s(log b_s
    - log A_s)``. Its two terms grow with t and cancel: in float32 at T = 10,000 with moderate
    gates the paper's formula kept 4e-4 relative error (measured against the reference). Here
    (deviations recorded in the spec):

    - the formula runs in blocks of `LOG_SCAN_CHUNK` steps, ``A`` restarting at 1 in each; the
      state entering a block comes from the same recurrence over the blocks' ends, scanned the
      same way (recursively), so the cancellation is bounded by a block's decay at every level;
    - it is accumulated in float64 and ``log a`` is clamped at float64's underflow (where
      ``a = 0`` in any precision, so nothing changes but the bound);
    - ``h_0`` enters linearly, ``h_t = A_t h_0 + exp(…)``, so it needs no logarithm: zero (the
      default state) is exact, with a finite gradient.
    """
    if ops.plain_eager(log_a, log_b, h0):
        return _log_scan_values(log_a, log_b, h0)
    return ops._apply(log_scan, log_a, log_b, h0)


def _scan_log_blocks(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """`scan_log` in float64, ``log a`` clamped: blocks of `LOG_SCAN_CHUNK` steps."""
    steps, rest = log_a.shape[0], log_a.shape[1:]
    if steps <= LOG_SCAN_CHUNK:
        log_decay = log_a.cumsum(0)  # log A_t
        log_from_zero = log_decay + torch.logcumsumexp(log_b - log_decay, dim=0)
        return log_decay.exp() * h0 + log_from_zero.exp()
    blocks = -(-steps // LOG_SCAN_CHUNK)
    padding = blocks * LOG_SCAN_CHUNK - steps
    if padding:  # held steps, a = 1 and b = 0, dropped at the end
        log_a = torch.cat([log_a, log_a.new_zeros((padding, *rest))])
        log_b = torch.cat([log_b, log_b.new_full((padding, *rest), _LOG_ZERO)])
    log_a = log_a.reshape(blocks, LOG_SCAN_CHUNK, *rest)
    log_b = log_b.reshape(blocks, LOG_SCAN_CHUNK, *rest)
    log_decay = log_a.cumsum(1)  # (blocks, C, ...): log A from each block's start
    log_from_zero = log_decay + torch.logcumsumexp(log_b - log_decay, dim=1)
    # The state after each block: the same recurrence over blocks, a = A_block, b = its h
    # from a zero start.
    ends = _scan_log_blocks(log_decay[:, -1].clamp(min=_LOG_TINY), log_from_zero[:, -1], h0)
    starts = torch.cat([h0.unsqueeze(0), ends[:-1]]).unsqueeze(1)  # (blocks, 1, ...)
    h = log_decay.exp() * starts + log_from_zero.exp()
    return h.reshape(blocks * LOG_SCAN_CHUNK, *rest)[:steps]


# ---- the native loop as an operator ------------------------------------------------------
# ``rnnkit::native_min_scan`` (forward: states, output, final state) and its backward, one node
# each for compile and export, as the families' native operators (`rnnkit.engine.ops`). The
# input projection stays outside, on autograd: its gradients (weights, bias, input) are
# autograd's, from the projection's gradient that the backward gives.

@torch.library.custom_op("rnnkit::native_min_scan", mutates_args=(), device_types="cpu")
def native_min_scan(projected: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool,
                    family: str, log_space: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> states (T + 1, N, H), output (T, N, H) with lengths (else empty: the states' view),
    h_n (N, H) (`native_functions.min_scan_forward`)."""
    return native_functions.min_scan_forward(projected, h0, lengths, reverse, family, log_space)


@torch.library.custom_op("rnnkit::native_min_scan_backward", mutates_args=(),
                         device_types="cpu")
def native_min_scan_backward(d_output: Tensor, d_h_n: Tensor, projected: Tensor,
                             states: Tensor, lengths: Tensor | None, reverse: bool, family: str,
                             log_space: bool) -> tuple[Tensor, Tensor]:
    """-> d_projected (T, N, G*H), d_h0 (N, H) (`native_functions.min_scan_backward`)."""
    return native_functions.min_scan_backward(d_output, d_h_n, projected, states, lengths,
                                              reverse, family, log_space)


def _fake_native_min_scan(projected, h0, lengths, reverse, family, log_space):
    steps, batch, hidden = projected.shape[0], projected.shape[1], h0.shape[1]
    new = projected.new_empty
    return (new(steps + 1, batch, hidden), ops._empty_like_lengths(projected, lengths, steps,
                                                                   batch, hidden),
            new(batch, hidden))


def _fake_native_min_scan_backward(d_output, d_h_n, projected, *rest):
    return torch.empty_like(projected), torch.empty_like(d_h_n)


def _native_min_scan_setup(ctx, inputs, output, native_layout: bool) -> None:
    projected, h0, lengths, reverse, family, log_space = inputs
    ctx.save_for_backward(projected, h0, lengths, output[0])
    ctx.reverse, ctx.family, ctx.log_space = reverse, family, log_space


def _native_min_scan_backward(ctx, grads, native_layout: bool):
    projected, h0, lengths, states = ctx.saved_tensors
    d_states, d_own_output, d_h_n = grads
    d_output = ops._native_output_grad(d_states, d_own_output, states, lengths, ctx.reverse)
    d_h_n = ops._or_zeros(d_h_n, h0)
    family = MinFamily(ctx.family)
    if torch.is_grad_enabled():
        # Recorded (double backward, torch.func): the vector-Jacobian product of the linear
        # scan from the same projection, itself differentiable, as the other native operators
        # differentiate their reference.
        def outputs_of(projected, h0):
            return _scan_projection(family, projected, h0, lengths, ctx.reverse, ctx.log_space)

        _, vjp = torch.func.vjp(outputs_of, projected, h0)
        d_projected, d_h0 = vjp((d_output, d_h_n))
    else:
        d_projected, d_h0 = native_min_scan_backward(d_output, d_h_n, projected, states,
                                                     lengths, ctx.reverse, ctx.family,
                                                     ctx.log_space)
    return d_projected, d_h0, None, None, None, None


ops._register(native_min_scan, _fake_native_min_scan, autocast=True)
ops._register(native_min_scan_backward, _fake_native_min_scan_backward)
ops._FUNCTIONS[native_min_scan] = ops._autograd(native_min_scan, _native_min_scan_setup,
                                                _native_min_scan_backward, True)
