"""One long-memory run: a recurrent layer with a linear read-out, trained on a generated task.

Chrono initialisation (``init="chrono"``) uses ``T_max`` = the task's whole sequence length.

- adding: ``x (T, N, 2)`` -> layer -> ``ŷ = w · h_T + b`` (N,), mean squared error against the
  sum of the two marked values; baseline 1/6.
- copy: one-hot symbols ``(T + 20, N, 10)`` -> layer -> logits per step ``(T + 20, N, 10)``,
  cross-entropy per step; baseline ``10 ln 8 / (T + 20)``.

Training draws a fresh batch every step from a seeded generator (the shared `Trainer`: Adam,
clipping); evaluation uses one fixed held-out set drawn from another seed, the same for
every cell, so runs are comparable. Gradient flow (`rnnkit.diagnostics.gradient_flow`) is taken
on a few held-out sequences at initialisation and after training, for the layers the diagnostics
read (`rnnkit.diagnostics.diagnosable`; not torch.nn's): the others' runs have no flow.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.recurrent import CELL_NAMES, RecurrentConfig, build_recurrent
from rnnkit.configuration import check_config
from rnnkit.diagnostics import diagnosable, gradient_flow
from rnnkit.tasks import ADDING_BASELINE_MSE, COPY_SYMBOLS, adding_problem, copy_baseline, copy_task
from rnnkit.training.trainer import BaseTask, LoopConfig, Trainer

TASKS = ("adding", "copy")
CELL_VARIANTS = tuple(CELL_NAMES)  # the cell names a comparison may hold
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out data never shares a generator state with training
FLOW_SAMPLES = 8  # held-out sequences the gradient flow is averaged over


def default_recurrent() -> RecurrentConfig:
    return RecurrentConfig(hidden_size=128)


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=1e-3, eval_every=50, checkpoint_every=LoopConfig.steps)


@dataclass
class RunConfig:
    """One run: a task at one length, one cell (``recurrent.cell``), one seed (``loop.seed``)."""

    task: str = field(metadata={"choices": TASKS})  # adding | copy
    length: int = field(metadata={"check": "positive"})  # T: sequence length (adding) or delay
        # (copy)
    recurrent: RecurrentConfig = field(default_factory=default_recurrent)
    loop: LoopConfig = field(default_factory=default_loop)
    batch_size: int = field(default=50, metadata={"check": "positive"})  # sequences per optimiser
        # step, drawn fresh every step
    held_out: int = field(default=1000, metadata={"check": "positive"})  # held-out sequences, the
        # same for every cell

    @property
    def cell(self) -> str:
        return self.recurrent.cell

    @property
    def seed(self) -> int:
        return self.loop.seed

    def settings(self) -> dict:
        """The run's settings as one flat record (results.json)."""
        return {"task": self.task, "length": self.length, **asdict(self.recurrent),
                **asdict(self.loop), "batch_size": self.batch_size, "held_out": self.held_out}


