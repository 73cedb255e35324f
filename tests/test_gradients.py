"""`rnnkit gradients`: fresh layers at a chosen spectral radius, a trained checkpoint, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rnnkit import cli
from rnnkit.apps.gradients import rescale_recurrent_weights
from rnnkit.apps.recurrent import make_recurrent


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
    cases = [
        (["gradients", "--checkpoint", str(tmp_path / "not.pt"), "--corpus", "prose"],
         "cannot be read (truncated or corrupted?)"),
        (["gradients", "--corpus", "prose"], "go with --checkpoint"),
    ]
    for argv, message in cases:
        assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["gradients", "--spectral-radius", "0"])
    assert "expected a number > 0, got '0'" in capsys.readouterr().err
