"""Checkpoints are written atomically and anything else is refused with a clear error."""

from __future__ import annotations

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
