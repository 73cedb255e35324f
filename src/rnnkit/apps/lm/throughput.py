"""Training throughput of a language model on rnnkit against the same model on torch.nn.

Both models (same configuration, same initial weights: rnnkit's plain layers draw torch.nn's)
train on the same windows, in alternating blocks of steps within one process, and each block's
time is kept; the report is the median characters (tokens) per second of each and their ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from rnnkit.apps.lm.corpus import Vocabulary
from rnnkit.apps.lm.model import ModelConfig
from rnnkit.apps.lm.train import TrainConfig, Trainer


def compare_throughput(model_config: ModelConfig, config: TrainConfig, text: str,
                       blocks: int = 7, steps_per_block: int = 10) -> dict[str, float]:
    """Median tokens per second of rnnkit's model and torch.nn's, and rnnkit's ratio."""
    vocabulary = Vocabulary.build(text, config.level, config.max_vocabulary)
    model_config = replace(model_config, vocabulary_size=len(vocabulary))
    contenders = {
        "rnnkit": Trainer(model_config, config, vocabulary, text, None),
        "torch.nn": Trainer(
            replace(model_config, recurrent=replace(model_config.recurrent, backend="torch.nn")),
            config, vocabulary, text, None),
    }
    tokens = steps_per_block * config.seq_len * config.batch_size
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for block in range(blocks + 1):  # block 0 warms both up and is not counted
        for name, trainer in contenders.items():
            started = time.perf_counter()
            for _ in range(steps_per_block):
                trainer.train_step()
            if block:
                rates[name].append(tokens / (time.perf_counter() - started))
    result = {f"{name} tokens/s": statistics.median(values) for name, values in rates.items()}
    result["rnnkit x torch.nn throughput"] = result["rnnkit tokens/s"] / result["torch.nn tokens/s"]
    return result
