"""The language model: embedding -> rnnkit recurrent stack -> output layer over the vocabulary,
with the model-level regularisation of AWD-LSTM (Merity et al. 2018) as options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.recurrent import CELLS, RecurrentConfig, build_recurrent
from rnnkit.configuration import check_config
from rnnkit.layers import RecurrentLayer


def default_recurrent() -> RecurrentConfig:
    return RecurrentConfig(hidden_size=256, num_layers=2, dropout=0.1)


@dataclass
class ModelConfig:
    """What the model is; every field maps one to one onto an `rnnkit lm train` option."""

    vocabulary_size: int = field(default=0, metadata={"cli": False})  # set from the text
    embedding_size: int = field(default=64, metadata={"option": "--embedding", "check": "positive"})
        # ignored with tied weights: the embedding is then hidden-sized
    tie_weights: bool = False  # output layer shares the embedding matrix (Press & Wolf 2017)
    embedding_dropout: float = field(default=0.0, metadata={"check": "probability"})
        # drop whole tokens: rows of the embedding matrix, one mask per forward call (AWD's
        # dropoute), training only
    input_dropout: float = field(default=0.0, metadata={"check": "probability"})
        # locked dropout on the embedding output (AWD's dropouti), training only
    locked_dropout: bool = False  # --dropout between layers and before the output layer uses
        # one mask per sequence, the same at every step (AWD's dropouth and dropout)
    output_dropout: float | None = field(default=None, metadata={"check": "probability"})
        # dropout before the output layer (none: --dropout)
    recurrent: RecurrentConfig = field(default_factory=default_recurrent)

    def check(self) -> None:
        if self.tie_weights and self.recurrent.output_size != self.recurrent.hidden_size:
            raise ValueError("--tie-weights shares the embedding with the output layer, which "
                             "reads the projected h: use it without a projection")
        for name in ("embedding_dropout", "input_dropout", "output_dropout"):
            value = getattr(self, name)
            if value is not None and value >= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be below 1 (at 1 nothing is "
                                 f"kept), got {value}")
        if self.locked_dropout and self.recurrent.backend == "torch.nn":
            raise ValueError("--locked-dropout runs the stack layer by layer, which the "
                             "torch.nn backend does not open; use an rnnkit backend")
        if self.locked_dropout and not issubclass(CELLS[self.recurrent.family], RecurrentLayer):
            raise ValueError(f"--locked-dropout runs the stack layer by layer, which --cell "
                             f"{self.recurrent.cell}'s layer does not open (lstm, gru and rnn "
                             "do); use --dropout")

    @property
    def hidden_size(self) -> int:
        return self.recurrent.hidden_size

    @property
    def num_layers(self) -> int:
        return self.recurrent.num_layers


# Chrono initialisation's T_max when the model is built without its training window (to load
# weights, which replace the drawn ones): the default truncated-BPTT window.
CHRONO_SPAN = 100


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational ("locked") dropout of a time-major ``x (T, N, F)``: one inverted mask
    ``(1, N, F)`` for all steps (Gal & Ghahramani 2016; Merity et al.'s LockedDropout)."""
    if not training or not p:
        return x
    mask = torch.bernoulli(torch.full((1, *x.shape[1:]), 1 - p, dtype=x.dtype,
                                      device=x.device))
    return x * mask / (1 - p)


def embedding_dropout(weight: Tensor, p: float, training: bool) -> Tensor:
    """The embedding matrix ``(V, E)`` with whole rows (tokens) dropped with probability
    ``p`` and the rest scaled by ``1 / (1 - p)`` (Gal & Ghahramani 2016, as AWD-LSTM uses it):
    a dropped token embeds to zero wherever it occurs in the batch."""
    if not training or not p:
        return weight
    mask = torch.bernoulli(torch.full((weight.shape[0], 1), 1 - p, dtype=weight.dtype,
                                      device=weight.device))
    return weight * mask / (1 - p)


