"""The command line: `rnnkit bench --quick` prints its table (correctness, not speed); bad options."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from rnnkit import bench, cli
from rnnkit.engine import native


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> tuple[str, dict]:
    """What `rnnkit bench --quick --json FILE` prints, and the file (every family)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    return printed.getvalue(), json.loads(path.read_text())


def test_bench_quick_prints_table_and_writes_json(quick_bench):
    out, data = quick_bench
    assert "infer ms" in out and "train ms" in out and "train GF/s" in out
    assert "float32 FMA peak:" in out and "torch.mm at n = 512:" in out
    for family in bench.FAMILIES:
        for variant, (arguments, _) in bench.VARIANTS[family].items():
            assert f"{family:7} {variant:18} rnnkit[{arguments.get('backend', 'auto')}]" in out
    assert "torch.nn.LSTMCell" in out and "step x torch.nn.LSTMCell" in out
    rows = [r for r in data["rows"] if r["family"] in bench.CLASSES]  # minimal ones: below
    assert data["machine"]["torch"]
    plain = [r for r in rows if r["variant"] == "plain" and r["implementation"] == "rnnkit[auto]"]
    assert len(plain) == len(bench.CLASSES)
    for row in plain:
        assert row["inference_ms"] > 0 and row["training_ms"] > 0
        assert row["ratios"]["train x torch.nn"] > 0
    variants = [r for r in rows if r["implementation"] == "rnnkit[auto]" and r["variant"] != "plain"]
    assert len(variants) == sum(len(bench.VARIANTS[family]) - 1 for family in bench.CLASSES)
    for row in variants:
        assert row["ratios"]["train x plain"] > 0 and row["ratios"]["train speedup vs reference"] > 0
    # Rates are the size's matrix-product FLOPs over the median time.
    for row in plain:
        flops = bench.product_flops(row["family"], tuple(row["size"]))
        assert row["training_gflops"] == pytest.approx(flops / row["training_ms"] / 1e6)
    peak = data["peak"]
    assert peak["mm_size"] == 512 and peak["mm_gflops"] > 0
    if native.why_not(torch.zeros(1)) is None:
        assert peak["fma_gflops"] > 0 and peak["lanes"] in (8, 16) and peak["threads"] >= 1
        # The machine as the kernels see it: the loop rules' profile and a core's L2.
        machine = data["machine"]
        assert machine["cpu_profile"] == native.cpu_profile() in ("intel", "other")
        assert machine["l2_cache_bytes"] == native.l2_cache_bytes() >= 1
        assert f"KiB of L2 a core, the kernels' {machine['cpu_profile']!r} rules" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--sizes", "10,2"], "--sizes takes T,N,H triples of positive ints"),
        (["bench", "--sizes", "10,0,4"], "--sizes takes T,N,H triples"),
        (["bench", "--families", "lstm,transformer"], "--families takes a comma-separated subset"),
        (["bench", "--repeats", "0"], "expected a positive int (at most 2**63 - 1), got '0'"),
        (["bench", "--backend", "cuda"], "invalid choice: 'cuda'"),
        (["bench", "--fast"], "unrecognized arguments: --fast"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_memory_probe_imports_this_rnnkit_whatever_the_working_directory(tmp_path, monkeypatch):
    planted = tmp_path / "rnnkit"
    planted.mkdir()
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    rows = bench.benchmark_memory("rnn", (4, 2, 4), "auto")
    assert not marker.exists()
    assert [row.implementation for row in rows] == ["torch.nn", "rnnkit[auto]"]
    assert all(row.peak_mib >= 0 for row in rows) and rows[1].ratios["peak x torch.nn"] >= 0


@pytest.mark.parametrize(("family", "proj_size"), [("lstm", 0), ("lstm", 3), ("gru", 0),
                                                   ("rnn", 0), ("mingru", 0), ("minlstm", 0)])
def test_the_bench_s_flop_count_is_what_the_reference_loop_multiplies(family, proj_size):
    """`product_flops` against torch's own count of every matrix product the reference engine
    (one product per step and weight, in plain PyTorch ops) runs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    import rnnkit

    steps, batch, hidden = 5, 3, 8
    layer_class = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN,
                   "mingru": rnnkit.MinGRU, "minlstm": rnnkit.MinLSTM}[family]
    options = {"proj_size": proj_size} if proj_size else {}
    model = layer_class(hidden, hidden, backend="reference", **options)
    width = proj_size or hidden
    for input_grad in (False, True):
        x = torch.randn(steps, batch, hidden, requires_grad=input_grad)
        state = [torch.randn(1, batch, width, requires_grad=True)]
        if family == "lstm":
            state.append(torch.randn(1, batch, hidden, requires_grad=True))
        with FlopCounterMode(display=False) as forward_count:  # the minimal: no W_hh h
            output, _ = model(x, tuple(state) if family == "lstm" else state[0])
        with FlopCounterMode(display=False) as backward_count:
            output.sum().backward()
        size = (steps, batch, hidden)
        assert forward_count.get_total_flops() == bench.product_flops(
            family, size, proj_size, training=False)
        assert forward_count.get_total_flops() + backward_count.get_total_flops() == \
            bench.product_flops(family, size, proj_size, training=True, input_grad=input_grad)


def test_bench_times_the_minimal_cells_against_rnnkits_gated_peers(quick_bench):
    """torch.nn has no minGRU or minLSTM: their rows say which rnnkit layer they ran against."""
    out, data = quick_bench
    rows = {(r["family"], r["variant"], r["implementation"]): r for r in data["rows"]}
    for family, peer, cell_peer in (("mingru", "rnnkit.GRU", "rnnkit.GRUCell"),
                                    ("minlstm", "rnnkit.LSTM", "rnnkit.LSTMCell")):
        assert f"{family:7} plain              {peer}[auto]" in out
        peer_row = rows[(family, "plain", f"{peer}[auto]")]
        plain = rows[(family, "plain", "rnnkit[auto]")]
        assert plain["ratios"][f"train x {peer}"] == pytest.approx(
            plain["training_ms"] / peer_row["training_ms"])
        assert plain["ratios"][f"infer x {peer}"] == pytest.approx(
            plain["inference_ms"] / peer_row["inference_ms"])
        assert plain["training_gflops"] == pytest.approx(bench.product_flops(
            family, (12, 4, 16)) / plain["training_ms"] / 1e6)
        for variant, (arguments, _) in bench.MINIMAL_VARIANTS.items():
            row = rows[(family, variant, f"rnnkit[{arguments.get('backend', 'auto')}]")]
            assert row["ratios"]["train speedup vs reference"] == pytest.approx(
                rows[(family, variant, "rnnkit[reference]")]["training_ms"]
                / row["training_ms"])
            if variant != "plain":
                assert row["ratios"]["train x plain"] > 0
        cell = rows[(family, "streaming step", f"rnnkit.Min{peer.split('.')[1]}Cell")]
        assert cell["ratios"][f"step x {cell_peer}"] > 0
        assert (family, "streaming step", cell_peer) in rows
        memory = {r["implementation"]: r for r in data["memory"] if r["family"] == family}
        assert set(memory) == {f"{peer}[auto]", "rnnkit[auto]"}
        assert memory["rnnkit[auto]"]["ratios"][f"peak x {peer}"] >= 0
    assert not any(r["implementation"] == "torch.nn" for r in data["rows"]
                   if r["family"] in bench.MINIMAL)


def test_bench_times_slstm_against_rnnkits_lstm_and_its_reference(quick_bench):
    """torch.nn has no sLSTM: its rows (plain, exp forget gate, 4 heads, lengths) run against
    rnnkit's LSTM of the same size, and each against the reference loop."""
    out, data = quick_bench
    assert "slstm" in bench.FAMILIES
    rows = {(r["family"], r["variant"], r["implementation"]): r for r in data["rows"]}
    assert "slstm   plain              rnnkit.LSTM[auto]" in out
    peer = rows[("slstm", "plain", "rnnkit.LSTM[auto]")]
    plain = rows[("slstm", "plain", "rnnkit[auto]")]
    assert plain["ratios"]["train x rnnkit.LSTM"] == pytest.approx(
        plain["training_ms"] / peer["training_ms"])
    assert plain["ratios"]["infer x rnnkit.LSTM"] == pytest.approx(
        plain["inference_ms"] / peer["inference_ms"])
    assert set(bench.VARIANTS["slstm"]) == {"plain", "exp forget gate", "4 heads", "lengths"}
    for variant in bench.VARIANTS["slstm"]:
        row = rows[("slstm", variant, "rnnkit[auto]")]
        assert row["ratios"]["train speedup vs reference"] == pytest.approx(
            rows[("slstm", variant, "rnnkit[reference]")]["training_ms"] / row["training_ms"])
    heads = rows[("slstm", "4 heads", "rnnkit[auto]")]
    assert heads["training_gflops"] == pytest.approx(bench.product_flops(
        "slstm", (12, 4, 16), num_heads=4) / heads["training_ms"] / 1e6)
    cell = rows[("slstm", "streaming step", "rnnkit.SLSTMCell")]
    assert cell["ratios"]["step x rnnkit.LSTMCell"] > 0
    memory = {r["implementation"]: r for r in data["memory"] if r["family"] == "slstm"}
    assert set(memory) == {"rnnkit.LSTM[auto]", "rnnkit[auto]"}
    assert not any(r["implementation"] == "torch.nn" for r in data["rows"]
                   if r["family"] == "slstm")


@pytest.mark.parametrize("num_heads", [1, 4])
def test_the_bench_s_slstm_flop_count_is_what_the_reference_loop_multiplies(num_heads):
    from torch.utils.flop_counter import FlopCounterMode

    import rnnkit

    steps, batch, hidden = 5, 3, 8
    model = rnnkit.SLSTM(hidden, hidden, num_heads=num_heads, backend="reference")
    for input_grad in (False, True):
        x = torch.randn(steps, batch, hidden, requires_grad=input_grad)
        state = tuple(torch.rand(1, batch, hidden, requires_grad=True) for _ in range(4))
        with FlopCounterMode(display=False) as forward_count:
            output, _ = model(x, state)
        with FlopCounterMode(display=False) as backward_count:
            output.sum().backward()
        size = (steps, batch, hidden)
        assert forward_count.get_total_flops() == bench.product_flops(
            "slstm", size, training=False, num_heads=num_heads)
        assert forward_count.get_total_flops() + backward_count.get_total_flops() == \
            bench.product_flops("slstm", size, training=True, input_grad=input_grad,
                                num_heads=num_heads)
