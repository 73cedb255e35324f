"""rnnkit.engine.steps: the step equations against torch's own cell kernels, the closed Family
type, CellKind's checks, and the engine importing nothing above it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.engine.steps import (
    CellKind,
    CellWeights,
    Family,
    cell_gates,
    cell_step,
    family_of,
    output_of,
    state_of,
)


def test_engine_imports_nothing_above_it():
    # rnnkit/__init__ imports the whole public surface, so the package is stubbed: what is left
    # in sys.modules is what the engine itself pulls in.
    program = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('rnnkit')\n"
        "package = types.ModuleType('rnnkit')\n"
        "package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['rnnkit'] = package\n"
        "import rnnkit.engine\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('rnnkit'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            check=True)
    loaded = set(result.stdout.split())
    assert "rnnkit.engine.steps" in loaded
    outside = {m for m in loaded if m not in ("rnnkit", "rnnkit._checks")
               and not m.startswith("rnnkit.engine")}
    assert outside == set()  # no rnnkit.cells, layers, diagnostics, apps


def test_family_is_a_closed_string_type():
    assert [f.value for f in Family] == ["rnn", "lstm", "gru"]
    assert Family.LSTM == "lstm" and Family("gru") is Family.GRU
    assert str(Family.RNN) == "rnn" and f"{Family.LSTM:>6}" == "  lstm"
    assert json.dumps({"cell": Family.GRU}) == '{"cell": "gru"}'
    assert {"lstm": 1}[Family.LSTM] == 1


@pytest.mark.parametrize("given, expected", [("lstm", Family.LSTM), (Family.GRU, Family.GRU),
                                             ("rnn", Family.RNN)])
def test_cell_kind_converts_family(given, expected):
    kind = CellKind(given)
    assert kind.family is expected
    assert kind == CellKind(expected)  # the same kind whichever way it was named
    assert kind.family == expected.value  # code comparing strings keeps working


@pytest.mark.parametrize("bad", ["LSTM", "gru2", "", 3, None])
def test_cell_kind_refuses_unknown_family(bad):
    with pytest.raises(ValueError, match=r"CellKind family must be one of 'rnn', 'lstm', "
                                         r"'gru', got " + repr(repr(bad))[1:-1]):
        CellKind(bad)
    with pytest.raises(ValueError, match=r"cell must be one of"):
        family_of("cell", bad)


def test_cell_kind_refuses_bad_switches():
    with pytest.raises(ValueError, match=r"nonlinearity must be one of 'tanh', 'relu', got "
                                         r"'sigmoid'"):
        CellKind(Family.RNN, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match=r"reset_after must be True or False, got 1 \(int\)"):
        CellKind(Family.GRU, reset_after=1)


@pytest.mark.parametrize("module", [rnnkit.RNN(2, 3), rnnkit.LSTM(2, 3), rnnkit.GRU(2, 3),
                                    rnnkit.RNNCell(2, 3), rnnkit.LSTMCell(2, 3),
                                    rnnkit.GRUCell(2, 3)])
def test_modules_name_their_family_as_a_member(module):
    kind = module.cell_kind() if hasattr(module, "cell_kind") else module.kind()
    assert type(module.family) is Family and kind.family is module.family
    assert module.family.value == type(module).__name__.removesuffix("Cell").lower()


def _weights(gates, inputs=4, hidden=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return CellWeights(draw(gates * hidden, inputs), draw(gates * hidden, hidden),
                       draw(gates * hidden), draw(gates * hidden))


def test_steps_match_torch_cell_kernels():
    """torch.nn's cells run ATen's own kernels (rnn_tanh_cell, lstm_cell, gru_cell): an
    independent implementation of the same equations."""
    x = torch.randn(3, 4, dtype=torch.float64)
    h, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    w = _weights(1)
    torch.testing.assert_close(cell_step(CellKind("rnn"), x, h, w),
                               torch.rnn_tanh_cell(x, h, *w[:4]))
    torch.testing.assert_close(cell_step(CellKind("rnn", nonlinearity="relu"), x, h, w),
                               torch.rnn_relu_cell(x, h, *w[:4]))
    w = _weights(4)
    expected = torch.lstm_cell(x, (h, c), *w[:4])
    for got, want in zip(cell_step(CellKind("lstm"), x, (h, c), w), expected, strict=True):
        torch.testing.assert_close(got, want)
    w = _weights(3)
    torch.testing.assert_close(cell_step(CellKind("gru"), x, h, w), torch.gru_cell(x, h, *w[:4]))


def test_gates_and_state_agree_with_the_step():
    x, h = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    c = torch.randn(2, 5, dtype=torch.float64)
    for kind, gates, state in [(CellKind("lstm"), 4, (h, c)), (CellKind("gru"), 3, h),
                               (CellKind("rnn"), 1, h)]:
        w = _weights(gates)
        step = cell_step(kind, x, state, w)
        from_gates = state_of(kind, cell_gates(kind, x, state, w))
        torch.testing.assert_close(output_of(from_gates), output_of(step), rtol=0, atol=0)
        if kind.family == Family.LSTM:
            torch.testing.assert_close(from_gates[1], step[1], rtol=0, atol=0)
