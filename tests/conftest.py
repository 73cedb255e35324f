"""Test setup: make the shared helpers importable, choose the fuzz profile, share the cores
between pytest-xdist's workers, and report parity figures at the end (gathered from every
worker)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

from compare import WORST  # noqa: E402

# Hypothesis profiles for tests/test_fuzz.py. "ci" (the default) is reproducible and bounded:
# derandomized (the same examples every run) with a fixed count, so its share of CI stays under
# two minutes. "long" explores with fresh randomness: `pytest --hypothesis-profile=long` or
# RNNKIT_FUZZ=long. No deadline: the first native call may compile the kernels.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=_FUZZ_HEALTH, database=None,
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=_FUZZ_HEALTH,
)
settings.load_profile(os.environ.get("RNNKIT_FUZZ", "ci"))


# Under pytest-xdist (README's test command runs `-n 2`), each worker takes its share of the cores
# as torch threads: two workers of two threads each on two cores ran the suite no faster than one
# process on one core (OpenMP's threads spin while they wait for a core the other worker holds).
# Tests that need a number of threads set it themselves and restore it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if os.environ.get("PYTEST_XDIST_WORKER") and _WORKERS > 1:
    _CORES = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")  # Linux
              else os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CORES // _WORKERS))


def pytest_sessionfinish(session):
    """A worker sends its parity figures to the controller (`pytest_testnodedown`)."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["parity"] = [[group, str(dtype), worst, count]
                            for (group, dtype), (worst, count) in WORST.items()]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown to pytest without the plugin
def pytest_testnodedown(node, error):
    """The controller merges a finished worker's parity figures into its own `WORST`."""
    # pop: an interrupted worker is reported down twice, and its figures count once.
    for group, dtype_name, worst, count in getattr(node, "workeroutput", {}).pop("parity", []):
        dtype = getattr(torch, dtype_name.removeprefix("torch."))
        before, before_count = WORST.get((group, dtype), (0.0, 0))
        WORST[(group, dtype)] = (max(before, worst), before_count + count)


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    terminalreporter.section("parity with torch.nn (worst absolute difference, outputs and grads)")
    for (group, dtype), (worst, count) in sorted(WORST.items(), key=str):
        terminalreporter.write_line(f"{group:12s} {str(dtype):14s} {count:5d} cases  {worst:.3g}")
