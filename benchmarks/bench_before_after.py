"""Two `rnnkit bench --json` files side by side: each rnnkit row's ratio to its torch.nn peer
before and after (training, inference, the streamed step), and the training rate's share of
each run's float32 peak, as the markdown table docs/benchmarks.md records.

    python benchmarks/bench_before_after.py before.json after.json
"""

from __future__ import annotations

import json
import sys


def rows_by_key(path: str) -> tuple[dict, dict]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    rows = {(r["family"], r["variant"], r["implementation"], tuple(r["size"])): r
            for r in data["rows"]}
    return rows, data


def main() -> None:
    before, before_data = rows_by_key(sys.argv[1])
    after, after_data = rows_by_key(sys.argv[2])
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
