"""Coverage: over many repeated certifications, the lower bound exceeds the truth in at most ~α of them.

The rotation encoder's smoothed feature is known exactly, so for every repetition the true value of the
certified quantity ``<F(x), û>`` (û depends on that repetition's selection samples) can be computed. The
check is one-sided binomial: with R repetitions, the failure count must stay below the 1e-4 upper quantile
of Binomial(R, α), so a valid bound passes with overwhelming probability (and the seeds are fixed anyway).
The same harness rejects an invalid bound (the plain sample mean), which shows the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fsmllm.certify import SmoothingConfig, SmoothingRun, mean_lower_bound, run_batched

from .analytic import RotationEncoder, point_at, unit_direction

REPETITIONS = 1500
ALPHA = 0.05


def repeated_failures(bound: str, lower_from_sums=None) -> tuple[int, int]:
    """Certify the same input REPETITIONS times (n0 = 10, n = 40); count bounds above the truth."""
    w = unit_direction(20)
    encoder = RotationEncoder(w, a=3.0)
    sigma, z = 0.25, 0.3
    truth = encoder.smoothed(z, sigma)
    config = SmoothingConfig(sigma=sigma, n0=10, n=40, alpha=ALPHA, bound=bound)  # type: ignore[arg-type]
    runs = [SmoothingRun(point_at(w, z), config, seed=seed) for seed in range(REPETITIONS)]
    run_batched(runs, encoder, batch_size=8192)
    failures = 0
    for run in runs:
        cert = run.certificate(radii=[0.0])
        lower = cert.score_lower if lower_from_sums is None else lower_from_sums(run)
        failures += lower > float(truth @ cert.direction.double().numpy())
    return failures, int(binom.isf(1e-4, REPETITIONS, ALPHA))


@pytest.mark.parametrize("bound", ["empirical-bernstein", "hoeffding"])
def test_lower_bound_covers_the_truth_with_the_stated_confidence(bound: str) -> None:
    failures, allowed = repeated_failures(bound)
    assert failures <= allowed, f"{failures}/{REPETITIONS} certificates overstated the score (allowed {allowed})"


def test_the_harness_rejects_an_invalid_bound() -> None:
    """Reporting the sample mean as if it were a lower bound fails about half the time: must be caught."""

    def sample_mean(run: SmoothingRun) -> float:
        return float(run._probe_sum[0] / run.config.n)

    failures, allowed = repeated_failures("empirical-bernstein", sample_mean)
    assert failures > allowed


def test_bound_is_not_vacuous() -> None:
    """Coverage alone would be met by a bound of −1: the bound must also track the truth (n = 2000)."""
    w = unit_direction(21)
    encoder = RotationEncoder(w, a=3.0)
    config = SmoothingConfig(sigma=0.25, n0=100, n=2000, alpha=ALPHA)
    run = SmoothingRun(point_at(w, 0.3), config, seed=0)
    run_batched([run], encoder, batch_size=1024)
    cert = run.certificate(radii=[0.0])
    sums = run._probe_sum.numpy(), run._probe_sq_sum.numpy()
    hoeffding = float(mean_lower_bound(sums[0][0], sums[1][0], config.n, ALPHA, "hoeffding"))
    assert cert.score_lower > hoeffding  # empirical Bernstein beats Hoeffding on low-variance samples
    assert encoder.score(0.25) - 0.05 < cert.score_lower < encoder.score(0.25)
    assert np.isfinite(cert.score_lower) and torch.isfinite(cert.direction).all()
