"""One helper to compare two modules' outputs *and* gradients, so each parity test is one call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

# The tolerances: 1e-5 in float32, 1e-10 in float64 (relative and absolute).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

# Worst absolute difference seen per (group, dtype) and the number of comparisons: conftest.py
# prints it at the end of the run, so the parity figures come from the tests themselves.
WORST: dict[tuple[str, torch.dtype], tuple[float, int]] = {}


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
    loss = sum(
        (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
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
    factor: float = 1.0,
):
    """Same keys, and each tensor within the tolerance for ``dtype`` *relative to its largest
    entry*: ``max |a - e| <= tol * max(1, max |e|)``.

    For float32 through layer norm: LN's backward divides by each row's deviation, so weight
    gradients summed over every step reach tens while the rounding of one engine's summation
    order against another's is ~1e-6 of that; an entry near zero beside them is not held to
    1e-5 of its own size (elementwise `assert_same` would be). Both engines are equally far
    from float64 there (tests/test_recurrence_engines.py says how far). ``factor`` widens the
    tolerance where the caller shows the reference itself is that far from float64.
    """
    tolerance = factor * _same_keys_and_shapes(actual, expected, dtype, group)
    for key in expected:
        if not expected[key].numel():
            continue
        scale = max(1.0, float(expected[key].abs().max()))
        error = float((actual[key] - expected[key]).abs().max())
        assert error <= tolerance * scale, (
            f"{key}: max |difference| {error:.3g} > {tolerance:g} x {scale:.3g}")


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
