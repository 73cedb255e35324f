"""One long-memory run: a recurrent layer with a linear read-out, trained on a generated task.

Chrono initialisation (``init="chrono"``) uses ``T_max`` = the task's whole sequence length.

- adding: ``x (T, N, 2)`` -> layer -> ``ŷ = w · h_T + b`` (N,), mean squared error against the
  sum of the two marked values; baseline 1/6.
- copy: one-hot symbols ``(T + 20, N, 10)`` -> layer -> logits per step ``(T + 20, N, 10)``,
  cross-entropy per step; baseline ``10 ln 8 / (T + 20)``.

Training draws a fresh batch every step from a seeded generator (Adam, clipping through the
shared `take_step`); evaluation uses one fixed held-out set drawn from another seed, the same for
every cell, so runs are comparable. Gradient flow (`rnnkit.diagnostics.gradient_flow`) is taken
on a few held-out sequences at initialisation and after training.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.recurrent import make_recurrent
from rnnkit.diagnostics import gradient_flow
from rnnkit.engine.steps import Family
from rnnkit.tasks import ADDING_BASELINE_MSE, COPY_SYMBOLS, adding_problem, copy_baseline, copy_task
from rnnkit.training.loop import progress_bar, take_step
from rnnkit.training.optimization import check_clipping, make_optimizer

TASKS = ("adding", "copy")
# Cell names on the command line: (family, make_recurrent options).
CELL_VARIANTS = {
    "rnn": (Family.RNN, {}),
    "rnn-relu": (Family.RNN, {"nonlinearity": "relu"}),
    "lstm": (Family.LSTM, {}),
    "lstm-peephole": (Family.LSTM, {"peephole": True}),
    "lstm-projection": (Family.LSTM, {}),  # h projected to hidden // 2: see `cell_options`
    "gru": (Family.GRU, {}),
    "gru-reset-before": (Family.GRU, {"reset_after": False}),
}
INITS = ("default", "chrono")
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out data never shares a generator state with training
FLOW_SAMPLES = 8  # held-out sequences the gradient flow is averaged over


@dataclass
class RunConfig:
    """One run's settings; every field maps one to one onto an `rnnkit memory` option."""

    task: str  # adding | copy
    cell: str  # a key of CELL_VARIANTS
    length: int  # T: sequence length (adding) or delay (copy)
    hidden_size: int = 128
    steps: int = 2000
    batch_size: int = 50
    lr: float = 1e-3
    clip_norm: float | None = 1.0  # global norm (tf.clip_by_global_norm); None: off
    clip_value: float | None = None  # per element (tf.clip_by_value); None: off
    clip_tensor_norm: float | None = None  # per tensor (tf.clip_by_norm); None: off
    init: str = "default"  # default | chrono (LSTM and GRU; T_max = the task's length)
    forget_bias: float = 0.0  # added to the LSTM forget-gate bias at initialisation (LSTM only)
    seed: int = 0
    eval_every: int = 50
    held_out: int = 1000  # held-out sequences


def check_run_config(config: RunConfig) -> None:
    """ValueError naming the first setting outside what is accepted."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if config.cell not in CELL_VARIANTS:
        raise ValueError(f"cell must be one of {', '.join(CELL_VARIANTS)}, got {config.cell!r}")
    if config.init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {config.init!r}")
    if not isinstance(config.length, int) or config.length < 2:
        raise ValueError(f"lengths must be integers >= 2, got {config.length!r}")
    for name in ("hidden_size", "steps", "batch_size", "eval_every", "held_out"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    check_clipping(clip_norm=config.clip_norm, clip_value=config.clip_value,
                   clip_tensor_norm=config.clip_tensor_norm)
    cell_options(config.cell, config.hidden_size)  # a cell the hidden size cannot build
    if (config.forget_bias and config.init == "chrono"
            and cell_family(config.cell) == Family.LSTM):
        raise ValueError("--forget-bias and --init chrono both set the LSTM forget-gate bias; "
                         "choose one")


def cell_options(cell: str, hidden_size: int) -> tuple[Family, dict]:
    """(family, `make_recurrent` options) of a command-line cell name at ``hidden_size`` units."""
    family, options = CELL_VARIANTS[cell]
    if cell == "lstm-projection":
        if hidden_size < 2:
            raise ValueError("lstm-projection projects h to hidden // 2 units: it needs "
                             f"hidden >= 2, got {hidden_size}")
        options = {**options, "proj_size": hidden_size // 2}
    return family, options


def cell_family(cell: str) -> Family:
    """`Family.RNN`, `Family.LSTM` or `Family.GRU`: the layer a command-line cell name builds."""
    return CELL_VARIANTS[cell][0]


def baseline(task: str, length: int) -> float:
    """The memoryless baseline of the task's metric (MSE, or cross-entropy per step)."""
    return ADDING_BASELINE_MSE if task == "adding" else copy_baseline(length)


def metric_name(task: str) -> str:
    return "MSE" if task == "adding" else "cross-entropy (nats/step)"


