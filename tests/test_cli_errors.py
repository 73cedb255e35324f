"""How every command fails: exit codes (1 run failed, 2 bad command line, 130 interrupted),
output paths refused before any work, one line naming the option, never a traceback."""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np
import pandas as pd
import pytest

from rnnkit import bench, cli
from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint

TINY_LM = ["--steps", "2", "--hidden", "8", "--layers", "1", "--embedding", "4",
           "--batch-size", "2", "--seq-len", "8", "--eval-every", "1"]
# What `rnnkit lm train` saves (training/train.py); re-saving these through save_checkpoint
# crafts a checkpoint with whatever integrity data that function adds.
LM_PAYLOAD = ("model_config", "train_config", "vocabulary", "text_fingerprint", "model",
              "optimizer", "schedule", "step", "task", "stopping", "history", "random_state")
# A folder that refuses new files even to root: Linux's sysfs.
UNWRITABLE = "/sys"


def _refuses_files(folder: str) -> bool:
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(handle)
    os.unlink(probe)
    return False


unwritable = pytest.mark.skipif(not os.path.isdir(UNWRITABLE) or not _refuses_files(UNWRITABLE),
                                reason="needs Linux's /sys, which refuses new files even to root")


def fails(argv, capsys, code=1) -> str:
    """Run ``argv``; assert exit ``code``, one line on stderr, no traceback; return that line."""
    assert cli.main(argv) == code
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err, printed.err
    fails.out = printed.out
    return printed.err.strip()


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "lm.pt"
    assert cli.main(["lm", "train", "--corpus", "prose", *TINY_LM, "--checkpoint",
                     str(path)]) == 0
    return path


def resave(source, target, **changes):
    saved = load_checkpoint(source, "lm")
    save_checkpoint(target, "lm", {**{k: saved[k] for k in LM_PAYLOAD}, **changes})
    return target


# 1. Exit codes --------------------------------------------------------------------------------

def test_data_errors_exit_1_and_usage_errors_exit_2(tmp_path, capsys):
    assert "does not exist" in fails(["lm", "train", str(tmp_path / "none.txt")], capsys, 1)
    assert "give a TEXT_FILE or --corpus" in fails(["lm", "train"], capsys, 2)
    message = fails(["lm", "train", "--corpus", "prose", "--cell", "gru", "--peephole"],
                    capsys, 2)
    assert message == "rnnkit lm: error: --peephole is for --cell lstm only, got --cell gru"
    assert "--lr must be positive" in fails(["memory", "adding", "--lr", "0"], capsys, 2)
    assert "does not exist" in fails(["forecast", "train", "--csv", str(tmp_path / "x.csv"),
                                      "--target", "y"], capsys, 1)
    assert "--target COL is required with --csv" in fails(
        ["forecast", "train", "--csv", str(tmp_path / "x.csv")], capsys, 2)


@pytest.mark.parametrize("error, printed", [
    (KeyboardInterrupt(), "rnnkit lm: interrupted"),
    (KeyboardInterrupt("interrupted at step 7: saved lm.pt; resume with --resume lm.pt"),
     "interrupted at step 7: saved lm.pt; resume with --resume lm.pt"),
])
def test_an_interrupt_exits_130_in_one_line(monkeypatch, capsys, error, printed):
    from rnnkit.apps.lm import commands

    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(commands, "train", interrupted)
    assert fails(["lm", "train", "--corpus", "prose"], capsys, 130) == printed


