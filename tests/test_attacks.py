"""The PGD attack's own contract: stays in the ball and the box, validates its input, restarts only help."""

from __future__ import annotations

import pytest
import torch

from fsmllm.attacks import feature_attack, pgd_l2, unit_features
from fsmllm.encoders import load_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("tiny-vit", image_size=16, patch_size=4)


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))


def cosine_after_attack(encoder, x: torch.Tensor, attacked: torch.Tensor) -> float:
    with torch.no_grad():
        clean, moved = unit_features(encoder, torch.stack([x, attacked]))
    return float(clean @ moved)


@pytest.mark.parametrize("restarts", [1, 3])
def test_attack_stays_in_the_ball_and_the_box(encoder, restarts: int) -> None:
    x = image()
    for eps in (0.1, 1.0, 5.0):
        attacked = feature_attack(encoder, x, eps, steps=5, seed=1, restarts=restarts)
        assert attacked.shape == x.shape
        assert float((attacked - x).norm()) <= eps * (1 + 1e-5)
        assert attacked.min() >= 0 and attacked.max() <= 1


def test_restarts_never_do_worse_and_one_restart_is_the_plain_attack(encoder) -> None:
    for seed in range(4):
        x = image(seed)
        single = feature_attack(encoder, x, 0.5, steps=4, seed=seed)
        assert torch.equal(single, feature_attack(encoder, x, 0.5, steps=4, seed=seed, restarts=1))
        several = feature_attack(encoder, x, 0.5, steps=4, seed=seed, restarts=3)
        assert cosine_after_attack(encoder, x, several) <= cosine_after_attack(encoder, x, single) + 1e-6


def test_zero_radius_returns_the_clean_image(encoder) -> None:
    x = image()
    assert torch.equal(feature_attack(encoder, x, 0.0), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "at least 1"), ({"restarts": 0}, "at least 1"), ({"x": torch.full((3, 4, 4), 2.0)}, r"\[0, 1\]")],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    arguments = {"loss": lambda candidate: candidate.sum(), "x": torch.rand(3, 4, 4), "eps": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        pgd_l2(**arguments)
