"""Coverage tests with shown power: the harness that accepts each confidence bound must reject the same bound
with half of its margin.

A coverage test that only rejects a bound with *no* margin (the sample mean) says little: a bound with half
the right margin fails its α several times over and would still pass a weak harness. Here the harness is
written once, against ``mean_lower_bound(total, total_sq, count, alpha, method)`` /
``mean_upper_bound(...)``, and run for every method computed from running sums. Samples are two-point
(c ∈ {−1, +1}), the distribution with the largest variance, where these bounds are least conservative; the
running sums of n such samples are drawn exactly from a binomial, so 20 000 repetitions of n = 10 000 cost
milliseconds. The verdict is one-sided binomial at 1e-6: a valid bound fails fewer than ``allowed`` times
with overwhelming probability, and the seeds are fixed anyway.

A bound that needs the samples themselves (not their sums) needs a harness that draws them; extend
``METHODS`` only with methods that ``mean_lower_bound`` computes from sums.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import binom

from fsmllm.certify.bounds import mean_lower_bound, mean_upper_bound

METHODS = ("hoeffding", "empirical-bernstein")
REPETITIONS = 20_000
COUNT = 10_000
ALPHA = 0.01

#: lower(total, total_sq, count, alpha) -> lower bounds on the mean of c, one per repetition
Bound = Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]


def sums(p: float, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Running sums of COUNT samples c ∈ {−1, +1} with P(c = 1) = p, per repetition, and the true mean."""
    ones = np.random.default_rng(seed).binomial(COUNT, p, size=REPETITIONS)
    total = (2 * ones - COUNT).astype(np.float64)
    return total, np.full(REPETITIONS, float(COUNT)), 2 * p - 1


def failures(lower: Bound, p: float, seed: int) -> int:
    """How many of the REPETITIONS lower bounds lie above the true mean."""
    total, total_sq, truth = sums(p, seed)
    return int(np.sum(lower(total, total_sq, COUNT, ALPHA) > truth))


ALLOWED = int(binom.isf(1e-6, REPETITIONS, ALPHA))


def method_bound(method: str) -> Bound:
    return lambda total, total_sq, count, alpha: mean_lower_bound(total, total_sq, count, alpha, method)  # type: ignore[arg-type]


def half_margin(bound: Bound) -> Bound:
    """The same bound, half as far below the sample mean."""

    def lower(total: np.ndarray, total_sq: np.ndarray, count: int, alpha: float) -> np.ndarray:
        mean = total / count
        return mean - 0.5 * (mean - bound(total, total_sq, count, alpha))

    return lower


@pytest.mark.parametrize("p", [0.5, 0.8])
@pytest.mark.parametrize("method", METHODS)
def test_the_lower_bound_covers_and_half_its_margin_does_not(method: str, p: float) -> None:
    right = failures(method_bound(method), p, seed=1)
    halved = failures(half_margin(method_bound(method)), p, seed=1)
    assert right <= ALLOWED, f"{method}: {right}/{REPETITIONS} bounds above the truth (allowed {ALLOWED})"
    assert halved > ALLOWED, f"the harness cannot tell {method} with half its margin from the real one ({halved})"


@pytest.mark.parametrize("method", METHODS)
def test_the_upper_bound_covers_and_half_its_margin_does_not(method: str) -> None:
    total, total_sq, truth = sums(0.3, seed=2)
    upper = mean_upper_bound(total, total_sq, COUNT, ALPHA, method)  # type: ignore[arg-type]
    mean = total / COUNT
    assert int(np.sum(upper < truth)) <= ALLOWED
    assert int(np.sum(mean + 0.5 * (upper - mean) < truth)) > ALLOWED


def test_the_harness_rejects_the_sample_mean() -> None:
    assert failures(lambda total, total_sq, count, alpha: total / count, 0.5, seed=3) > ALLOWED
