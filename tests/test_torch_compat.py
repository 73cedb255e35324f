"""Code written for torch.nn's recurrent layers runs on rnnkit's: the word language model of
pytorch/examples trained side by side, torch.nn.RNNBase's members (`flatten_parameters`,
`_flat_weights`, `all_weights`, `mode`) against torch.nn's own, and what TorchScript does."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import rnnkit


class WordLanguageModel(nn.Module):
    """pytorch/examples word_language_model/model.py's RNNModel (LSTM), trimmed: an encoder, a
    recurrent stack that calls ``flatten_parameters()`` in every forward, a decoder."""

    def __init__(self, tokens: int, embedding: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(tokens, embedding)
        self.rnn = nn.LSTM(embedding, hidden, layers)  # dropout between layers: see the test
        self.decoder = nn.Linear(hidden, tokens)
        self.tokens, self.hidden, self.layers = tokens, hidden, layers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        self.rnn.flatten_parameters()
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.tokens)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, batch: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.layers, batch, self.hidden),
                weight.new_zeros(self.layers, batch, self.hidden))


def train_like_the_example(model, batches, seed):
    """main.py's loop: hidden state carried and detached, clip_grad_norm_(0.25), plain SGD with
    lr 20. Returns the losses and every step's gradients."""
    torch.manual_seed(seed)  # the same dropout masks for both models
    model.train()
    hidden = model.init_hidden(batches[0][0].shape[1])
    losses, gradients = [], []
    for data, targets in batches:
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = F.nll_loss(output, targets)
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-20.0)
        losses.append(loss.item())
    return losses, gradients


