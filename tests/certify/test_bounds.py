"""The closed-form bounds against independent computations and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fsmllm.certify import (
    certified_radius,
    fcsb,
    mean_lower_bound,
    mean_upper_bound,
    prediction_radius,
)

scores = st.floats(min_value=-0.999, max_value=0.999999)
sigmas = st.floats(min_value=0.01, max_value=2.0)
radii = st.floats(min_value=0.0, max_value=3.0)


def naive_fcsb(score: float, sigma: float, radius: float) -> float:
    """method.md's formula written literally with Φ and Φ⁻¹."""
    return 2 * norm.cdf(norm.ppf((1 + score) / 2) - radius / sigma) - 1


@settings(max_examples=300, deadline=None)
@given(scores, sigmas, radii)
def test_fcsb_matches_the_literal_formula(score: float, sigma: float, radius: float) -> None:
    assert fcsb(score, sigma, radius) == pytest.approx(naive_fcsb(score, sigma, radius), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.0, max_value=0.999999), sigmas, st.floats(min_value=0.0, max_value=0.99))
def test_certified_radius_is_the_exact_inverse(score: float, sigma: float, target: float) -> None:
    radius = certified_radius(score, sigma, target)
    if score < target:
        assert np.isnan(radius)
    else:
        assert radius >= 0
        assert fcsb(score, sigma, radius) == pytest.approx(target, abs=1e-7)
        # and it is the largest such radius: a little further the bound drops below the target
        assert fcsb(score, sigma, radius + 1e-3 * sigma) < target


