"""A sweep of bad command lines: every option of every command given values it must refuse.

Each case starts from a tiny valid command line (a few training steps on small data) and
replaces one option's value by a bad one: zero, negative, non-numeric, NaN, infinity, 2**70,
paths that are missing, folders, files under files, binary, empty, truncated or crafted
checkpoints. Every case runs `rnnkit.cli.main` in this process, with a time limit, and is
classified by what a user would see:

- ``usage error``: exit 2 and a message on stderr;
- ``runtime error``: exit 1 and a message on stderr;
- ``accepted``: exit 0 (a value that is in fact valid, e.g. a seed of 2**63 - 1);
- ``interrupted``: exit 130;
- ``traceback``: an exception escaped ``main``, or stderr shows a traceback;
- ``unclear``: a refusal whose message is empty or more than three lines;
- ``hang``: the case ran past the time limit.

Run: ``python benchmarks/cli_sweep.py [--json results.json] [--limit-s 120]``; it prints one line
per case that is not a clear refusal and a count per class. The closing note of issue 14 quotes
its counts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HUGE = str(2**70)
BAD_POSITIVE_INTS = ["0", "-1", "abc", "1.5", "", HUGE]
BAD_REALS = ["nan", "inf", "-inf", "-1", "abc", "1e309", ""]
BAD_SEEDS = ["-1", "abc", HUGE, "1.5"]


class Hang(Exception):
    pass


def make_data(folder: Path) -> dict[str, str]:
    """Small inputs: a text file, a CSV series, a binary file, an empty file, a folder."""
    import math

    text = folder / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 120, encoding="utf-8")
    series = folder / "series.csv"
    rows = ["day,y,x"] + [
        f"2024-01-{1 + i % 28:02d}T{i // 28:02d}:00,{10 + math.sin(i / 3) + 0.01 * i:.4f},"
        f"{math.cos(i / 5):.4f}" for i in range(120)]
    series.write_text("\n".join(rows) + "\n", encoding="utf-8")
    binary = folder / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    empty = folder / "empty.txt"
    empty.write_text("")
    a_folder = folder / "a-folder"
    a_folder.mkdir()
    a_file = folder / "a-file"
    a_file.write_text("x")
    return {"text": str(text), "csv": str(series), "binary": str(binary), "empty": str(empty),
            "folder": str(a_folder), "file": str(a_file), "under_file": str(a_file / "x.pt"),
            "missing": str(folder / "missing.pt")}


def checkpoints(folder: Path, data: dict[str, str]) -> dict[str, str]:
    """A real lm and forecast checkpoint, and damaged copies of the lm one."""
    from rnnkit.cli import main

    lm, forecast = folder / "lm.pt", folder / "forecast"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*LM_TRAIN(data, str(lm))]) == 0
        assert main([*FORECAST_TRAIN(data, str(forecast))]) == 0
    good = lm.read_bytes()
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 3])
    flipped = folder / "flipped.pt"
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    trojan = folder / "trojan.pt"
    marker = folder / "trojan-ran"
    import torch

    class RunsACommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": "rnnkit", "kind": "lm", "version": 2, "x": RunsACommand()}, trojan)
    return {"lm": str(lm), "forecast": str(forecast / "model.pt"), "truncated": str(truncated),
            "flipped": str(flipped), "trojan": str(trojan), "marker": str(marker)}


def LM_TRAIN(data, checkpoint):  # noqa: N802 - a template, named like a constant
    return ["lm", "train", data["text"], "--steps", "2", "--hidden", "8", "--embedding", "4",
            "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--eval-every", "1",
            "--checkpoint", checkpoint, "--overwrite"]


def FORECAST_TRAIN(data, out):  # noqa: N802
    return ["forecast", "train", "--csv", data["csv"], "--target", "y", "--time", "day",
            "--epochs", "1", "--hidden", "4", "--lookback", "8", "--horizon", "2", "--out", out,
            "--overwrite", "--no-plot"]


def replace(argv: list[str], option: str, value: str | None) -> list[str]:
    """``argv`` with ``option``'s value replaced (appended if absent; removed if None)."""
    argv = list(argv)
    if option in argv:
        index = argv.index(option)
        if value is None:
            del argv[index : index + 2]
        else:
            argv[index + 1] = value
    elif value is not None:
        argv += [option, value]
    return argv


