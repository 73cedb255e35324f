"""Validation at rnnkit's boundaries: errors name the argument, the value and what is accepted."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


def describe(value: object) -> str:
    """A short description of a value for an error message (tensors by shape and dtype)."""
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} element(s)"
    return f"{value!r} ({type(value).__name__})"


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def require_int(name: str, value: object, *, minimum: int) -> int:
    """An int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def require_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {describe(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value}")
    return float(value)


def require_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def require_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value  # type: ignore[return-value]


def require_tensor(
    name: str, value: object, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A tensor of the module's floating dtype on the module's device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of dtype {dtype} (the parameters' dtype), "
            f"got dtype {value.dtype}; convert it with .to({dtype})"
        )
    if value.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but the parameters have dtype {dtype}; "
            f"convert the input with .to({dtype}) or the module with .to({value.dtype})"
        )
    if value.device != device:
        raise ValueError(
            f"{name} is on device {value.device} but the parameters are on {device}; "
            f"move one of them with .to()"
        )
    return value


def require_shape(name: str, value: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{name} must have shape {meaning} = {expected}, got {tuple(value.shape)}"
        )


def check_lengths(lengths: object, *, steps: int, batch: int, device: torch.device) -> Tensor:
    """Validate sequence lengths and return them as an int64 tensor on ``device``.

    Accepted: a 1-D integer tensor (on any device) or a sequence of ints, one per batch entry,
    each in ``[1, steps]``.
    """
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(
                f"lengths must be an integer tensor or a list of ints, got dtype {lengths.dtype}"
            )
        if lengths.dim() != 1:
            raise ValueError(
                f"lengths must be 1-D (one length per sequence), got shape {tuple(lengths.shape)}"
            )
        values = lengths.tolist()
    elif isinstance(lengths, Sequence) and not isinstance(lengths, str):
        values = list(lengths)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"lengths must hold ints, got {describe(v)} in {values!r}")
    else:
        raise TypeError(
            f"lengths must be a 1-D integer tensor or a list of ints, got {describe(lengths)}"
        )
    if len(values) != batch:
        raise ValueError(
            f"lengths must have one entry per sequence in the batch ({batch}), got {len(values)}"
        )
    bad = [(i, v) for i, v in enumerate(values) if not 1 <= v <= steps]
    if bad:
        index, value = bad[0]
        raise ValueError(
            f"lengths must lie in [1, {steps}] (the input has {steps} time steps), "
            f"got lengths[{index}] = {value}"
            + (f" and {len(bad) - 1} more out of range" if len(bad) > 1 else "")
        )
    return torch.tensor(values, dtype=torch.int64, device=device)
