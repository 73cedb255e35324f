"""Regressions found by the hostile audit of issue 16 (the one loop, the generated command line,
config files, the best checkpoint beside the last)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from rnnkit.cli import main
from rnnkit.errors import EXIT_USAGE
from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint

TINY = ["--hidden", "8", "--layers", "1", "--seq-len", "10", "--batch-size", "4",
        "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu", "--quiet"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("hello world, the quick brown fox jumps. " * 200, encoding="utf-8")
    return path


def _exit_code(arguments) -> int:
    """`main`'s exit status, argparse's own usage errors (SystemExit) included."""
    try:
        return main(arguments)
    except SystemExit as stop:
        return stop.code


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("source", ["option", "file"])
def test_a_mistyped_device_is_a_usage_error_before_anything_loads(tmp_path, capsys, source):
    # Was exit 1, after the text was read; --print-config even printed device = "gpu".
    if source == "option":
        arguments = ["--device", "gpu"]
    else:
        (tmp_path / "run.toml").write_text('[train.loop]\ndevice = "gpu"\n', encoding="utf-8")
        arguments = ["--config", str(tmp_path / "run.toml")]
    assert _exit_code(["lm", "train", str(tmp_path / "missing.txt"), *arguments,
                       "--print-config"]) == EXIT_USAGE
    line = _error(capsys)
    assert "--device" in line and "'gpu'" in line and "auto, cpu, cuda or cuda:N" in line


def test_a_device_is_written_canonically_by_print_config(text, capsys):
    assert main(["lm", "train", str(text), "--device", "cuda:01", "--print-config"]) == 0
    assert 'device = "cuda:1"' in capsys.readouterr().out


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_forget_bias_is_a_usage_error_naming_the_option(tmp_path, capsys, value):
    # Was accepted by the config (and printed by --print-config), then refused by the layer
    # with exit 1 as "LSTM forget_bias".
    (tmp_path / "run.toml").write_text(f"[model.recurrent]\nforget_bias = {value}\n",
                                       encoding="utf-8")
    assert main(["lm", "train", "--corpus", "prose", "--config", str(tmp_path / "run.toml"),
                 "--print-config"]) == EXIT_USAGE
    assert _error(capsys).endswith(f"--forget-bias must be a finite number, got {value}")


def test_a_yaml_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path, capsys):
    pytest.importorskip("yaml", reason="PyYAML reads the YAML config files")
    # 9 levels of 9 aliases: 387 million strings once written out; cheap to load (references).
    anchors = ['&x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
        f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text(
        "model:\n  recurrent:\n    cell: [" + ", ".join(anchors) + "]\n", encoding="utf-8")
    started = time.perf_counter()
    assert main(["lm", "train", "--corpus", "prose", "--config", str(tmp_path / "bomb.yaml"),
                 "--print-config"]) == EXIT_USAGE
    assert time.perf_counter() - started < 10
    line = _error(capsys)
    assert "key 'cell' in [model.recurrent]: --cell must be one of" in line
    assert len(line) < 1000


def _step_of(path) -> int:
    return torch.load(path, weights_only=True)["step"]


def test_a_stale_best_checkpoint_is_never_reported_as_the_resumed_runs(tmp_path, text, capsys):
    run, copy = tmp_path / "run.pt", tmp_path / "copy.pt"
    assert main(["lm", "train", str(text), *TINY, "--steps", "6", "--checkpoint", str(run)]) == 0
    shutil.copyfile(run, copy)  # the run at step 6 (best at 6), without its .best.pt
    assert main(["lm", "train", str(text), "--resume", str(run), "--checkpoint", str(run),
                 "--steps", "10", "--quiet"]) == 0
    assert _step_of(tmp_path / "run.best.pt") == 10  # the future the copy's resume abandons
    capsys.readouterr()
    # Resumed from step 6 into run.pt; the one step taken does not improve on step 6 (its lr is
    # 0 at the end of the cosine schedule), so the best stays step 6's. run.best.pt held step
    # 10's weights and was reported as "its weights".
    assert main(["lm", "train", str(text), "--resume", str(copy), "--checkpoint", str(run),
                 "--overwrite", "--steps", "7", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "at step 6; its weights:" in out
    best = torch.load(tmp_path / "run.best.pt", weights_only=True)
    saved = torch.load(copy, weights_only=True)
    assert best["step"] == 6
    for name, weight in saved["model"].items():
        assert torch.equal(best["model"][name], weight), name


def test_a_stale_best_is_removed_when_the_resumed_runs_best_is_unknown(tmp_path, text, capsys):
    run, copy = tmp_path / "run.pt", tmp_path / "copy.pt"
    assert main(["lm", "train", str(text), *TINY, "--steps", "6", "--checkpoint", str(run)]) == 0
    # A checkpoint whose best (step 2, a score no later step can beat: cross-entropy >= 0) is
    # not its own weights, and comes without its .best.pt.
    saved = load_checkpoint(run, "lm")
    payload = {key: value for key, value in saved.items()
               if key not in ("format", "kind", "version", "checksum")}
    payload["stopping"] = {"best_loss": 0.0, "best_step": 2, "waited": 2}
    save_checkpoint(copy, "lm", payload)
    assert main(["lm", "train", str(text), "--resume", str(run), "--checkpoint", str(run),
                 "--steps", "10", "--quiet"]) == 0
    assert _step_of(tmp_path / "run.best.pt") == 10  # another timeline's best
    capsys.readouterr()
    assert main(["lm", "train", str(text), "--resume", str(copy), "--checkpoint", str(run),
                 "--overwrite", "--steps", "7", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "at step 2; its weights were not kept" in out
    assert not (tmp_path / "run.best.pt").exists()
