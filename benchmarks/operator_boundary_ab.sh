#!/bin/bash
# A/B of `rnnkit bench` for two checkouts, alternating, two rounds (docs/benchmarks.md, "Cost of
# issue 15's operator boundary"). Usage, from the repository root with the venv active:
#   BEFORE_SRC=/path/to/old/checkout/src bash benchmarks/operator_boundary_ab.sh
# (for example `git worktree add /tmp/before 5628a21`, then BEFORE_SRC=/tmp/before/src).
set -euo pipefail
: "${BEFORE_SRC:?set BEFORE_SRC to the src folder of the checkout to compare against}"
for round in 1 2; do
  for side in before after; do
    if [ "$side" = before ]; then src=$BEFORE_SRC; else src=$PWD/src; fi
    echo "=== round $round $side"
    PYTHONPATH=$src python -m rnnkit.cli bench --sizes 100,32,64 100,32,256 200,1,128 \
      --families lstm,gru,rnn --no-reference --repeats 7 --json "ab_${side}_${round}.json"
  done
done