def test_bench_is_handled_like_every_command(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_benchmarks", interrupted)
    assert fails(["bench", "--quick", "--no-memory"], capsys, 130) == "rnnkit bench: interrupted"


@pytest.mark.parametrize("argv", [
    ["lm", "train", "--corpus", "prose", "--hidden", str(2**70)],
    ["lm", "sample", "lm.pt", "--length", str(2**63)],
    ["memory", "adding", "--lengths", f"5,{2**70}"],
    ["gradients", "--samples", str(2**70)],
    ["bench", "--sizes", f"{2**70},1,1"],
])
def test_counts_beyond_int64_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "2**63 - 1" in capsys.readouterr().err


def test_the_allocator_running_out_is_one_line_and_other_runtime_errors_are_bugs(monkeypatch,
                                                                               capsys):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 160000000000 bytes.")

    monkeypatch.setattr(bench, "run_benchmarks", exhausted)
    assert fails(["bench", "--quick", "--no-memory"], capsys, 1).startswith(
        "rnnkit bench: error: out of memory; choose smaller sizes")

    def a_bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(bench, "run_benchmarks", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["bench", "--quick", "--no-memory"])


def test_an_os_error_is_one_line_with_the_file_and_reason(monkeypatch, capsys):
    from rnnkit.apps.lm import commands

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/data/lm.pt")

    monkeypatch.setattr(commands, "train", disk_full)
    assert fails(["lm", "train", "--corpus", "prose"], capsys, 1) == \
        "rnnkit lm: error: '/data/lm.pt': No space left on device"


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and re.search(r"\n  130  interrupted", out)


# 2. Output paths, checked before any work -----------------------------------------------------

def output_cases(tmp_path):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "folder").mkdir()
    (tmp_path / "run" / "model.pt").mkdir(parents=True)
    lm = ["lm", "train", "--corpus", "prose", *TINY_LM]
    missing = str(tmp_path / "missing.pt")  # reached only if the output check let it through
    csv = ["--csv", str(tmp_path / "missing.csv")]
    return [
        (lm + ["--checkpoint", str(tmp_path / "folder"), "--overwrite"],
         "--checkpoint '.*folder' is an existing folder; give a file path"),
        (lm + ["--checkpoint", str(tmp_path / "file" / "lm.pt")],
         "--checkpoint '.*lm.pt' cannot be written: '.*file' is an existing file, not a folder"),
        (lm + ["--checkpoint", str(tmp_path / "a.pt"), "--plot",
               str(tmp_path / "file" / "loss.png")], "--plot '.*loss.png' cannot be written"),
        (["demo", "--steps", "1", "--out", str(tmp_path / "file")],
         "--out '.*file' is an existing file; give a folder"),
        (["forecast", "train", *csv, "--target", "y", "--out", str(tmp_path / "run"),
          "--overwrite"], "--out '.*model.pt' is an existing folder"),
        (["forecast", "predict", missing, *csv, "--out", str(tmp_path / "folder")],
         "--out '.*folder' is an existing folder"),
        (["forecast", "predict", missing, *csv, "--out", str(tmp_path / "file" / "p.csv")],
         "--out '.*p.csv' cannot be written: '.*file' is an existing file"),
        (["bench", "--quick", "--json", str(tmp_path / "folder")],
         "--json '.*folder' is an existing folder"),
    ]


def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_benchmarks", None)  # a bench that got this far would fail
    for argv, message in output_cases(tmp_path):
        error = fails(argv, capsys, 1)
        assert re.search(message, error), (argv, error)
        assert "vocabulary" not in fails.out and "rnnkit bench:" not in fails.out
    assert (tmp_path / "file").read_text() == "keep me"


@unwritable
@pytest.mark.parametrize("argv", [
    ["lm", "train", "--corpus", "prose", *TINY_LM, "--checkpoint", f"{UNWRITABLE}/lm.pt"],
    ["memory", "adding", "--lengths", "5", "--steps", "1", "--hidden", "4", "--out", UNWRITABLE],
    ["gradients", "--cells", "rnn", "--length", "5", "--hidden", "4", "--out", UNWRITABLE],
    ["forecast", "predict", "missing.pt", "--dataset", "co2", "--out", f"{UNWRITABLE}/p.csv"],
])
def test_an_unwritable_folder_is_refused_before_any_work(capsys, argv):
    error = fails(argv, capsys, 1)
    assert f"'{UNWRITABLE}" in error and "cannot be written" in error and "denied" in error, error
    assert "vocabulary" not in fails.out and "held-out" not in fails.out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: the /sys "
                    "test above covers a folder that refuses root")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        error = fails(["lm", "train", "--corpus", "prose", *TINY_LM, "--checkpoint",
                       str(folder / "lm.pt")], capsys, 1)
    finally:
        folder.chmod(0o755)
    assert "cannot be written" in error and "Permission denied" in error


