"""The betting confidence sequence against a literal transcription of Waudby-Smith & Ramdas (2023), its limits
and its properties; its coverage (fixed n and under optional stopping) is in test_statistical_validity.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fsmllm.certify import betting_lower_bound, lower_bound, mean_lower_bound, upper_bound
from fsmllm.certify.bounds import BETTING_TRUNCATION, VOTE_TRUNCATIONS


def literal_betting_lower(
    c: list[float], alpha: float, truncations: tuple[float, ...] = (BETTING_TRUNCATION,), horizon: int | None = None
) -> float:
    """WSR eq. (26)–(27) (or, with a ``horizon`` n, the bets of §4.1 tuned for t = n) written out sample by
    sample, the capital averaged over the bet caps, and the confidence set's lower end found on a fine grid of
    candidate means (no vectorisation, no root finder): an independent reference."""
    x = [(1 + v) / 2 for v in c]
    bets, mean_sum, var_sum, previous_var = [], 0.0, 0.0, 0.25
    for t, value in enumerate(x, start=1):
        spread = t * math.log(1 + t) if horizon is None else horizon
        bets.append(math.sqrt(2 * math.log(1 / alpha) / (previous_var * spread)))
        mean_sum += value
        mu = (0.5 + mean_sum) / (t + 1)
        var_sum += (value - mu) ** 2
        previous_var = (0.25 + var_sum) / (t + 1)
    grid = np.linspace(1e-9, 1.0, 200_001)
    capital = np.zeros_like(grid)
    with np.errstate(over="ignore"):  # the capital at tiny candidate means may overflow to inf (rejected anyway)
        for truncation in truncations:
            product = np.ones_like(grid)
            for bet, value in zip(bets, x):
                product *= 1 + np.minimum(bet, truncation / grid) * (value - grid)
            capital += product / len(truncations)
    rejected = grid[capital >= 1 / alpha]  # candidate means the capital has bet against successfully
    return -1.0 if rejected.size == 0 else 2 * float(rejected.max()) - 1


@pytest.mark.parametrize(
    ("seed", "n", "low", "high"),
    [
        (0, 50, 0.9, 1.0),
        (1, 300, 0.5, 1.0),
        (2, 200, -1.0, 1.0),
        (3, 1000, 0.95, 0.99),
        (4, 20, -0.2, 0.1),
        (0, 5, -0.2, 0.3),  # at α = 0.001 the capital at m → 0 is only 1.3/α: a bound of −0.93, not −1
    ],
)
def test_matches_the_literal_transcription(seed: int, n: int, low: float, high: float) -> None:
    values = np.random.default_rng(seed).uniform(low, high, n)
    for alpha in (0.05, 0.001):
        # the grid's spacing is 5e-6 on the [0, 1] scale, i.e. 1e-5 on the cosine scale
        assert betting_lower_bound(values, alpha) == pytest.approx(literal_betting_lower(list(values), alpha), abs=2e-5)
        tuned = literal_betting_lower(list(values), alpha, horizon=n)
        assert betting_lower_bound(values, alpha, horizon=n) == pytest.approx(tuned, abs=2e-5)


@pytest.mark.parametrize(("seed", "n", "share"), [(0, 256, 0.9), (1, 64, 0.97), (2, 500, 0.7), (3, 40, 0.5)])
def test_the_vote_mixture_matches_the_literal_transcription(seed: int, n: int, share: float) -> None:
    """The certified answers' bound: ±1 votes, the average of the capitals capped at 0.5/m and 0.95/m."""
    values = np.where(np.random.default_rng(seed).random(n) < share, 1.0, -1.0)
    for alpha in (0.05, 0.001):
        literal = literal_betting_lower(list(values), alpha, VOTE_TRUNCATIONS)
        assert betting_lower_bound(values, alpha, truncations=VOTE_TRUNCATIONS) == pytest.approx(literal, abs=2e-5)


def test_the_vote_mixture_certifies_radius_0_2_on_every_tenth_vote_disagreeing() -> None:
    """Issue 29's votes: 256 estimation votes, every tenth (the sixth of each ten) disagreeing, α 0.001, monitored
    at the checkpoints. Radius 0.2 at σ 0.25 needs p̲ ≥ Φ(0.8) = 0.788: the 0.95 cap alone reaches 0.7715 (a
    disagreement keeps 5 % of its capital), the mixture 0.806; with every vote agreeing it needs 352 votes to
    p̲ 0.977 where the 0.95 cap alone needs 320 (0.5 alone: 608)."""
    from fsmllm.certify.smoothing import bound_checked_after

    def monitored(values: np.ndarray, caps: tuple[float, ...]) -> float:
        counts = [t for t in range(2, values.size + 1) if bound_checked_after(t)]
        return max((1 + betting_lower_bound(values[:t], 0.001, truncations=caps)) / 2 for t in counts)

    votes = np.where(np.arange(256) % 10 == 5, -1.0, 1.0)
    assert int((votes > 0).sum()) == 230
    assert monitored(votes, (BETTING_TRUNCATION,)) == pytest.approx(0.7715, abs=1e-4)
    assert monitored(votes, VOTE_TRUNCATIONS) >= 0.8 > norm.cdf(0.2 / 0.25)
    unanimous = np.ones(352)
    assert monitored(unanimous, VOTE_TRUNCATIONS) >= 0.977 > monitored(unanimous[:320], VOTE_TRUNCATIONS)