@given(scores, sigmas)
def test_fcsb_at_zero_radius_is_the_score(score: float, sigma: float) -> None:
    assert fcsb(score, sigma, 0.0) == pytest.approx(score, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(scores, sigmas, radii, st.floats(min_value=1e-3, max_value=1.0))
def test_fcsb_is_monotone(score: float, sigma: float, radius: float, step: float) -> None:
    assert fcsb(score, sigma, radius + step) <= fcsb(score, sigma, radius) + 1e-12
    assert fcsb(min(score + step, 1.0), sigma, radius) >= fcsb(score, sigma, radius) - 1e-12
    assert fcsb(score, sigma + step, radius) >= fcsb(score, sigma, radius) - 1e-12


def test_fcsb_edge_values_and_vectorisation() -> None:
    assert fcsb(1.0, 0.25, 10.0) == 1.0  # noise never moves the feature: certified at any radius
    assert fcsb(-1.0, 0.25, 0.0) == -1.0
    grid = fcsb(np.array([[0.5], [0.9]]), 0.25, np.array([0.0, 0.1, 0.5]))
    assert grid.shape == (2, 3)
    assert grid[1, 1] == pytest.approx(naive_fcsb(0.9, 0.25, 0.1))
    # precision near S = 1, where (1 + S)/2 rounds badly in the literal form
    assert fcsb(1 - 1e-12, 0.25, 0.0) == pytest.approx(1 - 1e-12, abs=1e-15)
    assert certified_radius(1.0, 0.25, 0.5) == math.inf


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fcsb(0.9, 0.0, 0.1), "sigma"),
        (lambda: fcsb(0.9, -0.25, 0.1), "sigma"),
        (lambda: fcsb(0.9, 0.25, -0.1), r"^radius must be a non-negative l2 norm, got -0.1$"),
        (lambda: fcsb(0.9, 0.25, float("nan")), r"^radius must be a non-negative l2 norm, got nan$"),
        (lambda: fcsb(1.2, 0.25, 0.1), r"^score must lie in \[-1, 1\]"),
        (lambda: fcsb(float("nan"), 0.25, 0.1), r"^score must lie in \[-1, 1\]"),
        (lambda: certified_radius(1.2, 0.25, 0.5), r"^score must lie in \[-1, 1\]"),
        (lambda: certified_radius(0.9, 0.25, 1.0), "target_cos"),
        (lambda: certified_radius(0.9, 0.25, -0.1), "target_cos"),
        (lambda: certified_radius(0.9, 0.25, float("nan")), "target_cos"),
        (lambda: prediction_radius(1.5, 0.1, 0.25), r"^top_lower must lie in \[-1, 1\]"),
        (lambda: prediction_radius(0.8, -1.5, 0.25), r"^runner_up_upper must lie in \[-1, 1\]"),
        (lambda: certified_radius(0.9, float("inf"), 0.5), "sigma"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_hoeffding_matches_its_textbook_form() -> None:
    values = np.random.default_rng(0).uniform(-1, 1, size=500)
    alpha = 0.01
    # c in [-1, 1] has range 2: mean - 2 sqrt(ln(1/α) / (2n))
    expected = values.mean() - 2 * math.sqrt(math.log(1 / alpha) / (2 * len(values)))
    got = mean_lower_bound(values.sum(), (values**2).sum(), len(values), alpha, "hoeffding")
    assert got == pytest.approx(expected, abs=1e-12)


def test_empirical_bernstein_matches_maurer_pontil() -> None:
    values = np.random.default_rng(1).uniform(0.8, 1.0, size=1000)
    alpha = 0.001
    x = (values + 1) / 2
    n = len(x)
    log_term = math.log(2 / alpha)
    expected_x = x.mean() - math.sqrt(2 * x.var(ddof=1) * log_term / n) - 7 * log_term / (3 * (n - 1))
    got = mean_lower_bound(values.sum(), (values**2).sum(), n, alpha)
    assert got == pytest.approx(2 * expected_x - 1, abs=1e-10)
    # the point of using it: when samples barely vary it is much tighter than Hoeffding
    hoeffding = mean_lower_bound(values.sum(), (values**2).sum(), n, alpha, "hoeffding")
    assert got > hoeffding + 0.05


@pytest.mark.parametrize("method", ["empirical-bernstein", "hoeffding"])
def test_upper_bound_mirrors_the_lower_bound(method: str) -> None:
    values = np.random.default_rng(2).uniform(-0.5, 0.3, size=200)
    upper = mean_upper_bound(values.sum(), (values**2).sum(), len(values), 0.05, method)  # type: ignore[arg-type]
    lower = mean_lower_bound(-values.sum(), (values**2).sum(), len(values), 0.05, method)  # type: ignore[arg-type]
    assert upper == pytest.approx(-lower)
    assert upper > values.mean()
    if method == "empirical-bernstein":  # the default
        assert mean_upper_bound(values.sum(), (values**2).sum(), len(values), 0.05) == upper


def test_confidence_bound_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mean_lower_bound(1.0, 1.0, 1, 0.01)
    for alpha in (0.0, 1.0, 1.5):  # α must lie in the open interval (0, 1)
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
            mean_lower_bound(1.0, 1.0, 10, alpha)
    with pytest.raises(ValueError, match="unknown bound method 'student-t'; choose one of betting, empirical-bernstein, hoeffding$"):
        mean_lower_bound(1.0, 1.0, 10, 0.01, "student-t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'betting' needs the samples, not their sums; sums serve empirical-bernstein, hoeffding$"):
        mean_lower_bound(1.0, 1.0, 10, 0.01, "betting")


def test_a_lower_bound_below_minus_one_is_clipped_to_it() -> None:
    """Two samples at c = −1: Hoeffding's margin alone takes the bound below −1, which says nothing more."""
    assert mean_lower_bound(-2.0, 2.0, 2, 0.01, "hoeffding") == -1.0


def test_prediction_radius_is_cohen_style_gap() -> None:
    lower, upper, sigma = 0.8, 0.1, 0.5
    expected = sigma / 2 * (norm.ppf((1 + lower) / 2) - norm.ppf((1 + upper) / 2))
    assert prediction_radius(lower, upper, sigma) == pytest.approx(expected)
    assert np.isnan(prediction_radius(0.3, 0.3, sigma))
