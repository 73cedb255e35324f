"""Checkpoints are written atomically and anything else is refused with a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from rnnkit.training import checkpoint
from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 3, "weights": torch.ones(2)})
    loaded = load_checkpoint(path, "lm")
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], torch.ones(2))
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 1})

    def dies_half_way(obj, stream):
        stream.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "lm", {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, "lm")["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_bad_checkpoints_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(path, "lm")
    save_checkpoint(path, "forecast", {"step": 1})
    with pytest.raises(ValueError, match="written by 'rnnkit forecast', not 'rnnkit lm'"):
        load_checkpoint(path, "lm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read \\(truncated or corrupted\\?\\)"):
        load_checkpoint(path, "lm")
    path.write_bytes(b"just some text")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path, "lm")
    torch.save({"state_dict": {}}, path)  # a torch file from another program
    with pytest.raises(ValueError, match="is not an rnnkit checkpoint"):
        load_checkpoint(path, "lm")


class _RunsACommand:
    """Pickles as a call of os.system: what a trojan checkpoint would hold."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    genuine = tmp_path / "genuine.pt"
    save_checkpoint(genuine, "lm", {"step": 1, "weights": torch.ones(3)})
    # A trojan built from a real checkpoint plus one extra key, written as torch.save would.
    content = torch.load(genuine, weights_only=True)
    content["extra"] = _RunsACommand(marker)
    trojan = tmp_path / "trojan.pt"
    torch.save(content, trojan)
    with pytest.raises(ValueError, match=r"refused: it holds a Python object \(posix.system\)"):
        load_checkpoint(trojan, "lm")
    torch.save(_RunsACommand(marker), trojan)  # the object alone
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(trojan, "lm")
    assert not marker.exists()


def _records(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [(info.filename, info.header_offset, info.compress_size)
                for info in archive.infolist()]


def test_a_flipped_byte_in_any_record_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 7, "model": {"w": torch.randn(50), "b": torch.ones(4)},
                                 "history": [0.5, 0.25]})
    original = path.read_bytes()
    records = _records(path)
    assert len(records) >= 5
    for name, offset, size in records:
        damaged = bytearray(original)
        # The record's data lies after its local header (30 bytes + name + extra field); the
        # last byte of the record is data whatever the header's length.
        damaged[offset + 30 + len(name) + size - 1 + _extra_length(original, offset)] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="ckpt.pt") as refused:
            load_checkpoint(path, "lm")
        assert "corrupted" in str(refused.value), name
    path.write_bytes(original)
    assert load_checkpoint(path, "lm")["step"] == 7


def _extra_length(data: bytes, offset: int) -> int:
    import struct

    return struct.unpack("<H", data[offset + 28 : offset + 30])[0]


def test_a_payload_changed_behind_the_checksum_is_refused(tmp_path):
    # A file rewritten with valid zip CRCs but a different value than the checksum covers.
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 7, "weights": torch.ones(3)})
    content = torch.load(path, weights_only=True)
    content["weights"][1] = 2.0
    torch.save(content, path)
    with pytest.raises(ValueError, match="does not match the SHA-256 checksum"):
        load_checkpoint(path, "lm")


def test_version_1_checkpoints_without_checksum_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "rnnkit", "kind": "lm", "version": 1, "step": 4}, path)
    assert load_checkpoint(path, "lm")["step"] == 4


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_state_is_never_written(tmp_path, where):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 1, "model": {"w": torch.ones(2)},
                                 "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}})
    bad = {"step": 2, "model": {"w": torch.ones(2)},
           "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}}
    if where == "model":
        bad["model"]["w"][0] = float("nan")
    else:
        bad["optimizer"]["state"][0]["exp_avg"][1] = float("inf")
    with pytest.raises(checkpoint.NonFiniteState, match=rf"\['{where}'\].*NaN or infinite"):
        save_checkpoint(path, "lm", bad)
    assert load_checkpoint(path, "lm")["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 1})

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match="No space left on device.*previous checkpoint there is unchanged"):
        save_checkpoint(path, "lm", {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, "lm")["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "ckpt.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".ckpt.pt.{dead}-abc.tmp", tmp_path / ".ckpt.pt.xyz.tmp"]
    live = tmp_path / f".ckpt.pt.{os.getppid()}-def.tmp"  # a writer still running
    for file in [*stale, live]:
        file.write_bytes(b"PK half")
    save_checkpoint(path, "lm", {"step": 1})
    assert sorted(tmp_path.iterdir()) == sorted([path, live])


def test_unreadable_and_truncated_files_get_one_line(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, "lm", {"step": 1, "weights": torch.randn(1000)})
    data = path.read_bytes()
    for fraction in (0.1, 0.3, 0.5, 0.9):
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ValueError, match="cannot be read \\(truncated or corrupted\\?\\)"):
            load_checkpoint(path, "lm")
    path.write_bytes(data)

    def refuses(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.zipfile, "ZipFile", refuses)
    with pytest.raises(ValueError, match="cannot be opened: Permission denied"):
        load_checkpoint(path, "lm")