# 3. Sampling ----------------------------------------------------------------------------------

def test_extreme_sampling_settings_are_greedy(lm_checkpoint, capsys):
    samples = {}
    for name, options in {"greedy": ["--temperature", "0"], "top-p 0": ["--top-p", "0"],
                          "tiny temperature": ["--temperature", "1e-45"],
                          "denormal temperature": ["--temperature", "5e-324"]}.items():
        assert cli.main(["lm", "sample", str(lm_checkpoint), "--length", "20", "--seed", "1",
                         *options]) == 0, name
        samples[name] = capsys.readouterr().out
    assert len(set(samples.values())) == 1, samples


def test_a_checkpoint_with_a_bad_vocabulary_is_named(lm_checkpoint, tmp_path, capsys):
    empty = resave(lm_checkpoint, tmp_path / "empty.pt", vocabulary=[])
    error = fails(["lm", "sample", str(empty), "--length", "3"], capsys, 1)
    assert "empty.pt" in error and "vocabulary needs at least 1 token" in error, error
    short = resave(lm_checkpoint, tmp_path / "short.pt", vocabulary=["\ufffd", "a", "b"])
    error = fails(["lm", "sample", str(short), "--length", "3"], capsys, 1)
    assert re.search(r"short.pt' is inconsistent: a vocabulary of 3 tokens for a model with "
                     r"\d+ outputs", error), error


def test_an_infinite_temperature_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lm", "sample", "x.pt", "--temperature", "inf"])
    assert exit_info.value.code == 2
    assert "--temperature takes a finite number >= 0, got 'inf'" in capsys.readouterr().err


# 4. Forecasting an empty test tail ------------------------------------------------------------

def test_a_test_tail_without_values_is_refused_before_training(tmp_path, capsys):
    time = np.arange(200)
    values = 10 + np.sin(2 * np.pi * time / 7) + 0.01 * time
    values[-50:] = np.nan
    pd.DataFrame({"y": values}).to_csv(tmp_path / "tail.csv", index=False)
    error = fails(["forecast", "train", "--csv", str(tmp_path / "tail.csv"), "--target", "y",
                   "--hidden", "4", "--steps", "1", "--no-plot", "--out",
                   str(tmp_path / "out")], capsys, 1)
    assert "'y' has no value in the test tail (rows 180 to 199 of 200" in error, error
    assert "trained" not in fails.out and not (tmp_path / "out" / "model.pt").exists()


# 5. Sizes and seeds ---------------------------------------------------------------------------

def test_a_model_too_large_for_memory_is_refused_before_allocating(capsys):
    error = fails(["lm", "train", "--corpus", "prose", "--hidden", "100000", "--steps", "1"],
                  capsys, 1)
    assert error.startswith("rnnkit lm: error: --hidden 100000, --layers 2, --embedding 64 ")
    assert "GiB" in error and "choose a smaller --hidden, --layers or --embedding" in error


@pytest.mark.parametrize("seed", ["1180591620717411303424", "-1", str(2**63)])
@pytest.mark.parametrize("command", [
    ["lm", "train", "--corpus", "prose"], ["lm", "sample", "x.pt"], ["gradients"],
    ["forecast", "train", "--dataset", "co2"], ["memory", "adding"],
])
def test_seeds_are_bounded_by_the_parser(capsys, command, seed):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--seed", seed])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--seed takes" in error and f"integers in [0, 2**63 - 1], got '{seed}'" in error \
        or f"an integer in [0, 2**63 - 1], got '{seed}'" in error, error


def test_the_largest_seed_is_accepted(lm_checkpoint, capsys):
    assert cli.main(["lm", "sample", str(lm_checkpoint), "--length", "2", "--seed",
                     str(2**63 - 1)]) == 0
