"""Closed-form bounds of Feature-space Smoothing and the confidence bounds that make them sound.

Notation (method.md, "Objects" and "The bound"): S is the Gaussian robustness score of the encoder at x, σ the
l2 standard deviation of the pixel noise, ε the l2 radius of the perturbation, Φ the standard normal CDF.

* :func:`fcsb` — the feature cosine similarity bound, method.md "The bound" (the paper's FCSB):
  ``FCSB(S, σ, ε) = 2 Φ(Φ⁻¹((1 + S) / 2) − ε / σ) − 1``.
* :func:`certified_radius` — its exact inverse in ε for a target cosine c:
  ``ε*(S, σ, c) = σ (Φ⁻¹((1 + S) / 2) − Φ⁻¹((1 + c) / 2))``.
* :func:`mean_lower_bound` — a one-sided (1 − α) lower confidence bound on the mean of i.i.d. variables
  bounded in [−1, 1] (Hoeffding 1963, or the empirical-Bernstein bound of Maurer & Pontil 2009, Thm. 4), from
  running sums, for a number of samples fixed in advance;
* :func:`betting_lower_bound` — the betting confidence sequence of Waudby-Smith & Ramdas (JRSS-B 2023): a
  lower bound that follows the samples' variance and holds at every n simultaneously (anytime-valid), so
  sampling may stop whenever the bound is good enough; :func:`lower_bound` picks a method by name. Given several
  bet caps, its capital is the average of the capitals of each cap (a mixture: :data:`VOTE_TRUNCATIONS`).

Everything is vectorised over numpy broadcasting and computed in float64. Φ and Φ⁻¹ come from
``scipy.stats.norm``; the upper-tail forms (``isf``/``sf``) keep precision when S is close to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import norm

BoundMethod = Literal["betting", "empirical-bernstein", "hoeffding"]
BOUND_METHODS: tuple[BoundMethod, ...] = ("betting", "empirical-bernstein", "hoeffding")
#: the bound methods that hold at every sample count at once (so that sampling may stop early)
ANYTIME_METHODS: tuple[BoundMethod, ...] = ("betting",)
#: bets are capped at c/m (m the candidate mean): capital factors stay ≥ 1 − c > 0 (see betting_lower_bound)
BETTING_TRUNCATION = 0.95
#: the caps of the certified answers' vote bound: the average of the capitals capped at 0.5/m and at 0.95/m. On ±1
#: votes a disagreement multiplies a capital by 1 − c, so 0.95 alone loses most of it to every tenth vote (p̲ 0.7715
#: where 0.5 gives 0.811, 230 of 256 votes agreeing, α 0.001); 0.5 alone needs twice the votes when they all agree
#: (608 instead of 320 to reach 0.977). The mixture is within ln 2 of the better of the two: 0.806 and 352.
VOTE_TRUNCATIONS: tuple[float, ...] = (0.5, BETTING_TRUNCATION)
#: brentq's tolerances on the [0, 1] scale; its root lies within BRENT_XTOL + BRENT_RTOL · root of the exact one
BRENT_XTOL = 1e-13
BRENT_RTOL = 4 * np.finfo(float).eps
#: the methods computable from running sums (Σc, Σc²) alone
SUM_METHODS: tuple[BoundMethod, ...] = ("empirical-bernstein", "hoeffding")


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
    return np.asarray(norm.isf((1.0 - score) / 2.0), dtype=np.float64)


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
    return np.asarray(1.0 - 2.0 * norm.sf(_score_quantile(score) - radius / sigma), dtype=np.float64)


def certified_radius(score: ArrayLike, sigma: ArrayLike, target_cos: ArrayLike) -> NDArray[np.float64]:
    """The largest ε with ``fcsb(S, σ, ε) ≥ c``: ``σ (Φ⁻¹((1 + S)/2) − Φ⁻¹((1 + c)/2))`` (method.md).

    Exact inverse of :func:`fcsb` in ε. ``S = c`` gives 0 (the target holds at the image itself); where
    ``S < c`` no radius (not even 0) certifies the target and the result is NaN; ``S = 1`` (noise never moves
    the feature) gives ``inf``. The target must be in [0, 1):
    a negative cosine is no certificate (the FCSB only holds where it is ≥ 0), and c = 1 is never certifiable
    at a positive radius.
    """
    score = _check_cosine(score, "score")
    sigma = _check_sigma(sigma)
    target = np.asarray(target_cos, dtype=np.float64)
    if np.any(np.isnan(target)) or np.any(target < 0) or np.any(target >= 1):
        raise ValueError(f"target_cos must lie in [0, 1), got {target}")
    radius = np.maximum(sigma * (_score_quantile(score) - _score_quantile(target)), 0.0)
    return np.where(score >= target, radius, np.nan)


def mean_lower_bound(
    total: ArrayLike,
    total_sq: ArrayLike,
    count: int,
    alpha: float,
    method: BoundMethod = "empirical-bernstein",
) -> NDArray[np.float64]:
    """One-sided (1 − α) lower confidence bound on E[c] for i.i.d. c_i ∈ [−1, 1], from running sums.

    For a sample count fixed in advance (not anytime-valid: use :func:`betting_lower_bound` to stop early).

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
    elif method in BOUND_METHODS:
        raise ValueError(f"{method!r} needs the samples, not their sums; sums serve {', '.join(SUM_METHODS)}")
    else:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(BOUND_METHODS)}")
    return np.asarray(np.clip(2.0 * lower_x - 1.0, -1.0, 1.0), dtype=np.float64)


def _check_samples(values: ArrayLike, alpha: float) -> NDArray[np.float64]:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"a confidence bound needs a 1-D array of at least 2 samples, got shape {values.shape}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return np.asarray(np.clip(values, -1.0, 1.0), dtype=np.float64)


