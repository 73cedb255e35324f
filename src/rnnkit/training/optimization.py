"""Optimisers, learning-rate schedules and gradient clipping, by name, from torch.

Gradient clipping, the three ways textbooks teach it (TensorFlow's names), each done by torch:

- by value (``clip_by_value``): every element into ``[-v, v]``, `torch.nn.utils.clip_grad_value_`;
- by norm per tensor (``clip_by_norm``): each parameter's gradient ``g ← g · n / max(‖g‖, n)``,
  `torch.nn.utils.clip_grad_norm_` on that tensor alone;
- by global norm (``clip_by_global_norm``): all gradients ``g ← g · n / max(‖(g_1, …, g_k)‖, n)``,
  `torch.nn.utils.clip_grad_norm_` on all of them.

The global norm before any clipping is returned for logging whichever are used.
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


def check_clipping(**bounds: float | None) -> None:
    """``ValueError`` naming the first clipping bound that is neither None (off) nor a positive
    number: a bound of 0 would zero every gradient. Configurations call it at their boundary."""
    for name, bound in bounds.items():
        if bound is not None and not bound > 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive number or None (off), "
                             f"got {bound!r}")


def clip_gradients(module: nn.Module, max_norm: float | None = None,
                   max_value: float | None = None, max_tensor_norm: float | None = None) -> float:
    """Clip by value, then by norm per tensor, then by global norm (each if given); returns the
    global norm before clipping. A bound of 0 would zero every gradient: ``ValueError``."""
    check_clipping(max_norm=max_norm, max_value=max_value, max_tensor_norm=max_tensor_norm)
    parameters = [p for p in module.parameters() if p.grad is not None]
    # With an infinite bound clip_grad_norm_ only measures (the scale factor is clamped to 1).
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, math.inf))
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(parameters, max_value)
    if max_tensor_norm is not None:
        for parameter in parameters:
            torch.nn.utils.clip_grad_norm_([parameter], max_tensor_norm)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm
