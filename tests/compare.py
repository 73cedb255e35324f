"""One helper to compare two modules' outputs *and* gradients, so each parity test is one call."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

# The tolerances: 1e-5 in float32, 1e-10 in float64 (relative and absolute).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

# Worst absolute difference seen per (group, dtype) and the number of comparisons: conftest.py
# prints it at the end of the run, so the parity figures come from the tests themselves.
WORST: dict[tuple[str, torch.dtype], tuple[float, int]] = {}


def sequences(layer: nn.Module, steps: int, batch: int, dtype=torch.float32,
              seed: int = 1) -> tuple[Tensor, Tensor]:
    """A random input for ``layer`` (its ``input_size``, its ``batch_first`` layout) and
    lengths in ``[1, steps]``, the first sequence full, from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    size = layer.input_size
    shape = (batch, steps, size) if layer.batch_first else (steps, batch, size)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    return x, lengths


def flatten(value) -> list[Tensor]:
    """Every tensor in a nested output, PackedSequence as its data, in a fixed order."""
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, Tensor):
        return [value]
    return [t for item in value for t in flatten(item)]


def outputs_and_gradients(
    module: nn.Module, call: Callable[[nn.Module], object], inputs: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Run ``call(module)``, then backpropagate a fixed random projection of every output.

    Returns the outputs (``out0``, ``out1``, ...) and the gradients of every named input and
    every parameter (``grad:<name>``), so two modules can be compared key by key.
    """
    outputs = flatten(call(module))
    generator = torch.Generator().manual_seed(1234)
    # Drawn in float64 and rounded, so a float32 run and its float64 twin get the same weights.
    loss = sum(
        (out * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)).sum()
        for out in outputs
    )
    params = dict(module.named_parameters())
    leaves = list(inputs.values()) + list(params.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    result = {f"out{k}": out.detach() for k, out in enumerate(outputs)}
    for name, leaf, grad in zip(list(inputs) + list(params), leaves, grads, strict=True):
        # A leaf the computation does not reach has gradient zero, as a dense reference has.
        result[f"grad:{name}"] = torch.zeros_like(leaf) if grad is None else grad
    return result


def assert_same(
    actual: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype, group: str = ""
):
    """Same keys, and every tensor equal within the issue's tolerance for ``dtype``.

    With a ``group`` name, the worst difference is recorded in ``WORST`` for the run's summary.
    """
    tolerance = _same_keys_and_shapes(actual, expected, dtype, group)
    for key in expected:
        torch.testing.assert_close(
            actual[key], expected[key], rtol=tolerance, atol=tolerance, msg=lambda m, k=key: f"{k}: {m}"
        )


def max_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The largest absolute difference over every tensor (0 for tensors without elements)."""
    return max((float((actual[k] - expected[k]).abs().max()) for k in expected
                if expected[k].numel()), default=0.0)


def assert_same_normwise(
    actual: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype, group: str = "",
    sensitivity: dict[str, float] | None = None,
):
    """Same keys, and each tensor within the tolerance for ``dtype`` *relative to its largest
    entry*: ``max |a - e| <= tol * max(1, max |e|)``.

    For float32 through layer norm: LN's backward divides by each row's deviation, so weight
    gradients summed over every step reach tens while the rounding of one engine's summation
    order against another's is ~1e-6 of that; an entry near zero beside them is not held to
    1e-5 of its own size (elementwise `assert_same` would be).

    ``sensitivity`` (`rounding_sensitivity`): how far each result moves, normwise, when the
    inputs and parameters alone are rounded once more; a float32 computation rounds at every
    operation, so where the problem amplifies one rounding past the tolerance, the two sides
    are held to ten times that movement instead.
    """
    tolerance = _same_keys_and_shapes(actual, expected, dtype, group)
    for key in expected:
        if not expected[key].numel():
            continue
        scale = max(1.0, float(expected[key].abs().max()))
        allowed = max(tolerance, 10 * sensitivity[key]) if sensitivity else tolerance
        error = float((actual[key] - expected[key]).abs().max())
        assert error <= allowed * scale, (
            f"{key}: max |difference| {error:.3g} > {allowed:.3g} x {scale:.3g}")


def rounding_sensitivity(
    run: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]], module: nn.Module,
    inputs: dict[str, Tensor], trials: int = 3,
) -> dict[str, float]:
    """The float32 conditioning of ``run(module, inputs)``, measured in float64: the largest
    normwise change of each result (``max |r' - r| / max(1, max |r|)``) over ``trials`` runs
    with every parameter and input multiplied by ``1 + u``, ``u`` uniform in ±2^-24 (one
    float32 rounding). A well-conditioned result moves ~1e-7; one behind a layer norm of rows
    with little spread can move 1e-5."""
    twin = copy.deepcopy(module).double()
    twin_inputs = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    truth = run(twin, twin_inputs)
    generator = torch.Generator().manual_seed(0)

    def rounded(t: Tensor) -> Tensor:
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1
        return t * (1 + 2**-24 * u)

    worst = dict.fromkeys(truth, 0.0)
    for _ in range(trials):
        moved_module = copy.deepcopy(twin)
        with torch.no_grad():
            for parameter in moved_module.parameters():
                parameter.copy_(rounded(parameter))
        moved = run(moved_module, {name: rounded(t.detach()).requires_grad_()
                                   for name, t in twin_inputs.items()})
        for key, value in truth.items():
            if value.numel():
                change = float((moved[key] - value).abs().max()) / max(1.0, float(value.abs().max()))
                worst[key] = max(worst[key], change)
    return worst


def _same_keys_and_shapes(actual: dict[str, Tensor], expected: dict[str, Tensor],
                          dtype: torch.dtype, group: str) -> float:
    """Assert the same keys and shapes, record the worst difference under ``group``, and
    return the tolerance for ``dtype``."""
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
    if group:
        worst, count = WORST.get((group, dtype), (0.0, 0))
        WORST[(group, dtype)] = (max(worst, max_error(actual, expected)), count + 1)
    return TOLERANCE[dtype]


def operators_in(tensor: Tensor) -> set[str]:
    """The rnnkit operators anywhere in ``tensor``'s autograd graph, by name (a layer's
    ``rnnkit::native_min_scan`` -> ``"native_min_scan"``): which engine really ran."""
    found, seen, nodes = set(), set(), [tensor.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().startswith("rnnkit_"):
            found.add(node.name()[len("rnnkit_"):].removesuffix("Backward"))
        nodes.extend(parent for parent, _ in node.next_functions)
    return found


def subnormals(tensor: Tensor) -> int:
    """How many of ``tensor``'s values are subnormal (nonzero, below its dtype's smallest
    normal)."""
    return int(((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).sum())


def unflushed_then_flushed(kernels, run: Callable[[], dict]) -> tuple[dict, dict]:
    """``run()`` with the native kernels' flushing of subnormal floats switched off
    (`kernels.set_flush_subnormals`), then as they run by default, flushed."""
    try:
        kernels.set_flush_subnormals(False)
        unflushed = run()
    finally:
        kernels.set_flush_subnormals(True)
    return unflushed, run()