def cases(folder: Path, data: dict[str, str], saved: dict[str, str]) -> list[list[str]]:
    out = str(folder / "out")
    lm_train = LM_TRAIN(data, str(folder / "run.pt"))
    result: list[list[str]] = []
    for option in ("--steps", "--hidden", "--embedding", "--layers", "--batch-size", "--seq-len",
                   "--eval-every", "--checkpoint-every", "--max-vocabulary"):
        result += [replace(lm_train, option, v) for v in BAD_POSITIVE_INTS]
    for option in ("--lr", "--dropout", "--clip-norm", "--clip-value", "--clip-tensor-norm",
                   "--validation-fraction"):
        result += [replace(lm_train, option, v) for v in BAD_REALS]
    result += [replace(lm_train, "--seed", v) for v in BAD_SEEDS]
    result += [replace(lm_train, "--hidden", "100000")]  # 160 GB of weights
    result += [replace(lm_train, "--checkpoint", p) for p in
               (data["folder"], data["under_file"], data["file"])]
    result += [replace(lm_train, "--plot", p) for p in (data["folder"], data["under_file"])]
    result += [replace(lm_train, "--resume", p) for p in
               (data["missing"], data["folder"], data["binary"], saved["truncated"],
                saved["flipped"], saved["trojan"], saved["forecast"])]
    result += [["lm", "train", p, *lm_train[3:]] for p in
               (data["missing"], data["folder"], data["binary"], data["empty"])]
    result += [replace(lm_train, "--level", "byte"), replace(lm_train, "--optimizer", "lbfgs"),
               replace(lm_train, "--cell", "transformer"), [*lm_train, "--corpus", "prose"]]

    sample = ["lm", "sample", saved["lm"], "--length", "5", "--seed", "0"]
    for checkpoint in (data["missing"], data["folder"], data["binary"], data["empty"],
                       saved["truncated"], saved["flipped"], saved["trojan"], saved["forecast"]):
        result.append(["lm", "sample", checkpoint, "--length", "5"])
        result.append(["lm", "eval", checkpoint, data["text"]])
    result += [replace(sample, "--length", v) for v in BAD_POSITIVE_INTS]
    result += [replace(sample, "--temperature", v) for v in [*BAD_REALS, "1e-45", "1e308"]]
    result += [replace(sample, "--top-k", v) for v in BAD_POSITIVE_INTS]
    result += [replace(sample, "--top-p", v) for v in [*BAD_REALS, "0", "1.5"]]
    result += [replace(sample, "--seed", v) for v in BAD_SEEDS]
    result += [["lm", "eval", saved["lm"], p] for p in
               (data["missing"], data["folder"], data["binary"], data["empty"])]

    forecast = FORECAST_TRAIN(data, out)
    for option in ("--epochs", "--hidden", "--layers", "--lookback", "--horizon", "--batch-size",
                   "--patience", "--test-size", "--validation-size", "--stride"):
        result += [replace(forecast, option, v) for v in BAD_POSITIVE_INTS]
    result += [replace(forecast, "--lookback", "100000"), replace(forecast, "--horizon", "1000")]
    for option in ("--lr", "--dropout", "--clip-norm", "--clip-value"):
        result += [replace(forecast, option, v) for v in BAD_REALS]
    result += [replace(forecast, "--seed", v) for v in BAD_SEEDS]
    result += [replace(forecast, "--season", v) for v in ["1", "-2", "abc", HUGE, "100000"]]
    result += [replace(forecast, "--target", v) for v in ["nope", "day", ""]]
    result += [replace(forecast, "--time", v) for v in ["nope", "y"]]
    result += [replace(forecast, "--features", v) for v in ["nope", "y", ","]]
    result += [replace(forecast, "--csv", p) for p in
               (data["missing"], data["folder"], data["binary"], data["empty"], data["text"])]
    result += [replace(forecast, "--out", p) for p in (data["file"], data["under_file"])]
    result += [replace(forecast, "--strategy", "sideways"), replace(forecast, "--fill", "zero")]
    predict = ["forecast", "predict", saved["forecast"], "--csv", data["csv"], "--out",
               str(folder / "prediction.csv")]
    result += [replace(predict, "--out", p) for p in (data["folder"], data["under_file"])]
    result += [["forecast", "predict", p, "--csv", data["csv"], "--out", out + ".csv"] for p in
               (data["missing"], data["folder"], data["binary"], saved["lm"], saved["truncated"],
                saved["trojan"])]
    result += [replace(predict, "--csv", p) for p in
               (data["missing"], data["binary"], data["empty"], data["text"])]

    memory = ["memory", "adding", "--cells", "lstm", "--lengths", "5", "--steps", "2", "--hidden",
              "4", "--batch-size", "2", "--eval-every", "1", "--out", out, "--no-plot"]
    for option in ("--steps", "--hidden", "--batch-size", "--eval-every"):
        result += [replace(memory, option, v) for v in BAD_POSITIVE_INTS]
    result += [replace(memory, "--lengths", v) for v in ["1", "0", "abc", HUGE, ""]]
    result += [replace(memory, "--cells", v) for v in ["lstm,xyz", "", ","]]
    for option in ("--lr", "--forget-bias", "--clip-norm"):
        result += [replace(memory, option, v) for v in BAD_REALS]
    result += [replace(memory, "--seed", v) for v in [*BAD_SEEDS, "0,-1"]]
    result += [replace(memory, "--out", p) for p in (data["file"], data["under_file"])]

    gradients = ["gradients", "--cells", "lstm", "--length", "5", "--hidden", "4", "--samples",
                 "1", "--out", out, "--no-plot"]
    for option in ("--hidden", "--samples", "--input-size"):
        result += [replace(gradients, option, v) for v in BAD_POSITIVE_INTS]
    result += [replace(gradients, "--length", v) for v in ["1", "abc", HUGE]]
    result += [replace(gradients, "--spectral-radius", v) for v in BAD_REALS]
    result += [replace(gradients, "--seed", v) for v in BAD_SEEDS]
    result += [replace(gradients, "--out", p) for p in (data["file"], data["under_file"])]
    checkpoint_gradients = ["gradients", "--checkpoint", saved["lm"], data["text"], "--length",
                            "5", "--samples", "1", "--out", out, "--no-plot"]
    result += [replace(checkpoint_gradients, "--checkpoint", p) for p in
               (data["missing"], data["folder"], saved["truncated"], saved["trojan"],
                saved["forecast"])]
    result += [replace(checkpoint_gradients, "--layer", v) for v in ["5", "-7", "abc", HUGE]]

    result += [["demo", "--out", p, "--steps", "1"] for p in (data["file"], data["under_file"])]
    result += [["demo", "--steps", v] for v in ["0", "-1", "abc"]]
    result += [["bench", "--sizes", v] for v in ["0,1,1", "1,1", "a,b,c", f"{HUGE},1,1"]]
    result += [["bench", "--quick", "--families", "lstm", "--no-memory", "--no-reference",
                "--json", p] for p in (data["folder"], data["under_file"])]
    result += [["bench", "--repeats", v] for v in ["0", "abc"]]
    result += [["nonsense"], [], ["lm"], ["forecast"], ["lm", "sample"]]
    return result


