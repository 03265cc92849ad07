"""tiny-cnn / tiny-vit: seeded determinism, shapes, the encoder contract and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from fsmllm.encoders import load_encoder
from fsmllm.encoders.tiny import TinyCNNEncoder, TinyViTEncoder

NAMES = ["tiny-cnn", "tiny-vit"]


def batch(size: int = 32, count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_encoder_without_touching_the_global_rng(name: str) -> None:
    state = torch.get_rng_state()
    first, second = load_encoder(name, seed=3), load_encoder(name, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    x = batch()
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
        assert not torch.allclose(first(x), load_encoder(name, seed=4)(x))


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("tiny-cnn", {}, (4, 16)),
        ("tiny-cnn", {"image_size": 48, "grid": 3, "width": 8}, (9, 8)),
        ("tiny-vit", {}, (17, 16)),
        ("tiny-vit", {"image_size": 48, "patch_size": 8, "width": 24, "heads": 3}, (37, 24)),
    ],
)
def test_shapes(name: str, kwargs: dict, shape: tuple[int, int]) -> None:
    encoder = load_encoder(name, **kwargs)
    size = kwargs.get("image_size", 32)
    assert encoder.image_size == size and (encoder.num_tokens, encoder.token_dim) == shape
    assert encoder.feature_dim == math.prod(shape)
    with torch.no_grad():
        tokens = encoder(batch(size, count=2))
    assert tokens.shape == (2, *shape) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", NAMES)
def test_frozen_but_differentiable_in_the_pixels(name: str) -> None:
    encoder = load_encoder(name)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    x = batch(count=1).requires_grad_(True)
    encoder(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_noisy_pixels_outside_the_unit_box_are_accepted(name: str) -> None:
    """The smoothed encoder feeds x + δ unclamped (method.md), so values outside [0, 1] must pass."""
    encoder = load_encoder(name)
    x = batch() + 0.5 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert x.min() < 0 and x.max() > 1
    with torch.no_grad():
        assert torch.isfinite(encoder(x)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.rand(3, 32, 32), r"got one image \(3, 32, 32\); add a batch dimension"),
        (torch.rand(2, 3, 16, 16), r"expected pixels \[B, 3, 32, 32\].*got \(2, 3, 16, 16\)"),
        (torch.rand(2, 1, 32, 32), r"expected pixels \[B, 3, 32, 32\].*got \(2, 1, 32, 32\)"),
        (torch.rand(2, 32, 32, 3), r"expected pixels \[B, 3, 32, 32\].*got \(2, 32, 32, 3\)"),
        (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), r"floating-point pixels in \[0, 1\].*uint8.*255"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN or infinite"),
        (torch.ones(2, 3, 32, 32).index_put_((torch.tensor(1),), torch.tensor(float("inf"))), "NaN or infinite"),
    ],
)
def test_invalid_pixels_are_rejected_with_a_clear_message(name: str, pixels: torch.Tensor, message: str) -> None:
    encoder = load_encoder(name)
    with pytest.raises(ValueError, match=message):
        encoder(pixels)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (TinyCNNEncoder, {"image_size": 4}, "at least 4 \\* grid = 8"),
        (TinyViTEncoder, {"image_size": 30}, "multiple of patch_size=8"),
        (TinyViTEncoder, {"width": 10, "heads": 3}, "not divisible by heads"),
    ],
)
def test_invalid_construction(factory, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)
