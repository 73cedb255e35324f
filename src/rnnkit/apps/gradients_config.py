"""The settings of `rnnkit gradients` (`GradientsCommand`): fresh layers, or a trained
`rnnkit lm` checkpoint on real text; options, config files and ``--print-config`` are generated
from it (`rnnkit.configuration`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rnnkit.apps.lm.corpus import CORPORA
from rnnkit.apps.recurrent import CELL_NAMES
from rnnkit.configuration import LARGEST_COUNT, Check

LENGTH = Check(int, "an integer in [2, 2**63 - 1]", "integers in [2, 2**63 - 1]",
               lambda v: 2 <= v <= LARGEST_COUNT, names_option=True)
# The settings that describe fresh layers: a --checkpoint's trained stack has its own.
FRESH = ("cells", "hidden", "input_size", "spectral_radius", "seed")


@dataclass
class GradientsCommand:
    """`rnnkit gradients`: gradient flow ‖∂h_T/∂h_t‖ by distance t, without training."""

    cells: list[str] = field(default_factory=lambda: ["rnn", "lstm", "gru"],
                             metadata={"choices": tuple(CELL_NAMES)})
        # cell names (fresh layers)
    length: int = field(default=100, metadata={"check": LENGTH})  # sequence length T
    hidden: int = field(default=128, metadata={"check": "positive"})
        # hidden units (fresh layers)
    samples: int = field(default=8, metadata={"check": "positive"})  # sequences averaged over
    input_size: int = field(default=4, metadata={"check": "positive"})  # features (fresh layers)
    spectral_radius: float | None = field(default=None, metadata={"check": "positive_real"})
        # rescale each square gate block of W_hh to this spectral radius (fresh layers)
    seed: int = field(default=0, metadata={"check": "seed"})  # weights and inputs (fresh layers)
    checkpoint: str | None = field(default=None, metadata={"metavar": "CKPT"})
        # a trained `rnnkit lm` model instead of fresh layers
    text_file: str | None = field(default=None, metadata={"positional": True,
                                                          "metavar": "TEXT_FILE"})
        # text for --checkpoint
    corpus: str | None = field(default=None, metadata={"choices": CORPORA})
        # built-in text for --checkpoint
    layer: int | None = None  # which layer of the checkpoint's stack (none: the last)
    out: str = "rnnkit-gradients"  # folder for JSON and PNG
    plot: bool = True  # write the PNG
