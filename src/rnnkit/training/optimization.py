"""Optimisers, learning-rate schedules and gradient clipping, by name, from torch.

Clipping is torch's own: by global norm (`torch.nn.utils.clip_grad_norm_`) and/or by value
(`torch.nn.utils.clip_grad_value_`); the norm before clipping is returned for logging either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(parameters, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """A per-step schedule over ``total_steps``: constant, cosine or linear decay to zero."""
    factors = {
        "constant": lambda step: 1.0,
        "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
        "linear": lambda step: max(0.0, 1 - step / total_steps),
    }
    if name not in factors:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    factor = factors[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(module: nn.Module, max_norm: float | None, max_value: float | None) -> float:
    """Clip by value, then by global norm (each if given); returns the global norm before."""
    parameters = [p for p in module.parameters() if p.grad is not None]
    # With an infinite bound clip_grad_norm_ only measures (the scale factor is clamped to 1).
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, math.inf))
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(parameters, max_value)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm
