"""Run tests/test_fuzz.py's cases without stopping at failures and count the outcomes.

    PYTHONPATH=src python benchmarks/fuzz_counts.py --examples 1000 [--seed 0] [--json out.json]

Per property: cases tried, cases that ran (and agreed), cases that raised a named error,
disagreements, unnamed exceptions, bad input accepted, and hangs (a case over --timeout seconds).
Failures are grouped by a signature (kind, backend, exception and place, or the disagreeing key);
for each, the simplest case seen (fewest non-default fields) is printed as a reproducer.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_fuzz as fuzz  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    signal.alarm(1)  # again in a second, should this one land where it is swallowed (gc)
    raise Hang()


PROPERTIES = {
    "layer": (fuzz.valid_cases("layer"), fuzz.check_case),
    "cell": (fuzz.valid_cases("cell"), fuzz.check_case),
    "bad_forward": (st.one_of(fuzz.bad_forward_cases("layer"), fuzz.bad_forward_cases("cell")),
                    fuzz.check_case),
    "bad_constructor": (fuzz.bad_constructor_cases(), fuzz.check_constructor),
    "padding": (fuzz.padded_cases(), fuzz.check_padding),
}


def complexity(case: fuzz.Case) -> int:
    """How far a case is from the defaults (the simplest reproducer has the fewest)."""
    default = fuzz.Case(case.module, case.family, 1, 1, case.dtype)
    skip = {"seed", "input_size", "hidden_size", "extra"}
    return sum(getattr(case, f.name) != getattr(default, f.name)
               for f in fields(case) if f.name not in skip) + case.hidden_size // 4


def signature(kind: str, error: BaseException) -> str:
    message = str(error).split("\n")[0]
    message = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", message)  # numbers vary per case
    return f"{kind}: {message[:160]}"


def run_property(name: str, examples: int, seed_value: int, timeout: int) -> dict:
    """Run one property's cases, count the outcomes and keep the simplest case per failure."""
    strategy, check = PROPERTIES[name]
    counts: Counter = Counter()
    failures: dict[str, tuple[int, str]] = {}
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(strategy)
    def run(case):
        counts["tried"] += 1
        signal.alarm(timeout)
        try:
            outcome = check(case)
            counts["named" if outcome == "named" else "ran"] += 1
        except Hang:
            counts["hang"] += 1
            failures.setdefault("hang", (0, repr(case)))
        except fuzz.FuzzFailure as error:
            kind = type(error).__name__
            counts[kind] += 1
            key = signature(kind, error)
            score = complexity(case)
            if key not in failures or score < failures[key][0]:
                failures[key] = (score, repr(case))
        except Exception as error:  # noqa: BLE001 - a bug in the suite itself
            counts["suite_error"] += 1
            failures.setdefault(signature("suite_error", error), (0, repr(case)))
        finally:
            signal.alarm(0)

    run()
    seconds = time.perf_counter() - start
    print(f"== {name}: {dict(counts)} in {seconds:.0f} s", flush=True)
    for key, (_, case) in sorted(failures.items()):
        print(f"  {key}\n      {case}", flush=True)
    return {"counts": dict(counts), "seconds": round(seconds, 1),
            "failures": {key: case for key, (_, case) in sorted(failures.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per property")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=60, help="seconds before a case hangs")
    parser.add_argument("--only", choices=list(PROPERTIES), action="append")
    parser.add_argument("--json", type=Path, help="write the counts and reproducers here")
    arguments = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    report: dict = {}
    for name in arguments.only or list(PROPERTIES):
        report[name] = run_property(name, arguments.examples, arguments.seed, arguments.timeout)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
