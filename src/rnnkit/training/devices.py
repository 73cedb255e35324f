"""Where a run computes: the ``--device`` option parsed, resolved on this machine, described in
one line, and the batches moved there.

``--device`` takes ``auto`` (a GPU when one is visible, else the CPU), ``cpu``, ``cuda`` (the
current CUDA device) or ``cuda:N``. Parsing (`parse_device`) reads the text alone, so a typo is a
usage error before anything loads; resolving (`resolve_device`) asks this machine, so a GPU
that is missing here is a run-time error that says why and what to pass instead.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import platform
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
"""What ``--device`` accepts, as error messages say it."""

_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")

T = TypeVar("T")


def parse_device(text: str) -> str:
    """``--device``'s argparse ``type``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N >= 0).

    Returns the canonical spelling (``cuda:01`` becomes ``cuda:1``); whether the device exists
    here is `resolve_device`'s question, asked when the run starts.

    Raises:
        argparse.ArgumentTypeError: for anything else, e.g. ``--device takes auto, cpu, cuda
            or cuda:N, got 'gpu'``.
    """
    match = _DEVICE_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise argparse.ArgumentTypeError(f"--device takes {DEVICE_CHOICES}, got {text!r}")
    kind, index = match.groups()
    return kind if index is None else f"{kind}:{int(index)}"


def _cuda_missing_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False here, as precisely as torch can tell."""
    toolkit = torch.version.cuda or getattr(torch.version, "hip", None)  # ROCm runs torch.cuda
    if toolkit is None:
        return f"torch {torch.__version__} built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"torch {torch.__version__} built with CUDA {toolkit}, but no GPU visible{hidden}"


def resolve_device(text: str | torch.device) -> torch.device:
    """The `torch.device` that ``--device text`` means on this machine.

    ``auto`` is the current CUDA device when ``torch.cuda.is_available()``, else the CPU;
    ``cuda`` is the current CUDA device; ``cuda:N`` is device N.

    Raises:
        ValueError: the text is not one `parse_device` accepts; CUDA is asked for but is not
            available here (the message says why and suggests ``--device cpu or auto``); or
            ``N`` is not below the number of visible CUDA devices (the message says how many).
    """
    if isinstance(text, torch.device):
        text = str(text)
    try:
        canonical = parse_device(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None
    if canonical == "cpu":
        return torch.device("cpu")
    if canonical == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {canonical}: CUDA is not available here ({_cuda_missing_reason()}); "
            "use --device cpu or auto"
        )
    if canonical == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(canonical.split(":")[1]), torch.cuda.device_count()
    if index >= count:
        names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(
            f"--device {canonical}: this machine has {count} CUDA device"
            f"{'' if count == 1 else 's'} ({names}); give one of those, cuda or auto"
        )
    return torch.device("cuda", index)


