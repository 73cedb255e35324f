"""Training a language model with truncated backprop through time, resumable exactly.

The token stream is cut into ``batch_size`` parallel streams (time-major ``(S, N)``); step k
reads the window ``[p, p + seq_len)`` of every stream and predicts it shifted by one token. The
recurrent state is carried from one window to the next and detached (truncated BPTT), and reset
when the streams wrap around (a new epoch). A checkpoint holds everything the next step depends
on: model, optimiser, schedule, step, stream position, carried state, random state, vocabulary,
configuration and the text's fingerprint; resuming from it continues the very same run.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.apps.lm.corpus import LEVELS, Vocabulary
from rnnkit.apps.lm.model import LanguageModel, ModelConfig
from rnnkit.configuration import check_config, config_from_dict
from rnnkit.training import trainer as training
from rnnkit.training.checkpoint import load_checkpoint, restoring
from rnnkit.training.trainer import (
    BaseTask,
    LoopConfig,
    NonFiniteLoss,
    TrainingHistory,
    evaluating,
    model_device,
)

KIND = "lm"
History = TrainingHistory  # per-step training loss and gradient norm; validation by step
__all__ = ["KIND", "History", "LanguageModelTrainer", "NonFiniteLoss", "TrainConfig", "Trainer"]


def default_loop() -> LoopConfig:
    return LoopConfig(steps=1000, lr=2e-3, schedule="cosine", clip_norm=1.0, eval_every=100,
                      checkpoint_every=500)


@dataclass
class TrainConfig:
    """How to train; every field maps one to one onto an `rnnkit lm train` option."""

    level: str = field(default="char", metadata={"choices": LEVELS})  # char | word
    max_vocabulary: int | None = field(default=None, metadata={"check": "positive"})
        # most frequent tokens kept (words); none: all
    seq_len: int = field(default=100, metadata={"check": "positive"})  # truncated-BPTT window, in
        # tokens
    batch_size: int = field(default=32, metadata={"check": "positive"})  # parallel streams (over
        # all processes)
    validation_fraction: float = 0.05  # the text's tail held out
    loop: LoopConfig = field(default_factory=default_loop)

    def check(self) -> None:
        """What the fields' metadata cannot say (`check_config` calls it after them)."""
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation-fraction must be in (0, 1), got {self.validation_fraction!r}")


