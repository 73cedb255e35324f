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


def _rnn_arguments(T=3, N=4, H=5):
    torch.manual_seed(0)
    return torch.randn(T, N, H), torch.randn(N, H), torch.randn(H, H)


@pytest.mark.parametrize("argument, value, message", [
    ("recurrent_mask", torch.ones(1, 5), r"recurrent_mask must have shape \(4, 5\)"),
    ("recurrent_mask", torch.ones(4, 5, dtype=torch.float64), "recurrent_mask must be"),
    ("zoneout_h", torch.ones(4, 5), r"zoneout_h must be a 0-dim probability or have shape"),
    ("zoneout_h", torch.ones(3, 1, 5), r"zoneout_h must be a 0-dim probability or have shape"),
    ("zoneout_h", torch.ones(3, 4, 5, dtype=torch.bool), "zoneout_h must be"),
    ("h0", torch.ones(1, 5), r"h0 must have shape \(4, 5\)"),
])
def test_the_fused_recurrence_operator_names_a_wrong_argument(argument, value, message):
    # The native operator refuses these by name; the fused one broadcast them into garbage.
    pre_x, h0, w_hh = _rnn_arguments()
    arguments = dict(pre_x=pre_x, h0=h0, w_hh=w_hh, gain_hh=None, recurrent_mask=None,
                     zoneout_h=None, lengths=None, reverse=False, relu=False)
    arguments[argument] = value
    with pytest.raises(ValueError, match=f"fused_rnn_recurrence: {message}"):
        torch.ops.rnnkit.fused_rnn_recurrence(*arguments.values())


def test_the_fused_lstm_and_gru_recurrence_operators_name_a_wrong_argument():
    T, N, H = 3, 4, 5
    pre_x, h0, c0, w_hh = (torch.randn(T, N, 4 * H), torch.randn(N, H), torch.randn(N, H),
                           torch.randn(4 * H, H))
    with pytest.raises(ValueError, match=r"fused_lstm_recurrence: zoneout_c must be a 0-dim"):
        torch.ops.rnnkit.fused_lstm_recurrence(pre_x, h0, c0, w_hh, None, None, None, None,
                                               None, None, None, torch.ones(T, N, 1), None, False)
    with pytest.raises(ValueError, match=r"fused_lstm_recurrence: gain_ih \(the input side's "
                                         r"layer norm\) needs gain_hh"):
        torch.ops.rnnkit.fused_lstm_recurrence(pre_x, h0, c0, w_hh, None, None, None, None,
                                               None, None, None, None, None, False,
                                               torch.ones(4 * H))
    with pytest.raises(ValueError, match=r"fused_lstm_recurrence: bias_ih must have shape"):
        torch.ops.rnnkit.fused_lstm_recurrence(pre_x, h0, c0, w_hh, None, None, None, None,
                                               None, None, None, None, None, False, None,
                                               torch.ones(H))
    with pytest.raises(ValueError, match=r"fused_gru_recurrence: with reset_after=False"):
        torch.ops.rnnkit.fused_gru_recurrence(torch.randn(T, N, 3 * H), h0,
                                              torch.randn(3 * H, H), None, torch.ones(3 * H),
                                              None, None, None, False, False)
