"""Training on several processes started by ``torchrun``, and the same calls with one process.

``torchrun --nproc_per_node=N`` starts N copies of a command and tells each who it is through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
`setup_distributed` reads it, joins the process group (gloo on the CPU, NCCL on GPUs, one GPU
per process: ``cuda:LOCAL_RANK``) and returns a `Distributed`, whose methods are the few
collectives a training loop needs. Started without torchrun (or with one process) it returns a
single-process `Distributed` whose methods are identities, so the loop has one code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import Tensor

from rnnkit._checks import describe, require_int
from rnnkit.training.devices import parse_device, resolve_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets besides ``WORLD_SIZE``, and a multi-process run needs."""


@dataclasses.dataclass
class Distributed:
    """This process's place in a run of ``world_size`` processes, and the collectives between
    them. Every method is an identity (or a no-op) when ``world_size`` is 1.

    Attributes:
        rank: this process's number, 0 to ``world_size - 1`` (0 is the main process: the one
            that prints, logs and saves).
        world_size: how many processes train together.
        local_rank: this process's number on its machine: the GPU it uses.
        backend: the process group's backend (``"gloo"`` or ``"nccl"``), ``None`` with one
            process.
        device: where this process computes (``cuda:local_rank`` under NCCL); collectives take
            tensors on it.
        owns_group: whether `close` destroys the process group (False when it was initialised
            before `setup_distributed`, by the caller).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that prints, logs and writes checkpoints."""
        return self.rank == 0

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def shard(self, count: int, what: str = "batch size") -> slice:
        """This rank's contiguous share of ``count`` items: ``slice(rank * k, (rank + 1) * k)``
        with ``k = count / world_size``.

        ``what`` names the command-line option the count came from (``"batch size"`` is
        ``--batch-size``), for the error.

        Raises:
            ValueError: ``count`` is not a multiple of ``world_size``, e.g. ``--batch-size 30
                does not split evenly over 4 processes; give a multiple of 4``.
        """
        option = "--" + what.strip().replace(" ", "-")
        count = require_int(option, count, minimum=0)
        if count % self.world_size:
            raise ValueError(
                f"{option} {count} does not split evenly over {self.world_size} processes; "
                f"give a multiple of {self.world_size}"
            )
        share = count // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def all_gather(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (values only: no
        gradient flows back through it).

        The ranks' tensors must agree in every size but ``dim``'s; those may differ (a last,
        shorter evaluation batch): each is padded to the longest for the exchange and cut back.
        """
        if self.world_size == 1:
            return tensor
        if not isinstance(tensor, Tensor):
            raise TypeError(f"all_gather takes a Tensor, got {describe(tensor)}")
        dim = dim % tensor.dim() if tensor.dim() else 0
        tensor = tensor.detach().contiguous()
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        local_size = torch.tensor([tensor.shape[dim]], device=tensor.device)
        sizes = [torch.empty_like(local_size) for _ in range(self.world_size)]
        dist.all_gather(sizes, local_size)
        sizes = [int(size.item()) for size in sizes]
        longest = max(sizes)
        if tensor.shape[dim] < longest:
            padding = list(tensor.shape)
            padding[dim] = longest - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(padding)], dim=dim)
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(pieces, tensor)
        kept = [piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes, strict=True)]
        return torch.cat(kept, dim=dim)

    def any_flag(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank (a NaN loss, a Ctrl-C): every rank gets the
        same answer, so all of them stop at the same step."""
        return self.all_flags(flag)[0]

    def all_flags(self, *flags: bool) -> tuple[bool, ...]:
        """All the flags at once, each True where it is True on any rank, in one all_reduce
        of a small tensor (one exchange per step, whatever the number of flags)."""
        if self.world_size == 1:
            return tuple(bool(flag) for flag in flags)
        values = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32,
                              device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in values.tolist())

    def broadcast_object(self, obj, source: int = 0):
        """Rank ``source``'s ``obj`` (any picklable object) on every rank: e.g. a run folder
        name or a data split the main process decided."""
        if self.world_size == 1:
            return obj
        holder = [obj if self.rank == source else None]
        dist.broadcast_object_list(holder, src=source)
        return holder[0]

    def barrier(self) -> None:
        """Wait until every rank reaches this point (e.g. rank 0 finished writing a file)."""
        if self.world_size == 1:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (destroy it) if `setup_distributed` created it; closing
        twice, or with one process, does nothing."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _environment_text(name: str, world_size: int) -> str:
    """The environment variable ``name`` torchrun sets, or an error saying to use torchrun."""
    text = os.environ.get(name)
    if not text:
        raise ValueError(
            f"WORLD_SIZE={world_size} asks for a multi-process run, but {name} is not set; "
            f"start it with torchrun (torchrun --nproc_per_node={world_size} ...), which sets "
            f"{', '.join(TORCHRUN_VARIABLES)}"
        )
    return text


def _environment_int(name: str, world_size: int) -> int:
    text = _environment_text(name, world_size)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def setup_distributed(device_text: str = "auto") -> Distributed:
    """Join the run torchrun started, or describe a single process.

    With ``WORLD_SIZE`` > 1 in the environment: ``--device cpu`` (or ``auto`` without CUDA)
    joins a gloo process group on the CPU; ``--device cuda`` (or ``auto`` with CUDA) makes
    ``cuda:LOCAL_RANK`` this process's device and joins an NCCL group. Otherwise (no torchrun,
    or one process) no group is created and the device is `resolve_device`'s.
    A process group that already exists (the caller made it) is used as it is and left open
    by `Distributed.close`.

    Raises:
        ValueError: ``--device cuda:N`` with several processes (each takes its own GPU); CUDA
            asked for but missing, or fewer GPUs than processes on this machine; the
            environment incomplete (a variable torchrun sets is missing or not a number).
    """
    try:
        canonical = parse_device(device_text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None
    world_text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(world_text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got "
                         f"{world_text!r}") from None
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return Distributed(device=resolve_device(canonical))

    if canonical.startswith("cuda:") and world_size > 1:
        raise ValueError(
            f"--device {canonical} names one GPU, but this run has {world_size} processes; "
            "give --device cuda (or auto): each process takes the GPU cuda:LOCAL_RANK"
        )
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
        return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)

    rank = _environment_int("RANK", world_size)
    local_rank = _environment_int("LOCAL_RANK", world_size)
    _environment_text("MASTER_ADDR", world_size)
    _environment_int("MASTER_PORT", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK must be in [0, {world_size}), got {rank}")
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world_size} asks for a multi-process run, but this "
                         f"torch {torch.__version__} has no torch.distributed")

    device = resolve_device(canonical)  # ValueError when cuda is asked for and missing
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"--device {canonical}: LOCAL_RANK {local_rank} needs GPU cuda:{local_rank}, "
                f"but this machine has {count}; start at most {count} processes per machine "
                "(torchrun --nproc_per_node) or use --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                            world_size=world_size)
    return Distributed(rank, world_size, local_rank, backend, device, owns_group=True)
