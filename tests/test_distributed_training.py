"""Training in several processes (torchrun, gloo on the CPU) is training on the whole batch:
after N steps two processes hold the weights one process reaches on the same global batch, and a
checkpoint the two processes wrote resumes in one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkit.cli import main
from rnnkit.training.checkpoint import load_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
# dropout 0: each process draws its own dropout masks, so only a run without any is the same
SETTINGS = ["--hidden", "8", "--layers", "2", "--dropout", "0", "--batch-size", "4",
            "--seq-len", "12", "--eval-every", "2", "--checkpoint-every", "2", "--lr", "0.01",
            "--device", "cpu"]


def torchrun(arguments: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    source = Path(__file__).resolve().parents[1] / "src"
    environment = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}"
                   f"{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
                   "RNNKIT_BACKEND": "fused"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={processes}", "-m", "rnnkit", *arguments],
        env=environment, capture_output=True, text=True, timeout=240)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, "lm")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-5, msg=key)


def test_two_processes_train_as_one_on_the_same_global_batch_and_resume_in_one(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RNNKIT_BACKEND", "fused")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    assert main(["lm", "train", str(text), "--steps", "4", *SETTINGS, "--checkpoint",
                 str(single)]) == 0
    ran = torchrun(["lm", "train", str(text), "--steps", "4", *SETTINGS, "--checkpoint",
                    str(double)])
    assert ran.returncode == 0, ran.stderr[-2000:]
    reports = [line for line in ran.stdout.splitlines() if line.startswith("validation:")]
    assert len(reports) == 1  # rank 0 alone prints its report
    assert load_checkpoint(double, "lm")["step"] == 4
    assert_same_weights(single, double)
    # the carried state of every stream was gathered: the whole batch's, (layers, N, H)
    state = load_checkpoint(double, "lm")["task"]["state"]
    assert [tuple(s.shape) for s in state] == [(2, 4, 8), (2, 4, 8)]

    # The two-process checkpoint resumes in one process, and continues as the one-process run.
    capsys.readouterr()
    for path in (single, double):
        assert main(["lm", "train", str(text), "--resume", str(path), "--steps", "6",
                     "--checkpoint", str(path)]) == 0
    assert load_checkpoint(double, "lm")["step"] == 6
    assert_same_weights(single, double)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    settings = [*SETTINGS[:SETTINGS.index("--batch-size")], "--batch-size", "3",
                *SETTINGS[SETTINGS.index("--batch-size") + 2:]]
    ran = torchrun(["lm", "train", str(text), "--steps", "2", *settings, "--checkpoint",
                    str(tmp_path / "x.pt")])
    assert ran.returncode != 0
    assert "rnnkit lm: error: --batch-size 3 does not split evenly over 2 processes; give a " \
        "multiple of 2" in ran.stderr
    assert "rnnkit/" not in ran.stderr  # no traceback from rnnkit (torchrun reports the exit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_the_cpu_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    on_cpu, on_gpu = tmp_path / "cpu.pt", tmp_path / "gpu.pt"
    common = [s for s in SETTINGS if s not in ("--device", "cpu")]
    assert main(["lm", "train", str(text), "--steps", "4", *common, "--device", "cpu",
                 "--checkpoint", str(on_cpu)]) == 0
    assert main(["lm", "train", str(text), "--steps", "4", *common, "--device", "cuda",
                 "--checkpoint", str(on_gpu)]) == 0
    first, second = weights(on_cpu), weights(on_gpu)
    for key in first:
        assert second[key].device.type == "cpu"
        torch.testing.assert_close(second[key], first[key], rtol=1e-3, atol=1e-4, msg=key)


def test_two_processes_fit_a_forecaster_as_one_and_only_rank_0_writes(tmp_path, monkeypatch,
                                                                     capsys):
    import numpy as np
    import pandas as pd

    from rnnkit.apps.forecast.data import rolling_windows, split_series

    monkeypatch.setenv("RNNKIT_BACKEND", "fused")
    length, lookback, horizon, held_out = 198, 12, 4, 24
    steps = np.arange(length)
    values = 5 + np.sin(2 * np.pi * steps / 12) + 0.1 * np.random.default_rng(0).normal(size=length)
    pd.DataFrame({"y": values}).to_csv(tmp_path / "series.csv", index=False)
    split = split_series(length, lookback, horizon, held_out, held_out)
    count = len(rolling_windows(values[:, None], 0, split.train_end, lookback, horizon)[0])
    batch = 46
    assert count % batch == 0 and batch % 2 == 0  # every mini-batch splits evenly in two
    settings = ["forecast", "train", "--csv", str(tmp_path / "series.csv"), "--target", "y",
                "--lookback", str(lookback), "--horizon", str(horizon), "--test-size",
                str(held_out), "--validation-size", str(held_out), "--season", "12",
                "--hidden", "8", "--steps", "6", "--eval-every", "2", "--min-steps", "0",
                "--patience", "3", "--batch-size", str(batch),
                "--no-plot"]
    assert main([*settings, "--out", str(tmp_path / "one")]) == 0
    ran = torchrun([*settings, "--out", str(tmp_path / "two")])
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.count("wrote ") == 1
    one = load_checkpoint(tmp_path / "one" / "model.pt", "forecast")["models"][0]
    two = load_checkpoint(tmp_path / "two" / "model.pt", "forecast")["models"][0]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
