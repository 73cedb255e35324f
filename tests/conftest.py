"""Test setup: make the shared helpers importable, choose the fuzz profile, and report parity
figures at the end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    terminalreporter.section("parity with torch.nn (worst absolute difference, outputs and grads)")
    for (group, dtype), (worst, count) in sorted(WORST.items(), key=str):
        terminalreporter.write_line(f"{group:12s} {str(dtype):14s} {count:5d} cases  {worst:.3g}")