def test_word_language_model_trains_the_same_on_rnnkit():
    torch.manual_seed(0)
    reference = WordLanguageModel(tokens=13, embedding=6, hidden=5, layers=2,
                                  dropout=0.2).double()
    swapped = copy.deepcopy(reference)
    swapped.rnn = rnnkit.from_torch(swapped.rnn)
    assert isinstance(swapped.rnn, rnnkit.LSTM)
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(13, (4 * 6 + 1, 3), generator=generator)  # (tokens, batch)
    batches = [(text[i : i + 6], text[i + 1 : i + 7].reshape(-1)) for i in range(0, 24, 6)]
    expected_losses, expected_gradients = train_like_the_example(reference, batches, seed=2)
    losses, gradients = train_like_the_example(swapped, batches, seed=2)
    assert losses == pytest.approx(expected_losses, rel=1e-10)
    assert losses[-1] != losses[0]  # it trained
    for got, want in zip(gradients, expected_gradients, strict=True):
        assert list(got) == list(want)  # same names, same order: an optimiser lines up
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10)
    for (name, got), want in zip(swapped.state_dict().items(),
                                 reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


CONFIGURATIONS = {
    "lstm": (nn.LSTM, {}),
    "lstm-proj-bi-2": (nn.LSTM, {"proj_size": 2, "bidirectional": True, "num_layers": 2}),
    "gru-bi-2": (nn.GRU, {"bidirectional": True, "num_layers": 2}),
    "rnn-relu-bi-nobias": (nn.RNN, {"nonlinearity": "relu", "bidirectional": True,
                                    "bias": False}),
    "rnn-tanh-2": (nn.RNN, {"num_layers": 2}),
}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_torch_nn_members_match_torch_nn(name):
    torch_class, arguments = CONFIGURATIONS[name]
    torch.manual_seed(0)
    original = torch_class(3, 4, dtype=torch.float64, **arguments)
    layer = rnnkit.from_torch(original)
    assert layer._flat_weights_names == original._flat_weights_names
    assert layer._all_weights == original._all_weights
    for got, want in zip(layer._flat_weights, original._flat_weights, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    assert [[p.shape for p in group] for group in layer.all_weights] == [
        [p.shape for p in group] for group in original.all_weights]
    assert (layer.mode, layer.proj_size) == (original.mode, original.proj_size)


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_torch_kernels_read_flat_weights_as_torch_nn_does(name):
    """torch.nn's forward hands ``_flat_weights`` to ATen's lstm / gru / rnn_* kernel: on an
    rnnkit layer's list the same kernel reproduces the rnnkit layer's output."""
    torch_class, arguments = CONFIGURATIONS[name]
    torch.manual_seed(0)
    layer = rnnkit.from_torch(torch_class(3, 4, dtype=torch.float64, **arguments))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, state = layer(x)
    kernel = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh,
              "RNN_RELU": torch.rnn_relu}[layer.mode]
    zeros = torch.zeros(layer.num_layers * layer.num_directions, 2, layer.output_size,
                        dtype=torch.float64)
    hx = ((zeros, torch.zeros(*zeros.shape[:2], layer.hidden_size, dtype=torch.float64))
          if layer.mode == "LSTM" else zeros)
    expected = kernel(x, hx, layer._flat_weights, layer.bias, layer.num_layers, 0.0, False,
                      layer.bidirectional, False)
    torch.testing.assert_close(output, expected[0])
    torch.testing.assert_close(state[0] if layer.mode == "LSTM" else state, expected[1])


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_flat_weights_stay_current():
    layer = rnnkit.LSTM(3, 4)
    assert [w.dtype for w in layer.double()._flat_weights] == [torch.float64] * 4
    replacement = nn.Parameter(torch.zeros(16, 4, dtype=torch.float64))
    layer.weight_hh_l0 = replacement
    assert layer._flat_weights[1] is replacement
    before = layer.weight_ih_l0.detach().clone()
    parametrize.register_parametrization(layer, "weight_ih_l0", Doubled())
    torch.testing.assert_close(layer._flat_weights[0], 2 * before)
    assert layer._flat_weights_names[0] == "weight_ih_l0"


def test_variant_parameters_are_in_all_weights_only():
    layer = rnnkit.LSTM(3, 4, peephole=True, bidirectional=True)
    assert "weight_ch_l0" not in layer._flat_weights_names  # torch.nn's kernels cannot read it
    assert [group[-1] for group in layer._all_weights] == ["weight_ch_l0",
                                                           "weight_ch_l0_reverse"]
    assert layer.all_weights[1][-1] is layer.weight_ch_l0_reverse


@pytest.mark.parametrize("make", [lambda: rnnkit.LSTM(3, 4, num_layers=2),
                                  lambda: rnnkit.GRU(3, 4), lambda: rnnkit.RNN(3, 4)])
def test_flatten_parameters_is_a_no_op(make):
    layer = make()
    x = torch.randn(5, 2, 3)
    before = {n: p.clone() for n, p in layer.state_dict().items()}
    expected = layer(x)[0]
    assert layer.flatten_parameters() is None
    assert all(torch.equal(p, before[n]) for n, p in layer.state_dict().items())
    assert torch.equal(layer(x)[0], expected)


@pytest.mark.parametrize("make", [lambda: rnnkit.LSTM(3, 4), lambda: rnnkit.GRUCell(3, 4),
                                  lambda: nn.Sequential(nn.Linear(3, 3), rnnkit.RNN(3, 4))])
def test_torch_jit_script_refuses_with_the_alternatives(make):
    module = make()
    name = type(module[1] if isinstance(module, nn.Sequential) else module).__name__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own notice
        with pytest.raises(RuntimeError, match=re.escape(
                f"torch.jit.script cannot compile rnnkit.{name}")) as caught:
            torch.jit.script(module)
    for alternative in ("torch.compile(model)", "torch.export.export(model, args)"):
        assert alternative in str(caught.value)


@pytest.mark.parametrize("backend", ["auto", "native", "fused", "reference"])
def test_torch_jit_trace_generalises_to_other_lengths_and_batches(backend, monkeypatch):
    """torch.jit.trace records the engine's operator as one node, so the traced module runs
    any length and batch. The reference's Python loop would be unrolled to the example's
    length: under tracing it runs the fused operator, after one BackendWarning."""
    monkeypatch.setattr(rnnkit.engine, "_warned", set())  # the warning is once per process
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, backend=backend, peephole=True, bidirectional=True)
    example, longer = torch.randn(5, 2, 3), torch.randn(7, 6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(layer, (example,))
    warned = [w for w in caught if issubclass(w.category, rnnkit.engine.BackendWarning)]
    assert bool(warned) == (backend == "reference")
    for x in (example, longer):
        torch.testing.assert_close(traced(x), layer(x))
