"""Coverage: over many repeated certifications, the lower bound exceeds the truth in at most ~α of them.

The analytic encoders' smoothed features are known exactly, so for every repetition the true value of the
certified quantity ``<F(x), û>`` (û depends on that repetition's selection samples) can be computed, and with it
the true worst cosine over the ball. The check is one-sided binomial: with R repetitions, the failure count must
stay below the 1e-4 upper quantile of Binomial(R, α), so a valid bound passes with overwhelming probability (and
the seeds are fixed anyway). The same harness rejects bounds with half the right margin, which shows its power.

The sign encoder (two feature values, c_i = ±1) is the hardest case for a confidence bound: all the variance a
bounded variable can have. Early stopping is checked in its most adversarial form: a run that stops as soon as
its bound passes a level just above the truth, at any checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fsmllm.certify import SmoothingConfig, SmoothingRun, StopRule, betting_lower_bound, fcsb, run_batched
from fsmllm.certify.bounds import BETTING_TRUNCATION, VOTE_TRUNCATIONS

from .analytic import RotationEncoder, TwoValueEncoder, point_at, unit_direction

REPETITIONS = 1500
ALPHA = 0.05
SIGMA = 0.25


def allowed_failures(repetitions: int = REPETITIONS) -> int:
    return int(binom.isf(1e-4, repetitions, ALPHA))


def sign_setup() -> tuple[TwoValueEncoder, torch.Tensor, float]:
    """The sign encoder at P(feature = e1) = Φ(0.3/0.25) ≈ 0.885: c_i = ±1, S ≈ 0.77."""
    w = unit_direction(20)
    return TwoValueEncoder(w, b=0.0, theta=math.pi), point_at(w, 0.3), 0.3


def rotation_setup() -> tuple[RotationEncoder, torch.Tensor, float]:
    w = unit_direction(20)
    return RotationEncoder(w, a=3.0), point_at(w, 0.3), 0.3


def certify_many(
    setup, bound: str, n: int = 40, stop: StopRule | None = None, repetitions: int = REPETITIONS
) -> list[tuple[SmoothingRun, float]]:
    """``repetitions`` runs (n0 = 10) and the true <F(x), û> of each."""
    encoder, x, z = setup()
    truth = encoder.smoothed(z, SIGMA)
    config = SmoothingConfig(sigma=SIGMA, n0=10, n=n, alpha=ALPHA, bound=bound)  # type: ignore[arg-type]
    runs = [SmoothingRun(x, config, seed=seed, stop=stop) for seed in range(repetitions)]
    run_batched(runs, encoder, batch_size=8192)
    return [(run, float(truth @ run.certificate([]).direction.double().numpy())) for run in runs]


@pytest.mark.parametrize("setup", [sign_setup, rotation_setup], ids=["sign", "rotation"])
@pytest.mark.parametrize("bound", ["betting", "empirical-bernstein", "hoeffding"])
def test_lower_bound_covers_the_truth_with_the_stated_confidence(setup, bound: str) -> None:
    failures = sum(run.certificate([]).score_lower > truth for run, truth in certify_many(setup, bound))
    assert failures <= allowed_failures(), f"{failures}/{REPETITIONS} certificates overstated the score"


def test_certified_fcsb_never_exceeds_the_true_worst_cosine_more_often_than_alpha() -> None:
    """The statement itself, on the rotation encoder whose worst cosine over the ε-ball is cos(aε)."""
    encoder, _, _ = rotation_setup()
    radii = [0.02, 0.05, 0.1]
    failures = 0
    for run, _ in certify_many(rotation_setup, "betting"):
        cert = run.certificate(radii)
        failures += any(c is not None and c > encoder.worst_cosine(r) for r, c in zip(radii, cert.certified_fcsb))
    assert failures <= allowed_failures()


@pytest.mark.parametrize("level", [0.60, 0.775])
def test_optional_stopping_does_not_break_the_betting_bound(level: float) -> None:
    """Each run stops the moment its score bound passes ``level`` (below the truth ≈ 0.77: most runs stop
    early; just above it: a run stops early only when its bound overstates the score) at any checkpoint up
    to n = 1000: for a fixed-n bound, stopping on it is a recipe for failures."""
    runs = certify_many(sign_setup, "betting", n=1000, stop=StopRule(fcsb=level, radii=(0.0,)), repetitions=600)
    certificates = [(run.certificate([0.0]), truth) for run, truth in runs]
    failures = sum(cert.score_lower > truth for cert, truth in certificates)
    assert failures <= allowed_failures(600)
    if level < 0.77:
        early = [cert for cert, _ in certificates if cert.stopped_by == "target_reached"]
        assert len(early) > 500 and max(cert.n for cert in early) < 1000


def two_point_bounds(method, repetitions: int, n: int = 1000) -> list[tuple[float, float]]:
    """(best bound over the checkpoints, truth) for c_i = ±1 with P(+1) = 0.885: what a run that monitors its
    bound and stops when it likes would report."""
    rng = np.random.default_rng(0)
    truth = 2 * 0.885 - 1
    results = []
    for _ in range(repetitions):
        c = np.where(rng.random(n) < 0.885, 1.0, -1.0)
        results.append((max(method(c[:t]) for t in range(32, n + 1, 32)), truth))
    return results


@pytest.mark.parametrize("caps", [(BETTING_TRUNCATION,), VOTE_TRUNCATIONS], ids=["features", "votes"])
def test_monitored_betting_bound_keeps_its_confidence_and_half_the_margin_does_not(caps: tuple[float, ...]) -> None:
    """The anytime guarantee on the bound function itself (sup over the checkpoints), and its power: the bound
    halfway to the sample mean, monitored the same way, fails far more often than α. Both bet caps: the
    features' (one cap, 0.95: 10 and 82 failures in 600, 52 allowed) and the certified answers' votes (the
    mixture of the capitals capped at 0.5 and 0.95; ±1 samples are exactly what votes are: 17 and 154)."""
    def betting(c: np.ndarray) -> float:
        return betting_lower_bound(c, ALPHA, truncations=caps)

    def half_margin(c: np.ndarray) -> float:
        return (betting_lower_bound(c, ALPHA, truncations=caps) + c.mean()) / 2

    valid = sum(best > truth for best, truth in two_point_bounds(betting, 600))
    invalid = sum(best > truth for best, truth in two_point_bounds(half_margin, 600))
    assert valid <= allowed_failures(600) < invalid


@dataclass
class PackedRotationEncoder:
    """A rotation encoder whose "kernel" depends on the packing: alone in a batch it is exactly
    :class:`RotationEncoder`; in a batch of several, every feature's angle moves by up to ``shift`` radians
    towards the mean direction's (what an adversarial batch-dependent rounding could do: every c_i up, by at
    most D = ``shift``, since ‖Δf‖ = 2 sin(|Δθ|/2) ≤ |Δθ|). ``smoothed`` is the batch-of-one function's F."""

    rotation: RotationEncoder
    z: float
    shift: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.rotation(x)
        angle = self.rotation.a * (x.reshape(x.shape[0], -1).double() @ self.rotation.w.reshape(-1).double())
        centre = self.rotation.a * self.z
        angle = angle - (angle - centre).clamp(-self.shift, self.shift)
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).float()

    def smoothed(self, z: float, sigma: float) -> np.ndarray:
        return self.rotation.smoothed(z, sigma)


