"""The 0/1 masks of recurrent dropout, zoneout and weight drop: where their random bits come from.

Every mask comes from torch's default generator, so ``torch.manual_seed`` makes a run
reproducible, and the layer draws it once per forward call before choosing an engine, so every
engine sees the same mask. An entry is 1 with probability ``p``: it is 1 when a uniform 32-bit
integer ``u`` is below ``round(p·2^32)`` (the law of ``torch.bernoulli`` with ``p`` rounded to a
multiple of 2^-32; ``torch.rand(...) < p`` rounds it to 2^-24). The integers come from:

- **torch's generator directly**: the two 32-bit halves of each 64-bit draw;
- **SplitMix64 in the native kernels**, for masks of at least `NATIVE_MIN_ENTRIES` entries on
  the CPU when the kernels are built: one 64-bit seed from torch's generator, then draw ``k`` is
  ``mix(seed + (k + 1)·γ)`` (Steele, Lea and Flood 2014; `splitmix64` is the readable version the
  kernel is tested against), its halves again two entries. Torch's CPU generator costs ~3 ns
  a 64-bit draw; this, computed in parallel and vectorised, about a tenth: a (100, 32, 256)
  zoneout mask was 15 % of an RNN training step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rnnkit.engine import native, ops

NATIVE_MIN_ENTRIES = 1 << 14
"""Smaller masks come from torch's generator: the kernel call would cost more than it saves."""

SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_UINT64 = (1 << 64) - 1


def bernoulli(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """0/1 entries of ``shape`` (``like``'s dtype and device), 1 with probability ``p``."""
    threshold = round(p * 2**32)  # u in [0, 2^32) gives 1 below it
    if threshold <= 0 or threshold >= 2**32:
        return torch.full(shape, 1.0 if threshold > 0 else 0.0, dtype=like.dtype,
                          device=like.device)
    count = math.prod(shape)
    if (count >= NATIVE_MIN_ENTRIES and like.dtype in native.SUPPORTED_DTYPES
            and native.why_not(like) is None):
        seed = uniform_64bit_draws(1, like.device).view(())
        return ops.native_bernoulli(seed, list(shape), p, like.dtype == torch.float64)
    halves = uniform_64bit_draws((count + 1) // 2, like.device).view(torch.int32)[:count]
    return (halves < threshold - 2**31).to(like.dtype).view(shape)  # halves hold u - 2^31


def uniform_64bit_draws(count: int, device: torch.device) -> Tensor:
    """``count`` uniform 64-bit integers (int64) from torch's default generator for ``device``."""
    if torch.compiler.is_compiling():  # Dynamo traces no in-place random_; randint draws the
        # same 64 bits with the top one flipped, flipped back so compiled equals eager
        return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64,
                             device=device) ^ -(2**63)
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None)


def splitmix64(seed: int, count: int) -> list[int]:
    """The first ``count`` SplitMix64 outputs from state ``seed`` (unsigned 64-bit integers):
    the reference the native mask kernel is tested against."""
    outputs = []
    for k in range(1, count + 1):
        z = (seed + k * SPLITMIX_GAMMA) & _UINT64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
        outputs.append(z ^ (z >> 31))
    return outputs


__all__ = ["NATIVE_MIN_ENTRIES", "bernoulli", "splitmix64", "uniform_64bit_draws"]
