"""Compile the native kernels at first use, cache them, and fall back when that is impossible.

`kernels()` returns the compiled extension module, building it the first time in a process (a
build takes about a minute on two cores, once per machine: later processes load the cached
library in well under a second). When the build fails (no C++ compiler, no ninja, headers
missing), it warns once and returns ``None``; the engine then runs the fused backend.

Where the library is cached: ``$RNNKIT_BUILD_DIR`` if set, else
``~/.cache/rnnkit/native-<torch version>-<cpu capability>``. Deleting the folder forces a rebuild;
torch's extension loader also rebuilds by itself when the sources or flags change.

Trust: loading a library runs its code, so a cache anyone else could have written to is never
loaded (a ``.so`` planted in another user's build directory once ran inside a root process). A
build directory is used only when it, every file and folder in it, and every folder above it
pass `distrust`: owned by this user (folders above: or by root), not writable by group or others
(folders above: unless sticky, as ``/tmp``), no symbolic links inside. When the configured
directory fails, rnnkit warns once (`NativeBuildWarning`, naming the directory and the reason)
and builds in the default cache instead; when that fails too, in a fresh private
``tempfile.mkdtemp()`` directory removed at exit (a rebuild per process: slow, but safe, and the
warning says how to repair the cache); should even that fail, the build fails as any other does.
Rebuilding rather than running the fused engine keeps the speed the user asked for; refusing
rather than repairing (chmod) keeps out a file someone may already have replaced. Folders rnnkit
creates (the cache and its missing parents) are made 0700, and the build runs under umask 077,
so a cache rnnkit wrote passes the check whatever the user's umask.

Concurrency: the build holds an exclusive ``fcntl.flock`` on ``rnnkit-build.lock`` in the build
directory, so processes build one at a time and the others wait, saying once on stderr whose
build they wait for. The kernel releases a flock when its holder dies, so an interrupted build
never blocks the next one; torch's own lock file (``lock``, which records no owner and which
torch waits on forever) can then only be stale when rnnkit holds the flock and finds it, and is
removed. (A process building in the same directory with torch directly, not through rnnkit,
would not take the flock: build directories are rnnkit's own.)

Vectorisation: the kernels take the vector width torch chose for itself on this CPU. With AVX512
the gate math and the step products are compiled for ATen's 512-bit ``Vectorized``, with AVX2 for
its 256-bit one (Sleef's vector exp from libtorch either way); elsewhere for ATen's portable
``Vectorized`` (scalar loops the compiler may vectorise). On this project's Intel Xeon VM the
512-bit build ran a forward 0.75-0.87x the time of the 256-bit one at small sizes and 0.94-1.0x
at hidden 256-512, where ATen's mm does most of the work (docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import platform
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
BUILD_DIR_VARIABLE = "RNNKIT_BUILD_DIR"
BUILD_LOCK = "rnnkit-build.lock"  # rnnkit's flock (see the module docstring)
TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file, which cpp_extension.load takes
PRIVATE = 0o700  # folders rnnkit creates

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_failure: list[str] = []  # why the build failed, once it has


class NativeBuildWarning(UserWarning):
    """The native kernels could not be built as configured: they are built elsewhere (an
    untrusted build directory), or rnnkit runs the fused backend instead (a failed build)."""


@functools.cache
def vector_capability() -> str:
    """The vector width the kernels are compiled for: torch's own choice on this CPU,
    ``"AVX512"`` or ``"AVX2"`` on x86-64, else ``"DEFAULT"``."""
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if on_x86 and capability in ("AVX2", "AVX512") else "DEFAULT"


def build_directory(capability: str) -> Path:
    """Where the library is cached as configured: ``$RNNKIT_BUILD_DIR``, else the default."""
    configured = os.environ.get(BUILD_DIR_VARIABLE)
    return Path(configured) if configured else default_build_directory(capability)


def default_build_directory(capability: str) -> Path:
    version = torch.__version__.replace("+", "_")
    return Path.home() / ".cache" / "rnnkit" / f"native-{version}-{capability.lower()}"


def distrust(directory: Path) -> str | None:
    """Why a library must not be loaded from ``directory`` (existing), or ``None`` if it may be:
    the directory and the folders above it (`_distrust_place`), then everything inside.

    POSIX only (``os.getuid``): elsewhere this raises, the build fails and the fused engine runs.
    """
    directory = directory.resolve()
    problem = _distrust_place(directory)
    if problem:
        return problem
    for folder, subfolders, files in os.walk(directory):  # does not follow links
        for name in subfolders + files:
            path = Path(folder, name)
            entry = path.lstat()
            if stat.S_ISLNK(entry.st_mode):
                return f"{directory} holds a symbolic link, {path}"
            problem = _unsafe(entry)
            if problem:
                return f"{directory} holds {path}, which is {problem}"
    return None


def _distrust_place(directory: Path) -> str | None:
    """`distrust` of the directory itself and the folders above it, not of its contents."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    problem = _unsafe(info)
    if problem:
        return f"{directory} is {problem}"
    for parent in directory.parents:
        # Whoever may rename the entries of a folder above could swap the whole directory.
        entry = parent.stat()
        if entry.st_uid not in (0, os.getuid()):
            return f"{directory} lies in {parent}, which is owned by uid {entry.st_uid}"
        if entry.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not entry.st_mode & stat.S_ISVTX:
            return (f"{directory} lies in {parent}, which is writable by group or others "
                    f"(mode {stat.S_IMODE(entry.st_mode):o}) and not sticky")
    return None