def run_case(argv: list[str], limit_s: float) -> tuple[str, int | None, str]:
    """(class, exit code, stderr) of one command line run in this process."""
    from rnnkit.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    code: int | None = None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    except Hang:
        return "hang", None, stderr.getvalue()
    except BaseException:  # noqa: BLE001 - what escapes main is what the sweep counts
        return "traceback", None, traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    err = stderr.getvalue()
    if "Traceback (most recent call last)" in err:
        return "traceback", code, err
    if code == 0:
        return "accepted", code, err
    if code == 130:
        return "interrupted", code, err
    message = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    refusal = [line for line in message if "error" in line.lower()]
    if code in (1, 2) and refusal and len(refusal) <= 3:
        return "usage error" if code == 2 else "runtime error", code, err
    return "unclear", code, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every case's class, exit code and stderr here")
    parser.add_argument("--limit-s", type=float, default=120.0, help="time limit per case")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    folder = Path(tempfile.mkdtemp(prefix="rnnkit-sweep-"))
    started = time.perf_counter()
    try:
        data = make_data(folder)
        saved = checkpoints(folder, data)
        everything = cases(folder, data, saved)
        counts: Counter[str] = Counter()
        records = []
        for number, argv in enumerate(everything, 1):
            kind, code, err = run_case(argv, args.limit_s)
            counts[kind] += 1
            records.append({"argv": argv, "class": kind, "exit": code, "stderr": err[-2000:]})
            if kind not in ("usage error", "runtime error"):
                last = err.strip().splitlines()[-1] if err.strip() else ""
                print(f"[{number}/{len(everything)}] {kind} (exit {code}): rnnkit "
                      f"{' '.join(argv)}\n    {last[:300]}", flush=True)
        trojan_ran = Path(saved["marker"]).exists()
        print(f"\n{len(everything)} command lines in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{count} {kind}" for kind, count in counts.most_common())
              + f"; crafted checkpoint ran its command: {'YES' if trojan_ran else 'no'}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"counts": counts, "trojan_ran": trojan_ran, "cases": records}, indent=1))
        bad = counts["traceback"] + counts["hang"] + counts["unclear"]
        return 1 if bad or trojan_ran else 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