def move_to(obj: T, device: torch.device | str) -> T:
    """``obj`` with every tensor inside it moved to ``device``, the containers rebuilt.

    Walks tuples (named tuples keep their type), lists, dicts (their type kept, e.g.
    ``OrderedDict``) and dataclass instances (rebuilt with `dataclasses.replace`, so a frozen
    one works too); a `PackedSequence` moves through its own ``.to``, which keeps
    ``batch_sizes`` on the CPU as packing requires. Anything else (``None``, numbers, strings,
    modules) comes back as it is. A tensor in pinned memory is copied with ``non_blocking=True``:
    the copy overlaps the computation, and pinned pages cannot be reused before it is done.
    """
    device = torch.device(device)
    if isinstance(obj, PackedSequence):
        return obj.to(device)
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=obj.device.type == "cpu" and obj.is_pinned())
    if isinstance(obj, tuple):
        moved = [move_to(item, device) for item in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    if isinstance(obj, list):
        return type(obj)(move_to(item, device) for item in obj)
    if isinstance(obj, Mapping):
        # A shallow copy keeps the mapping's type and constructor arguments (defaultdict's
        # factory); then each value is replaced.
        moved_mapping: Any = obj.copy() if hasattr(obj, "copy") else dict(obj)
        for key, value in obj.items():
            moved_mapping[key] = move_to(value, device)
        return moved_mapping
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {field.name: move_to(getattr(obj, field.name), device)
                   for field in dataclasses.fields(obj) if field.init}
        return dataclasses.replace(obj, **changes)
    return obj


def _cpu_model_name() -> str:
    """The processor's marketing name (Linux /proc/cpuinfo; else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def describe_device(device: torch.device | str) -> str:
    """One line for a run's log saying what ``device`` is.

    ``cpu (AMD EPYC 7B13, 2 threads)`` (the threads torch computes with) or ``cuda:0 (NVIDIA
    H200, 139 GiB)`` (the total memory of the device).
    """
    device = torch.device(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({_cpu_model_name()}, {threads} thread{'' if threads == 1 else 's'})"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        memory_gib = properties.total_memory / 2**30
        return f"cuda:{index} ({properties.name}, {memory_gib:.0f} GiB)"
    return str(device)


# glibc's default: allocations from 128 KiB up are mapped afresh (the bound then follows the
# largest block freed, up to 32 MiB), and free memory above the heap's top goes back to the
# system past twice that. A training step allocates and frees the same tens of megabytes every
# step, and which of them come back as new pages depends on the order: a zoneout LSTM step at
# (100, 32, 256) took 6,700 page faults and 12 ms of system time out of 62 ms (measured,
# `benchmarks/switch_overhead.py`); the plain step 230. Held here: none, and the same step 52 ms.
# At long sequences one buffer passes 64 MiB (the LSTM's gates at T = 1000, batch 50, hidden 128
# are 100 MiB): with both bounds at 64 / 256 MiB an LSTM step there took 25,000 page faults and
# 0.285 s of CPU, the sLSTM's 36,000 and 0.38 s; at 1 GiB 0-2,500, 0.23 s and 0.31 s
# (`benchmarks/training_from_init.py --length 1000 lstm gru slstm`). Memory kept is at most what
# the step held at its peak: the process takes it again at the next step.
KEPT_MMAP_THRESHOLD = 1 << 30
"""Blocks below this come from the heap (glibc's ``M_MMAP_THRESHOLD``), fixed."""
KEPT_TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top kept up to this (glibc's ``M_TRIM_THRESHOLD``)."""
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a step frees for the next step, rather than return it
    to the system and take it back as new pages (each one a page fault): freed memory up to
    `KEPT_TRIM_THRESHOLD` stays with the process, blocks under `KEPT_MMAP_THRESHOLD` come from
    the heap. The rnnkit commands call it once at start (they own their process); a library user
    may call it, or set glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``.

    Returns whether it was applied: not on other C libraries (jemalloc or tcmalloc preloaded
    keep memory their own way), and not where the environment already sets glibc's malloc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _MALLOC_ENVIRONMENT):
        return False  # the user chose
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    applied = bool(mallopt(m_mmap_threshold, KEPT_MMAP_THRESHOLD)
                   and mallopt(m_trim_threshold, KEPT_TRIM_THRESHOLD))
    _allocator["kept"] = _allocator["kept"] or applied
    return applied


_allocator = {"kept": False}


def describe_allocator() -> str:
    """How this process's malloc treats freed memory, for benchmark headers."""
    if _allocator["kept"]:
        return (f"malloc keeps freed memory (glibc: mmap threshold {KEPT_MMAP_THRESHOLD >> 20} "
                f"MiB, trim threshold {KEPT_TRIM_THRESHOLD >> 20} MiB)")
    chosen = [name for name in _MALLOC_ENVIRONMENT if name in os.environ]
    return f"malloc as the environment sets it ({', '.join(chosen)})" if chosen else \
        "malloc's defaults"