def _unsafe(info: os.stat_result) -> str | None:
    """What makes a file or folder with this status untrusted, or ``None``."""
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _make_private(directory: Path) -> Path:
    """Create ``directory`` and its missing parents 0700; returns it resolved."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(PRIVATE)
        except FileExistsError:  # another process was first: distrust judges its folder
            continue
        folder.chmod(PRIVATE)  # mkdir's mode passes through the umask
    return (missing[0] if missing else directory).resolve()


def _candidates(capability: str) -> Iterator[Path]:
    """Build directories in the order they are tried: configured, default, a fresh private one
    (created only when reached, removed at exit)."""
    yield from dict.fromkeys([build_directory(capability), default_build_directory(capability)])
    fresh = Path(tempfile.mkdtemp(prefix="rnnkit-native-"))  # 0700, ours
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    yield fresh


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold rnnkit's flock on ``directory`` (waiting for another process's build, said once on
    stderr), and remove torch's lock file, stale once the flock is ours.

    ``directory`` has passed `_distrust_place`: nobody else can have planted the lock file.
    """
    import fcntl  # POSIX only, like the build itself: elsewhere the fused engine runs

    path = directory / BUILD_LOCK
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rnnkit: waiting for another process's build of the native kernels in "
                  f"{directory} (it holds {path})", file=sys.stderr, flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        torch_lock = directory / TORCH_LOCK
        if torch_lock.exists():  # every rnnkit build holds the flock: this one was interrupted
            print(f"rnnkit: removing {torch_lock}, left by an interrupted build",
                  file=sys.stderr, flush=True)
            torch_lock.unlink()
        yield
    finally:
        os.close(descriptor)  # releases the flock


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Files created inside (the build's) are private, whatever the user's umask.

    The umask is the process's: files other threads create meanwhile are private too, a
    minute's side effect accepted over a window in which the library is writable by a group.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def compiler_flags(capability: str) -> list[str]:
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}"]
    if capability == "AVX2":
        flags += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        flags += ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                  "-mavx512dq", "-mfma", "-mf16c"]
    return flags



def _compile(capability: str) -> ModuleType:
    """Build (or load from the cache) the extension in the first trusted build directory;
    raises whatever the toolchain raises."""
    from torch.utils import cpp_extension

    try:  # ninja from PyPI: its binary is not on PATH when the venv is not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    name = f"rnnkit_native_{capability.lower()}"
    refused: list[str] = []
    for candidate in _candidates(capability):
        directory = _make_private(candidate)
        reason = _distrust_place(directory)
        if reason is None:
            with _build_lock(directory):
                reason = distrust(directory)  # its contents, now that no build writes to them
                if reason is None:
                    _warn_refused(refused, directory)
                    if not any(directory.glob(f"{name}*.so")):
                        print(f"rnnkit: compiling native CPU kernels once (about a minute), "
                              f"cache: {directory}", file=sys.stderr, flush=True)
                    with _private_files():
                        return cpp_extension.load(
                            name=name,
                            sources=[str(SOURCE)],
                            extra_cflags=compiler_flags(capability),
                            # libgomp has the soname of the one torch already loaded: it is used.
                            extra_ldflags=["-fopenmp"],
                            build_directory=str(directory),
                            verbose=False,
                        )
        refused.append(reason)
    raise RuntimeError(f"no trusted build directory: {'; '.join(refused)}")


def _warn_refused(refused: list[str], directory: Path) -> None:
    if refused:
        warnings.warn(
            f"rnnkit: not loading the native kernels from an untrusted build directory: "
            f"{'; '.join(refused)}. Building them in {directory} instead. A build directory "
            f"must be owned by this user and writable by nobody else (chmod go-w, or point "
            f"{BUILD_DIR_VARIABLE} at a private folder).",
            NativeBuildWarning,
            stacklevel=4,
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
