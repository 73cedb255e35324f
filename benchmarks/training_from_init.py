"""CPU seconds per training step of `rnnkit memory adding` from initialisation, several
configurations side by side in one process (issue 20: subnormal floats in the first steps).

Each configuration is its own model as `rnnkit memory adding` builds it (seed 0, ``--init
chrono``, ``backend`` auto, hidden 128, batch 50) with its own Adam (lr 1e-3) and batch
generator, trained with ``clip_grad_norm_(..., 1.0)``; the configurations take turns, a chunk of
steps each, and each chunk's ``time.process_time()`` is divided by its steps, so a busy spell of
the machine hits them alike. Page faults per step (the last chunk's) come with them.

A configuration is ``CELL`` or ``CELL:MODE``:

- ``flushed`` (the default): the native kernels as they run, subnormals flushed inside them
  (``kernels.cpp``, "subnormal floats");
- ``unflushed``: the kernels' flushing off (``set_flush_subnormals(False)``), as before issue 20;
- ``torch-flush``: the kernels' flushing off, ``torch.set_flush_denormal(True)`` around the
  configuration's steps (the whole process flushed on the calling thread);
- ``before``: ``unflushed``, and the sLSTM's d_W_hh product as the einsum it was before issue
  20 (a transposing copy of the gate gradients first), to measure both changes in one process.

    taskset -c 1 python benchmarks/training_from_init.py --length 200 \\
        slstm:before slstm:torch-flush slstm gru lstm
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from rnnkit.apps.memory.experiment import MemoryTask, RunConfig
from rnnkit.apps.recurrent import RecurrentConfig
from rnnkit.engine import slstm
from rnnkit.engine.native import build
from rnnkit.training.devices import describe_allocator, keep_freed_memory
from rnnkit.training.trainer import LoopConfig

MODES = ("flushed", "unflushed", "torch-flush", "before")
weight_gradients = slstm.weight_gradients


def einsum_weight_gradients(d_pre, x, h_entering, weight_ih, needs):
    """`slstm.weight_gradients` with d_W_hh as it was computed before issue 20."""
    d_x, d_w_ih, _, d_b = weight_gradients(d_pre, x, h_entering, weight_ih,
                                           (needs[0], needs[1], False, needs[3]))
    d_w_hh = torch.einsum("tkng,tknd->kgd", d_pre, h_entering) if needs[2] else None
    return d_x, d_w_ih, d_w_hh, d_b


class Run:
    """One configuration: its model, optimiser, batches and timings."""

    def __init__(self, label: str, length: int) -> None:
        self.label = label
        self.cell, _, mode = label.partition(":")
        self.mode = mode or "flushed"
        if self.mode not in MODES:
            raise SystemExit(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        config = RunConfig(task="adding", length=length,
                           recurrent=RecurrentConfig(cell=self.cell, hidden_size=128,
                                                     init="chrono"),
                           loop=LoopConfig(lr=1e-3, seed=0))
        self.task = MemoryTask(config)
        torch.manual_seed(0)  # as the Trainer seeds before it builds the model
        self.model = self.task.build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.seconds: list[float] = []
        self.faults = 0
        self.loss = float("nan")

    def steps(self, count: int, kernels) -> None:
        kernels.set_flush_subnormals(self.mode == "flushed")
        torch.set_flush_denormal(self.mode == "torch-flush")
        if self.mode == "before":
            slstm.weight_gradients = einsum_weight_gradients
        try:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.process_time()
            for _ in range(count):
                batch = self.task.next_batch()
                self.optimizer.zero_grad()
                loss = self.task.loss(self.model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
            self.seconds.append((time.process_time() - started) / count)
            self.faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // count
            self.loss = loss.item()
        finally:
            kernels.set_flush_subnormals(True)
            torch.set_flush_denormal(False)
            slstm.weight_gradients = weight_gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="CELL or CELL:MODE, MODE one of "
                        + ", ".join(MODES))
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the rnnkit commands keep freed "
                             "memory, `keep_freed_memory`)")
    arguments = parser.parse_args()
    if not arguments.default_malloc:
        keep_freed_memory()
    torch.set_num_threads(arguments.threads)
    kernels = build.kernels()
    if kernels is None:
        raise SystemExit(f"the native kernels did not build: {build.failure()}")
    runs = [Run(label, arguments.length) for label in arguments.configs]
    print(f"adding, T = {arguments.length}, hidden 128, batch 50, {arguments.threads} thread(s), "
          f"{describe_allocator()}; CPU s per step", flush=True)
    for first in range(1, arguments.steps + 1, arguments.chunk):
        count = min(arguments.chunk, arguments.steps + 1 - first)
        for run in runs:
            run.steps(count, kernels)
        print(f"steps {first}-{first + count - 1}: " + "  ".join(
            f"{run.label} {run.seconds[-1]:.3f}" for run in runs), flush=True)
    for run in runs:
        print(f"{run.label:18s} " + " ".join(f"{s:.3f}" for s in run.seconds)
              + f"  | page faults/step {run.faults} | loss {run.loss:.4f}")


if __name__ == "__main__":
    main()
