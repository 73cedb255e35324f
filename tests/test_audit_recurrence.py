"""Audit of the recurrence operators (``rnnkit::{fused,native}_*_recurrence``): one test per
bug found, each against the reference engine or the named error the project rules ask for."""

from __future__ import annotations

import pytest
import torch

import rnnkit

ENGINES = ("fused", "native", "auto")


@pytest.mark.parametrize("cls", [rnnkit.LSTMCell, rnnkit.GRUCell, rnnkit.RNNCell])
@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mask_batch", [None, 1])
def test_a_cell_takes_a_broadcast_recurrent_mask_on_every_engine(cls, backend, mask_batch):
    # The cell accepts (H_out,) and (1, H_out) for batched input (recurrent_dropout_mask()
    # without a batch gives the former); the native kernels take (N, H_out) only.
    torch.manual_seed(0)
    cell = cls(4, 5, recurrent_dropout=0.3)
    x = torch.randn(3, 4)
    mask = cell.recurrent_dropout_mask(mask_batch)
    cell.backend = "reference"
    expected = cell(x, None, recurrent_mask=mask)
    cell.backend = backend
    got = cell(x, None, recurrent_mask=mask)
    for a, b in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,), strict=True):
        torch.testing.assert_close(b, a)
