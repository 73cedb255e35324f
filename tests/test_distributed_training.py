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
            ]


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
