"""One rank of tests/test_distributed.py's torchrun run: exercises every collective of
`rnnkit.training.distributed.Distributed` and writes what it saw to OUT/rank<R>.json, for the
test to compare with values it computes itself (this file asserts nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rnnkit.training.distributed import setup_distributed


def rank_rows(rank: int, rows: int) -> torch.Tensor:
    """A rank's tensor for all_gather: its values say which rank and row they came from."""
    return torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) + 100 * rank


def main(out_dir: str) -> None:
    run = setup_distributed("cpu")
    seen: dict = {
        "rank": run.rank, "world_size": run.world_size, "local_rank": run.local_rank,
        "backend": run.backend, "device": str(run.device), "is_main": run.is_main,
        "initialized": dist.is_initialized(),
    }
    share = run.shard(8)
    seen["shard"] = [share.start, share.stop]
    try:
        run.shard(7, what="batch size")
    except ValueError as error:
        seen["shard_error"] = str(error)
    seen["gather_rows"] = run.all_gather(rank_rows(run.rank, 2), dim=0).tolist()
    seen["gather_columns"] = run.all_gather(rank_rows(run.rank, 2), dim=-1).tolist()
    seen["gather_uneven"] = run.all_gather(rank_rows(run.rank, run.rank + 1)).tolist()
    seen["any_rank1"] = run.any_flag(run.rank == 1)
    seen["any_none"] = run.any_flag(False)
    seen["flags"] = list(run.all_flags(run.rank == 0, False, run.rank == run.world_size - 1))
    seen["broadcast"] = run.broadcast_object({"chosen_by": run.rank, "folder": f"run-{run.rank}"})
    run.barrier()
    run.close()
    seen["initialized_after_close"] = dist.is_initialized()
    Path(out_dir, f"rank{seen['rank']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
