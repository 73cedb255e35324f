"""The command line: `rnnkit bench --quick` prints its table (correctness, not speed); bad options."""

from __future__ import annotations

import json
import os

import pytest

from rnnkit import bench, cli


def test_bench_quick_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "infer ms" in out and "train ms" in out
    for family in bench.FAMILIES:
        for variant in bench.VARIANTS[family]:
            assert f"{family:6} {variant:18} rnnkit[auto]" in out
    assert "torch.nn.LSTMCell" in out and "step x torch.nn.LSTMCell" in out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert data["machine"]["torch"]
    plain = [r for r in rows if r["variant"] == "plain" and r["implementation"] == "rnnkit[auto]"]
    assert len(plain) == len(bench.FAMILIES)
    for row in plain:
        assert row["inference_ms"] > 0 and row["training_ms"] > 0
        assert row["ratios"]["train x torch.nn"] > 0
    variants = [r for r in rows if r["implementation"] == "rnnkit[auto]" and r["variant"] != "plain"]
    assert len(variants) == sum(len(v) - 1 for v in bench.VARIANTS.values())
    for row in variants:
        assert row["ratios"]["train x plain"] > 0 and row["ratios"]["train speedup vs reference"] > 0


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
