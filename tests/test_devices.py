"""--device is parsed from its text alone, resolved on this machine with errors that say why, and
batches of any nesting reach the device whole."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import subprocess
import sys
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from rnnkit.training.devices import describe_device, move_to, parse_device, resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="the no-CUDA error needs a machine without CUDA")


@pytest.mark.parametrize("text, canonical", [
    ("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
    ("cuda:7", "cuda:7"), ("cuda:01", "cuda:1"), (" cpu ", "cpu"),
])
def test_parse_device_accepts(text, canonical):
    assert parse_device(text) == canonical


@pytest.mark.parametrize("text", ["gpu", "", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "auto:1",
                                  "CUDA", "cuda:0:1", "mps"])
def test_parse_device_refuses_with_the_choices(text):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse_device(text)
    assert str(caught.value) == f"--device takes auto, cpu, cuda or cuda:N, got {text!r}"


def test_parse_device_is_an_argparse_type():
    parser = argparse.ArgumentParser(prog="rnnkit", exit_on_error=False)
    parser.add_argument("--device", type=parse_device, default="auto")
    assert parser.parse_args(["--device", "cuda:2"]).device == "cuda:2"
    with pytest.raises(argparse.ArgumentError, match="got 'gpu'"):
        parser.parse_args(["--device", "gpu"])


def test_resolve_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                else torch.device("cpu"))
    assert resolve_device("auto") == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_refuses_what_parse_refuses():
    with pytest.raises(ValueError, match=r"--device takes auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


@without_cuda
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_why_and_what_to_use(text):
    # Real on this machine: torch sees no GPU, nothing is patched.
    with pytest.raises(ValueError) as caught:
        resolve_device(text)
    message = str(caught.value)
    assert message.startswith(f"--device {text}: CUDA is not available here (torch "
                              f"{torch.__version__} built ")
    assert message.endswith("; use --device cpu or auto")


@needs_cuda
def test_cuda_resolves_to_the_current_or_named_device():
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


@needs_cuda
def test_cuda_index_out_of_range_names_the_count():
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"--device cuda:{count}: this machine has {count} CUDA"):
        resolve_device(f"cuda:{count}")


Batch = namedtuple("Batch", "inputs targets")


@dataclasses.dataclass(frozen=True)
class Window:
    series: torch.Tensor
    name: str
    lengths: torch.Tensor | None = None
    derived: int = dataclasses.field(init=False, default=3)


def test_move_to_walks_every_container():
    # The meta device stands in for a GPU: a real device change, on any machine.
    nested = {
        "batch": Batch(torch.ones(2, 3), [torch.zeros(4), None, 5, "text"]),
        "window": Window(torch.arange(6.0), "w", torch.tensor([3, 2])),
        "ordered": OrderedDict(a=torch.ones(1)),
        "counts": defaultdict(list, {"x": (torch.ones(2, dtype=torch.int64),)}),
        "plain": 1.5,
    }
    moved = move_to(nested, "meta")
    assert type(moved["batch"]) is Batch
    assert moved["batch"].inputs.device.type == "meta"
    assert moved["batch"].inputs.shape == (2, 3)
    assert moved["batch"].targets[0].device.type == "meta"
    assert moved["batch"].targets[1:] == [None, 5, "text"]
    assert type(moved["window"]) is Window and moved["window"].name == "w"
    assert moved["window"].series.device.type == "meta"
    assert moved["window"].lengths.device.type == "meta"
    assert type(moved["ordered"]) is OrderedDict
    assert moved["ordered"]["a"].device.type == "meta"
    assert type(moved["counts"]) is defaultdict and moved["counts"].default_factory is list
    assert moved["counts"]["x"][0].dtype == torch.int64
    assert moved["counts"]["x"][0].device.type == "meta"
    assert moved["plain"] == 1.5
    # The original is untouched.
    assert nested["batch"].inputs.device.type == "cpu"
    assert nested["window"].series.device.type == "cpu"


def test_move_to_keeps_packed_batch_sizes_on_the_cpu():
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 1]))
    moved = move_to([packed], "meta")[0]
    assert moved.data.device.type == "meta"
    assert moved.batch_sizes.device.type == "cpu"
    assert torch.equal(moved.batch_sizes, packed.batch_sizes)


def test_move_to_same_device_returns_the_same_tensors():
    inputs = torch.randn(2, 2)
    assert move_to((inputs,), "cpu")[0] is inputs
    module = torch.nn.Linear(1, 1)
    assert move_to(module, "meta") is module  # not a container of tensors: returned as is


@needs_cuda
def test_move_to_cuda_from_pinned_memory():
    pinned = torch.arange(4.0).pin_memory()
    moved = move_to({"x": pinned}, "cuda")["x"]
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), torch.arange(4.0))


def test_describe_cpu():
    text = describe_device("cpu")
    threads = torch.get_num_threads()
    match = re.fullmatch(r"cpu \((.+), (\d+) threads?\)", text)
    assert match is not None, text
    assert int(match.group(2)) == threads and match.group(1).strip()


@needs_cuda
def test_describe_cuda():
    properties = torch.cuda.get_device_properties(0)
    assert describe_device("cuda:0") == (
        f"cuda:0 ({properties.name}, {properties.total_memory / 2**30:.0f} GiB)")


# A child process that allocates and frees the same 100 MiB sixteen times (a long sequence's
# gate buffer: over glibc's largest dynamic mmap threshold, 32 MiB, and over the 64 MiB rnnkit
# kept before), printing the page faults of each time.
_FAULTS_OF_REUSE = """
import resource, sys, torch
from rnnkit.training.devices import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(25 << 20)  # 100 MiB, filled: every page touched
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults_of_reuse(mode: str, environment: dict | None = None) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", _FAULTS_OF_REUSE, mode], capture_output=True,
                          text=True, check=True, env=environment)
    applied, faults = done.stdout.splitlines()
    return applied, [int(count) for count in faults.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keeping_freed_memory_takes_no_page_faults_for_reused_buffers():
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    applied, kept = _faults_of_reuse("keep", environment)
    _, default = _faults_of_reuse("default", environment)
    assert applied == "True"
    pages = 25_600  # 100 MiB
    assert all(count >= 0.9 * pages for count in default)  # mapped afresh every time
    # Kept: the first few may still fault while the heap settles (more of them on a busy
    # machine: up to six of sixteen measured); then the same pages serve every time.
    assert sum(kept[-4:]) < pages
    # An environment that sets glibc's malloc is the user's choice: left alone.
    applied, _ = _faults_of_reuse("keep", {**environment, "MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert applied == "False"
