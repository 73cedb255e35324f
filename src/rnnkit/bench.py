"""`rnnkit bench`: time rnnkit's layers against torch.nn and the reference loop, in one process.

Every contender of a size is timed in the same run, interleaved (one repeat of each in turn),
and reported by its median, so that a noisy machine slows all of them alike; the slow
reference loops form a second interleaved group after the rest, so that their buffers do not
evict a fast step's caches between its repeats. Two modes:
inference (forward under ``no_grad``) and training (forward + backward of ``output.sum()``).

Peers: plain cells against torch.nn's module with the same weights; every variant against the
plain cell through rnnkit ("x plain") and against the reference loop ("x faster than reference").
Single-step streaming latency is timed against ``torch.nn.LSTMCell``. torch.nn has no minGRU,
minLSTM or sLSTM: their rows (families ``mingru``, ``minlstm``, ``slstm``, each variant also
against its reference loop) have rnnkit's GRU, LSTM and LSTM of the same size as the peer, on
the ``--backend`` given (rows ``rnnkit.GRU[<backend>]``, ratios "x rnnkit.GRU"), and their
cells' streaming step is timed against ``rnnkit.GRUCell`` and ``rnnkit.LSTMCell``; the new
layers run their own engines (``auto``, and ``log_scan`` for the log-space variant).

Memory: the peak resident memory that one training step (forward + backward of ``output.sum()``)
adds to a fresh process, for torch.nn (the minimal families: rnnkit's GRU, LSTM) and rnnkit,
each measured in a process of its own (Linux: the kernel's high-water mark, reset just before
the step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnnkit.cells import GRUCell, LSTMCell
from rnnkit.configuration import LARGEST_COUNT
from rnnkit.engine import BACKENDS, native
from rnnkit.interop import from_torch
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
from rnnkit.slstm import SLSTM, SLSTMCell
from rnnkit.training.devices import describe_allocator

FULL_SIZES = [(100, 32, 64), (100, 32, 256), (50, 64, 512), (200, 1, 128)]
QUICK_SIZES = [(12, 4, 16)]
MEMORY_SIZE = (1000, 32, 256)
QUICK_MEMORY_SIZE = (50, 4, 16)
FAMILIES = ("lstm", "gru", "rnn", "mingru", "minlstm", "slstm")


def _size_parser(option: str, accepted: str, as_text: bool) -> Callable[[str], object]:
    """A parser of 'T,N,H' -> [T, N, H] (or its text, normalized), each a positive int."""
    def parse(text: str):
        try:
            size = [int(part) for part in text.split(",")]
        except ValueError:
            size = []
        if len(size) != 3 or min(size) < 1 or max(size) > LARGEST_COUNT:
            raise argparse.ArgumentTypeError(
                f"{option} takes {accepted} of positive ints up to 2**63 - 1 (e.g. 100,32,256), "
                f"got {text!r}")
        return ",".join(map(str, size)) if as_text else size
    return parse


def _triples(sizes) -> str:
    return " ".join(",".join(map(str, size)) for size in sizes)


@dataclass
class BenchCommand:
    """`rnnkit bench`: its options, config files and ``--print-config`` are generated from this
    dataclass (`rnnkit.configuration`)."""

    quick: bool = False  # one tiny size and 2 repeats: checks the command, not the speed
    sizes: list[str] | None = field(default=None, metadata={
        "nargs": "+", "parse": _size_parser("--sizes", "T,N,H triples", as_text=True),
        "metavar": "T,N,H", "help": f"sizes to time (none: {_triples(FULL_SIZES)}; with "
        f"--quick {_triples(QUICK_SIZES)})"})
    families: list[str] = field(default_factory=lambda: list(FAMILIES),
                                metadata={"choices": FAMILIES})  # cell families to time
    backend: str = field(default="auto", metadata={
        "choices": tuple(b for b in BACKENDS if b != "reference")})  # rnnkit backend to time
        # (lstm, gru, rnn, and the minimal families' GRU and LSTM peers; minGRU and minLSTM run
        # their own engines)
    repeats: int = field(default=7, metadata={"check": "positive"})
        # timed repeats, their median reported (2 with --quick)
    streaming_hidden: int = field(default=256, metadata={"check": "positive"})
        # hidden size of the single-step latency test (16 with --quick)
    memory_size: list[int] | None = field(default=None, metadata={
        "parse": _size_parser("--memory-size", "a T,N,H triple", as_text=False),
        "metavar": "T,N,H", "help": "size of the training-step peak-memory comparison (none: "
        f"{_triples([MEMORY_SIZE])}; with --quick {_triples([QUICK_MEMORY_SIZE])})"})
    memory: bool = True  # the training-step peak-memory comparison
    reference: bool = True  # time the (slow) reference loop peers
    json_file: str | None = field(default=None, metadata={"option": "--json",
                                                           "metavar": "FILE"})
        # also write the results as JSON here

# The normalisation and regularisation switches, one at a time, for every family.
SWITCHES: dict[str, tuple[dict, bool]] = {
    "layer_norm": ({"layer_norm": True}, False),
    "recurrent_dropout": ({"recurrent_dropout": 0.25}, False),
    "zoneout": ({"zoneout": 0.1}, False),
    "weight_drop": ({"weight_drop": 0.5}, False),
    # All four at once (AWD-LSTM's recurrent parts with layer norm): the combination the
    # issue holds to "at least 5x faster than the per-step autograd loop" (the reference peer).
    "all four": ({"layer_norm": True, "recurrent_dropout": 0.25, "zoneout": 0.1,
                  "weight_drop": 0.5}, False),
}
# family -> variant -> (constructor arguments, whether it runs on padded input with lengths)
VARIANTS: dict[str, dict[str, tuple[dict, bool]]] = {
    "lstm": {
        "plain": ({}, False),
        "peephole": ({"peephole": True}, False),
        "projection": ({"proj_size": -1}, False),  # -1: half the hidden size, set per size
        "learned state": ({"learn_initial_state": True}, False),
        "lengths": ({}, True),
        **SWITCHES,
    },
    "gru": {
        "plain": ({}, False),
        "reset_after=False": ({"reset_after": False}, False),
        "learned state": ({"learn_initial_state": True}, False),
        "lengths": ({}, True),
        **SWITCHES,
    },
    "rnn": {
        "plain": ({}, False),
        "learned state": ({"learn_initial_state": True}, False),
        "lengths": ({}, True),
        **SWITCHES,
    },
}
CLASSES = {"lstm": (LSTM, nn.LSTM), "gru": (GRU, nn.GRU), "rnn": (RNN, nn.RNN)}
# The families torch.nn lacks: (layer, cell, the rnnkit family of the same size timed beside).
# (Named for the minimal cells, the first of them; xLSTM's sLSTM is timed the same way.)
MINIMAL: dict[str, tuple[type[nn.Module], type[nn.Module], str]] = {
    "mingru": (MinGRU, MinGRUCell, "gru"),
    "minlstm": (MinLSTM, MinLSTMCell, "lstm"),
    "slstm": (SLSTM, SLSTMCell, "lstm"),
}
NO_RECURRENT_PRODUCT = ("mingru", "minlstm")  # the gates read x only
# Their variants: (constructor arguments, whether it runs on padded input with lengths); a
# "backend" argument names the engine in the row ("rnnkit[log_scan]"), else their auto.
MINIMAL_VARIANTS: dict[str, tuple[dict, bool]] = {
    "plain": ({}, False),
    "log_space": ({"log_space": True}, False),
    "log_space log_scan": ({"log_space": True, "backend": "log_scan"}, False),
    "lengths": ({}, True),
}
SLSTM_VARIANTS: dict[str, tuple[dict, bool]] = {
    "plain": ({}, False),
    "exp forget gate": ({"forget_gate": "exp"}, False),
    "4 heads": ({"num_heads": 4}, False),
    "lengths": ({}, True),
}
VARIANTS |= {"mingru": MINIMAL_VARIANTS, "minlstm": MINIMAL_VARIANTS, "slstm": SLSTM_VARIANTS}


@dataclass
class Row:
    """One contender at one size: median milliseconds per mode, and ratios to its peers."""

    family: str
    variant: str
    implementation: str  # "torch.nn" | "rnnkit[<backend>]"
    size: tuple[int, ...]  # (T, N, H) with input size H
    inference_ms: float
    training_ms: float | None
    ratios: dict[str, float] = field(default_factory=dict)
    inference_gflops: float | None = None  # matrix-product FLOPs (`product_flops`) per second
    training_gflops: float | None = None


# Gate blocks per family: the rows of W_ih and W_hh are gates x hidden (the minimal families
# have W_ih only).
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "mingru": 2, "minlstm": 3, "slstm": 4}


def product_flops(family: str, size: tuple[int, int, int], proj_size: int = 0,
                  training: bool = True, input_grad: bool = False, num_heads: int = 1) -> float:
    """The matrix-product FLOPs of one layer's pass over (T, N) with input and hidden size H
    (2 per multiply-add; elementwise work is not counted): forward, ``2 T N (H·G·H + P·G·H)``
    for the input and recurrent products (``G`` gate blocks, ``P`` the state's width, ``H``
    or the projection's ``P``, whose own product adds ``2 T N H·P``). Training adds the
    backward's products: each weight's gradient, and the gradient of each product's input,
    except the sequence's own unless ``input_grad`` (the bench's input does not require one).
    Padded steps (lengths) are counted: the nominal work of the size. The minimal families
    have no recurrent product; sLSTM's is block-diagonal over ``num_heads``, so each gate row
    reads ``P = H / num_heads`` units of the state."""
    steps, batch, hidden = size
    width = proj_size or (hidden // num_heads)
    gates = GATES[family] * hidden
    input_product = 2 * steps * batch * hidden * gates
    recurrent = 0 if family in NO_RECURRENT_PRODUCT else (
        2 * steps * batch * (width * gates + (hidden * width if proj_size else 0)))
    if not training:
        return input_product + recurrent
    return (3 if input_grad else 2) * input_product + 3 * recurrent


def _gflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None or ms <= 0 else flops / (ms * 1e-3) / 1e9


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _time_interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn ``repeats`` times after one warm-up."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: _median_ms(values) for name, values in samples.items()}


def _runners(module: nn.Module, x: torch.Tensor, lengths: list[int] | None):
    """(inference, training) callables for one module and input."""
    keywords = {} if lengths is None else {"lengths": lengths}

    def inference() -> None:
        with torch.no_grad():
            module(x, **keywords)

    def training() -> None:
        module.zero_grad(set_to_none=True)
        output, _ = module(x, **keywords)
        output.sum().backward()

    return inference, training


# What one size times: (variant, implementation) -> (module, its lengths or None).
Contenders = dict[tuple[str, str], tuple[nn.Module, list[int] | None]]


def benchmark_size(family: str, size: tuple[int, int, int], backend: str, repeats: int,
                   with_reference: bool) -> list[Row]:
    """Every variant of ``family`` at ``size`` (T, N, H) with its peers. lstm, gru and rnn:
    torch.nn's layer, whose weights rnnkit's plain row runs on ``backend``, and each other
    variant's reference loop. torch.nn has no minGRU, minLSTM or sLSTM: their peer is rnnkit's
    GRU or LSTM of the same size on ``backend``, they run their own engines, and every variant
    has its reference loop."""
    steps, batch, hidden = size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, hidden, generator=generator)
    lengths = torch.randint(max(1, steps // 2), steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    torch.manual_seed(0)
    if family in MINIMAL:
        layer_class, _, peer_family = MINIMAL[family]
        peer_class = CLASSES[peer_family][0]
        peer = peer_class(hidden, hidden, backend=backend)
        peer_label, engine = f"rnnkit.{peer_class.__name__}[{backend}]", "auto"
    else:
        layer_class, torch_class = CLASSES[family]
        peer, peer_family = torch_class(hidden, hidden), family
        peer_label, engine = "torch.nn", backend
    contenders = _contenders(layer_class, VARIANTS[family], hidden, lengths.tolist(), engine,
                             (peer, peer_label), plain_from_peer=family not in MINIMAL,
                             with_reference=with_reference)
    # Two groups, each interleaved: the peer and rnnkit's engines, then the reference loops.
    # A 3 ms step timed between 40 ms reference loops, whose buffers evict its caches, moved
    # its ratios to the plain cell by 0.1 from run to run at (200, 1, 128).
    inference_ms, training_ms = _timed_groups(contenders, x, repeats)

    peer_key, plain_key = ("plain", peer_label), ("plain", f"rnnkit[{engine}]")
    peer_name = peer_label.split("[")[0]  # "torch.nn", "rnnkit.GRU"
    rows = []
    for key, (module, _) in contenders.items():
        variant, implementation = key
        flops_family = peer_family if key == peer_key else family
        proj_size = getattr(module, "proj_size", 0)  # the module's own: 0 without a projection
        heads = getattr(module, "num_heads", 1)
        infer, train = inference_ms[key], training_ms[key]
        row = Row(family, variant, implementation, size, infer, train,
                  inference_gflops=_gflops(product_flops(flops_family, size, proj_size, False,
                                                         num_heads=heads), infer),
                  training_gflops=_gflops(product_flops(flops_family, size, proj_size,
                                                        num_heads=heads), train))
        if implementation not in ("rnnkit[reference]", peer_label):
            if variant == "plain":
                row.ratios[f"train x {peer_name}"] = train / training_ms[peer_key]
                row.ratios[f"infer x {peer_name}"] = infer / inference_ms[peer_key]
            else:
                row.ratios["train x plain"] = train / training_ms[plain_key]
            reference_ms = training_ms.get((variant, "rnnkit[reference]"))
            if reference_ms is not None:
                row.ratios["train speedup vs reference"] = reference_ms / train
        rows.append(row)
    return rows


def _contenders(layer_class: type[nn.Module], variants: dict[str, tuple[dict, bool]],
                hidden: int, lengths: list[int], engine: str, peer: tuple[nn.Module, str], *,
                plain_from_peer: bool, with_reference: bool) -> Contenders:
    """``(variant, implementation) -> (module, lengths or None)``: the ``(module, label)``
    peer as ``("plain", label)``, then each of ``variants`` of ``layer_class`` at ``hidden``
    on ``engine`` (or the variant's own ``backend`` argument), followed by its reference loop
    with the same weights when ``with_reference``. ``plain_from_peer``: the peer is torch.nn's
    layer of the family, and the plain row runs its weights (its ratios are to the peer, so it
    has no reference loop)."""
    peer_module, peer_label = peer
    contenders: Contenders = {("plain", peer_label): (peer_module, None)}
    for variant, (arguments, needs_lengths) in variants.items():
        arguments = dict(arguments)
        if arguments.get("proj_size") == -1:
            arguments["proj_size"] = hidden // 2
        variant_engine = arguments.pop("backend", engine)
        module = layer_class(hidden, hidden, **arguments, backend=variant_engine)
        plain_peer = plain_from_peer and variant == "plain"
        if plain_peer:  # built above all the same: its draws keep later variants' weights
            module = from_torch(peer_module)
            module.backend = variant_engine
        variant_lengths = lengths if needs_lengths else None
        contenders[(variant, f"rnnkit[{variant_engine}]")] = (module, variant_lengths)
        if with_reference and not plain_peer:
            reference = layer_class(hidden, hidden, **arguments, backend="reference")
            reference.load_state_dict(module.state_dict())
            contenders[(variant, "rnnkit[reference]")] = (reference, variant_lengths)
    return contenders


def _timed_groups(contenders: Contenders, x: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """(inference ms, training ms) of every contender: two groups, each interleaved, the
    reference loops after the rest (see `benchmark_size`)."""
    inference_ms, training_ms = {}, {}
    for group in (False, True):
        inference, training = {}, {}
        for key, (module, variant_lengths) in contenders.items():
            if (key[1] == "rnnkit[reference]") == group:
                inference[key], training[key] = _runners(module, x, variant_lengths)
        if inference:
            inference_ms.update(_time_interleaved(inference, repeats))
            training_ms.update(_time_interleaved(training, repeats))
    return inference_ms, training_ms


def stream_cell(xs: torch.Tensor, cell: nn.Module) -> Callable[[], None]:
    """A run of ``cell`` over the steps of ``xs`` ``(T, 1, H)``, one call a step, state fed
    back, under ``no_grad``: the streaming latency's callable."""
    def run() -> None:
        with torch.no_grad():
            state = None
            for x in xs:
                state = cell(x, state)
    return run


def benchmark_minimal_streaming(families, hidden: int, backend: str, repeats: int,
                                steps: int = 100) -> list[Row]:
    """Latency of one step at batch 1 of each minimal family's cell against rnnkit's GRUCell
    or LSTMCell (on ``backend``), interleaved."""
    xs = torch.randn(steps, 1, hidden, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    # (family, label) -> (peer label, cell): minLSTM and sLSTM each get their own LSTMCell row.
    cells: dict[tuple[str, str], tuple[str, nn.Module]] = {}
    for family in families:
        _, cell_class, peer_family = MINIMAL[family]
        peer_class = {"gru": GRUCell, "lstm": LSTMCell}[peer_family]
        peer_label = f"rnnkit.{peer_class.__name__}"
        peer = peer_class(hidden, hidden)
        peer.backend = backend
        cells[(family, peer_label)] = (peer_label, peer)
        cells[(family, f"rnnkit.{cell_class.__name__}")] = (peer_label,
                                                             cell_class(hidden, hidden))
    runs = {key: stream_cell(xs, cell) for key, (_, cell) in cells.items()}
    per_step = {key: ms / steps for key, ms in _time_interleaved(runs, repeats).items()}
    rows = []
    for (family, label), (peer_label, _) in cells.items():
        ms = per_step[(family, label)]
        row = Row(family, "streaming step", label, (1, 1, hidden), ms, None,
                  inference_gflops=_gflops(product_flops(
                      family if label != peer_label else MINIMAL[family][2], (1, 1, hidden), 0,
                      False), ms))
        if label != peer_label:
            row.ratios[f"step x {peer_label}"] = ms / per_step[(family, peer_label)]
        rows.append(row)
    return rows


def benchmark_streaming(hidden: int, backend: str, repeats: int, steps: int = 100) -> list[Row]:
    """Latency of one step at batch 1: torch.nn.LSTMCell, rnnkit.LSTMCell, rnnkit.LSTM called
    on one-step sequences, and its `LayerStream` (``layer.stream()``)."""
    torch.manual_seed(0)
    peer = nn.LSTMCell(hidden, hidden)
    cell = from_torch(peer)
    layer = LSTM(hidden, hidden, backend=backend)
    layer.load_state_dict({f"{k}_l0": v for k, v in peer.state_dict().items()})
    xs = torch.randn(steps, 1, hidden)

    def stream_layer() -> None:
        with torch.no_grad():
            state = None
            for x in xs:
                _, state = layer(x.unsqueeze(0), state)

    def layer_stream() -> None:
        with torch.no_grad():
            stream = layer.stream()
            for x in xs:
                stream(x)

    runs = {"torch.nn.LSTMCell": stream_cell(xs, peer),
            "rnnkit.LSTMCell": stream_cell(xs, cell),
            f"rnnkit.LSTM[{backend}] 1 step": stream_layer,
            f"rnnkit.LSTM[{backend}].stream()": layer_stream}
    per_step = {name: ms / steps for name, ms in _time_interleaved(runs, repeats).items()}
    rows = []
    for name, ms in per_step.items():
        row = Row("lstm", "streaming step", name, (1, 1, hidden), ms, None,
                  inference_gflops=_gflops(product_flops("lstm", (1, 1, hidden), 0, False), ms))
        if name != "torch.nn.LSTMCell":
            row.ratios["step x torch.nn.LSTMCell"] = ms / per_step["torch.nn.LSTMCell"]
        rows.append(row)
    return rows


@dataclass
class MemoryRow:
    """Peak memory one training step adds to a fresh process."""

    family: str
    implementation: str
    size: tuple[int, ...]
    peak_mib: float
    ratios: dict[str, float] = field(default_factory=dict)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure_training_step_memory(family: str, implementation: str, size: list[int],
                                 backend: str) -> float:
    """In this process: MiB that one training step adds at its peak (run in a fresh process)."""
    steps, batch, hidden = size
    torch.manual_seed(0)
    if family in MINIMAL:  # the peer is rnnkit's GRU or LSTM, on ``backend``
        layer_class, _, peer_family = MINIMAL[family]
        module = (CLASSES[peer_family][0](hidden, hidden, backend=backend)
                  if implementation != "rnnkit[auto]" else layer_class(hidden, hidden))
    elif implementation == "torch.nn":
        module = CLASSES[family][1](hidden, hidden)
    else:
        module = CLASSES[family][0](hidden, hidden, backend=backend)
    if implementation != "torch.nn":
        module(torch.randn(2, 1, hidden))  # loads the native kernels before the baseline
    x = torch.randn(steps, batch, hidden)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets the high-water mark (VmHWM) to the current resident size
    baseline = _status_kib("VmRSS")
    output, _ = module(x)
    output.sum().backward()
    return (_status_kib("VmHWM") - baseline) / 1024


def run_in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python process that imports this very rnnkit, whatever the working
    directory holds: ``python -c`` puts the working directory first on ``sys.path``, where a
    folder named ``rnnkit`` would be imported (and run) instead. The child starts in an empty
    private folder, with this package's parent first on its path. (``python -P`` would do it
    too, from Python 3.11 only; ``-I`` would also drop ``PYTHONPATH``, which may be how this
    rnnkit was found.)"""
    package_parent = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="rnnkit-bench-") as private:
        return subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {package_parent!r}); {code}"],
            cwd=private, capture_output=True, text=True, check=False)


def benchmark_memory(family: str, size: tuple[int, int, int], backend: str) -> list[MemoryRow]:
    """Peak memory of a training step, torch.nn (for a minimal family rnnkit's GRU or LSTM on
    ``backend``) against rnnkit, each in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("the memory benchmark needs Linux (/proc/self/clear_refs)")
    if family in MINIMAL:
        peer = f"rnnkit.{CLASSES[MINIMAL[family][2]][0].__name__}[{backend}]"
        implementations = (peer, "rnnkit[auto]")
    else:
        peer, implementations = "torch.nn", ("torch.nn", f"rnnkit[{backend}]")
    rows = []
    for implementation in implementations:
        done = run_in_fresh_process(
            "from rnnkit.bench import measure_training_step_memory as m; "
            f"print(m({family!r}, {implementation!r}, {list(size)!r}, {backend!r}))")
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement of {implementation} failed:\n{done.stderr}")
        rows.append(MemoryRow(family, implementation, size, float(done.stdout.split()[-1])))
    peer_name = peer.split("[")[0]  # "torch.nn", "rnnkit.GRU"
    rows[1].ratios[f"peak x {peer_name}"] = rows[1].peak_mib / max(rows[0].peak_mib, 1e-9)
    return rows


def format_memory_table(rows: list[MemoryRow]) -> str:
    header = f"{'family':7} {'implementation':24} {'T,N,H':14} {'peak MiB':>9}  ratios"
    lines = [header, "-" * len(header)]
    for row in rows:
        size = ",".join(str(s) for s in row.size)
        ratios = "  ".join(f"{k} {v:.2f}" for k, v in row.ratios.items())
        lines.append(f"{row.family:7} {row.implementation:24} {size:14} {row.peak_mib:9.1f}  "
                     f"{ratios}")
    return "\n".join(lines)


def format_table(rows: list[Row], peak_gflops: float | None = None) -> str:
    """A fixed-width table: one line per contender, times in ms, the matrix-product GFLOP/s
    (`product_flops`) and, given the machine's float32 peak, the training rate's share of it
    (the inference rate's for rows without training), ratios last."""
    header = (f"{'family':7} {'variant':18} {'implementation':24} {'T,N,H':14} "
              f"{'infer ms':>9} {'train ms':>9} {'infer GF/s':>10} {'train GF/s':>10} "
              f"{'% peak':>6}  ratios")
    lines = [header, "-" * len(header)]
    for row in rows:
        size = ",".join(str(s) for s in row.size)
        train = "-" if row.training_ms is None else f"{row.training_ms:9.2f}"
        rates = [("-" if rate is None else f"{rate:10.1f}")
                 for rate in (row.inference_gflops, row.training_gflops)]
        rate = row.training_gflops if row.training_ms is not None else row.inference_gflops
        share = "-" if rate is None or not peak_gflops else f"{100 * rate / peak_gflops:5.1f}%"
        ratios = "  ".join(f"{k} {v:.2f}" for k, v in row.ratios.items())
        lines.append(f"{row.family:7} {row.variant:18} {row.implementation:24} {size:14} "
                     f"{row.inference_ms:9.2f} {train:>9} {rates[0]:>10} {rates[1]:>10} "
                     f"{share:>6}  {ratios}")
    return "\n".join(lines)


@dataclass
class Peak:
    """The machine's float32 reference points, measured in this process."""

    fma_gflops: float | None  # a loop of nothing but vector FMAs on every thread (None: no kernels)
    lanes: int | None  # float32 lanes per vector in the kernels' build (16 AVX-512, 8 AVX2)
    threads: int
    clock_ghz: float | None  # the fastest core's current clock in /proc/cpuinfo (None: unknown)
    mm_size: int  # torch.mm of two n x n float32 matrices
    mm_gflops: float

    def describe(self) -> str:
        """One line: the FMA peak, its decomposition, and torch.mm against it."""
        mm = f"torch.mm at n = {self.mm_size}: {self.mm_gflops:.1f} GFLOP/s"
        if self.fma_gflops is None:
            return f"float32 FMA peak: unknown (the native kernels are not built); {mm}"
        per_unit_cycle = self.threads * self.lanes * 2  # FLOP per cycle of one FMA unit a core
        # The FMA units: the fewest (1 or 2, what x86 cores have) that put the clock the rate
        # implies at or under 5 GHz; a VM's /proc/cpuinfo lists a nominal clock, not the turbo
        # one, so the listed clock cannot say it.
        units = 1 if self.fma_gflops / per_unit_cycle <= 5.0 else 2
        parts = (f"{self.threads} threads x {self.lanes} lanes x 2 FLOP x {units} FMA units x "
                 f"{self.fma_gflops / (per_unit_cycle * units):.2f} GHz, the clock that implies")
        if self.clock_ghz:
            parts += f"; /proc/cpuinfo lists {self.clock_ghz:.2f} GHz"
        return (f"float32 FMA peak: {self.fma_gflops:.1f} GFLOP/s measured (= {parts}); "
                f"{mm} ({100 * self.mm_gflops / self.fma_gflops:.0f} % of it)")


def _cpuinfo_values(key: str) -> list[str] | None:
    """The values of ``key`` lines in /proc/cpuinfo (Linux), one per core; None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return [line.split(":", 1)[1].strip() for line in info if line.startswith(key)]
    except (OSError, IndexError):
        return None


def cpu_clock_ghz() -> float | None:
    """The highest current core clock in /proc/cpuinfo (Linux), in GHz; None elsewhere."""
    try:
        clocks = [float(value) for value in _cpuinfo_values("cpu MHz") or []]
    except ValueError:
        return None
    return max(clocks) / 1e3 if clocks else None


def measure_peak(quick: bool) -> Peak:
    """The FMA loop (median of 3 after a warm-up) and torch.mm at n = 4096 (512 with quick)."""
    iterations = 2_000_000 if quick else 20_000_000
    native.fma_peak(iterations // 10)  # warm-up: threads started, clocks up
    runs = [native.fma_peak(iterations) for _ in range(3)]
    fma = None if runs[0] is None else (statistics.median(r[0] for r in runs), *runs[0][1:])
    size = 512 if quick else 4096
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    mm_ms = _time_interleaved({"mm": lambda: torch.mm(a, b)}, 3)["mm"]
    return Peak(fma_gflops=None if fma is None else fma[0], lanes=None if fma is None else fma[1],
                threads=torch.get_num_threads(), clock_ghz=cpu_clock_ghz(), mm_size=size,
                mm_gflops=2 * size**3 / (mm_ms * 1e-3) / 1e9)


def cpu_model() -> str | None:
    """The CPU's model name in /proc/cpuinfo (Linux); None elsewhere."""
    names = _cpuinfo_values("model name")
    return names[0] if names else None


def machine_description() -> dict[str, object]:
    """What the figures were measured on: the CPU, its L2 and the kernels' profile for it (their
    loop rules differ between CPU makers: `kernels.cpp` ``CpuProfile``), torch, threads."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": cpu_model() or platform.processor() or platform.machine(),
        "cpu_profile": native.cpu_profile(),
        "l2_cache_bytes": native.l2_cache_bytes(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": describe_allocator(),
    }


def run_benchmarks(
    sizes, families, backend: str, repeats: int, streaming_hidden: int,
    with_reference: bool = True, progress: Callable[[str], None] = print,
) -> list[Row]:
    rows: list[Row] = []
    for family in families:
        for size in sizes:
            progress(f"timing {family} at T,N,H = {size} ...")
            rows += benchmark_size(family, size, backend, repeats, with_reference)
    progress(f"timing streaming steps at H = {streaming_hidden} ...")
    rows += benchmark_streaming(streaming_hidden, backend, repeats)
    minimal = [family for family in families if family in MINIMAL]
    if minimal:
        rows += benchmark_minimal_streaming(minimal, streaming_hidden, backend, repeats)
    return rows


def rows_to_json(rows: list[Row], memory_rows: list[MemoryRow] = (),
                 peak: Peak | None = None) -> str:
    return json.dumps({"machine": machine_description(), "rows": [asdict(r) for r in rows],
                       "memory": [asdict(r) for r in memory_rows],
                       "peak": None if peak is None else asdict(peak)}, indent=2)


def bench_command(command: BenchCommand) -> int:
    """Run `rnnkit bench`: time, print the tables (progress on stderr), write --json."""
    from rnnkit.apps.outputs import output_file

    if command.json_file:
        output_file(command.json_file, "--json")  # said now, not after minutes of timing
    if command.sizes:
        sizes = [tuple(int(n) for n in size.split(",")) for size in command.sizes]
    else:
        sizes = QUICK_SIZES if command.quick else FULL_SIZES
    repeats = 2 if command.quick else command.repeats
    streaming_hidden = 16 if command.quick else command.streaming_hidden
    machine = machine_description()
    l2 = machine["l2_cache_bytes"]
    profile = ("" if machine["cpu_profile"] is None else
               f" ({l2 // 1024} KiB of L2 a core, the kernels' {machine['cpu_profile']!r} rules)")
    print(f"rnnkit bench: torch {machine['torch']}, {machine['threads']} threads, "
          f"{machine['processor']}{profile}, median of {repeats}; {machine['allocator']}",
          flush=True)
    peak = measure_peak(command.quick)  # a few seconds: no progress line
    print(peak.describe(), flush=True)
    rows = run_benchmarks(
        sizes, command.families, command.backend, repeats, streaming_hidden,
        with_reference=command.reference,
        progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(rows, peak.fma_gflops))
    memory_rows: list[MemoryRow] = []
    if command.memory:
        memory_size = tuple(command.memory_size or (
            QUICK_MEMORY_SIZE if command.quick else MEMORY_SIZE))
        for family in command.families:
            print(f"measuring {family} training-step memory at T,N,H = {memory_size} ...",
                  file=sys.stderr, flush=True)
            memory_rows += benchmark_memory(family, memory_size, command.backend)
        print()
        print(format_memory_table(memory_rows))
    if command.json_file:
        with open(command.json_file, "w", encoding="utf-8") as handle:
            handle.write(rows_to_json(rows, memory_rows, peak))
        print(f"wrote {command.json_file}")
    return 0
