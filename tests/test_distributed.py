"""Distributed: identities with one process; under a real torchrun of 2 gloo processes, shards,
all_gather order, flags and broadcast agree with values computed here; bad setups say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import rnnkit
from rnnkit.training.distributed import Distributed, setup_distributed

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import rank_rows  # noqa: E402

TORCHRUN_ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_torchrun(no_torchrun):
    run = setup_distributed("cpu")
    assert run == Distributed(rank=0, world_size=1, local_rank=0, backend=None,
                              device=torch.device("cpu"))
    assert run.is_main and not dist.is_initialized()


def test_single_process_collectives_are_identities(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: still no group
    with setup_distributed("auto") as run:
        assert run.backend is None and not dist.is_initialized()
        assert run.shard(30) == slice(0, 30)
        values = torch.randn(3, 2)
        assert run.all_gather(values, dim=1) is values
        assert run.any_flag(True) is True and run.any_flag(False) is False
        assert run.all_flags(True, False, 1) == (True, False, True)
        marker = object()
        assert run.broadcast_object(marker) is marker
        run.barrier()
    run.close()  # twice: harmless


def test_shard_refuses_uneven_counts():
    run = Distributed(rank=3, world_size=4)
    assert run.shard(32) == slice(24, 32) and not run.is_main
    with pytest.raises(ValueError) as caught:
        run.shard(30)
    assert str(caught.value) == ("--batch-size 30 does not split evenly over 4 processes; "
                                 "give a multiple of 4")
    with pytest.raises(ValueError, match="--eval-batch-size 5 does not split evenly over 4"):
        run.shard(5, what="eval batch size")
    with pytest.raises(ValueError, match="--batch-size must be an int >= 0, got -4"):
        run.shard(-4)


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE must be an integer, got 'two'"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be >= 1, got 0"),
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 asks for a multi-process run, but RANK is not set; "
                          r"start it with torchrun \(torchrun --nproc_per_node=2 \.\.\.\)"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "29500"},
     "but MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"},
     "environment variable LOCAL_RANK must be an integer, got 'x'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
      "MASTER_PORT": "29500"}, r"environment variable RANK must be in \[0, 2\), got 2"),
])
def test_incomplete_environment_is_named(no_torchrun, environment, message):
    for name, value in environment.items():
        no_torchrun.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        setup_distributed("cpu")
    assert not dist.is_initialized()


def test_one_named_gpu_cannot_serve_several_processes(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--device cuda:1 names one GPU, but this run has 2 "
                                         r"processes; give --device cuda \(or auto\)"):
        setup_distributed("cuda:1")
    with pytest.raises(ValueError, match=r"--device takes auto, cpu, cuda or cuda:N, got 'gpu'"):
        setup_distributed("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error needs a machine without CUDA")
def test_cuda_without_cuda_under_torchrun(no_torchrun):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        no_torchrun.setenv(name, value)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
        setup_distributed("cuda")
    assert not dist.is_initialized()


def test_two_processes_under_torchrun(tmp_path):
    worker = Path(__file__).with_name("distributed_worker.py")
    environment = {name: value for name, value in os.environ.items()
                   if name not in TORCHRUN_ENVIRONMENT}
    source = str(Path(rnnkit.__file__).parents[1])  # this checkout's rnnkit, not an installed one
    environment["PYTHONPATH"] = os.pathsep.join(
        [source] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else []))
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    for rank, ranks_view in enumerate(seen):
        assert ranks_view["rank"] == rank and ranks_view["world_size"] == 2
        assert ranks_view["local_rank"] == rank and ranks_view["is_main"] == (rank == 0)
        assert ranks_view["backend"] == "gloo" and ranks_view["device"] == "cpu"
        assert ranks_view["initialized"] and not ranks_view["initialized_after_close"]
        assert ranks_view["shard"] == [4 * rank, 4 * rank + 4]
        assert ranks_view["shard_error"] == ("--batch-size 7 does not split evenly over 2 "
                                             "processes; give a multiple of 2")
        # Rank order, along either dimension, and with ranks of different lengths.
        assert ranks_view["gather_rows"] == torch.cat([rank_rows(0, 2), rank_rows(1, 2)]).tolist()
        assert ranks_view["gather_columns"] == torch.cat(
            [rank_rows(0, 2), rank_rows(1, 2)], dim=1).tolist()
        assert ranks_view["gather_uneven"] == torch.cat(
            [rank_rows(0, 1), rank_rows(1, 2)]).tolist()
        # A flag raised on one rank is seen by both; flags are reduced one by one.
        assert ranks_view["any_rank1"] is True and ranks_view["any_none"] is False
        assert ranks_view["flags"] == [True, False, True]
        assert ranks_view["broadcast"] == {"chosen_by": 0, "folder": "run-0"}


def test_a_group_the_caller_made_is_used_and_left_open(no_torchrun, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        run = setup_distributed("cpu")
        assert (run.rank, run.world_size, run.backend, run.owns_group) == (0, 1, "gloo", False)
        run.close()
        assert dist.is_initialized()  # the caller's group: the caller closes it
    finally:
        dist.destroy_process_group()
