"""What `rnnkit lm train|sample|eval` and `rnnkit demo` do, given parsed arguments."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

from rnnkit.apps.lm.corpus import Vocabulary, builtin_corpus, read_text_file
from rnnkit.apps.lm.model import LanguageModel, ModelConfig, check_model_fits, model_too_large
from rnnkit.apps.lm.sample import generate
from rnnkit.apps.lm.train import (
    KIND,
    NonFiniteLoss,
    TrainConfig,
    Trainer,
    default_loop,
    evaluate,
    model_config_from_dict,
    train_config_from_dict,
)
from rnnkit.apps.outputs import output_directory, output_file
from rnnkit.engine.native import build
from rnnkit.errors import is_out_of_memory
from rnnkit.training.checkpoint import load_checkpoint, restoring
from rnnkit.training.devices import describe_device
from rnnkit.training.distributed import setup_distributed
from rnnkit.training.metrics import MetricsLog
from rnnkit.training.trainer import best_checkpoint_path

LN2 = math.log(2)


def load_text(text_file: str | None, corpus: str | None) -> tuple[str, str]:
    """(text, description) from a file or a built-in corpus (exactly one of them)."""
    if (text_file is None) == (corpus is None):
        raise ValueError("give a TEXT_FILE or --corpus NAME (one of them)")
    if corpus is not None:
        return builtin_corpus(corpus), f"built-in corpus {corpus!r}"
    return read_text_file(text_file), f"file {text_file!r}"


def describe_loss(nats: float, level: str) -> str:
    """Loss in nats per token, with bits per character (char) or perplexity (word)."""
    if level == "char":
        return f"{nats:.4f} nats/char = {nats / LN2:.4f} bits/char"
    return f"{nats:.4f} nats/word, perplexity {math.exp(min(nats, 700)):.2f}"


def train(model_config: ModelConfig, config: TrainConfig, text_file: str | None,
          corpus: str | None, checkpoint: str, resume: str | None, plot: str | None,
          resume_steps: int | None, overwrite: bool = False, quiet: bool = False) -> int:
    """Train from scratch, or resume ``resume`` (its own configuration; ``resume_steps``, if
    given, as the new total). Every output path is checked before the text is read."""
    output_file(checkpoint, "--checkpoint")
    if plot:
        output_file(plot, "--plot")
    best = best_checkpoint_path(checkpoint)
    for path in (Path(checkpoint), best):
        if path.exists() and not overwrite and Path(checkpoint) != Path(resume or ""):
            raise ValueError(
                f"checkpoint {str(path)!r} exists and would be overwritten; continue it with "
                f"--resume {checkpoint}, choose another --checkpoint, or pass --overwrite")
    text, source = load_text(text_file, corpus)
    with setup_distributed(config.loop.device) as distributed:
        say = print if distributed.is_main else _silent
        if not resume and distributed.is_main:
            best.unlink(missing_ok=True)  # a previous run's best, replaced by this run's
        # Said before any model is built: each process reads its share of the streams.
        distributed.shard(config.batch_size, "batch size")
        options = {"distributed": distributed, "quiet": quiet}
        if resume:
            trainer = Trainer.resume(resume, text, steps=resume_steps, **options)
            trainer.continue_in(checkpoint)
            say(f"resuming {resume} at step {trainer.step} of {trainer.loop.steps}", flush=True)
            if trainer.step >= trainer.loop.steps:
                say(f"nothing to do: the run is complete at step {trainer.step}; give a larger "
                    "--steps to train on")
                return 0
        else:
            vocabulary = Vocabulary.build(text, config.level, config.max_vocabulary)
            model_config.vocabulary_size = len(vocabulary)
            check_model_fits(model_config)  # before allocating, in one line naming the options
            try:
                trainer = Trainer(model_config, config, vocabulary, text, checkpoint, **options)
            except (MemoryError, RuntimeError) as error:
                # The estimate leaves the allocator the last word (other processes' memory).
                if not is_out_of_memory(error):
                    raise
                raise ValueError(model_too_large(model_config, "could not be allocated")) from None
        # Build the native kernels (once per machine) before the clock starts, so that progress,
        # tokens/s and ETA measure training. A failed build warns and training runs on "fused".
        build.kernels()
        parameters = sum(p.numel() for p in trainer.model.parameters())
        recurrent = trainer.model.config.recurrent
        say(f"{source}: {len(text):,} characters, vocabulary {len(trainer.vocabulary)} "
            f"{trainer.config.level}s, model {parameters:,} parameters "
            f"({recurrent.cell}, {recurrent.num_layers} x {recurrent.hidden_size}) on "
            f"{describe_device(trainer.device)}"
            + (f", {distributed.world_size} processes" if distributed.world_size > 1 else ""),
            flush=True)
        metrics = metrics_path(checkpoint)
        with MetricsLog(metrics, resume_step=trainer.step if resume else None,
                        tensorboard_dir=metrics.with_suffix(".tensorboard"),
                        enabled=distributed.is_main) as log:
            trainer.metrics = log
            try:
                history = trainer.run()
            except NonFiniteLoss as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
    final, level = history.validation[-1], trainer.config.level
    if trainer.stopped_early:
        say(f"stopped early at step {trainer.step} of {trainer.loop.steps}: "
            f"{trainer.loop.patience} validations without improvement (--patience)")
    say(f"validation: {describe_loss(final, level)}; checkpoint: {checkpoint}; every "
        f"validation: {metrics}")
    stopping = trainer.stopping
    if stopping.best_epoch != history.validation_steps[-1]:
        kept = f"its weights: {best}" if best.is_file() else \
            "its weights were not kept (the resumed checkpoint came without its .best.pt)"
        say(f"best validation: {describe_loss(stopping.best_loss, level)} at step "
            f"{stopping.best_epoch}; {kept}")
    if plot and distributed.is_main:
        save_plot_or_hint(plot, history)
    return 0


def _silent(*args, **kwargs) -> None:
    """`print` on the processes other than rank 0, which print nothing."""


def metrics_path(checkpoint: str | Path) -> Path:
    """The JSON-lines log of a run's validations, beside its checkpoint: ``lm.metrics.jsonl``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.metrics.jsonl")


