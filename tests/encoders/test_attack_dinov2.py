"""PGD on the real DINOv2-S (112 px) against its certificate (the pattern of tests/certify/test_attack.py).

The attack is first shown to have teeth on the base encoder (a perturbation of l2 norm 1 over the 37 632 pixel
values turns the feature far away, where a random one of the same norm does nothing). On the Monte Carlo
smoothed encoder, the cosine between clean and attacked smoothed features, each estimated from fresh samples,
must stay above the certified FCSB, and the projection on the certified direction above the direction bound;
the tolerance covers only the Monte Carlo error of that observation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsmllm.attacks import feature_attack, smoothed_feature, unit_features
from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.encoders.dinov2_imgfocus import Dinov2Encoder

from .photos import photo

OBSERVATION_TOLERANCE = 0.01
SIGMA = 0.25
RADII = [0.1, 0.2]  # certified FCSB about 0.44 and 0.20 here; 0.25 would be barely positive


@pytest.fixture(scope="module")
def encoder(dinov2_backbone) -> Dinov2Encoder:
    return Dinov2Encoder(image_size=112, model=dinov2_backbone)


@pytest.fixture(scope="module")
def cat() -> torch.Tensor:
    return photo("chelsea", 112)


def random_perturbation(x: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + eps * direction / direction.norm()).clamp(0, 1)


def test_the_attack_breaks_the_base_encoder(encoder, cat) -> None:
    eps = 1.0
    attacked = feature_attack(encoder, cat, eps, steps=10, seed=0, restarts=3)  # one start can stall
    assert (attacked - cat).norm() <= eps * (1 + 1e-5) and attacked.min() >= 0 and attacked.max() <= 1
    with torch.no_grad():
        images = torch.stack([cat, attacked, random_perturbation(cat, eps, 1)])
        clean, adversarial, noise = unit_features(encoder, images)
    assert float(clean @ noise) > 0.99  # a random direction barely moves the feature
    assert float(clean @ adversarial) < 0.5, float(clean @ adversarial)  # PGD turns it far away


@pytest.mark.slow
def test_pgd_cannot_push_smoothed_dinov2_below_its_certificate(encoder, cat) -> None:
    config = SmoothingConfig(SIGMA, n0=50, n=500, alpha=0.001)
    cert = SmoothedEncoder(encoder, batch_size=64).certify(cat, config, RADII, seed=0)
    assert None not in cert.certified_fcsb, cert  # the comparison below is not vacuous
    clean = smoothed_feature(encoder, cat, SIGMA, n=256, seed=1)
    served = cert.smoothed_feature
    for eps, certified, served_bound in zip(RADII, cert.certified_fcsb, cert.served_fcsb):
        attacked = feature_attack(encoder, cat, eps, sigma=SIGMA, samples=8, steps=8, seed=2)
        assert (attacked - cat).norm() <= eps * (1 + 1e-5) and attacked.min() >= 0 and attacked.max() <= 1
        moved = smoothed_feature(encoder, attacked, SIGMA, n=256, seed=3)
        observed = float(F.cosine_similarity(clean, moved, dim=0))
        assert observed >= certified - OBSERVATION_TOLERANCE, (eps, observed, certified)
        projection = float(moved @ cert.direction)  # the lemma with u = û bounds this by the same number
        assert projection >= certified - OBSERVATION_TOLERANCE, (eps, projection, certified)
        to_served = float(F.cosine_similarity(served, moved, dim=0))  # what the language model read, vs F(x')
        assert to_served >= served_bound - OBSERVATION_TOLERANCE, (eps, to_served, served_bound)
    # at the largest radius the attack moves the smoothed feature more than a random perturbation does
    # (same noise samples for both, so the comparison is not drowned in Monte Carlo error)
    unattacked = smoothed_feature(encoder, random_perturbation(cat, RADII[-1], 4), SIGMA, n=256, seed=3)
    assert observed < float(F.cosine_similarity(clean, unattacked, dim=0))
