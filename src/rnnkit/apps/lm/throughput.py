"""Training throughput of a language model on rnnkit against the same model on torch.nn.

Both models (same configuration, same initial weights: rnnkit's plain layers draw torch.nn's)
train on the same windows, in alternating blocks of steps within one process, and each block's
time is kept; the report is the median characters (tokens) per second of each and their ratio.

A cell torch.nn does not have (minGRU, minLSTM) runs against its family's peer in rnnkit
(`rnnkit.apps.recurrent.StackFamily.peer`: GRU, LSTM) with the same sizes, on the peer's
``auto`` engine; `peer_of` says which, and the report's names say so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from rnnkit.apps.lm.corpus import Vocabulary
from rnnkit.apps.lm.model import ModelConfig
from rnnkit.apps.lm.train import TrainConfig, Trainer
from rnnkit.apps.recurrent import FAMILIES, RecurrentConfig


def peer_of(recurrent: RecurrentConfig) -> tuple[str, RecurrentConfig]:
    """(name, config) of what ``recurrent``'s stack is timed against: the same on torch.nn, or
    where torch.nn has no such layer its family's peer in rnnkit, same sizes, engine auto."""
    family = FAMILIES[recurrent.family]
    if family.torch_nn:
        return "torch.nn", replace(recurrent, backend="torch.nn")
    peer = replace(recurrent.with_cell(family.peer), backend="auto")
    return f"rnnkit {family.peer}", peer


def compare_throughput(model_config: ModelConfig, config: TrainConfig, text: str,
                       blocks: int = 7, steps_per_block: int = 10) -> dict[str, float]:
    """Median tokens per second of rnnkit's model and its peer's (`peer_of`), and the ratio."""
    vocabulary = Vocabulary.build(text, config.level, config.max_vocabulary)
    model_config = replace(model_config, vocabulary_size=len(vocabulary))
    cell = model_config.recurrent.cell
    peer_name, peer = peer_of(model_config.recurrent)
    timed = "rnnkit" if peer_name == "torch.nn" else f"rnnkit {cell}"
    contenders = {
        timed: Trainer(model_config, config, vocabulary, text, None),
        peer_name: Trainer(replace(model_config, recurrent=peer), config, vocabulary, text, None),
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
    result = {f"{key} tokens/s": statistics.median(values) for key, values in rates.items()}
    result[f"{timed} x {peer_name} throughput"] = (result[f"{timed} tokens/s"]
                                                   / result[f"{peer_name} tokens/s"])
    return result
