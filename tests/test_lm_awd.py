"""The AWD-LSTM parts of the language model (Merity et al. 2018): locked and embedding dropout
written out, weight drop through the layer, the preset's settings, and a resumed run that stays
bit-exact with every mask in play."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rnnkit.apps.lm.config import LMTrainCommand
from rnnkit.apps.lm.corpus import Vocabulary
from rnnkit.apps.lm.model import LanguageModel, ModelConfig, embedding_dropout, locked_dropout
from rnnkit.apps.lm.train import TrainConfig, Trainer, default_loop
from rnnkit.apps.recurrent import RecurrentConfig
from rnnkit.cli import main
from rnnkit.training.checkpoint import load_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def test_locked_dropout_shares_one_mask_over_time_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(50, 40, 30)
    dropped = locked_dropout(x, 0.3, training=True)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # the same at every step
    assert set(dropped.unique().tolist()) <= {0.0, torch.tensor(1 / 0.7).item()}
    assert abs((dropped[0] == 0).float().mean().item() - 0.3) < 0.03  # 1200 draws
    assert locked_dropout(x, 0.3, training=False) is x


def test_embedding_dropout_drops_whole_tokens():
    torch.manual_seed(1)
    weight = torch.randn(400, 6)
    dropped = embedding_dropout(weight, 0.25, training=True)
    rows = (dropped == 0).all(1)
    assert abs(rows.float().mean().item() - 0.25) < 0.06
    torch.testing.assert_close(dropped[~rows], weight[~rows] / 0.75)
    assert embedding_dropout(weight, 0.25, training=False) is weight


def awd_model(**model):
    vocabulary = Vocabulary.build(TEXT, "char")
    recurrent = RecurrentConfig(hidden_size=16, num_layers=2, dropout=0.25, weight_drop=0.5)
    return ModelConfig(len(vocabulary), tie_weights=True, locked_dropout=True,
                       input_dropout=0.1, output_dropout=0.1, embedding_dropout=0.1,
                       recurrent=recurrent, **model), vocabulary


def test_the_locked_stack_in_evaluation_is_the_plain_stack():
    config, _ = awd_model()
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    ids = torch.randint(config.vocabulary_size, (9, 3))
    logits, state = model(ids)
    plain_logits, plain_state = model.output(model.recurrent(model.embedding(ids))[0]), \
        model.recurrent(model.embedding(ids))[1]
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(state[0], plain_state[0], rtol=0, atol=1e-6)
    # In training the masks act: two draws differ, one seed repeats.
    model.train()
    torch.manual_seed(4)
    first = model(ids)[0]
    torch.manual_seed(4)
    again = model(ids)[0]
    assert torch.equal(first, again) and not torch.allclose(first, model(ids)[0])


def test_an_awd_run_resumes_bit_exactly(tmp_path):
    config, vocabulary = awd_model()
    train = TrainConfig(seq_len=20, batch_size=4, loop=replace(
        default_loop(), steps=30, eval_every=10, checkpoint_every=10, lr=1e-2))
    uninterrupted = Trainer(config, train, vocabulary, TEXT, tmp_path / "a.pt").run()
    first = Trainer(config, train, vocabulary, TEXT, tmp_path / "b.pt")
    first.run(until=10)
    resumed = Trainer.resume(tmp_path / "b.pt", TEXT)
    history = resumed.run()
    assert history.train == uninterrupted.train and history.validation == \
        uninterrupted.validation
    final_a = load_checkpoint(tmp_path / "a.pt", "lm")["model"]
    final_b = load_checkpoint(tmp_path / "b.pt", "lm")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_the_awd_preset_sets_its_values_and_options_override_them(tmp_path, capsys):
    preset = LMTrainCommand.with_preset("awd")
    assert (preset.model.tie_weights, preset.model.locked_dropout,
            preset.model.recurrent.weight_drop, preset.model.recurrent.dropout,
            preset.model.input_dropout, preset.model.output_dropout) == \
        (True, True, 0.5, 0.25, 0.1, 0.1)
    assert main(["lm", "train", "--corpus", "prose", "--preset", "awd", "--weight-drop", "0.3",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "weight_drop = 0.3" in printed and "locked_dropout = true" in printed
    assert main(["lm", "train", "--corpus", "prose", "--preset", "awd", "--hidden", "16",
                 "--layers", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "3",
                 "--checkpoint", str(tmp_path / "awd.pt"), "--quiet"]) == 0
    saved = load_checkpoint(tmp_path / "awd.pt", "lm")
    assert saved["model_config"]["recurrent"]["weight_drop"] == 0.5


@pytest.mark.parametrize(("argv", "message"), [
    (["--input-dropout", "1"], "--input-dropout must be below 1"),
    (["--locked-dropout", "--backend", "torch.nn"], "--locked-dropout runs the stack layer by "
                                                    "layer"),
    (["--weight-drop", "0.2", "--backend", "torch.nn"], "torch.nn has no weight_drop"),
])
def test_bad_awd_settings_are_named(tmp_path, capsys, argv, message):
    code = main(["lm", "train", "--corpus", "prose", "--steps", "1", "--checkpoint",
                 str(tmp_path / "x.pt"), *argv])
    assert code in (1, 2)
    assert message in capsys.readouterr().err


def test_bad_switches_are_usage_errors_on_every_app(capsys):
    cases = [(["memory", "adding", "--zoneout", "1"], "--zoneout must be below 1"),
             (["forecast", "train", "--dataset", "sunspots", "--weight-drop", "1"],
              "--weight-drop must be below 1 (at 1 nothing is kept), got 1.0"),
             (["lm", "train", "--corpus", "prose", "--recurrent-dropout", "1"],
              "--recurrent-dropout must be below 1"),
             (["lm", "train", "--corpus", "prose", "--layer-norm", "--cell", "gru",
               "--reset-before"], "--layer-norm needs the GRU's reset gate after W_hn"),
             (["memory", "copy", "--cells", "gru-reset-before", "--layer-norm"],
              "--layer-norm needs the GRU's reset gate after W_hn")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