class LanguageModel(nn.Module):
    """Next-token logits for token ids.

    ``x (T, N)`` int64 ids and a state -> logits ``(T, N, V)`` and the new state, with
    ``e = Embedding(x)``, ``h = RNN(e, state)``, ``logits = W_out dropout(h) + b_out``.
    The AWD options (training only): ``embedding_dropout`` drops rows of the embedding matrix,
    ``input_dropout`` is locked dropout on ``e``; with ``locked_dropout`` the stack runs layer
    by layer with a locked mask between layers and before the output layer.
    """

    def __init__(self, config: ModelConfig, chrono_span: int = CHRONO_SPAN) -> None:
        """``chrono_span``: chrono initialisation's T_max, the truncated-BPTT window."""
        super().__init__()
        check_config(config)
        self.config = config
        recurrent = config.recurrent
        embedding_size = recurrent.hidden_size if config.tie_weights else config.embedding_size
        self.embedding = nn.Embedding(config.vocabulary_size, embedding_size)
        # With locked dropout the model applies --dropout between the layers itself.
        stack = replace(recurrent, dropout=0.0) if config.locked_dropout else recurrent
        self.recurrent = build_recurrent(stack, embedding_size, chrono_max_length=chrono_span)
        self.output_rate = (recurrent.dropout if config.output_dropout is None
                            else config.output_dropout)
        self.dropout = nn.Dropout(self.output_rate)
        self.output = nn.Linear(recurrent.output_size, config.vocabulary_size)
        if config.tie_weights:
            self.output.weight = self.embedding.weight

    def forward(self, ids: Tensor, state=None):
        config = self.config
        weight = embedding_dropout(self.embedding.weight, config.embedding_dropout,
                                   self.training)
        embedded = F.embedding(ids, weight)  # (T, N, E)
        embedded = locked_dropout(embedded, config.input_dropout, self.training)
        if not config.locked_dropout:
            hidden, state = self.recurrent(embedded, state)  # (T, N, H)
            return self.output(self.dropout(hidden)), state  # (T, N, V)
        hidden, state = self._locked_stack(embedded, state)
        return self.output(locked_dropout(hidden, self.output_rate, self.training)), state

    def stream(self, state=None) -> Callable[[Tensor], Tensor]:
        """Next-token logits a step at a time, for generation in evaluation mode: a callable
        ``ids (N,) -> logits (N, V)`` that keeps the state between calls, starting from
        ``state`` (`forward`'s). The same as `forward` on one-step sequences (the AWD dropouts
        are off in evaluation); an rnnkit RNN, LSTM or GRU stack runs on its `LayerStream`
        (one native call per layer and step), the others (torch.nn's, MinGRU, MinLSTM) through
        their forward on one-step sequences."""
        if self.training:
            raise ValueError("LanguageModel.stream is for generation in evaluation mode (its "
                             "dropouts are off there); call model.eval() first")
        recurrent = self.recurrent
        if isinstance(recurrent, RecurrentLayer) and not recurrent.bidirectional:
            layers = recurrent.stream(state)
            return lambda ids: self.output(layers(self.embedding(ids)))
        held = [state]

        def step(ids: Tensor) -> Tensor:
            logits, held[0] = self(ids.view(1, -1), held[0])
            return logits[0]

        return step

    def _locked_stack(self, embedded: Tensor, state):
        """The stack layer by layer (each direction through the layer's own engine), with
        locked dropout of ``--dropout`` between layers."""
        stack = self.recurrent
        prepared = stack.prepare(embedded, state)
        layer_input, finals = prepared.x, []
        directions = stack.num_directions
        for layer in range(stack.num_layers):
            outputs = []
            for direction in range(directions):
                output, final = stack.run_direction(
                    layer, direction, layer_input, prepared.initial[layer * directions + direction],
                    prepared.lengths)
                outputs.append(output)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=2) if directions > 1 else outputs[0]
            if layer < stack.num_layers - 1:
                layer_input = locked_dropout(layer_input, self.config.recurrent.dropout,
                                             self.training)
        return layer_input, stack._stack_states(finals, prepared.batched)


# Training holds four float32 copies of every parameter: weights, gradients, Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in LanguageModel(config).parameters())


def physical_memory_bytes() -> int | None:
    """This machine's memory, or None where the platform does not say."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def model_too_large(config: ModelConfig, why: str) -> str:
    """The one line that refuses ``config`` for its size, naming the options that set it."""
    return (f"--hidden {config.hidden_size}, --layers {config.num_layers}, --embedding "
            f"{config.embedding_size} (vocabulary {config.vocabulary_size}): the model {why}; "
            "choose a smaller --hidden, --layers or --embedding")


def check_model_fits(config: ModelConfig) -> None:
    """``ValueError`` when training ``config`` would need more than the machine's memory,
    estimated before any weight is allocated (an allocator failure is a traceback, or the
    kernel's out-of-memory killer)."""
    memory = physical_memory_bytes()
    if memory is None:
        return
    from rnnkit._checks import TooLarge

    try:
        parameters = parameter_count(config)
    except TooLarge:  # the recurrent layers refuse to exist: their weights alone do not fit
        raise ValueError(model_too_large(
            config, f"needs more than this machine's {memory / 2**30:,.1f} GiB of memory for "
            "its recurrent weights alone")) from None
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if needed > memory:
        raise ValueError(model_too_large(
            config, f"has {parameters:,} parameters, and training them needs about "
            f"{needed / 2**30:,.1f} GiB (weights, gradients and optimizer state), more than this "
            f"machine's {memory / 2**30:,.1f} GiB of memory"))
