"""MetricsLog: one flushed JSON line per write, strict JSON (non-finite as null), a resumed run's
log without repeated or orphaned steps, and the same scalars in TensorBoard's event file."""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
import torch

from rnnkit.training import metrics
from rnnkit.training.metrics import MetricsLog, read_metrics


def steps_of(path):
    return [record["step"] for record in read_metrics(path)]


def test_each_write_is_one_flushed_json_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    before = time.time()
    with MetricsLog(path) as log:
        log.write(1, loss=2.5, lr=1e-3, phase="train", improved=True, note=None)
        # Readable before close: a crash after this line keeps it.
        lines = path.read_text().splitlines()
        assert len(lines) == 1
        log.write(2, loss=2.25)
    after = time.time()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert list(first) == ["step", "time", "loss", "lr", "phase", "improved", "note"]
    assert first["step"] == 1 and before <= first["time"] <= second["time"] <= after
    assert first["loss"] == 2.5 and first["lr"] == 1e-3 and first["phase"] == "train"
    assert first["improved"] is True and first["note"] is None
    assert read_metrics(path) == [first, second]


def test_non_finite_values_are_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(3, loss=math.nan, grad_norm=math.inf, low=-math.inf, fine=1.0)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))
    assert record["loss"] is None and record["grad_norm"] is None and record["low"] is None
    assert record["fine"] == 1.0


def test_tensors_and_numpy_scalars_are_taken_by_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(0, loss=torch.tensor(0.5), tokens=torch.tensor([7]), f32=np.float32(0.25),
                  count=np.int64(3))
    (record,) = read_metrics(path)
    assert record["loss"] == 0.5 and record["tokens"] == 7
    assert record["f32"] == 0.25 and record["count"] == 3 and isinstance(record["count"], int)


def test_bad_values_are_named(tmp_path):
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        with pytest.raises(TypeError, match=r"metric 'weights' must be an int, float, bool, str, "
                                            r"None or a one-element tensor, got a Tensor of shape \(2,\)"):
            log.write(1, weights=torch.ones(2))
        with pytest.raises(TypeError, match=r"metric 'config' must be .* got \{'a': 1\} \(dict\)"):
            log.write(1, config={"a": 1})
        with pytest.raises(ValueError, match=r"metric 'time' is a name every record has"):
            log.write(1, time=3.0)
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            log.write(-1, loss=1.0)
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # nothing half-written
    with pytest.raises(ValueError, match=r"metrics log .*metrics.jsonl is closed"):
        log.write(1, loss=1.0)


def test_a_new_run_replaces_the_old_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(1, loss=1.0)
        log.write(2, loss=1.0)
    with MetricsLog(path) as log:
        log.write(1, loss=3.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 3.0)]


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 11):
            log.write(step, loss=10.0 - step)
            if step % 5 == 0:
                log.write(step, val=5.0)  # an evaluation at the same step: a second record
    # The run died after step 10; its last checkpoint was at step 5.
    with MetricsLog(path, resume_step=5) as log:
        assert steps_of(path) == [1, 2, 3, 4, 5, 5]
        for step in range(6, 9):
            log.write(step, loss=0.5)
    assert steps_of(path) == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_resume_with_nothing_to_drop_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(1, loss=1.0)
    modified = path.stat().st_mtime_ns
    with MetricsLog(path, resume_step=4):
        pass
    assert path.stat().st_mtime_ns == modified and steps_of(path) == [1]
    with MetricsLog(tmp_path / "fresh.jsonl", resume_step=4) as log:  # the log was deleted
        log.write(5, loss=1.0)
    assert steps_of(tmp_path / "fresh.jsonl") == [5]


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0, "loss": 1.0}\n{"step": 2, "time": 0, "lo')
    assert steps_of(path) == [1]
    with MetricsLog(path, resume_step=1) as log:
        log.write(2, loss=0.5)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5)]


