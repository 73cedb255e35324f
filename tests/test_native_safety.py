"""The native engine is safe to load and hard to break: a trusted build cache, no stale build
lock, kernels that check their inputs, torch.nn's NaN convention, empty batches."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from rnnkit.engine.native import build

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def loader(monkeypatch, tmp_path):
    """torch's extension loader replaced by a recorder of the build directories it is given
    (and of the umask it runs under), so no test here compiles; HOME is a fresh folder."""
    calls: list[Path] = []
    masks: list[int] = []

    def load(**arguments):
        calls.append(Path(arguments["build_directory"]))
        mask = os.umask(0)
        os.umask(mask)
        masks.append(mask)
        return types.SimpleNamespace(name=arguments["name"])

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failure", [])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(build.BUILD_DIR_VARIABLE, raising=False)
    loader = types.SimpleNamespace(calls=calls, masks=masks, home=tmp_path / "home")
    yield loader


def default_cache() -> Path:
    return build.default_build_directory(build.vector_capability())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plant(directory: Path) -> Path:
    """A folder holding a library as a build would leave it."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"rnnkit_native_{build.vector_capability().lower()}.so"
    library.write_bytes(b"not a library")
    return library


# ---- the build cache is trusted only when nobody else can have written to it -----------------

@pytest.mark.parametrize("spoil", [
    pytest.param(lambda d: os.chown(d, NOBODY, NOBODY), id="owned-by-another-user", marks=as_root),
    pytest.param(lambda d: d.chmod(0o777), id="writable-by-others"),
    pytest.param(lambda d: d.chmod(0o770), id="writable-by-group"),
])
def test_an_untrusted_configured_directory_is_never_loaded(loader, monkeypatch, tmp_path, spoil):
    planted = tmp_path / "planted"
    plant(planted)
    spoil(planted)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"untrusted build directory: {planted} is (owned by uid {NOBODY}|writable by group or others).*Building them in {default_cache()} instead"):
        assert build.kernels() is not None
    assert loader.calls == [default_cache()]  # the default cache, fresh and private


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda f: os.chown(f, NOBODY, NOBODY), id="library-owned-by-another-user", marks=as_root),
    pytest.param(lambda f: f.chmod(0o666), id="library-writable-by-others"),
    pytest.param(lambda f: f.with_name("evil.so").symlink_to(f), id="symbolic-link-inside"),
])
def test_a_directory_holding_an_untrusted_file_is_never_loaded(loader, monkeypatch, tmp_path, spoil):
    planted = tmp_path / "planted"
    library = plant(planted)
    spoil(library)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"{planted} holds (a symbolic link, )?{planted}/"):
        build.kernels()
    assert loader.calls == [default_cache()]


def test_a_directory_in_a_folder_others_may_rename_in_is_never_loaded(loader, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may swap the build directory for their own
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(shared / "cache"))
    with pytest.warns(build.NativeBuildWarning, match=rf"{shared}/cache lies in {shared}, which is writable by group or others \(mode 777\) and not sticky"):
        build.kernels()
    assert loader.calls == [default_cache()]


@as_root
def test_when_the_default_cache_is_untrusted_too_a_fresh_private_directory_is_used(loader, monkeypatch, tmp_path):
    planted = tmp_path / "planted"
    plant(planted)
    os.chown(planted, NOBODY, NOBODY)
    plant(default_cache())
    os.chown(default_cache(), NOBODY, NOBODY)
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(planted))
    with pytest.warns(build.NativeBuildWarning, match=rf"{planted} is owned.*; {default_cache()} is owned.*Building them in"):
        build.kernels()
    [fresh] = loader.calls
    assert fresh.parent == Path(tempfile.gettempdir()).resolve()
    assert fresh.name.startswith("rnnkit-native-")
    assert mode(fresh) == 0o700 and fresh.stat().st_uid == os.getuid()


def test_a_fresh_cache_is_created_private_whatever_the_umask(loader):
    previous = os.umask(0)  # mkdir alone would make every folder 0777
    try:
        build.kernels()
    finally:
        os.umask(previous)
    assert loader.calls == [default_cache()]
    for folder in (loader.home, loader.home / ".cache", loader.home / ".cache" / "rnnkit",
                   default_cache()):
        assert mode(folder) == 0o700, folder
    assert loader.masks == [0o077]  # the build's own files are private too
    assert build.distrust(default_cache()) is None


def test_a_private_configured_directory_is_used_without_a_warning(loader, monkeypatch, tmp_path, recwarn):
    private = tmp_path / "private"
    plant(private)
    private.chmod(0o755)  # readable by others is fine: only writing is refused
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(private))
    build.kernels()
    assert loader.calls == [private]
    assert not [w for w in recwarn if issubclass(w.category, build.NativeBuildWarning)]


# ---- a stale build lock does not block; a live one is waited for, and said so ----------------

def build_in_thread() -> threading.Thread:
    thread = threading.Thread(target=build.kernels, daemon=True)
    thread.start()
    return thread


def test_a_stale_torch_lock_is_removed_and_the_build_proceeds(loader, monkeypatch, tmp_path, capsys):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / build.TORCH_LOCK).touch()  # left by a build killed midway
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(directory))
    thread = build_in_thread()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert loader.calls == [directory]
    assert not (directory / build.TORCH_LOCK).exists()
    assert f"removing {directory / build.TORCH_LOCK}, left by an interrupted build" in capsys.readouterr().err


def test_a_live_build_is_waited_for_with_one_message(loader, monkeypatch, tmp_path, capsys):
    directory = tmp_path / "cache"
    directory.mkdir()
    monkeypatch.setenv(build.BUILD_DIR_VARIABLE, str(directory))
    with open(directory / build.BUILD_LOCK, "w") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)  # another open file: it conflicts like one
        thread = build_in_thread()
        message, deadline = "", time.monotonic() + 30
        while "waiting" not in message and time.monotonic() < deadline:
            time.sleep(0.05)
            message += capsys.readouterr().err
        assert f"waiting for another process's build of the native kernels in {directory}" in message
        time.sleep(0.2)
        assert loader.calls == [] and thread.is_alive()
    thread.join(timeout=30)  # closing the file released the lock
    assert not thread.is_alive()
    assert loader.calls == [directory]
    assert "waiting" not in capsys.readouterr().err  # said once
