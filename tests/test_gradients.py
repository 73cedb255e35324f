"""`rnnkit gradients`: fresh layers at a chosen spectral radius, a trained checkpoint, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rnnkit
from rnnkit import cli
from rnnkit.apps.gradients import rescale_recurrent_weights
from rnnkit.apps.recurrent import make_recurrent
from rnnkit.training.checkpoint import save_checkpoint


def test_rescaling_sets_each_gate_blocks_spectral_radius():
    layer = make_recurrent("gru", 3, 6, 1).double()
    rescale_recurrent_weights(layer, 0.7)
    for block in layer.weight_hh_l0.detach().split(6):
        assert float(torch.linalg.eigvals(block).abs().max()) == pytest.approx(0.7)


def test_fresh_layers_vanish_below_radius_one_and_grow_above(tmp_path, capsys):
    for radius, out in (("0.5", "small"), ("3", "large")):
        assert cli.main(["gradients", "--cells", "rnn", "--length", "25", "--hidden", "16",
                         "--spectral-radius", radius, "--out", str(tmp_path / out),
                         "--no-plot"]) == 0
    small = json.loads((tmp_path / "small" / "gradient_flow.json").read_text())
    large = json.loads((tmp_path / "large" / "gradient_flow.json").read_text())
    flow_small = small["flow_by_distance"]["rnn"]
    flow_large = large["flow_by_distance"]["rnn"]
    assert flow_small[0] == pytest.approx(math.sqrt(16))  # distance 0: the identity
    assert flow_small[20] < 1e-3 * flow_small[0] and flow_large[20] > flow_large[0]
    assert "mean ‖∂h_T/∂h_t‖ at distance" in capsys.readouterr().out


def test_every_cell_name_gives_its_flow_with_the_identity_at_distance_zero(tmp_path):
    from rnnkit.apps.memory.experiment import CELL_VARIANTS

    assert {"slstm", "slstm-exp", "slstm-heads4"} <= set(CELL_VARIANTS)
    assert cli.main(["gradients", "--cells", ",".join(CELL_VARIANTS), "--length", "6",
                     "--hidden", "8", "--out", str(tmp_path), "--no-plot"]) == 0
    flows = json.loads((tmp_path / "gradient_flow.json").read_text())["flow_by_distance"]
    for cell in CELL_VARIANTS:
        size = 4 if cell == "lstm-projection" else 8  # h projected to hidden // 2
        assert flows[cell][0] == pytest.approx(math.sqrt(size)) and len(flows[cell]) == 6
    assert flows["lstm-projection (through c)"][0] == 0


def test_slstm_cells_give_their_flow_through_h_and_through_c_over_n(tmp_path, capsys):
    # The sLSTM's cell path is its normalised cell c/n (rnnkit.diagnostics), beside the LSTM's c.
    assert cli.main(["gradients", "--cells", "lstm,slstm,slstm-exp,slstm-heads4", "--length",
                     "12", "--hidden", "8", "--samples", "3", "--spectral-radius", "0.9",
                     "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "slstm-heads4 (through c/n)" in printed
    flows = json.loads((tmp_path / "gradient_flow.json").read_text())["flow_by_distance"]
    assert set(flows) == {"lstm", "lstm (through c)", *(
        name for cell in ("slstm", "slstm-exp", "slstm-heads4")
        for name in (cell, f"{cell} (through c/n)"))}
    for cell in ("slstm", "slstm-exp", "slstm-heads4"):
        through_h, through_cell = flows[cell], flows[f"{cell} (through c/n)"]
        assert len(through_h) == len(through_cell) == 12
        assert through_h[0] == pytest.approx(math.sqrt(8)) and through_cell[0] == 0
        assert all(math.isfinite(v) and v > 0 for v in through_h[1:] + through_cell[1:])
    assert (tmp_path / "gradient_flow.png").stat().st_size > 0


def test_rescaling_an_slstm_sets_each_heads_gate_blocks_spectral_radius():
    for heads in (1, 4):
        layer = rnnkit.SLSTM(3, 8, num_heads=heads, dtype=torch.float64)
        rescale_recurrent_weights(layer, 0.7)
        for head in layer.weight_hh_l0.detach():  # (4d, d): (R_i|R_f|R_z|R_o)
            for block in head.split(8 // heads):
                assert float(torch.linalg.eigvals(block).abs().max()) == pytest.approx(0.7)


def test_a_trained_language_model_on_real_text(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    checkpoint = tmp_path / "lm.pt"
    assert cli.main(["lm", "train", str(text), "--steps", "2", "--hidden", "8", "--layers", "2",
                     "--batch-size", "4", "--seq-len", "20", "--checkpoint",
                     str(checkpoint)]) == 0
    assert cli.main(["gradients", "--checkpoint", str(checkpoint), str(text), "--length", "30",
                     "--layer", "0", "--out", str(tmp_path / "g")]) == 0
    flows = json.loads((tmp_path / "g" / "gradient_flow.json").read_text())["flow_by_distance"]
    assert set(flows) == {"lstm layer 0 (trained)", "lstm layer 0 (trained, through c)"}
    assert len(flows["lstm layer 0 (trained)"]) == 30
    assert (tmp_path / "g" / "gradient_flow.png").stat().st_size > 0


def test_bad_gradient_requests_are_named(tmp_path, capsys):
    (tmp_path / "not.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.ones(2)}, tmp_path / "dict.pt")
    save_checkpoint(tmp_path / "forecast.pt", "forecast", {"model": {}})
    save_checkpoint(tmp_path / "hollow.pt", "lm", {"vocabulary": ["a"]})
    (tmp_path / "file").write_text("in the way")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    lm = tmp_path / "lm.pt"
    assert cli.main(["lm", "train", str(text), "--steps", "1", "--hidden", "8", "--batch-size",
                     "4", "--seq-len", "20", "--checkpoint", str(lm)]) == 0
    capsys.readouterr()
    cases = [
        (["gradients", "--checkpoint", str(tmp_path / "not.pt"), "--corpus", "prose"],
         "cannot be read (truncated or corrupted?)"),
        (["gradients", "--checkpoint", str(tmp_path / "dict.pt"), "--corpus", "prose"],
         "is not an rnnkit checkpoint (a torch file, but not one that 'rnnkit lm' wrote)"),
        (["gradients", "--checkpoint", str(tmp_path / "forecast.pt"), "--corpus", "prose"],
         "was written by 'rnnkit forecast', not 'rnnkit lm'"),
        (["gradients", "--checkpoint", str(tmp_path / "hollow.pt"), "--corpus", "prose"],
         "is not a complete, compatible 'rnnkit lm' checkpoint (KeyError: 'model_config')"),
        (["gradients", "--checkpoint", str(tmp_path), "--corpus", "prose"],
         "is a directory; give the checkpoint file that 'rnnkit lm' wrote"),
        (["gradients", "--checkpoint", str(lm), str(text), "--layer", "2"],
         "--layer must be in [0, 1] for the 2-layer stack"),
        (["gradients", "--checkpoint", str(lm), str(text), "--hidden", "8", "--cells", "gru"],
         "--cells, --hidden set up fresh layers and cannot change a --checkpoint's"),
        (["gradients", "--checkpoint", str(lm), str(text), "--seed", "0"],
         "--seed set up fresh layers"),  # even at its default value
        (["gradients", "--corpus", "prose"], "go with --checkpoint"),
        (["gradients", "--cells", "lstm-projection", "--spectral-radius", "0.5"],
         "lstm-projection has no square W_hh blocks for --spectral-radius to rescale"),
        (["gradients", "--cells", "rnn,lstm-projection", "--hidden", "1"],
         "lstm-projection projects h to hidden // 2 units: it needs hidden >= 2, got 1"),
    ]
    # The first six are the files' fault (exit 1), the rest the command line's alone (exit 2).
    for number, (argv, message) in enumerate(cases):
        assert cli.main(argv + ["--out", str(tmp_path / "o")]) == (1 if number < 6 else 2)
        assert message in capsys.readouterr().err
    assert cli.main(["gradients", "--length", "5", "--hidden", "4", "--cells", "rnn", "--out",
                     str(tmp_path / "file")]) == 1
    assert "--out " + repr(str(tmp_path / "file")) + " is an existing file" in \
        capsys.readouterr().err
    for radius in ("0", "-1", "inf"):
        with pytest.raises(SystemExit):
            cli.main(["gradients", "--spectral-radius", radius])
        assert f"expected a finite number > 0, got '{radius}'" in capsys.readouterr().err
