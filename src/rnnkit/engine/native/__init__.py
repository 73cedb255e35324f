"""The native engine: C++ CPU kernels for the time loops, compiled at first use and cached.

- `build.kernels()` compiles ``kernels.cpp`` with ``torch.utils.cpp_extension`` (once per machine)
  or returns ``None`` after one warning when that is impossible;
- `functions` holds the ``rnnkit::native_*`` operators' implementations (registered in
  `rnnkit.engine.ops`);
- `why_not` says whether the kernels can run an input, and if not, why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engine.native import build

SUPPORTED_DTYPES = (torch.float32, torch.float64)
NOT_BUILT = "the native kernels could not be built"


def _computed_dtype(x: Tensor) -> torch.dtype:
    """The dtype the operators compute in: float32 for a low precision under autocast."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernels are built (building them now if this is the first ask).

    A constant to torch.compile: it is asked once while tracing, never inside the graph.
    """
    return build.kernels() is not None


def why_not(x: Tensor) -> str | None:
    """``None`` when the native kernels can run ``x``, else the reason they cannot."""
    if not x.is_cpu:
        return f"the kernels are for the CPU, the input is on {x.device}"
    if _computed_dtype(x) not in SUPPORTED_DTYPES:
        return f"the kernels are for float32 and float64, the input is {x.dtype}"
    return None if available() else NOT_BUILT


def fma_peak(iterations: int) -> tuple[float, int, int] | None:
    """``(GFLOP/s, float32 lanes per vector, threads)`` of a loop of nothing but vector FMAs on
    every thread (`kernels.cpp` ``fma_peak``): the float32 peak this build reaches here; ``None``
    without the kernels."""
    kernels = build.kernels()
    if kernels is None:
        return None
    gflops, lanes, threads, _ = kernels.fma_peak(iterations)
    return gflops, int(lanes), int(threads)


def cpu_profile() -> str | None:
    """The kernels' loop rules for this CPU: ``"intel"`` or ``"other"`` (`kernels.cpp`
    ``CpuProfile``: detected from the CPU's maker at load, settable for tests and benchmarks);
    ``None`` without the kernels."""
    kernels = build.kernels()
    return None if kernels is None else kernels.cpu_profile()


def l2_cache_bytes() -> int | None:
    """A core's L2 cache in bytes as the C library reports it (1 MiB where it does not);
    ``None`` without the kernels."""
    kernels = build.kernels()
    return None if kernels is None else kernels.l2_cache_bytes()


__all__ = ["NOT_BUILT", "SUPPORTED_DTYPES", "available", "cpu_profile", "fma_peak",
           "l2_cache_bytes", "why_not"]