def test_a_bound_for_every_packing_subtracts_the_worst_per_sample_difference() -> None:
    """docs/method.md, "Reduced precision": when a sample's feature depends on its batch by at most D
    (|Δc_i| ≤ ‖Δf‖ ≤ D), p̲ − D bounds the batch-of-one function's ⟨F(x), û⟩ whatever the packing (each c_i's
    mean is at most D above it, so the capital at that mean + D is a supermartingale). Every sample here is
    packed and moved up by up to D = 0.05: p̲ − D keeps the confidence; p̲ alone, averaging the differences
    out, does not (the shift does not shrink with n)."""
    w = unit_direction(20)
    encoder = PackedRotationEncoder(RotationEncoder(w, a=3.0), z=0.3, shift=0.05)
    runs = certify_many(lambda: (encoder, point_at(w, 0.3), 0.3), "betting", n=1000, repetitions=300)  # 0 and 168 fail
    lowers = [(run.certificate([]).score_lower, truth) for run, truth in runs]
    assert sum(lower - encoder.shift > truth for lower, truth in lowers) <= allowed_failures(300)
    assert sum(lower > truth for lower, truth in lowers) > allowed_failures(300)


def test_bound_is_not_vacuous() -> None:
    """Coverage alone would be met by a bound of −1: the bound must also track the truth (n = 2000). The truth is
    <F(x), û> = S cos∠(û, F(x)); the c_i's mean is within 5 standard errors of it, and the betting bound within 0.02
    of that mean (its width; Hoeffding's is wider)."""
    w = unit_direction(21)
    encoder = RotationEncoder(w, a=3.0)
    results = {}
    for bound in ("betting", "empirical-bernstein", "hoeffding"):
        config = SmoothingConfig(sigma=0.25, n0=100, n=2000, alpha=ALPHA, bound=bound)  # type: ignore[arg-type]
        run = SmoothingRun(point_at(w, 0.3), config, seed=0)
        run_batched([run], encoder, batch_size=1024)
        results[bound] = run.certificate([0.1])
    assert results["betting"].score_lower > results["empirical-bernstein"].score_lower > results["hoeffding"].score_lower
    cert = results["betting"]
    assert cert.samples is not None
    values = cert.samples[:, 0]
    truth = float(encoder.smoothed(0.3, 0.25) @ cert.direction.double().numpy())
    assert abs(values.mean() - truth) <= 5 * values.std() / math.sqrt(values.size)
    assert values.mean() - 0.02 < cert.score_lower < values.mean()
    assert results["hoeffding"].score_lower < values.mean() - 0.02
    assert cert.certified_fcsb[0] == pytest.approx(float(fcsb(cert.score_lower, 0.25, 0.1)))
    assert np.isfinite(cert.score_lower) and torch.isfinite(cert.direction).all()
