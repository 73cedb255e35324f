"""The mask sampler (`rnnkit.engine.masks`): the law of its entries from both sources of bits,
the native SplitMix64 kernel against the readable version (itself against published values),
reproducibility, and torch.compile drawing the same masks as eager."""

from __future__ import annotations

import pytest
import torch

from rnnkit.engine import masks, native

NATIVE = native.why_not(torch.zeros(1)) is None
needs_native = pytest.mark.skipif(not NATIVE, reason="the native kernels could not be built here")
SOURCES = ["torch", pytest.param("native", marks=needs_native)]


@pytest.fixture
def source(request, monkeypatch):
    """Run the test with the named source of bits: the native kernel for any mask of 2+
    entries, or torch's generator for every mask."""
    monkeypatch.setattr(masks, "NATIVE_MIN_ENTRIES", 2 if request.param == "native" else 2**62)
    return request.param


def test_splitmix64_gives_the_published_sequence():
    # Rosetta Code, "Pseudo-random numbers/Splitmix64": state 1234567, the first five outputs.
    assert masks.splitmix64(1234567, 5) == [
        0x599ED017FB08FC85, 0x2C73F08458540FA5, 0x883EBCE5A3F27C77, 0x3FBEF740E9177B3F,
        0xE3B8346708CB5ECD]


@needs_native
@pytest.mark.parametrize("seed", [0, 1234567, -(2**63), 2**63 - 1, -5])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.97])
def test_the_native_kernel_equals_the_readable_splitmix64(seed, p):
    shape = (3, 7, 11)  # 231 entries: an odd count, the last draw half used
    mask = torch.ops.rnnkit.native_bernoulli(torch.tensor(seed), list(shape), p, False)
    draws = masks.splitmix64(seed % 2**64, 116)
    threshold = round(p * 2**32)
    halves = [half for bits in draws for half in (bits & 0xFFFFFFFF, bits >> 32)][:231]
    expected = torch.tensor([1.0 if u < threshold else 0.0 for u in halves]).view(shape)
    assert mask.dtype == torch.float32 and mask.shape == shape
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("source", SOURCES, indirect=True)
@pytest.mark.parametrize("p", [0.03, 0.25, 0.5, 0.9])
def test_entries_keep_their_rate_with_independent_neighbours(source, p):
    """Each 64-bit draw gives two neighbouring entries: both, and the pairs they form, must
    follow Bernoulli(p) (a correlated half would show in the joint rate)."""
    torch.manual_seed(1)
    draws = 1_000_001  # odd: the last pair is half used
    mask = masks.bernoulli((draws,), p, torch.zeros(()))
    assert mask.shape == (draws,) and set(mask.unique().tolist()) <= {0.0, 1.0}
    bound = 5 * (p * (1 - p) / (draws / 2)) ** 0.5  # five standard deviations
    assert abs(mask[0::2].mean().item() - p) < bound
    assert abs(mask[1::2].mean().item() - p) < bound
    both = (mask[:-1:2] * mask[1::2]).mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (draws / 2)) ** 0.5
    # Consecutive draws too (the kernel's counter steps by one).
    following = (mask[1:-1:2] * mask[2::2]).mean().item()
    assert abs(following - p * p) < 5 * (p * p * (1 - p * p) / (draws / 2)) ** 0.5


@pytest.mark.parametrize("source", SOURCES, indirect=True)
def test_masks_follow_torch_seed_and_dtype(source):
    like = torch.zeros((), dtype=torch.float64)
    torch.manual_seed(3)
    first = masks.bernoulli((40, 50), 0.5, like)
    second = masks.bernoulli((40, 50), 0.5, like)
    torch.manual_seed(3)
    assert torch.equal(masks.bernoulli((40, 50), 0.5, like), first)
    assert not torch.equal(first, second)
    assert first.dtype == torch.float64
    # Degenerate rates round to the certain outcome; empty shapes stay empty.
    assert not masks.bernoulli((3, 5), 1e-12, like).any()
    assert masks.bernoulli((3, 5), 1 - 1e-12, like).all()
    assert masks.bernoulli((0, 4), 0.5, like).shape == (0, 4)


def test_half_precision_masks_come_from_torch_s_generator():
    mask = masks.bernoulli((200, 200), 0.5, torch.zeros((), dtype=torch.float16))
    assert mask.dtype == torch.float16 and 0.45 < mask.float().mean().item() < 0.55


@pytest.mark.parametrize("source", SOURCES, indirect=True)
def test_compiled_masks_equal_eager_ones(source):
    def draw(x):
        return x * masks.bernoulli(tuple(x.shape), 0.7, x)

    x = torch.ones(64, 16, 17)
    torch.manual_seed(11)
    eager = draw(x)
    torch._dynamo.reset()
    torch.manual_seed(11)
    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)