def check_train_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first field outside its accepted range: each field by its
    metadata, then `TrainConfig.check` (see `check_config`)."""
    check_config(config)


def model_config_from_dict(data: dict, source: str = "checkpoint") -> ModelConfig:
    return config_from_dict(ModelConfig, data, source)


def train_config_from_dict(data: dict, source: str = "checkpoint") -> TrainConfig:
    return config_from_dict(TrainConfig, data, source)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def streams(ids: Tensor, batch_size: int) -> Tensor:
    """``(L,)`` ids -> ``(S, N)`` time-major streams; a tail that does not fit is dropped."""
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length).t().contiguous()


def split_text_ids(ids: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """(train, validation) ids: the validation part is the tail, so no window straddles both."""
    held_out = max(2, int(ids.numel() * config.validation_fraction))
    train, validation = ids[:-held_out], ids[-held_out:]
    needed = config.batch_size * (config.seq_len + 1)
    if train.numel() < needed:
        raise ValueError(
            f"the text is too short: {train.numel()} training tokens, but batch-size "
            f"{config.batch_size} x (seq-len {config.seq_len} + 1) = {needed} are needed for one "
            "batch; give more text or smaller --batch-size/--seq-len")
    return train, validation


def detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def evaluate(model: LanguageModel, ids: Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Mean negative log-likelihood (nats per token) of ``ids`` under the model."""
    data = streams(ids, min(batch_size, max(1, (ids.numel() - 1) // 2))).to(model_device(model))
    total, count, state = 0.0, 0, None
    with evaluating(model):
        for start in range(0, data.shape[0] - 1, seq_len):
            window = data[start : start + seq_len + 1]
            logits, state = model(window[:-1], state)
            total += float(F.cross_entropy(logits.flatten(0, 1), window[1:].flatten(),
                                           reduction="sum"))
            count += window[1:].numel()
    return total / max(count, 1)


class LanguageModelTask(BaseTask):
    """Truncated BPTT as a `TrainingTask`: the ``(S, N)`` streams read window after window, the
    recurrent state carried (detached) from one window to the next and reset when the streams
    wrap around. Over several processes each rank reads its own columns (streams); the carried
    state is gathered into the whole batch's for checkpoints, so any number of processes resumes.
    """

    def __init__(self, model_config: ModelConfig, config: TrainConfig, vocabulary: Vocabulary,
                 text: str) -> None:
        self.model_config, self.config = model_config, config
        ids, _ = vocabulary.encode(text)
        train_ids, self.validation_ids = split_text_ids(ids, config)
        self.data = streams(train_ids, config.batch_size)  # (S, N)
        self.position, self.carried = 0, None

    def build_model(self) -> LanguageModel:
        return LanguageModel(self.model_config, chrono_span=self.config.seq_len)

    def _streams(self) -> slice:
        """This rank's streams (all of them in one process)."""
        return self.distributed.shard(self.config.batch_size, "batch size")

    def next_batch(self) -> Tensor:
        """The next ``(seq_len + 1, N)`` window; wraps (and resets the state) at the end."""
        seq_len = self.config.seq_len
        if self.position + seq_len + 1 > self.data.shape[0]:
            self.position, self.carried = 0, None
        window = self.data[self.position : self.position + seq_len + 1, self._streams()]
        self.position += seq_len
        return window

    def loss(self, model: nn.Module, window: Tensor) -> Tensor:
        logits, state = model(window[:-1], self.carried)
        self.carried = detach_state(state)
        return F.cross_entropy(logits.flatten(0, 1), window[1:].flatten())

    def evaluate(self, model: LanguageModel) -> float:
        return evaluate(model, self.validation_ids, self.config.seq_len)

    def state_dict(self) -> dict:
        state = self.carried
        if state is not None:  # every stream's state, whatever the number of processes
            gather = self.distributed.all_gather
            state = tuple(gather(s, 1) for s in state) if isinstance(state, tuple) \
                else gather(state, 1)
        return {"position": self.position, "state": state}

    def load_state_dict(self, saved: dict) -> None:
        self.position, state = saved["position"], saved["state"]
        if state is not None:
            shard = self._streams()
            state = tuple(s[:, shard].to(self.device) for s in state) \
                if isinstance(state, (tuple, list)) else state[:, shard].to(self.device)
        self.carried = state


class LanguageModelTrainer(training.Trainer):
    """One language-model run (`Trainer` on a `LanguageModelTask`): build, or `resume` one."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, vocabulary: Vocabulary,
                 text: str, checkpoint_path: str | Path | None, progress: bool = True,
                 **options) -> None:
        check_train_config(config)
        self.vocabulary = vocabulary
        self.text_fingerprint = fingerprint(text)
        tokens = config.seq_len * config.batch_size
        super().__init__(
            LanguageModelTask(model_config, config, vocabulary, text), config.loop,
            checkpoint=checkpoint_path, kind=KIND, payload=self._payload,
            resume_hint="continue with 'rnnkit lm train' on the same text and --resume "
            "{checkpoint}",
            show_progress=progress,
            unit_of_work=lambda rate: f"{rate * tokens:,.0f} tok/s", **options)
        self.config = config  # the app's settings; the loop's are ``self.loop``

    def _payload(self) -> dict:
        return {"model_config": asdict(self.model.config),
                "train_config": asdict(self.config),
                "vocabulary": list(self.vocabulary.tokens),
                "text_fingerprint": self.text_fingerprint}

    @classmethod
    def resume(cls, path: str | Path, text: str, steps: int | None = None,
               **options) -> LanguageModelTrainer:
        """The run saved at ``path``, on the same text, optionally with more total ``steps``."""
        saved = load_checkpoint(path, KIND)
        with restoring(path, KIND):  # a damaged payload: one error naming the file
            if saved["text_fingerprint"] != fingerprint(text):
                raise ValueError(
                    f"checkpoint {str(path)!r} was trained on other text (fingerprint "
                    f"{saved['text_fingerprint']}, this text {fingerprint(text)}); resume with the "
                    "same file or corpus")
            config = train_config_from_dict(saved["train_config"], f"checkpoint {str(path)!r}")
            if steps is not None:
                config.loop.steps = steps
            vocabulary = Vocabulary(tuple(saved["vocabulary"]), config.level)
            model_config = model_config_from_dict(saved["model_config"],
                                                  f"checkpoint {str(path)!r}")
            trainer = cls(model_config, config, vocabulary, text, path, **options)
            trainer.load_state_dict(saved)
            return trainer


Trainer = LanguageModelTrainer  # the lm app's name for its run
