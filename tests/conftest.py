"""Test setup: make the shared helpers importable and report parity figures at the end."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from compare import WORST  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    terminalreporter.section("parity with torch.nn (worst absolute difference, outputs and grads)")
    for (group, dtype), (worst, count) in sorted(WORST.items(), key=str):
        terminalreporter.write_line(f"{group:12s} {str(dtype):14s} {count:5d} cases  {worst:.3g}")
