"""Validation at rnnkit's boundaries: errors name the argument, the value and what is accepted."""

from __future__ import annotations

import numbers
import os
import warnings
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


INT64_MAX = 2**63 - 1
"""The largest size torch can hold: tensor shapes are int64."""

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The parameter dtypes every engine runs (native runs float32/float64, fused the others)."""


def require_int(name: str, value: object, *, minimum: int) -> int:
    """An int (not a bool) >= minimum that fits in int64 (a tensor size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(
            f"{name} must be an int >= {minimum} that fits in int64 (at most 2**63 - 1 = "
            f"{INT64_MAX}), got {value}"
        )
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


def require_dtype(name: str, dtype: object) -> torch.dtype:
    """A floating dtype of `FLOATING_DTYPES`, or None for torch's default dtype (resolved)."""
    if dtype is None:
        return torch.get_default_dtype()
    accepted = ", ".join(str(d) for d in FLOATING_DTYPES)
    if not isinstance(dtype, torch.dtype):
        hint = (f" (did you mean torch.{dtype}?)"
                if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
                else "")
        raise TypeError(f"{name} must be None or one of {accepted}, got {describe(dtype)}{hint}")
    if dtype not in FLOATING_DTYPES:
        raise ValueError(f"{name} must be None or one of {accepted}, got {dtype}")
    return dtype


def require_device(name: str, device: object) -> torch.device:
    """None (torch's default device) or a device torch names and can allocate on, resolved."""
    if isinstance(device, bool) or not isinstance(device, str | torch.device | int | None):
        raise TypeError(
            f"{name} must be None, a torch.device, a device string such as 'cpu' or 'cuda:0', "
            f"or a device index, got {describe(device)}"
        )
    try:
        # An empty tensor allocates nothing: it parses the name, applies torch's default
        # device for None, and fails here (not in the first parameter) where there is none.
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(
            f"{name} must be a device torch can allocate on here, got {device!r}: {error}"
        ) from None



def require_factory(owner: str, device: object, dtype: object) -> dict[str, object]:
    """A module constructor's ``device`` and ``dtype`` checked (`require_device`,
    `require_dtype`), as the keywords for its parameters' ``torch.empty``."""
    return {"device": require_device(f"{owner} device", device),
            "dtype": require_dtype(f"{owner} dtype", dtype)}


def require_sizes(owner: str, input_size: object, hidden_size: object) -> tuple[int, int]:
    """A cell's or layer's ``(input_size, hidden_size)``, ints >= 1."""
    return (require_int(f"{owner} input_size", input_size, minimum=1),
            require_int(f"{owner} hidden_size", hidden_size, minimum=1))


def require_layer_arguments(
    owner: str, input_size: object, hidden_size: object, num_layers: object, bias: object,
    batch_first: object, dropout: object, bidirectional: object,
) -> tuple[int, int, int, bool, bool, float, bool]:
    """torch.nn's layer arguments, checked in their positional order: ``(input_size,
    hidden_size, num_layers, bias, batch_first, dropout, bidirectional)``."""
    return (*require_sizes(owner, input_size, hidden_size),
            require_int(f"{owner} num_layers", num_layers, minimum=1),
            require_bool(f"{owner} bias", bias),
            require_bool(f"{owner} batch_first", batch_first),
            require_probability(f"{owner} dropout", dropout),
            require_bool(f"{owner} bidirectional", bidirectional))


def warn_unused_dropout(owner: str, dropout: float, num_layers: int, stacklevel: int) -> None:
    """Warn that a layer's (checked) ``dropout`` does nothing in a single layer; ``stacklevel``
    as `warnings.warn`'s, counted from the caller."""
    if dropout > 0 and num_layers == 1:
        warnings.warn(f"{owner} dropout={dropout} acts between stacked layers only, so it does "
                      "nothing with num_layers=1", stacklevel=stacklevel + 1)

def _memory_of(device: torch.device) -> tuple[int, str]:
    """Bytes of memory that can hold tensors on ``device`` at most, and where that is.

    A CUDA device's own memory; for everything else the host's physical memory (a meta layer
    is held to what the real one would need, as it is built to be materialised here later).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"on {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in this host"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the int64 bound only
        return INT64_MAX, "addressable"


class TooLarge(ValueError):
    """Sizes whose parameters cannot be allocated (`require_allocatable`)."""


def require_allocatable(
    owner: str, sizes: str, count: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Refuse, before allocating, ``count`` parameters that cannot fit in the device's memory.

    ``count`` is computed in Python ints, so it cannot overflow; without this check a huge size
    gives torch's internal errors, or a num_layers loop that runs for hours.
    """
    needed = count * dtype.itemsize
    memory, where = _memory_of(device)
    if count > INT64_MAX or needed > memory:
        raise TooLarge(
            f"{owner} with {sizes} needs {count:,} parameters, {needed:,} bytes as {dtype}: more "
            f"than the {memory:,} bytes of memory {where}; accepted: sizes whose parameters fit"
        )


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


def check_lengths(lengths: object, *, steps: int, batch: int, device: torch.device,
                  symbolic: bool = False) -> Tensor:
    """Validate sequence lengths and return them as an int64 tensor on ``device``.

    Accepted: a 1-D dense integer tensor (on any device that holds data, not meta) or a sequence
    of ints, one per batch entry, each in ``[1, steps]``. ``symbolic``: the model is being traced
    for export, where lengths must be a tensor (a graph input: a list would be baked into the
    graph as a constant) whose values are not known, so only its form is checked.
    """
    if symbolic:
        if not isinstance(lengths, Tensor) or lengths.is_floating_point() or \
                lengths.is_complex() or lengths.dtype == torch.bool or lengths.dim() != 1:
            raise TypeError(
                "lengths must be a 1-D integer tensor when a model is exported (an input of the "
                f"exported graph), got {describe(lengths)}")
        matches = lengths.shape[0] == batch
        if isinstance(matches, Tensor):  # the legacy exporter's tracer gives sizes as tensors
            matches = bool(matches)
        torch._check(matches, lambda: (
            f"lengths must have one entry per sequence in the batch ({batch}), got "
            f"{lengths.shape[0]}"))
        return lengths.to(device=device, dtype=torch.int64)
    if isinstance(lengths, Tensor):
        if lengths.layout != torch.strided:
            raise TypeError(
                f"lengths must be a dense (strided) integer tensor or a list of ints, got "
                f"layout {lengths.layout}"
            )
        if lengths.device.type == "meta":
            raise ValueError(
                "lengths must hold values: a tensor on a real device or a list of ints, got a "
                "tensor on the meta device (it has shape and dtype only)"
            )
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(
                f"lengths must be an integer tensor or a list of ints, got dtype {lengths.dtype}"
            )
        if lengths.dim() != 1:
            raise ValueError(
                f"lengths must be 1-D (one length per sequence), got shape {tuple(lengths.shape)}"
            )
        if torch.compiler.is_compiling():
            return _traced_lengths(lengths, steps=steps, batch=batch, device=device)
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


def _traced_lengths(lengths: Tensor, *, steps: int, batch: int, device: torch.device) -> Tensor:
    """`check_lengths` of a tensor inside torch.compile / torch.export: the values are unknown
    while tracing, so their range is checked by the graph itself when it runs (an assertion
    op that fails with the same message), and the shape here."""
    if lengths.shape[0] != batch:
        raise ValueError(
            f"lengths must have one entry per sequence in the batch ({batch}), got "
            f"{lengths.shape[0]}"
        )
    lengths = lengths.to(device=device, dtype=torch.int64)
    torch._assert_async(((lengths >= 1) & (lengths <= steps)).all(),
                        "lengths must lie in [1, T], T the input's number of time steps")
    return lengths


def require_non_negative(name: str, value: Tensor, reason: str) -> None:
    """Every entry of ``value`` >= 0 (NaN passes: it is no sign error); ``reason`` says why.

    Reads the values, so it synchronises with an accelerator; skipped while torch.compile
    traces, where the values are unknown.
    """
    if torch.compiler.is_compiling() or value.numel() == 0:
        return
    smallest = float(value.detach().min())
    if smallest < 0:
        raise ValueError(f"{name} must be >= 0 everywhere ({reason}), got a minimum of "
                         f"{smallest:.6g}")
