"""The certificate of one image (:class:`Certificate`): the certified and served FCSB at each radius from the
score's lower confidence bound (method.md, "Estimating it soundly", steps 3 and 4), per token when asked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from fsmllm.certify.bounds import (
    certified_radius,
    fcsb,
)
from fsmllm.certify.classify import PredictionCertificate
from fsmllm.certify.config import (
    SmoothingConfig,
    StopReason,
    StopRule,
)


def optional_floats(values: np.ndarray) -> tuple[float | None, ...]:
    """The values as floats, NaN (nothing certified there) as None."""
    return tuple(None if math.isnan(v) else float(v) for v in values)


def certified_fcsb(score_lower: float, sigma: float, radii: np.ndarray) -> np.ndarray:
    """The direct bound FCSB(p̲, σ, ε) where it is positive, NaN (abstain) elsewhere (method.md step 3)."""
    bound = fcsb(min(max(score_lower, 0.0), 1.0), sigma, radii)
    return np.where((score_lower > 0) & (bound > 0), bound, np.nan)


def served_fcsb(certified: np.ndarray, offset: float) -> np.ndarray:
    """``cos(arccos b + θ)``: the bound b on the cosine to û moved to a vector at the known angle θ from û;
    NaN where b is not positive or the angles add past π/2 (method.md step 3)."""
    angle = np.arccos(np.clip(certified, -1.0, 1.0)) + offset
    return np.where(np.isfinite(certified) & (angle < np.pi / 2), np.cos(angle), np.nan)


@dataclass(frozen=True)
class TokenBounds:
    """Per-token numbers of a ``token`` certificate (index t = the encoder's token t)."""

    score_estimate: tuple[float, ...]
    score_lower: tuple[float, ...]
    served_angle: tuple[float, ...]


@dataclass(frozen=True)
class InterimCertificate:
    """The certificate valid so far while an anytime-valid bound samples on (a progress report's): after ``n``
    estimation samples, the best lower bound ``score_lower`` over the checkpoints passed (the worst token's for
    token granularity) and the certified FCSB it gives at each of ``radii`` (None: nothing certified there)."""

    n: int
    score_lower: float
    radii: tuple[float, ...]
    certified_fcsb: tuple[float | None, ...]


@dataclass(frozen=True)
class Certificate:
    """Everything one certification established, reproducible from ``(image, config, stop rule, seed)``.

    F is the smoothed encoder, û the direction fixed by the selection samples, F̂ the Monte Carlo mean of the
    n0 + n used samples (what the language model reads). With probability ≥ 1 − α, jointly:

    * ``score_lower`` = p̲ ≤ ``<F(x), û>`` ≤ S(x) = ||F(x)||;
    * ``certified_fcsb[i]``: ``cos(F(x), F(x')) ≥`` this for every ``||x' − x|| ≤ radii[i]`` (the direct bound);
    * ``served_fcsb[i]``: ``cos(F̂, F(x')) ≥`` this for the same x' (the features handed to the language
      model, ``served_angle`` = ∠(û, F̂) radians away from û);
    * ``prediction`` (with a classifier): its own statement; α is then split in halves between the two.

    With ``granularity == "token"`` every token t is smoothed on its own (F_t, û_t, F̂_t; method.md, "Token-level
    certificates") and the statements hold for every token at once (α split over the T tokens): the headline
    numbers are the worst token's (``worst_token``; ``served_fcsb`` the smallest over the tokens), ``tokens``
    has each token's score bounds and served angle.

    ``score_estimate`` (an estimate of S(x)) and ``estimated_fcsb`` (the paper's FCSB at that estimate) are
    *not* certified. ``None`` in a certified list means abstention at that radius; ``abstain`` means no
    requested radius is certified. ``n`` is the number of estimation samples used, ``stopped_by`` why
    sampling ended ("budget", "target_reached", "target_unreachable", "radius_converged"). ``samples`` holds the
    c_i the score bounds were computed from, float64 [n, T] (T = 1 for a global certificate), so that
    :func:`~fsmllm.certify.replay.score_lower` recomputes ``score_lower`` from them bit for bit.
    """

    config: SmoothingConfig
    seed: int
    radii: tuple[float, ...]
    n: int
    stopped_by: StopReason
    score_estimate: float
    score_lower: float
    certified_fcsb: tuple[float | None, ...]
    served_fcsb: tuple[float | None, ...]
    estimated_fcsb: tuple[float, ...]
    served_angle: float
    smoothed_feature: torch.Tensor = field(repr=False)
    direction: torch.Tensor = field(repr=False)
    prediction: PredictionCertificate | None = None
    clean_score: float | None = None
    stop: StopRule | None = None
    worst_token: int | None = None
    tokens: TokenBounds | None = field(default=None, repr=False)
    samples: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)

    @property
    def abstain(self) -> bool:
        """True when no requested radius is certified (every ``certified_fcsb`` is None; with no radii asked,
        when the score itself is not certified positive)."""
        if not self.radii:
            return self.score_lower <= 0
        return all(value is None for value in self.certified_fcsb)

    @property
    def score_alpha(self) -> float:
        """The share of α spent on each score bound: halved when a prediction is certified too, split over the
        tokens of a token-level certificate."""
        alpha = self.config.alpha / 2 if self.prediction is not None else self.config.alpha
        return alpha / (len(self.tokens.score_lower) if self.tokens is not None else 1)

    def token_certified_fcsb(self) -> list[list[float | None]]:
        """Per token, the certified FCSB at each radius (a token-level certificate only)."""
        if self.tokens is None:
            raise ValueError("per-token values exist only for a token-level certificate (granularity 'token')")
        radii = np.asarray(self.radii, dtype=np.float64)
        return [
            list(optional_floats(certified_fcsb(lower, self.config.sigma, radii))) for lower in self.tokens.score_lower
        ]

    def certified_radius(self, target_cos: float) -> float | None:
        """Largest ε at which the certified FCSB is still ≥ ``target_cos``: ``σ (Φ⁻¹((1+p̲)/2) − Φ⁻¹((1+c)/2))``
        (0 when c = p̲); None when not even ε = 0 is (c > p̲). For a token-level certificate, p̲ is the worst
        token's: the smallest radius over the tokens."""
        if not 0 <= target_cos < 1:
            raise ValueError(f"target_cos must lie in [0, 1), got {target_cos}")
        if self.score_lower <= 0 or target_cos > self.score_lower:
            return None
        return float(certified_radius(self.score_lower, self.config.sigma, target_cos))


def per_token_features(global_mean: torch.Tensor, token_mean: torch.Tensor) -> torch.Tensor:
    """The features handed to the language model under ``token`` granularity, [..., T, W]: each token's mean
    direction (``token_mean``: the mean of the per-token unit rows) at the norm that token has in the mean of
    the flattened unit features (``global_mean``), which is what the ``global`` path serves, so the model sees
    token magnitudes as it does there (method.md, "Token-level certificates")."""
    directions: torch.Tensor = F.normalize(token_mean, dim=-1)
    norms: torch.Tensor = global_mean.norm(dim=-1, keepdim=True)
    return directions * norms
