"""Attacks that try to break the certificate: PGD within the certified radius on the smoothed encoder.

The observed cosine between the clean and attacked smoothed features (each estimated from many samples)
must not fall below the certified FCSB; a small tolerance covers the Monte Carlo error of that observation
only. A control shows that the attack has teeth: on an encoder whose worst case is known in closed form it
reaches that worst case, so a certificate that claimed more than the truth would be caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsmllm.attacks import feature_attack, smoothed_feature
from fsmllm.certify import SmoothedEncoder, SmoothingConfig

from .analytic import RotationEncoder

OBSERVATION_TOLERANCE = 0.01


def sensitive_net() -> torch.nn.Module:
    """A random conv net with a strong gain, so that small perturbations move its features a lot."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 32),
    ).eval()
    with torch.no_grad():
        net[0].weight.mul_(8.0)
    return net.requires_grad_(False)


def test_pgd_cannot_push_the_smoothed_cosine_below_the_certificate() -> None:
    net = sensitive_net()
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, radii = 0.25, [0.1, 0.25]
    config = SmoothingConfig(sigma, n0=100, n=2000, alpha=0.001)
    cert = SmoothedEncoder(net, batch_size=500).certify(x, config, radii, seed=0)
    clean = smoothed_feature(net, x, sigma, n=4000, seed=1, batch_size=1000)
    for eps, certified in zip(radii, cert.certified_fcsb):
        assert certified is not None
        attacked = feature_attack(net, x, eps, sigma=sigma, samples=32, steps=25, seed=2)
        assert (attacked - x).norm() <= eps * (1 + 1e-5) and attacked.min() >= 0 and attacked.max() <= 1
        observed = F.cosine_similarity(clean, smoothed_feature(net, attacked, sigma, 4000, seed=3, batch_size=1000), dim=0)
        assert float(observed) >= certified - OBSERVATION_TOLERANCE, (eps, float(observed), certified)


def test_the_attack_finds_the_known_worst_case() -> None:
    """Rotation encoder in 768 dimensions: the worst case over the ball is cos(a ε), reached along w only.

    PGD on the Monte Carlo smoothed encoder must find it (so a certificate claiming more would be caught),
    and the certificate must stay below it.
    """
    w = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    w = w / w.norm()
    encoder = RotationEncoder(w, a=2.0)
    x = (0.5 + 0.1 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    sigma, radii = 0.25, [0.05, 0.1, 0.2]
    cert = SmoothedEncoder(encoder, batch_size=2000).certify(x, SmoothingConfig(sigma, n0=100, n=4000), radii, seed=0)
    clean = smoothed_feature(encoder, x, sigma, n=20000, seed=1, batch_size=5000)
    for eps, certified in zip(radii, cert.certified_fcsb):
        attacked = feature_attack(encoder, x, eps, sigma=sigma, samples=64, steps=30, seed=2)
        observed = F.cosine_similarity(clean, smoothed_feature(encoder, attacked, sigma, 20000, 3, 5000), dim=0)
        assert float(observed) == pytest.approx(encoder.worst_cosine(eps), abs=0.02)
        assert certified is None or certified <= float(observed) + OBSERVATION_TOLERANCE
    assert None not in cert.certified_fcsb[:2]
