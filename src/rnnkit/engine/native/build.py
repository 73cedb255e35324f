"""Compile the native kernels at first use, cache them, and fall back when that is impossible.

`kernels()` returns the compiled extension module, building it the first time in a process (a
build takes about a minute on two cores, once per machine: later processes load the cached
library in well under a second). When the build fails (no C++ compiler, no ninja, headers
missing), it warns once and returns ``None``; the engine then runs the fused backend.

Where the library is cached: ``$RNNKIT_BUILD_DIR`` if set, else
``~/.cache/rnnkit/native-<torch version>-<cpu capability>``. Deleting the folder forces a rebuild;
torch's extension loader also rebuilds by itself when the sources or flags change.

Vectorisation: the kernels take the vector width torch chose for itself on this CPU. With AVX512
the gate math and the step products are compiled for ATen's 512-bit ``Vectorized``, with AVX2 for
its 256-bit one (Sleef's vector exp from libtorch either way); elsewhere for ATen's portable
``Vectorized`` (scalar loops the compiler may vectorise). On this project's Intel Xeon VM the
512-bit build ran a forward 0.75-0.87x the time of the 256-bit one at small sizes and 0.94-1.0x
at hidden 256-512, where ATen's mm does most of the work (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
BUILD_DIR_VARIABLE = "RNNKIT_BUILD_DIR"

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_failure: list[str] = []  # why the build failed, once it has


class NativeBuildWarning(UserWarning):
    """The native kernels could not be built; rnnkit runs the fused backend instead."""


@functools.cache
def vector_capability() -> str:
    """The vector width the kernels are compiled for: torch's own choice on this CPU,
    ``"AVX512"`` or ``"AVX2"`` on x86-64, else ``"DEFAULT"``."""
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if on_x86 and capability in ("AVX2", "AVX512") else "DEFAULT"


def build_directory(capability: str) -> Path:
    configured = os.environ.get(BUILD_DIR_VARIABLE)
    if configured:
        return Path(configured)
    version = torch.__version__.replace("+", "_")
    return Path.home() / ".cache" / "rnnkit" / f"native-{version}-{capability.lower()}"


def compiler_flags(capability: str) -> list[str]:
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}"]
    if capability == "AVX2":
        flags += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        flags += ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                  "-mavx512dq", "-mfma", "-mf16c"]
    return flags


def _compile(capability: str) -> ModuleType:
    """Build (or load from the cache) the extension; raises whatever the toolchain raises."""
    from torch.utils import cpp_extension

    try:  # ninja from PyPI: its binary is not on PATH when the venv is not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = build_directory(capability)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"rnnkit_native_{capability.lower()}"
    if not any(directory.glob(f"{name}*.so")):
        print(f"rnnkit: compiling native CPU kernels once (about a minute), cache: {directory}",
              file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=compiler_flags(capability),
        # libgomp has the soname of the one torch already loaded, so that one is used.
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def kernels() -> ModuleType | None:
    """The compiled kernels, or ``None`` (with one `NativeBuildWarning` per process)."""
    capability = vector_capability()
    if capability in _loaded:  # every call after the first (a streamed step makes many)
        return _loaded[capability]
    with _lock:
        if capability not in _loaded:
            try:
                _loaded[capability] = _compile(capability)
            except Exception as error:  # noqa: BLE001 - any build failure means: fall back
                reason = str(error).strip().splitlines()
                _failure.append(f"{type(error).__name__}: {reason[-1] if reason else ''}")
                _loaded[capability] = None
                warnings.warn(
                    f"rnnkit: the native CPU kernels could not be built ({_failure[-1]}); "
                    "running the fused PyTorch backend instead, which gives the same results "
                    "more slowly. A C++ compiler (g++) and the 'ninja' package are needed.",
                    NativeBuildWarning,
                    stacklevel=2,
                )
    return _loaded[capability]


def failure() -> str | None:
    """Why the native build failed in this process, or ``None`` (not tried, or it worked)."""
    return _failure[-1] if _failure else None


def _forget() -> None:
    """Forget the outcome of the build in this process (for tests)."""
    _loaded.clear()
    _failure.clear()
