"""Generating text from a trained language model: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from rnnkit.apps.lm.corpus import Vocabulary
from rnnkit.apps.lm.model import LanguageModel


def next_token_distribution(logits: Tensor, temperature: float, top_k: int | None,
                            top_p: float | None) -> Tensor:
    """Probabilities ``(V,)`` from one step's logits after temperature, top-k and top-p.

    Temperature 0 is greedy: all mass on the most likely token. Any other temperature divides
    the logits *after* the largest is subtracted, in float64: the scaled logits are then at most
    0, so a tiny temperature sends every other token to -inf (probability 0) instead of
    overflowing to inf - inf = nan, and tends to greedy as it should. ``top_p`` keeps the
    smallest set of most likely tokens whose mass reaches it, never fewer than one: ``top_p=0``
    keeps the single most likely token (greedy), ``top_p=1`` (or None) keeps them all.
    """
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's logits are not finite (nan or inf): its weights are "
                         "damaged; retrain or use another checkpoint")
    if temperature == 0:
        probabilities = torch.zeros_like(logits)
        probabilities[int(logits.argmax())] = 1.0
        return probabilities
    shifted = logits.double() - logits.max().double()  # (V,), all <= 0, the largest exactly 0
    scaled = shifted / temperature
    if top_k is not None and top_k < scaled.numel():
        threshold = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(probabilities, descending=True)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        outside = ordered.cumsum(0) - ordered >= top_p
        outside[0] = False
        ordered = ordered.masked_fill(outside, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        probabilities = probabilities / probabilities.sum()
    return probabilities.to(logits.dtype)


@torch.no_grad()
def generate(model: LanguageModel, vocabulary: Vocabulary, prime: str, length: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None) -> Iterator[str]:
    """Yield ``length`` generated tokens (as text) after reading ``prime``."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.eval()
    ids, _ = vocabulary.encode(prime) if prime else (torch.zeros(1, dtype=torch.int64), 0)
    logits, state = model(ids.view(-1, 1))  # (T, 1, V)
    last = logits[-1, 0]
    step = model.stream(state)  # then one token at a time
    for _ in range(length):
        probabilities = next_token_distribution(last, temperature, top_k, top_p)
        token = int(torch.multinomial(probabilities, 1, generator=generator))
        yield vocabulary.tokens[token]
        last = step(torch.tensor([token]))[0]
