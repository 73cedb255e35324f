"""Two `rnnkit bench --json` files side by side: each rnnkit row's ratio to its torch.nn peer
before and after (training, inference, the streamed step), and the training rate's share of
each run's float32 peak, as the markdown table docs/benchmarks.md records.

    python benchmarks/bench_before_after.py before.json after.json
"""

from __future__ import annotations

import argparse
import json


def rows_by_key(path: str) -> tuple[dict, dict]:
    """The rows of an `rnnkit bench --json` file by (family, variant, implementation, size),
    and the whole file; SystemExit naming the file where it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        rows = {(r["family"], r["variant"], r["implementation"], tuple(r["size"])): r
                for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path}: not an `rnnkit bench --json` file ({error})") from None
    return rows, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="rnnkit bench --json file of the old build")
    parser.add_argument("after", help="rnnkit bench --json file of the new build")
    arguments = parser.parse_args()
    before, before_data = rows_by_key(arguments.before)
    after, after_data = rows_by_key(arguments.after)
    print("| family | variant | rnnkit row | size | ratio | before | after |")
    print("|---|---|---|---|---|---:|---:|")
    for key, row in after.items():
        if key not in before or not row["implementation"].startswith("rnnkit"):
            continue
        for ratio, value in row["ratios"].items():
            if "torch.nn" not in ratio:
                continue
            old = before[key]["ratios"].get(ratio)
            family, variant, implementation, size = key
            print(f"| {family} | {variant} | {implementation} | {size} | {ratio} | "
                  f"{'' if old is None else f'{old:.2f}'} | {value:.2f} |")
    for name, data in (("before", before_data), ("after", after_data)):
        print(f"{name}: machine {data.get('machine')}, peak {data.get('peak')}")


if __name__ == "__main__":
    main()
