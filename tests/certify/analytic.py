"""Encoders whose smoothed feature F and worst case over an l2 ball are known in closed form.

Each depends on x only through ``z = <w, x>`` with ``||w|| = 1``, so under ``δ ~ N(0, σ² I)``,
``z + <w, δ> ~ N(z, σ²)``, and an l2 perturbation of norm ≤ ε can move z by at most ε (and by exactly ±ε
along ±w). That reduces every smoothed quantity to one-dimensional Gaussian integrals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

SHAPE = (3, 4, 4)  # a tiny "image": the maths does not depend on the dimension


def unit_direction(seed: int) -> torch.Tensor:
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (w / w.norm()).float()


def point_at(w: torch.Tensor, z: float, offset_seed: int = 0) -> torch.Tensor:
    """An input x with <w, x> = z, plus a component orthogonal to w (which must not matter)."""
    other = torch.randn(SHAPE, generator=torch.Generator().manual_seed(offset_seed + 1))
    other = other - (other * w).sum() * w
    return z * w + 0.3 * other


@dataclass
class TwoValueEncoder:
    """``f(x) = e1`` if ``<w, x> > b`` else ``v = (cos θ, sin θ)``: a step between two unit features.

    With p = Φ((z − b)/σ): ``F(x) = p e1 + (1 − p) v``. Moving x within the ε-ball moves p anywhere in
    ``[Φ((z − b − ε)/σ), Φ((z − b + ε)/σ)]``; F stays on the segment [v, e1], whose direction turns
    monotonically with p, so the worst cosine to F(x) is at one end of that interval. θ = π gives the
    sign encoder ``±e1``, for which the Lipschitz lemma (and so the direction bound) is exactly tight.
    """

    w: torch.Tensor
    b: float
    theta: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1).double() @ self.w.reshape(-1).double()
        e1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
        v = torch.tensor([math.cos(self.theta), math.sin(self.theta)], dtype=torch.float64)
        return torch.where((z > self.b)[:, None], e1, v).float()

    def smoothed(self, z: float, sigma: float) -> np.ndarray:
        p = norm.cdf((z - self.b) / sigma)
        return p * np.array([1.0, 0.0]) + (1 - p) * np.array([math.cos(self.theta), math.sin(self.theta)])

    def worst_cosine(self, z: float, sigma: float, eps: float) -> float:
        clean = self.smoothed(z, sigma)
        return min(cosine(clean, self.smoothed(z + shift, sigma)) for shift in (-eps, eps))

    def worst_projection(self, z: float, sigma: float, eps: float, u: np.ndarray) -> float:
        """min over the ε-ball of <F(x'), u>: linear in p, so again at an end of the interval."""
        return min(float(self.smoothed(z + shift, sigma) @ u) for shift in (-eps, eps))


@dataclass
class RotationEncoder:
    """``f(x) = (cos(a<w,x>), sin(a<w,x>))``: ``F(x) = e^{−a²σ²/2} (cos az, sin az)``, so S = e^{−a²σ²/2}
    and the worst-case cosine between F(x) and F(x') over the ε-ball is ``cos(a ε)`` (for a ε ≤ π)."""

    w: torch.Tensor
    a: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1).double() @ self.w.reshape(-1).double()
        return torch.stack([torch.cos(self.a * z), torch.sin(self.a * z)], dim=1).float()

    def smoothed(self, z: float, sigma: float) -> np.ndarray:
        return math.exp(-((self.a * sigma) ** 2) / 2) * np.array([math.cos(self.a * z), math.sin(self.a * z)])

    def score(self, sigma: float) -> float:
        return math.exp(-((self.a * sigma) ** 2) / 2)

    def worst_cosine(self, eps: float) -> float:
        return math.cos(min(self.a * eps, math.pi))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class TokenRotationEncoder:
    """T tokens, token t = ``scale_t · (cos(a_t <w,x>), sin(a_t <w,x>))``: each token normalised on its own is a
    :class:`RotationEncoder` with rate a_t, so ``S_t = e^{−a_t²σ²/2}`` and token t's worst-case cosine over the
    ε-ball is ``cos(a_t ε)``. The scales only matter to the *global* (flattened) feature, where a token with a
    small scale barely counts: the case token-level certificates exist for."""

    w: torch.Tensor
    rates: tuple[float, ...]
    scales: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1).double() @ self.w.reshape(-1).double()
        rates = torch.tensor(self.rates, dtype=torch.float64)
        scales = torch.tensor(self.scales, dtype=torch.float64)
        angle = z[:, None] * rates[None]
        return (scales[None, :, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=2)).float()

    def score(self, token: int, sigma: float) -> float:
        return math.exp(-((self.rates[token] * sigma) ** 2) / 2)

    def worst_cosine(self, token: int, eps: float) -> float:
        return math.cos(min(self.rates[token] * eps, math.pi))
