"""Training, resuming, sampling and evaluating language models, and the lm commands' errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rnnkit.apps.lm.corpus import Vocabulary
from rnnkit.apps.lm.model import LanguageModel, ModelConfig
from rnnkit.apps.lm.sample import generate, next_token_distribution
from rnnkit.apps.lm.train import NonFiniteLoss, TrainConfig, Trainer, default_loop
from rnnkit.apps.recurrent import RecurrentConfig
from rnnkit.cli import main
from rnnkit.training.checkpoint import load_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def tiny(steps=40, **train):
    vocabulary = Vocabulary.build(TEXT, "char")
    model = ModelConfig(len(vocabulary), embedding_size=16,
                        recurrent=RecurrentConfig(hidden_size=32, num_layers=2, dropout=0.1))
    config = TrainConfig(seq_len=20, batch_size=4,
                         loop=replace(default_loop(), steps=steps, eval_every=10,
                                      checkpoint_every=10, lr=1e-2, **train))
    return model, config, vocabulary


def test_loss_falls_on_a_tiny_corpus():
    model, config, vocabulary = tiny(steps=60)
    history = Trainer(model, config, vocabulary, TEXT, None).run()
    uniform = math.log(len(vocabulary))
    assert history.train[0] > 0.9 * uniform
    assert history.validation[-1] < 0.75 * uniform
    assert history.train[-1] < 0.5 * history.train[0]
    assert len(history.gradient_norm) == 60 and all(n > 0 for n in history.gradient_norm)


def test_resume_continues_exactly(tmp_path):
    model, config, vocabulary = tiny(steps=40)
    uninterrupted = Trainer(model, config, vocabulary, TEXT, tmp_path / "a.pt").run()

    model, config, vocabulary = tiny(steps=40)
    first = Trainer(model, config, vocabulary, TEXT, tmp_path / "b.pt")
    first.run(until=20)  # as if stopped after the checkpoint of step 20
    resumed = Trainer.resume(tmp_path / "b.pt", TEXT)
    assert resumed.step == 20
    history = resumed.run()
    assert history.train == uninterrupted.train  # exactly: same floats, every step
    assert history.validation == uninterrupted.validation
    final_a = load_checkpoint(tmp_path / "a.pt", "lm")["model"]
    final_b = load_checkpoint(tmp_path / "b.pt", "lm")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_refuses_other_text(tmp_path):
    model, config, vocabulary = tiny(steps=10)
    Trainer(model, config, vocabulary, TEXT, tmp_path / "c.pt").run()
    with pytest.raises(ValueError, match="was trained on other text"):
        Trainer.resume(tmp_path / "c.pt", TEXT.upper())


def test_non_finite_loss_stops_with_a_diagnosis(tmp_path):
    model, config, vocabulary = tiny(steps=30)
    trainer = Trainer(model, config, vocabulary, TEXT, tmp_path / "d.pt")
    trainer.run(until=10)  # a good checkpoint at step 10
    saved = (tmp_path / "d.pt").read_bytes()
    with torch.no_grad():
        trainer.model.output.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"the loss became nan at step 11 \(last finite loss at step 10; gradient norm before clipping .*\); the checkpoint of step 10 in .*d.pt. is kept"):
        trainer.run()
    assert (tmp_path / "d.pt").read_bytes() == saved  # the last good checkpoint is kept


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    # An infinite learning rate makes the weights NaN at step 1 while its loss is finite.
    model, config, vocabulary = tiny(steps=10, optimizer="sgd", schedule="constant")
    config.loop.checkpoint_every, config.loop.lr = 1, float("inf")
    trainer = Trainer(model, config, vocabulary, TEXT, tmp_path / "e.pt")
    with pytest.raises(NonFiniteLoss, match=r"became NaN or infinite by step 1 \(checkpoint\['model'\]\['.*'\]\), so it was not saved; no checkpoint was written"):
        trainer.run()
    assert not (tmp_path / "e.pt").exists()

    model, config, vocabulary = tiny(steps=10, optimizer="sgd", schedule="constant")
    config.loop.checkpoint_every = 1
    trainer = Trainer(model, config, vocabulary, TEXT, tmp_path / "f.pt")
    trainer.run(until=3)
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"by step 4 .* the checkpoint of step 3 in '.*f.pt' is kept"):
        trainer.run()
    kept = load_checkpoint(tmp_path / "f.pt", "lm")
    assert kept["step"] == 3
    assert all(torch.isfinite(weight).all() for weight in kept["model"].values())


def test_ctrl_c_checkpoints_the_current_step_and_resumes_exactly(tmp_path):
    import os
    import signal

    from rnnkit.training.loop import Interrupted

    model, config, vocabulary = tiny(steps=30)
    uninterrupted = Trainer(model, config, vocabulary, TEXT, tmp_path / "a.pt").run()

    model, config, vocabulary = tiny(steps=30)
    trainer = Trainer(model, config, vocabulary, TEXT, tmp_path / "b.pt")
    take_step = trainer.train_step

    def pressed_at_step_13():
        loss = take_step()
        if trainer.step == 13:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the step, as a user's would
        return loss

    trainer.train_step = pressed_at_step_13
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a background job
    with pytest.raises(Interrupted, match=r"interrupted at step 13 of 30: checkpoint saved to '.*b.pt'; continue .* --resume .*b.pt"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = Trainer.resume(tmp_path / "b.pt", TEXT)
    assert resumed.step == 13
    history = resumed.run()
    assert history.train == uninterrupted.train
    final_a = load_checkpoint(tmp_path / "a.pt", "lm")["model"]
    final_b = load_checkpoint(tmp_path / "b.pt", "lm")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_a_killed_runs_temporary_file_is_removed_at_the_next_start(tmp_path):
    (tmp_path / ".g.pt.999999999-x.tmp").write_bytes(b"PK half a zip")
    model, config, vocabulary = tiny(steps=1)
    Trainer(model, config, vocabulary, TEXT, tmp_path / "g.pt")
    assert list(tmp_path.iterdir()) == []


def test_sampling_is_reproducible_and_greedy_at_temperature_zero():
    model_config, _, vocabulary = tiny()
    torch.manual_seed(0)
    model = LanguageModel(model_config)
    first = "".join(generate(model, vocabulary, "the ", 30, temperature=1.0, seed=7))
    again = "".join(generate(model, vocabulary, "the ", 30, temperature=1.0, seed=7))
    assert first == again and len(first) == 30
    greedy = "".join(generate(model, vocabulary, "the ", 10, temperature=0.0, seed=1))
    # Greedy by hand: argmax at every step.
    ids, _ = vocabulary.encode("the ")
    with torch.no_grad():
        logits, state = model(ids.view(-1, 1))
        expected = []
        for _ in range(10):
            token = int(logits[-1, 0].argmax())
            expected.append(vocabulary.tokens[token])
            logits, state = model(torch.tensor([[token]]), state)
    assert greedy == "".join(expected)


@pytest.mark.parametrize("backend", ["auto", "torch.nn"])
def test_the_models_token_stream_equals_forward_a_token_at_a_time(backend):
    model_config, _, vocabulary = tiny()
    model_config = replace(model_config, recurrent=replace(model_config.recurrent,
                                                           backend=backend))
    torch.manual_seed(0)
    model = LanguageModel(model_config)
    ids, _ = vocabulary.encode("the quick")
    with pytest.raises(ValueError, match=r"evaluation mode .*model.eval\(\)"):
        model.stream()
    model.eval()
    with torch.no_grad():
        logits, state = model(ids[:3].view(-1, 1))
        step = model.stream(state)
        streamed = torch.stack([step(token.view(1)) for token in ids[3:]])  # (T, 1, V)
        expected, _ = model(ids[3:].view(-1, 1), state)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_k = next_token_distribution(logits, 1.0, 2, None)
    torch.testing.assert_close(top_k, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    top_p = next_token_distribution(logits, 1.0, None, 0.7)  # 0.5 + 0.3 reaches 0.7
    torch.testing.assert_close(top_p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    greedy = next_token_distribution(logits, 0.0, None, None)
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("temperature, top_p", [
    (1.0, 0.0),  # top-p 0 keeps the single most likely token
    (1e-45, None), (5e-324, None), (1e-300, 0.5),  # a tiny temperature tends to greedy
])
def test_extreme_sampling_settings_give_the_greedy_distribution(temperature, top_p):
    logits = torch.tensor([1e4, 3e4, -2e4, 2.9e4])  # wide apart: scaled, they would overflow
    probabilities = next_token_distribution(logits, temperature, None, top_p)
    assert probabilities.tolist() == [0.0, 1.0, 0.0, 0.0]
    token = torch.multinomial(probabilities, 1)  # refused for inf or nan entries
    assert int(token) == 1


def test_damaged_logits_are_named():
    with pytest.raises(ValueError, match="the model's logits are not finite"):
        next_token_distribution(torch.tensor([0.0, float("nan")]), 1.0, None, None)


def test_commands_train_sample_eval(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ckpt = tmp_path / "lm.pt"
    assert main(["lm", "train", str(text), "--steps", "12", "--hidden", "16", "--layers", "1",
                 "--seq-len", "10", "--batch-size", "4", "--eval-every", "6",
                 "--checkpoint", str(ckpt), "--plot", str(tmp_path / "loss.png")]) == 0
    out = capsys.readouterr().out
    assert "bits/char" in out and (tmp_path / "loss.png").stat().st_size > 1000
    assert main(["lm", "sample", str(ckpt), "--prime", "the", "--length", "5", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    main(["lm", "sample", str(ckpt), "--prime", "the", "--length", "5", "--seed", "3"])
    assert capsys.readouterr().out == first and first.startswith("the")
    other = tmp_path / "other.txt"
    other.write_text("the fox é")
    assert main(["lm", "eval", str(ckpt), str(other)]) == 0
    assert "1 unknown to the vocabulary" in capsys.readouterr().out


@pytest.mark.parametrize("arguments,message,code", [
    (["lm", "train", "{missing}"], "text file '.*missing.txt' does not exist", 1),
    (["lm", "train", "{short}"], "the text is too short: .* training tokens", 1),
    (["lm", "train"], "give a TEXT_FILE or --corpus NAME", 2),
    (["lm", "sample", "{notckpt}"], "is not an rnnkit checkpoint|cannot be read", 1),
])
def test_command_errors_are_one_line(tmp_path, capsys, arguments, message, code):
    (tmp_path / "short.txt").write_text("too short")
    torch.save({"weights": 1}, tmp_path / "notckpt.pt")
    files = {"missing": tmp_path / "missing.txt", "short": tmp_path / "short.txt",
             "notckpt": tmp_path / "notckpt.pt"}
    arguments = [a.format(**files) for a in arguments]
    assert main(arguments) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err


@pytest.mark.parametrize("arguments,message", [
    (["lm", "train", "--corpus", "poems"], "invalid choice: 'poems'"),
    (["lm", "train", "--corpus", "prose", "--cell", "tcn"], "invalid choice: 'tcn'"),
    (["lm", "train", "--corpus", "prose", "--seq-len", "0"], "expected a positive int (at most 2**63 - 1), got '0'"),
    (["lm", "train", "--corpus", "prose", "--batch-size", "-3"], "expected a positive int (at most 2**63 - 1), got '-3'"),
])
def test_bad_options_are_rejected_by_the_parser(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0  # reruns replace
    out = capsys.readouterr().out
    assert "built-in corpus 'prose'" in out and "bits/char" in out and "sample" in out
    assert (tmp_path / "lm.pt").is_file() and (tmp_path / "loss.png").is_file()


def test_command_resume_keeps_the_saved_run_length(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    options = ["--hidden", "16", "--layers", "1", "--seq-len", "10", "--batch-size", "4",
               "--eval-every", "5", "--checkpoint-every", "5"]
    assert main(["lm", "train", str(text), "--steps", "10", *options,
                 "--checkpoint", str(tmp_path / "a.pt")]) == 0
    assert main(["lm", "train", str(text), "--resume", str(tmp_path / "a.pt"),
                 "--checkpoint", str(tmp_path / "b.pt")]) == 0
    assert "nothing to do: the run is complete at step 10" in capsys.readouterr().out
    assert not (tmp_path / "b.pt").exists()
    assert main(["lm", "train", str(text), "--resume", str(tmp_path / "a.pt"), "--steps", "15",
                 "--checkpoint", str(tmp_path / "c.pt")]) == 0
    assert load_checkpoint(tmp_path / "c.pt", "lm")["step"] == 15
    # A new run may not overwrite a saved one by accident.
    saved = (tmp_path / "c.pt").read_bytes()
    assert main(["lm", "train", str(text), "--steps", "5", *options,
                 "--checkpoint", str(tmp_path / "c.pt")]) == 1
    assert "exists and would be overwritten; continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "c.pt").read_bytes() == saved
    assert main(["lm", "train", str(text), "--steps", "5", *options, "--overwrite",
                 "--checkpoint", str(tmp_path / "c.pt")]) == 0
    assert load_checkpoint(tmp_path / "c.pt", "lm")["step"] == 5
    # A resumed run keeps its saved settings: changing one is refused, not ignored.
    assert main(["lm", "train", str(text), "--resume", str(tmp_path / "c.pt"), "--hidden", "32",
                 "--lr=0.1", "--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "--hidden, --lr cannot change a resumed run" in capsys.readouterr().err
    # Resuming in place is what --resume is for.
    assert main(["lm", "train", str(text), "--resume", str(tmp_path / "c.pt"), "--steps", "8",
                 "--checkpoint", str(tmp_path / "c.pt")]) == 0
    assert load_checkpoint(tmp_path / "c.pt", "lm")["step"] == 8


def test_torch_nn_model_starts_from_the_same_weights_and_throughput_runs(capsys):
    model_config, _, _ = tiny()
    torch.manual_seed(0)
    ours = LanguageModel(model_config)
    torch.manual_seed(0)
    theirs = LanguageModel(replace(model_config, recurrent=replace(model_config.recurrent,
                                                                   backend="torch.nn")))
    assert isinstance(theirs.recurrent, torch.nn.LSTM)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    with pytest.raises(ValueError, match="torch.nn has no peephole LSTM"):
        LanguageModel(replace(model_config, recurrent=replace(
            model_config.recurrent, backend="torch.nn", peephole=True)))
    assert main(["lm", "throughput", "--corpus", "prose", "--hidden", "16", "--layers", "1",
                 "--seq-len", "10", "--batch-size", "4", "--blocks", "2",
                 "--block-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "rnnkit x torch.nn throughput:" in out and "torch.nn tokens/s:" in out


def test_ctrl_c_on_the_command_line_saves_says_where_and_exits_130(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    checkpoint = tmp_path / "lm.pt"
    command = [sys.executable, "-m", "rnnkit.cli", "lm", "train", str(text), "--steps", "100000",
               "--hidden", "8", "--embedding", "4", "--layers", "1", "--batch-size", "2",
               "--seq-len", "8", "--eval-every", "1000", "--checkpoint-every", "1",
               "--checkpoint", str(checkpoint)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    stopped = re.search(r"interrupted at step (\d+) of 100000: checkpoint saved to '(.*)'; "
                        r"continue with 'rnnkit lm train' on the same text and --resume", err)
    assert stopped and stopped.group(2) == str(checkpoint), err
    assert load_checkpoint(checkpoint, "lm")["step"] == int(stopped.group(1))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
