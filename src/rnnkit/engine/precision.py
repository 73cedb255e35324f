"""Mixed precision: what rnnkit's layers and cells do under ``torch.autocast``.

Policy: a recurrent layer or cell computes in its parameters' float32 under autocast, whatever
the low precision (bfloat16, float16) of the input it receives, and returns float32. The
recurrence multiplies by ``W_hh`` and accumulates over every step, so its error grows with the
length: in bfloat16 (8 bits of mantissa) states drift visibly within tens of steps, which is
why torch.nn's autocast runs its RNNs in float32 on CUDA too (``lstm``/``gru`` cast to the
widest input type). The products around it (embeddings, heads) keep autocast's speed.

`autocast_inputs` casts the low-precision floating inputs to the parameters' dtype; the module
then runs with autocast off, so every engine (reference included) computes the same float32
math. The engine's operators declare the same rule to torch.library (``register_autocast``),
for callers of ``torch.ops.rnnkit.*`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocasting(parameter: Tensor) -> bool:
    """Whether autocast is on for the parameter's device, with float32 parameters."""
    # The first test is one C call: a streamed step asks this on every call.
    return (torch._C._is_any_autocast_enabled() and parameter.dtype == torch.float32
            and torch.is_autocast_enabled(parameter.device.type))


def to_parameter_dtype(value, parameter: Tensor):
    """A tensor, PackedSequence or tuple of tensors with every low-precision float cast."""
    if isinstance(value, PackedSequence):
        return value._replace(data=to_parameter_dtype(value.data, parameter))
    if isinstance(value, Tensor):
        return value.to(parameter.dtype) if value.dtype in LOW_PRECISION else value
    if isinstance(value, tuple | list):
        return type(value)(to_parameter_dtype(v, parameter) for v in value)
    return value


__all__ = ["LOW_PRECISION", "autocasting", "to_parameter_dtype"]