def saved_settings(checkpoint: str) -> dict:
    """The ``model`` and ``train`` configs a resumable checkpoint was trained with."""
    saved = load_checkpoint(checkpoint, KIND)
    with restoring(checkpoint, KIND):
        source = f"checkpoint {checkpoint!r}"
        return {"model": model_config_from_dict(saved["model_config"], source),
                "train": train_config_from_dict(saved["train_config"], source)}


def save_plot_or_hint(path: str, history) -> None:
    from rnnkit.training.plots import MissingPlotting, save_loss_curves

    try:
        save_loss_curves(path, history)
        print(f"loss curves: {path}")
    except MissingPlotting as error:
        print(f"note: {error}", file=sys.stderr)


def restore(checkpoint: str) -> tuple[LanguageModel, Vocabulary, dict]:
    """The model, vocabulary and payload of an `rnnkit lm` checkpoint; ``ValueError`` naming
    the file for anything that does not fit together."""
    saved = load_checkpoint(checkpoint, KIND)
    with restoring(checkpoint, KIND):
        model = LanguageModel(model_config_from_dict(saved["model_config"]))
        tokens = saved["vocabulary"]
        if not isinstance(tokens, (list, tuple)):
            raise ValueError(f"checkpoint {checkpoint!r} has a malformed vocabulary (a "
                             f"{type(tokens).__name__}, not a list of tokens)")
        try:
            vocabulary = Vocabulary(tuple(tokens), saved["train_config"]["level"])
        except ValueError as error:
            raise ValueError(f"checkpoint {checkpoint!r} has a bad vocabulary: {error}") from None
        if model.config.vocabulary_size != len(vocabulary):
            raise ValueError(f"checkpoint {checkpoint!r} is inconsistent: a vocabulary of "
                             f"{len(vocabulary)} tokens for a model with "
                             f"{model.config.vocabulary_size} outputs")
        model.load_state_dict(saved["model"])
    return model, vocabulary, saved


def sample(checkpoint: str, prime: str, length: int, temperature: float, top_k: int | None,
           top_p: float | None, seed: int | None) -> int:
    model, vocabulary, _ = restore(checkpoint)
    sys.stdout.write(prime)
    for token in generate(model, vocabulary, prime, length, temperature, top_k, top_p, seed):
        sys.stdout.write(token)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def evaluate_file(checkpoint: str, text_file: str) -> int:
    model, vocabulary, saved = restore(checkpoint)
    text = read_text_file(text_file)
    ids, unknown = vocabulary.encode(text)
    if ids.numel() < 2:
        raise ValueError(f"text file {text_file!r} has fewer than 2 tokens to evaluate")
    nats = evaluate(model, ids, saved["train_config"]["seq_len"])
    level = saved["train_config"]["level"]
    print(f"{text_file}: {ids.numel():,} {level}s, {unknown:,} unknown to the vocabulary "
          f"({100 * unknown / ids.numel():.2f} %)")
    print(f"loss: {describe_loss(nats, level)}")
    return 0


def throughput(model_config: ModelConfig, config: TrainConfig, text_file: str | None,
               corpus: str | None, blocks: int, steps_per_block: int) -> int:
    from rnnkit.apps.lm.throughput import compare_throughput, peer_of

    text, source = load_text(text_file, corpus)
    build.kernels()
    recurrent = model_config.recurrent
    print(f"{source}: {recurrent.cell} {recurrent.num_layers} x {recurrent.hidden_size}, "
          f"batch {config.batch_size} x {config.seq_len}, median of {blocks} blocks of "
          f"{steps_per_block} steps each, alternating")
    peer_name, peer = peer_of(recurrent)
    if peer_name != "torch.nn":
        print(f"torch.nn has no {recurrent.cell}: the peer is rnnkit's {peer.cell} of the same "
              f"size ({peer.num_layers} x {peer.hidden_size}, backend {peer.backend})")
    for name, value in compare_throughput(model_config, config, text, blocks,
                                          steps_per_block).items():
        print(f"{name}: {value:,.2f}")
    return 0


def demo(steps: int, out: str) -> int:
    """`rnnkit demo`: a 2 x 256 character LSTM (dropout 0.1) trained ``steps`` steps on built-in
    prose, its checkpoint and loss plot in ``out`` (replaced), then a sample of 400 characters."""
    folder = output_directory(out)
    train_config = TrainConfig(loop=replace(default_loop(), steps=steps,
                                            eval_every=max(1, steps // 6), checkpoint_every=steps))
    status = train(ModelConfig(vocabulary_size=0), train_config, None, "prose",
                   str(folder / "lm.pt"), None, str(folder / "loss.png"), resume_steps=None,
                   overwrite=True)
    if status == 0:
        print("\nsample (temperature 0.8):\n")
        sample(str(folder / "lm.pt"), "The ", 400, 0.8, None, None, seed=0)
    return status
