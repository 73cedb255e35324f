"""The settings of `rnnkit lm train|throughput|sample|eval` and `rnnkit demo`: the model and
training configs plus what the command itself reads (the text, the checkpoint); their options,
config files and ``--print-config`` are generated from these dataclasses
(`rnnkit.configuration`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace

from rnnkit.apps.lm.corpus import CORPORA
from rnnkit.apps.lm.model import ModelConfig
from rnnkit.apps.lm.train import TrainConfig

# The vocabulary comes from the text, never from an option.
LM_EXCLUDE = frozenset({"model.vocabulary_size"})
# The settings a resumed run may change: the rest continue as saved.
RESUMABLE = frozenset({"train.loop.steps", "train.loop.device", "checkpoint", "resume", "quiet",
                       "plot", "overwrite", "text_file", "corpus"})


@dataclass
class LMTrainCommand:
    """`rnnkit lm train`: train on a text file or a built-in corpus."""

    text_file: str | None = field(default=None, metadata={"positional": True,
                                                          "metavar": "TEXT_FILE"})
        # a UTF-8 text file
    corpus: str | None = field(default=None, metadata={"choices": CORPORA})
        # a built-in corpus instead of a file
    checkpoint: str = "lm.pt"  # checkpoint path
    resume: str | None = field(default=None, metadata={"metavar": "CKPT"})
        # continue the run saved in CKPT (only --steps may change)
    overwrite: bool = False  # replace an existing --checkpoint file (refused otherwise)
    plot: str | None = field(default=None, metadata={"metavar": "PNG"})
        # save train/validation loss curves here
    quiet: bool = False  # no progress bar
    preset: str | None = field(default=None, metadata={"choices": ("awd",)})
        # awd: the AWD-LSTM recipe's regularisation on this model (Merity et al. 2018, their
        # character-level settings): weight drop 0.5 on W_hh, locked dropout 0.25 between
        # layers, 0.1 on the embedding output and before the output layer, tied weights;
        # options given with it override its values (--print-config shows them all)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def with_preset(cls, name: str) -> LMTrainCommand:
        """The defaults of ``--preset name``: what the options start from before the config
        file and the command line."""
        if name != "awd":
            raise ValueError(f"--preset must be awd, got {name!r}")
        plain = cls()
        recurrent = replace(plain.model.recurrent, weight_drop=0.5, dropout=0.25)
        return replace(plain, preset=name, model=replace(
            plain.model, tie_weights=True, locked_dropout=True, input_dropout=0.1,
            output_dropout=0.1, recurrent=recurrent))


@dataclass
class LMThroughputCommand:
    """`rnnkit lm throughput`: training speed on rnnkit against the same model on torch.nn (a
    cell torch.nn lacks against rnnkit's nearest: minGRU against GRU, minLSTM against LSTM)."""

    text_file: str | None = field(default=None, metadata={"positional": True,
                                                          "metavar": "TEXT_FILE"})
        # a UTF-8 text file
    corpus: str | None = field(default=None, metadata={"choices": CORPORA})
        # a built-in corpus instead of a file
    blocks: int = field(default=7, metadata={"check": "positive"})  # timed blocks (median)
    block_steps: int = field(default=10, metadata={"check": "positive"})
        # training steps per block
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_temperature(text: str) -> float:
    """A finite number >= 0 (0: greedy)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(
            f"--temperature takes a finite number >= 0, got {text!r}")
    return value


@dataclass
class LMSampleCommand:
    """`rnnkit lm sample`: generate text from a checkpoint."""

    checkpoint: str | None = field(default=None, metadata={"positional": True,
                                                           "metavar": "CKPT"})
        # a checkpoint of `rnnkit lm train`
    prime: str = ""  # text the model reads before generating
    length: int = field(default=500, metadata={"check": "positive"})  # tokens to generate
    temperature: float = field(default=1.0, metadata={"parse": parse_temperature})
        # 0 is greedy (a tiny one tends to it); below 1 sharper, above 1 flatter
    top_k: int | None = field(default=None, metadata={"check": "positive"})
        # sample among the k most likely tokens (none: all)
    top_p: float | None = field(default=None, metadata={"check": "probability"})
        # sample among the fewest most likely tokens whose probability reaches this mass; the
        # most likely token always stays, so 0 is greedy (none: all)
    seed: int | None = field(default=None, metadata={"check": "seed"})
        # random seed (reproducible samples; none: unseeded)


@dataclass
class LMEvalCommand:
    """`rnnkit lm eval`: the loss of a checkpoint on a new text file."""

    checkpoint: str | None = field(default=None, metadata={"positional": True,
                                                           "metavar": "CKPT"})
        # a checkpoint of `rnnkit lm train`
    text_file: str | None = field(default=None, metadata={"positional": True,
                                                          "metavar": "TEXT_FILE"})
        # the UTF-8 text file to score


@dataclass
class DemoCommand:
    """`rnnkit demo`: train a character LSTM on built-in prose, then sample from it."""

    steps: int = field(default=600, metadata={"check": "positive"})
        # training steps (the default takes a few minutes on 2 cores)
    out: str = "rnnkit-demo"  # folder for checkpoint and plot (a previous demo's are replaced)
