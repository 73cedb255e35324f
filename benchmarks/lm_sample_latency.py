"""Per-token latency of generation with the language model `rnnkit lm sample` builds by
default (2 x 256 LSTM): the model's forward on one-token sequences (how `lm sample` generated
before issue 19) against `LanguageModel.stream` (`LayerStream`: one native call per layer and
token), alternating blocks of 400 tokens in one process, under no_grad, median of 7.

    python benchmarks/lm_sample_latency.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnnkit.apps.lm.model import LanguageModel, ModelConfig

TOKENS = 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocabulary_size=100)).eval()
    tokens = torch.randint(0, 100, (TOKENS,))

    def through_forward() -> None:
        state = None
        for token in tokens:
            _, state = model(token.view(1, 1), state)

    def through_stream() -> None:
        step = model.stream()
        for token in tokens:
            step(token.view(1))

    times: dict[str, list[float]] = {"forward per token": [], "stream per token": []}
    with torch.no_grad():
        through_forward()
        through_stream()
        for _ in range(7):
            for name, run in (("forward per token", through_forward),
                              ("stream per token", through_stream)):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / TOKENS)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    for name, ms in medians.items():
        print(f"{name:18s} {ms:.3f} ms")
    print(f"stream / forward: {medians['stream per token'] / medians['forward per token']:.2f}")


if __name__ == "__main__":
    main()