def betting_bets(x: NDArray[np.float64], alpha: float, horizon: int | None = None) -> NDArray[np.float64]:
    """The predictable plug-in bets λ_t of Waudby-Smith & Ramdas (2023), one-sided level α.

    For x_t ∈ [0, 1]: ``μ̂_t = (1/2 + Σ_{i≤t} x_i)/(t + 1)``, ``σ̂²_t = (1/4 + Σ_{i≤t} (x_i − μ̂_i)²)/(t + 1)``
    and ``λ_t = sqrt(2 ln(1/α) / (σ̂²_{t−1} t ln(1 + t)))`` (eq. (26)–(27), tuned for every t: the confidence
    sequence), or with a ``horizon`` n ``λ_t = sqrt(2 ln(1/α) / (σ̂²_{t−1} n))`` (§4.1, tuned for t = n: the
    confidence interval). Each bet uses only the samples before it, so either process is a valid capital
    process at every t; the tuning only decides where the bound is tightest. Sequential sums (``np.cumsum``),
    so a prefix of the samples gives a prefix of the bets, bit for bit.
    """
    t = np.arange(1, x.size + 1, dtype=np.float64)
    mean = (0.5 + np.cumsum(x)) / (t + 1.0)
    variance = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1.0)
    previous = np.concatenate(([0.25], variance[:-1]))
    spread = t * np.log1p(t) if horizon is None else float(horizon)
    return np.sqrt(2.0 * math.log(1.0 / alpha) / (previous * spread))


def betting_lower_bound(
    values: ArrayLike,
    alpha: float,
    horizon: int | None = None,
    truncations: Sequence[float] = (BETTING_TRUNCATION,),
) -> float:
    """Anytime-valid one-sided (1 − α) lower confidence bound on E[c] for i.i.d. c_i ∈ [−1, 1] (betting).

    Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting" (JRSS-B 2023), §4, the
    predictable plug-in capital process, one-sided: with x_i = (1 + c_i)/2 ∈ [0, 1] and a candidate mean m,

        K_t(m) = (1/J) Σ_j Π_{i≤t} (1 + min(λ_i, c_j/m) (x_i − m)),   λ_i from :func:`betting_bets`,

    c_1 … c_J the ``truncations`` (one cap by default, :data:`BETTING_TRUNCATION`; the votes of a certified answer
    use :data:`VOTE_TRUNCATIONS`). ``horizon``: tune the bets for that sample count (the planned budget) instead
    of for every t; the bound is anytime-valid either way. For the true mean μ, each product is a non-negative
    martingale (each factor has conditional mean 1, given the past, and is ≥ 1 − c_j > 0 since x_i ≥ 0), and
    so is their average (a fixed mixture of martingales of one filtration, starting at 1), so by Ville's
    inequality P(∃t: K_t(μ) ≥ 1/α) ≤ α. Every factor is non-increasing in m, hence so is K_t, and
    ``L_t = inf{m : K_t(m) < 1/α}`` satisfies P(∃t: μ < L_t) ≤ α: the bound holds at every t at once, so it
    may be evaluated as samples arrive and sampling stopped on any rule. L_t is found by Brent's method on
    ln K_t and lowered by Brent's tolerance (BRENT_XTOL + BRENT_RTOL · root, under 2e-13), so that the value
    returned is never above the exact root. Bets capped at c/m near 1 let the bound approach the limit that no
    valid bound beats when all samples are near S, S − (1 + S)(1 − α^{1/n}). Returns ``2 L_t − 1`` (c scale).
    """
    x = (1.0 + _check_samples(values, alpha)) / 2.0
    caps = np.asarray(truncations, dtype=np.float64)
    if caps.ndim != 1 or caps.size == 0 or np.any(caps <= 0) or np.any(caps >= 1):
        raise ValueError(f"bet caps must lie in (0, 1), got {truncations}")
    bets = betting_bets(x, alpha, horizon)
    # ln of the average capital: ln K = logsumexp_j(ln K_j) − ln J
    threshold = math.log(1.0 / alpha) + math.log(caps.size)

    def log_capital(m: float) -> float:
        logs = np.log1p(np.minimum(bets[None, :], caps[:, None] / m) * (x[None, :] - m)).sum(axis=1)
        # one cap: logsumexp of one value is that value, exactly (and without scipy's per-call overhead)
        return float(logs[0] if logs.size == 1 else logsumexp(logs)) - threshold

    lowest = np.finfo(np.float64).tiny
    if log_capital(lowest) < 0:
        return -1.0
    # at m = 1 every factor is ≤ 1, so ln K_t(1) ≤ 0 < ln(1/α): the root lies in (0, 1)
    root = brentq(log_capital, lowest, 1.0, xtol=BRENT_XTOL, rtol=BRENT_RTOL)
    return float(max(2.0 * (root - BRENT_XTOL - BRENT_RTOL * root) - 1.0, -1.0))


def lower_bound(values: ArrayLike, alpha: float, method: BoundMethod, horizon: int | None = None) -> float:
    """One-sided (1 − α) lower confidence bound on E[c] from the samples c_i ∈ [−1, 1], by ``method``
    (``horizon``: the sample count the betting bound is tuned for; None tunes it for every count)."""
    if method == "betting":
        return betting_lower_bound(values, alpha, horizon)
    values = _check_samples(values, alpha)
    return float(mean_lower_bound(values.sum(), np.square(values).sum(), values.size, alpha, method))


def upper_bound(values: ArrayLike, alpha: float, method: BoundMethod, horizon: int | None = None) -> float:
    """One-sided (1 − α) upper confidence bound on E[c]: the lower bound of −c, negated."""
    return -lower_bound(-np.asarray(values, dtype=np.float64), alpha, method, horizon)


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
