"""The settings of `rnnkit memory`: the cells, lengths and seeds compared, and the one run
config (`RunConfig`'s recurrent stack and loop) each of them shares; options, config files and
``--print-config`` are generated from `MemoryCommand` (`rnnkit.configuration`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rnnkit.apps.memory.experiment import TASKS, default_loop, default_recurrent
from rnnkit.apps.recurrent import CELL_NAMES, RecurrentConfig
from rnnkit.configuration import parse_integers
from rnnkit.training.trainer import LoopConfig

# One run's cell and seed are the members of --cells and --seed (a cell name carries its own
# variant switches, see `RecurrentConfig.with_cell`); no checkpoint is written.
MEMORY_EXCLUDE = frozenset({"recurrent.cell", "recurrent.peephole", "recurrent.reset_before",
                            "recurrent.nonlinearity", "loop.seed", "loop.checkpoint_every"})


@dataclass
class MemoryCommand:
    """`rnnkit memory`: each cell x length (x seed) on the adding problem or the copy task."""

    task: str | None = field(default=None, metadata={"positional": True, "choices": TASKS,
                                                     "metavar": "{" + ",".join(TASKS) + "}"})
        # adding | copy
    cells: list[str] = field(default_factory=lambda: ["rnn", "lstm", "gru"],
                             metadata={"choices": tuple(CELL_NAMES)})
        # cell names compared (variants: rnn-relu, lstm-peephole, lstm-projection (h to
        # hidden // 2), gru-reset-before; and mingru, minlstm, mingru-log, minlstm-log, slstm,
        # slstm-exp, slstm-heads4)
    lengths: list[int] = field(default_factory=lambda: [50],
                               metadata={"parse": parse_integers(2, "--lengths")})
        # sequence lengths T (adding) or delays T (copy)
    seeds: list[int] = field(default_factory=lambda: [0],
                             metadata={"option": "--seed", "check": "seed"})
        # random seed, or several (mean and spread reported)
    batch_size: int = field(default=50, metadata={"check": "positive"})
        # sequences per optimiser step, drawn fresh every step
    held_out: int = field(default=1000, metadata={"check": "positive"})
        # held-out sequences, the same for every cell
    recurrent: RecurrentConfig = field(default_factory=default_recurrent)
    loop: LoopConfig = field(default_factory=default_loop)
    out: str = "rnnkit-memory"  # folder for results and plots
    plot: bool = True  # write the PNGs
    flow: bool = True  # gradient flow before and after training (slow at long T: --no-flow)
    quiet: bool = False  # no progress bars