class MemoryModel(nn.Module):
    """A one-layer recurrent network and a linear read-out for a task (see the module doc)."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        family, options = cell_options(config.cell, config.hidden_size)
        init = effective_init(config)
        self.task = config.task
        inputs = 2 if config.task == "adding" else COPY_SYMBOLS
        outputs = 1 if config.task == "adding" else COPY_SYMBOLS
        # Chrono's T_max: the longest dependency the task can ask for, its whole sequence.
        total_steps = config.length if config.task == "adding" else config.length + 20
        self.recurrent = make_recurrent(
            family, inputs, config.hidden_size, 1, init=init,
            chrono_max_length=total_steps if init == "chrono" else None,
            forget_bias=config.forget_bias if family == Family.LSTM else 0.0, **options)
        self.readout = nn.Linear(options.get("proj_size") or config.hidden_size, outputs)

    def encode(self, inputs: Tensor) -> Tensor:
        """Task input -> the layer's float input ``(T, N, I)``."""
        if self.task == "copy":
            return F.one_hot(inputs, COPY_SYMBOLS).to(self.readout.weight.dtype)
        return inputs

    def forward(self, inputs: Tensor) -> Tensor:
        """Adding: ``(N,)`` predictions; copy: ``(T, N, 10)`` logits."""
        hidden, _ = self.recurrent(self.encode(inputs))  # (T, N, H)
        if self.task == "adding":
            return self.readout(hidden[-1]).squeeze(-1)
        return self.readout(hidden)

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        output = self(inputs)
        if self.task == "adding":
            return F.mse_loss(output, targets)
        return F.cross_entropy(output.flatten(0, 1), targets.flatten())


def make_batch(task: str, batch_size: int, length: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if task == "adding":
        return adding_problem(batch_size, length, generator)
    return copy_task(batch_size, length, generator)


@dataclass
class RunResult:
    """What one run measured; the metric is the task's (MSE or cross-entropy per step)."""

    task: str
    cell: str
    length: int
    init: str
    seed: int
    baseline: float
    eval_steps: list[int] = field(default_factory=list)
    eval_metric: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    gradient_norm: list[float] = field(default_factory=list)
    final_metric: float = math.nan
    first_step_below_tenth: int | None = None  # first evaluated step under baseline / 10
    seconds: float = 0.0
    flow_initial: list[float] = field(default_factory=list)  # mean over samples, by distance
    flow_trained: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """The row of the results table (no per-step lists)."""
        keep = ("task", "cell", "length", "init", "seed", "baseline", "final_metric",
                "first_step_below_tenth", "seconds")
        return {k: v for k, v in asdict(self).items() if k in keep}


@torch.no_grad()
def evaluate(model: MemoryModel, held_out: tuple[Tensor, Tensor], batch_size: int = 500) -> float:
    inputs, targets = held_out
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, targets.shape[-1], batch_size):
        part = slice(start, start + batch_size)
        size = targets[..., part].shape[-1]
        total += float(model.loss(inputs[:, part], targets[..., part])) * size
        count += size
    model.train(was_training)
    return total / count


def flow_by_distance(model: MemoryModel, inputs: Tensor) -> list[float]:
    """Mean over samples of ‖∂h_T/∂h_t‖ per distance T - t (index 0 = distance 0)."""
    flow = gradient_flow(model.recurrent, model.encode(inputs)).h  # (T, N)
    return flow.mean(dim=1).flip(0).tolist()


def effective_init(config: RunConfig) -> str:
    """The ``init`` the run's layer gets: chrono has no meaning for a plain RNN, which keeps the
    default."""
    return "default" if cell_family(config.cell) == Family.RNN else config.init


def init_label(config: RunConfig) -> str:
    """How the run's recurrent layer is initialised, for tables: `effective_init`, or ``fb=1``
    for the default draw with forget bias 1 (LSTM cells only)."""
    if config.forget_bias and cell_family(config.cell) == Family.LSTM:
        return f"fb={config.forget_bias:g}"
    return effective_init(config)


def run(config: RunConfig, show_progress: bool = True, flow: bool = True
        ) -> tuple[RunResult, MemoryModel, tuple[Tensor, Tensor]]:
    """Train one cell on one task length; returns the result, the trained model and the
    held-out set."""
    check_run_config(config)
    torch.manual_seed(config.seed)
    model = MemoryModel(config)
    optimizer = make_optimizer(model.parameters(), "adam", config.lr)
    held_out = make_batch(config.task, config.held_out, config.length,
                          torch.Generator().manual_seed(config.seed + HELD_OUT_SEED_OFFSET))
    flow_inputs = held_out[0][:, :FLOW_SAMPLES]
    result = RunResult(config.task, config.cell, config.length, init_label(config), config.seed,
                       baseline(config.task, config.length))
    if flow:
        result.flow_initial = flow_by_distance(model, flow_inputs)
    generator = torch.Generator().manual_seed(config.seed)
    bar = progress_bar(config.steps, description=f"{config.cell} T={config.length}") \
        if show_progress else None
    started = time.perf_counter()
    model.train()
    for step in range(1, config.steps + 1):
        loss = model.loss(*make_batch(config.task, config.batch_size, config.length, generator))
        if not math.isfinite(loss.item()):
            raise ValueError(f"{config.cell} at T={config.length}: the loss became "
                             f"{loss.item()} at step {step}; try a smaller --lr or --clip-norm 1")
        result.gradient_norm.append(take_step(
            model, loss, optimizer, config.clip_norm, config.clip_value,
            clip_tensor_norm=config.clip_tensor_norm))
        result.train_loss.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            metric = evaluate(model, held_out)
            result.eval_steps.append(step)
            result.eval_metric.append(metric)
            if result.first_step_below_tenth is None and metric < result.baseline / 10:
                result.first_step_below_tenth = step
        if bar is not None:
            latest = f" test {result.eval_metric[-1]:.4f}" if result.eval_metric else ""
            rate = step / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"loss {loss.item():.4f}{latest} (baseline "
                                f"{result.baseline:.3f}) | {rate:.1f} steps/s")
            bar.update(1)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - started
    result.final_metric = result.eval_metric[-1]
    if flow:
        result.flow_trained = flow_by_distance(model, flow_inputs)
    return result, model, held_out