def check_run_config(config: RunConfig) -> None:
    """ValueError naming the first setting outside what is accepted."""
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if not isinstance(config.length, int) or config.length < 2:
        raise ValueError(f"lengths must be integers >= 2, got {config.length!r}")
    for name in ("batch_size", "held_out"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    check_config(config.recurrent)
    check_config(config.loop)


def baseline(task: str, length: int) -> float:
    """The memoryless baseline of the task's metric (MSE, or cross-entropy per step)."""
    return ADDING_BASELINE_MSE if task == "adding" else copy_baseline(length)


def metric_name(task: str) -> str:
    return "MSE" if task == "adding" else "cross-entropy (nats/step)"


class MemoryModel(nn.Module):
    """A recurrent stack and a linear read-out for a task (see the module doc)."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.task = config.task
        inputs = 2 if config.task == "adding" else COPY_SYMBOLS
        outputs = 1 if config.task == "adding" else COPY_SYMBOLS
        # Chrono's T_max: the longest dependency the task can ask for, its whole sequence.
        total_steps = config.length if config.task == "adding" else config.length + 20
        self.recurrent = build_recurrent(config.recurrent, inputs, chrono_max_length=total_steps)
        self.readout = nn.Linear(config.recurrent.output_size, outputs)

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


def task_loss(task: str, output: Tensor, targets: Tensor) -> Tensor:
    """The task's loss of a model's ``output``: MSE (adding), cross-entropy per step (copy)."""
    if task == "adding":
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


def evaluate(model: MemoryModel, held_out: tuple[Tensor, Tensor], batch_size: int = 500) -> float:
    """The task's metric on the held-out set (call in evaluation mode, see `evaluating`)."""
    inputs, targets = held_out
    device = model.readout.weight.device
    total, count = 0.0, 0
    for start in range(0, targets.shape[-1], batch_size):
        part = slice(start, start + batch_size)
        size = targets[..., part].shape[-1]
        output = model(inputs[:, part].to(device))
        total += float(task_loss(model.task, output, targets[..., part].to(device))) * size
        count += size
    return total / count


def flow_by_distance(model: MemoryModel, inputs: Tensor) -> list[float]:
    """Mean over samples of ‖∂h_T/∂h_t‖ per distance T - t (index 0 = distance 0)."""
    inputs = inputs.to(model.readout.weight.device)
    flow = gradient_flow(model.recurrent, model.encode(inputs)).h  # (T, N)
    return flow.mean(dim=1).flip(0).tolist()


def effective_init(config: RunConfig) -> str:
    """The ``init`` the run's layer gets: chrono has no meaning for a plain RNN, which keeps the
    default."""
    return config.recurrent.layer_options().get("init", "default")


def init_label(config: RunConfig) -> str:
    """How the run's recurrent layer is initialised, for tables: `effective_init`, or ``fb=1``
    for the default draw with forget bias 1 (LSTM cells only)."""
    if config.recurrent.forget_bias and config.recurrent.family == "lstm":
        return f"fb={config.recurrent.forget_bias:g}"
    return effective_init(config)


class MemoryTask(BaseTask):
    """The memory experiment as a `TrainingTask`: a fresh batch from a seeded generator every
    step, the task's loss, the metric on one fixed held-out set."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.held_out = make_batch(config.task, config.held_out, config.length,
                                   torch.Generator().manual_seed(config.seed
                                                                 + HELD_OUT_SEED_OFFSET))
        self.generator = torch.Generator().manual_seed(config.seed)

    def build_model(self) -> MemoryModel:
        return MemoryModel(self.config)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        return make_batch(self.config.task, self.config.batch_size, self.config.length,
                          self.generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return task_loss(self.config.task, model(inputs), targets)

    def evaluate(self, model: MemoryModel) -> float:
        return evaluate(model, self.held_out)


def run(config: RunConfig, show_progress: bool = True, flow: bool = True, **options
        ) -> tuple[RunResult, MemoryModel, tuple[Tensor, Tensor]]:
    """Train one cell on one task length; returns the result, the trained model (its last
    weights) and the held-out set. ``options`` go to the `Trainer` (quiet, metrics, ...)."""
    check_run_config(config)
    task = MemoryTask(config)
    label = f"{config.cell} T={config.length}"
    trainer = Trainer(
        task, config.loop, description=label,
        show_progress=show_progress, **options)
    model = trainer.model
    result = RunResult(config.task, config.cell, config.length, init_label(config), config.seed,
                       baseline(config.task, config.length))
    flow_inputs = task.held_out[0][:, :FLOW_SAMPLES]
    flow = flow and diagnosable(model.recurrent)
    if flow:
        result.flow_initial = flow_by_distance(model, flow_inputs)
    started = time.perf_counter()
    history = trainer.run()
    result.seconds = time.perf_counter() - started
    result.train_loss, result.gradient_norm = history.train, history.gradient_norm
    result.eval_steps, result.eval_metric = history.validation_steps, history.validation
    result.first_step_below_tenth = next(
        (step for step, metric in zip(history.validation_steps, history.validation, strict=True)
         if metric < result.baseline / 10), None)
    result.final_metric = result.eval_metric[-1]
    if flow:
        result.flow_trained = flow_by_distance(model, flow_inputs)
    return result, model.cpu(), task.held_out  # the gate heatmaps read it on the host
