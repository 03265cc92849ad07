"""Closed-form bounds of Feature-space Smoothing and the confidence bounds that make them sound.

Notation (method.md, "Objects" and "The bound"): S is the Gaussian robustness score of the encoder at x, σ the
l2 standard deviation of the pixel noise, ε the l2 radius of the perturbation, Φ the standard normal CDF.

* :func:`fcsb` — the feature cosine similarity bound, method.md "The bound" (the paper's FCSB):
  ``FCSB(S, σ, ε) = 2 Φ(Φ⁻¹((1 + S) / 2) − ε / σ) − 1``.
* :func:`certified_radius` — its exact inverse in ε for a target cosine c:
  ``ε*(S, σ, c) = σ (Φ⁻¹((1 + S) / 2) − Φ⁻¹((1 + c) / 2))``.
* :func:`mean_lower_bound` — a one-sided (1 − α) lower confidence bound on the mean of i.i.d. variables
  bounded in [−1, 1] (Hoeffding 1963, or the empirical-Bernstein bound of Maurer & Pontil 2009, Thm. 4).

Everything is vectorised over numpy broadcasting and computed in float64. Φ and Φ⁻¹ come from
``scipy.stats.norm``; the upper-tail forms (``isf``/``sf``) keep precision when S is close to 1.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

BoundMethod = Literal["empirical-bernstein", "hoeffding"]
BOUND_METHODS: tuple[BoundMethod, ...] = ("empirical-bernstein", "hoeffding")


def _check_sigma(sigma: ArrayLike) -> NDArray[np.float64]:
    sigma = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise ValueError(f"sigma must be a positive finite noise level, got {sigma}")
    return sigma


def _check_cosine(value: ArrayLike, name: str) -> NDArray[np.float64]:
    value = np.asarray(value, dtype=np.float64)
    if np.any(np.isnan(value)) or np.any(value < -1) or np.any(value > 1):
        raise ValueError(f"{name} must lie in [-1, 1] (it is a cosine similarity), got {value}")
    return value


def _score_quantile(score: NDArray[np.float64]) -> NDArray[np.float64]:
    """Φ⁻¹((1 + S) / 2), written as the upper-tail quantile of (1 − S) / 2 for precision near S = 1."""
    return norm.isf((1.0 - score) / 2.0)


def fcsb(score: ArrayLike, sigma: ArrayLike, radius: ArrayLike) -> NDArray[np.float64]:
    """Feature cosine similarity bound ``2 Φ(Φ⁻¹((1 + S)/2) − ε/σ) − 1`` (method.md, "The bound").

    For an encoder with unit-norm features and Gaussian robustness score ``S = ||F(x)||``, every x' with
    ``||x' − x||₂ ≤ ε`` has ``cos(F(x), F(x')) ≥ fcsb(S, σ, ε)`` wherever the value is ≥ 0. Applied to any
    lower bound p̲ on ``<F(x), u>`` for a fixed unit u, it lower-bounds ``<F(x'), u>`` (the Lipschitz lemma
    of Salman et al. 2019). Monotone: rises with S and σ, falls with ε, equals S at ε = 0.
    """
    score = _check_cosine(score, "score")
    sigma = _check_sigma(sigma)
    radius = np.asarray(radius, dtype=np.float64)
    if np.any(np.isnan(radius)) or np.any(radius < 0):
        raise ValueError(f"radius must be a non-negative l2 norm, got {radius}")
    # 2Φ(z) − 1 = 1 − 2Φ(−z): the survival form keeps precision when the bound is close to 1.
    return 1.0 - 2.0 * norm.sf(_score_quantile(score) - radius / sigma)


def certified_radius(score: ArrayLike, sigma: ArrayLike, target_cos: ArrayLike) -> NDArray[np.float64]:
    """The largest ε with ``fcsb(S, σ, ε) ≥ c``: ``σ (Φ⁻¹((1 + S)/2) − Φ⁻¹((1 + c)/2))`` (method.md).

    Exact inverse of :func:`fcsb` in ε. Where ``S < c`` no radius (not even 0) certifies the target and the
    result is NaN; ``S = 1`` (noise never moves the feature) gives ``inf``. The target must be in [0, 1):
    a negative cosine is no certificate (the FCSB only holds where it is ≥ 0), and c = 1 is never certifiable
    at a positive radius.
    """
    score = _check_cosine(score, "score")
    sigma = _check_sigma(sigma)
    target = np.asarray(target_cos, dtype=np.float64)
    if np.any(np.isnan(target)) or np.any(target < 0) or np.any(target >= 1):
        raise ValueError(f"target_cos must lie in [0, 1), got {target}")
    radius = sigma * (_score_quantile(score) - _score_quantile(target))
    return np.where(score >= target, radius, np.nan)


def combined_cosine_bound(direction_lower: ArrayLike, shifted_lower: ArrayLike) -> NDArray[np.float64]:
    """Lower bound on ``cos(F(x), F(x'))`` from bounds that both refer to one fixed unit vector û.

    With ``||F|| ≤ 1``, ``<F(x), û> ≥ p̲ > 0`` gives ``angle(F(x), û) ≤ arccos p̲`` and ``<F(x'), û> ≥ b > 0``
    gives ``angle(F(x'), û) ≤ arccos b``; the triangle inequality for angles then gives
    ``cos(F(x), F(x')) ≥ cos(arccos p̲ + arccos b)`` (method.md, "Estimating it soundly", step 3). NaN where
    either input is ≤ 0 or the angles add past π/2: no positive cosine is certified there.
    """
    p = np.asarray(direction_lower, dtype=np.float64)
    b = np.asarray(shifted_lower, dtype=np.float64)
    valid = (p > 0) & (b > 0)
    angle = np.arccos(np.clip(p, -1, 1)) + np.arccos(np.clip(b, -1, 1))
    return np.where(valid & (angle < np.pi / 2), np.cos(angle), np.nan)


def mean_lower_bound(
    total: ArrayLike,
    total_sq: ArrayLike,
    count: int,
    alpha: float,
    method: BoundMethod = "empirical-bernstein",
) -> NDArray[np.float64]:
    """One-sided (1 − α) lower confidence bound on E[c] for i.i.d. c_i ∈ [−1, 1], from running sums.

    ``total = Σ c_i`` and ``total_sq = Σ c_i²`` over ``count`` samples (streaming: no sample is kept).
    The variables are mapped to X = (1 + c) / 2 ∈ [0, 1]; then, with probability ≥ 1 − α,

    * Hoeffding (1963): ``E X ≥ X̄ − sqrt(ln(1/α) / (2n))``;
    * empirical Bernstein (Maurer & Pontil 2009, Theorem 4):
      ``E X ≥ X̄ − sqrt(2 V ln(2/α) / n) − 7 ln(2/α) / (3 (n − 1))`` with V the unbiased sample variance.
      It is far tighter than Hoeffding when the c_i barely vary, the usual case for smoothed encoders.

    Returns the bound mapped back to the c scale (``2 E X − 1``), clipped to [−1, 1].
    """
    if count < 2:
        raise ValueError(f"a confidence bound needs at least 2 samples, got {count}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n = float(count)
    mean_x = (np.asarray(total, dtype=np.float64) / n + 1.0) / 2.0
    if method == "hoeffding":
        lower_x = mean_x - np.sqrt(np.log(1.0 / alpha) / (2.0 * n))
    elif method == "empirical-bernstein":
        mean_sq_c = np.asarray(total_sq, dtype=np.float64) / n
        mean_c = 2.0 * mean_x - 1.0
        # Var(X) = Var(c) / 4; unbiased sample variance from the sums, floored at 0 against rounding.
        variance_x = np.maximum(mean_sq_c - mean_c**2, 0.0) * n / (n - 1.0) / 4.0
        log_term = np.log(2.0 / alpha)
        lower_x = mean_x - np.sqrt(2.0 * variance_x * log_term / n) - 7.0 * log_term / (3.0 * (n - 1.0))
    else:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(BOUND_METHODS)}")
    return np.clip(2.0 * lower_x - 1.0, -1.0, 1.0)


def mean_upper_bound(
    total: ArrayLike,
    total_sq: ArrayLike,
    count: int,
    alpha: float,
    method: BoundMethod = "empirical-bernstein",
) -> NDArray[np.float64]:
    """One-sided (1 − α) upper confidence bound on E[c], c_i ∈ [−1, 1]: the lower bound of −c, negated."""
    return -mean_lower_bound(-np.asarray(total, dtype=np.float64), total_sq, count, alpha, method)


def prediction_radius(top_lower: ArrayLike, runner_up_upper: ArrayLike, sigma: ArrayLike) -> NDArray[np.float64]:
    """Certified l2 radius of a smoothed cosine classifier (method.md, "Prediction-wise certification").

    ``top_lower`` lower-bounds ``<F(x), w_k*>`` and ``runner_up_upper`` upper-bounds the largest other
    ``<F(x), w_j>``. The lemma applied to ``(1 ± <f, w>) / 2`` moves the first down and the second up by at most
    ε/σ in Φ⁻¹ units, so the prediction cannot change while
    ``ε < σ/2 · (Φ⁻¹((1 + top_lower)/2) − Φ⁻¹((1 + runner_up_upper)/2))``. NaN when that is ≤ 0 (abstain).
    """
    lower = _check_cosine(top_lower, "top_lower")
    upper = _check_cosine(runner_up_upper, "runner_up_upper")
    sigma = _check_sigma(sigma)
    radius = sigma / 2.0 * (_score_quantile(lower) - _score_quantile(upper))
    return np.where(radius > 0, radius, np.nan)