def test_a_damaged_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0}\nnot json\n{"step": 3, "time": 0}\n')
    with pytest.raises(ValueError, match=rf"metrics log {path} line 2 is not JSON"):
        read_metrics(path)
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        MetricsLog(path, resume_step=2)
    path.write_text('{"step": "1"}\n')
    with pytest.raises(ValueError, match='line 1 is not a record with an integer "step"'):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"metrics log .*missing.jsonl does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


def test_an_interrupted_rewrite_keeps_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 4):
            log.write(step, loss=1.0)
    original = path.read_text()

    def dies(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_step=1)
    assert path.read_text() == original and list(tmp_path.iterdir()) == [path]


def test_disabled_log_touches_nothing(tmp_path):
    with MetricsLog(tmp_path / "run" / "metrics.jsonl", tensorboard_dir=tmp_path / "tb",
                    enabled=False) as log:
        log.write(1, loss=1.0)
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_installed_only_json_lines(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb") as log:
        log.write(1, loss=1.0)
    assert log.tensorboard is False and not (tmp_path / "tb").exists()
    assert steps_of(tmp_path / "metrics.jsonl") == [1]


def tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} read back from the event files in ``folder``."""
    # tensorboard is a dev dependency (pip install -e .[dev]): not skipped when missing.
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_numeric_values_become_tensorboard_scalars(tmp_path):
    folder = tmp_path / "tb"
    with MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=folder) as log:
        assert log.tensorboard is True
        log.write(1, loss=2.5, phase="train", improved=True, tokens=64)
        log.write(2, loss=math.nan, tokens=torch.tensor(128))
    scalars = tensorboard_scalars(folder)
    assert set(scalars) == {"loss", "tokens"}  # strings and bools are not curves
    assert scalars["tokens"] == [(1, 64.0), (2, 128.0)]
    assert scalars["loss"][0] == (1, 2.5)
    assert scalars["loss"][1][0] == 2 and math.isnan(scalars["loss"][1][1])  # the value itself


def _log_six_steps_then_resume_after_three(tmp_path, folder):
    """Steps 1-6 with loss = step, then a log resumed at step 3 writing steps 4-5 with 10 x step."""
    with MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=folder) as log:
        for step in range(1, 7):
            log.write(step, loss=float(step))
    with MetricsLog(tmp_path / "metrics.jsonl", resume_step=3, tensorboard_dir=folder) as log:
        for step in range(4, 6):
            log.write(step, loss=10.0 * step)


def test_resumed_tensorboard_curves_have_no_orphaned_steps(tmp_path):
    folder = tmp_path / "tb"
    _log_six_steps_then_resume_after_three(tmp_path, folder)
    assert tensorboard_scalars(folder)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                   (5, 50.0)]
    assert steps_of(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]


def test_a_resumed_curve_purges_even_when_the_event_file_counter_gains_a_digit(tmp_path,
                                                                              monkeypatch):
    """The first writer's file ends in ".9", the resumed one's in ".10" ("10" sorts before "9"),
    within the same second: the resumed writer waits into the next second, so its file sorts
    last and its purge of steps 4-6 applies (found under pytest-xdist, where a worker's earlier
    tests had moved tensorboard's per-process counter to such a boundary)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    folder = tmp_path / "tb"
    start = time.time()
    if start - int(start) > 0.5:  # leave the first writer the same second as the check
        time.sleep(int(start) + 1 - start)
    _log_six_steps_then_resume_after_three(tmp_path, folder)
    names = sorted(path.name for path in folder.glob("events.out.tfevents.*"))
    assert [name.rsplit(".", 1)[1] for name in names] == ["9", "10"]  # the resumed file last
    assert tensorboard_scalars(folder)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                   (5, 50.0)]


def test_a_new_log_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "run.metrics.jsonl"
    link.symlink_to(victim)
    with MetricsLog(link) as log:
        log.write(1, validation=0.5)
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and read_metrics(link)[0]["validation"] == 0.5