def test_the_returned_bound_is_never_above_the_exact_lower_end() -> None:
    """The root finder's answer is lowered by its tolerance: the capital at the returned candidate mean has
    always reached 1/α (so that mean is rejected, and the exact lower end is at or above it). Brent's own root
    lies on either side of the exact one (by up to ~1e-13): without the margin, about half of these fail."""
    from fsmllm.certify.bounds import betting_bets

    rng = np.random.default_rng(11)
    for trial in range(200):
        values = np.clip(rng.normal(rng.uniform(-0.5, 0.9), rng.uniform(0.01, 0.5), int(rng.integers(20, 400))), -1, 1)
        caps = VOTE_TRUNCATIONS if trial % 2 else (BETTING_TRUNCATION,)
        alpha = float(rng.choice([0.05, 0.001]))
        m = (1 + betting_lower_bound(values, alpha, truncations=caps)) / 2
        x = (1 + values) / 2
        bets = betting_bets(x, alpha)
        products = [np.prod(1 + np.minimum(bets, cap / m) * (x - m)) for cap in caps]
        assert m == 0 or sum(products) / len(caps) >= 1 / alpha, (trial, m)


def test_reaches_the_limit_of_any_valid_bound_on_concentrated_samples() -> None:
    """All samples at S: no valid bound may exceed S − (1 + S)(1 − α^{1/n}) (a two-point distribution with rare
    values at −1 looks the same); the betting bound gets within 6 % of that gap, empirical Bernstein does not."""
    alpha, score = 0.001, 0.974
    for n in (100, 1000, 10_000):
        values = np.full(n, score)
        limit = score - (1 + score) * (1 - alpha ** (1 / n))
        got = betting_lower_bound(values, alpha)
        assert got <= limit + 1e-12
        assert score - got <= 1.06 * (score - limit)
        bernstein = float(mean_lower_bound(values.sum(), np.square(values).sum(), n, alpha))
        assert score - bernstein > 2 * (score - got)


def test_the_gap_on_dinov2_like_samples_meets_the_target() -> None:
    """c_i of DINOv2-S at σ 0.25 on chelsea: mean 0.974, sd 0.022. Target: score gap ≤ 0.016 at n = 1000."""
    values = np.clip(np.random.default_rng(5).normal(0.974, 0.022, 1000), -1, 1)
    assert values.mean() - betting_lower_bound(values, 0.001) <= 0.016
    bernstein = lower_bound(values, 0.001, "empirical-bernstein")
    assert betting_lower_bound(values, 0.001) > bernstein + 0.02


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=80),
    alpha=st.floats(1e-6, 0.5),
    smaller=st.floats(0.01, 1.0),
)
def test_properties(values: list[float], alpha: float, smaller: float) -> None:
    got = betting_lower_bound(values, alpha)
    assert -1.0 <= got <= 1.0
    # a constant sequence: below the constant; more confidence gives a lower (or equal) bound (its bets are
    # capped at c/m, so only the threshold ln(1/α) changes); the upper bound mirrors the lower one
    constant = [values[0]] * len(values)
    assert betting_lower_bound(constant, alpha) <= values[0] + 1e-12
    assert betting_lower_bound(constant, alpha * smaller) <= betting_lower_bound(constant, alpha) + 1e-12
    assert upper_bound(constant, alpha, "betting") == pytest.approx(-betting_lower_bound([-v for v in constant], alpha))


def test_prefixes_give_the_same_bound_whatever_was_computed_before() -> None:
    """Bets use only past samples: the bound at t depends on the first t samples alone (sequential sums)."""
    values = np.random.default_rng(6).uniform(0.6, 1.0, 500)
    assert betting_lower_bound(values[:200], 0.01) == betting_lower_bound(values[:200].copy(), 0.01)
    alone = betting_lower_bound(values[:200], 0.01)
    from fsmllm.certify.bounds import betting_bets

    assert np.array_equal(betting_bets((1 + values[:200]) / 2, 0.01), betting_bets((1 + values) / 2, 0.01)[:200])
    assert alone != betting_lower_bound(values, 0.01)


def test_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        betting_lower_bound([0.5], 0.01)
    with pytest.raises(ValueError, match="alpha"):
        betting_lower_bound([0.5, 0.6], 1.0)
    for caps in ((), (0.5, 1.0), (0.0,)):  # a cap of 1 lets a capital reach 0; none is no bound
        with pytest.raises(ValueError, match=r"bet caps must lie in \(0, 1\)"):
            betting_lower_bound([0.5, 0.6], 0.01, truncations=caps)
    with pytest.raises(ValueError, match="needs the samples"):
        mean_lower_bound(1.0, 1.0, 10, 0.01, "betting")
    with pytest.raises(ValueError, match="unknown bound"):
        lower_bound([0.5, 0.6], 0.01, "student-t")  # type: ignore[arg-type]
