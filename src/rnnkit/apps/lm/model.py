"""The language model: embedding -> rnnkit recurrent stack -> output layer over the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from rnnkit.apps.recurrent import RecurrentConfig, build_recurrent
from rnnkit.configuration import check_config


def default_recurrent() -> RecurrentConfig:
    return RecurrentConfig(hidden_size=256, num_layers=2, dropout=0.1)


@dataclass
class ModelConfig:
    """What the model is; every field maps one to one onto an `rnnkit lm train` option."""

    vocabulary_size: int = field(default=0, metadata={"cli": False})  # set from the text
    embedding_size: int = field(default=64, metadata={"option": "--embedding", "check": "positive"})
        # ignored with tied weights: the embedding is then hidden-sized
    tie_weights: bool = False  # output layer shares the embedding matrix (Press & Wolf 2017)
    recurrent: RecurrentConfig = field(default_factory=default_recurrent)

    def check(self) -> None:
        if self.tie_weights and self.recurrent.output_size != self.recurrent.hidden_size:
            raise ValueError("--tie-weights shares the embedding with the output layer, which "
                             "reads the projected h: use it without a projection")

    @property
    def hidden_size(self) -> int:
        return self.recurrent.hidden_size

    @property
    def num_layers(self) -> int:
        return self.recurrent.num_layers


# Chrono initialisation's T_max when the model is built without its training window (to load
# weights, which replace the drawn ones): the default truncated-BPTT window.
CHRONO_SPAN = 100


class LanguageModel(nn.Module):
    """Next-token logits for token ids.

    ``x (T, N)`` int64 ids and a state -> logits ``(T, N, V)`` and the new state, with
    ``e = Embedding(x)``, ``h = RNN(e, state)``, ``logits = W_out dropout(h) + b_out``.
    """

    def __init__(self, config: ModelConfig, chrono_span: int = CHRONO_SPAN) -> None:
        """``chrono_span``: chrono initialisation's T_max, the truncated-BPTT window."""
        super().__init__()
        check_config(config)
        self.config = config
        recurrent = config.recurrent
        embedding_size = recurrent.hidden_size if config.tie_weights else config.embedding_size
        self.embedding = nn.Embedding(config.vocabulary_size, embedding_size)
        self.recurrent = build_recurrent(recurrent, embedding_size, chrono_max_length=chrono_span)
        self.dropout = nn.Dropout(recurrent.dropout)
        self.output = nn.Linear(recurrent.output_size, config.vocabulary_size)
        if config.tie_weights:
            self.output.weight = self.embedding.weight

    def forward(self, ids: Tensor, state=None):
        hidden, state = self.recurrent(self.embedding(ids), state)  # (T, N, H)
        return self.output(self.dropout(hidden)), state  # (T, N, V)


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
