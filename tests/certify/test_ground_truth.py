"""Certificates against encoders whose smoothed features and worst-case adversaries are known exactly.

The FCSB formula itself is checked with the true score; the Monte Carlo certificates are checked with fixed
seeds (so every run is reproducible) over many random configurations: the certified bound must never exceed
the true worst case, and must be reasonably close to it where the lemma is tight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fsmllm.certify import SmoothedEncoder, SmoothingConfig, fcsb

from .analytic import RotationEncoder, TwoValueEncoder, cosine, point_at, unit_direction

sigmas = st.sampled_from([0.12, 0.25, 0.5])
thetas = st.floats(min_value=0.3, max_value=math.pi)


@settings(max_examples=400, deadline=None)
@given(
    offset=st.floats(-2.0, 2.0), theta=thetas, sigma=sigmas, eps_over_sigma=st.floats(0.0, 2.0)
)
def test_fcsb_with_the_true_score_never_exceeds_the_true_worst_case(
    offset: float, theta: float, sigma: float, eps_over_sigma: float
) -> None:
    encoder = TwoValueEncoder(unit_direction(0), b=0.0, theta=theta)
    z = offset * sigma
    eps = eps_over_sigma * sigma
    score = float(np.linalg.norm(encoder.smoothed(z, sigma)))
    bound = float(fcsb(min(score, 1.0), sigma, eps))
    if bound >= 0:  # the FCSB is only a statement where it is non-negative
        assert bound <= encoder.worst_cosine(z, sigma, eps) + 1e-9


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0.5, 6.0), sigma=sigmas, eps_over_sigma=st.floats(0.0, 2.0))
def test_fcsb_below_the_rotation_encoders_exact_worst_case(a: float, sigma: float, eps_over_sigma: float) -> None:
    encoder = RotationEncoder(unit_direction(1), a)
    eps = eps_over_sigma * sigma
    bound = float(fcsb(encoder.score(sigma), sigma, eps))
    if bound >= 0:
        assert bound <= encoder.worst_cosine(eps) + 1e-9


def test_the_direction_bound_is_exact_for_the_sign_encoder() -> None:
    """For f = ±e1 the lemma is tight: min over the ball of <F(x'), e1> equals FCSB(S, σ, ε)."""
    encoder = TwoValueEncoder(unit_direction(2), b=0.0, theta=math.pi)
    sigma = 0.25
    for z in (0.1, 0.3, 0.6):
        score = float(np.linalg.norm(encoder.smoothed(z, sigma)))
        for eps in (0.05, 0.1, 0.25):
            worst = encoder.worst_projection(z, sigma, eps, np.array([1.0, 0.0]))
            assert float(fcsb(score, sigma, eps)) == pytest.approx(worst, abs=1e-9)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(offset=st.floats(-2.5, 2.5), theta=thetas, sigma=sigmas, seed=st.integers(0, 2**31))
def test_monte_carlo_certificates_are_below_the_true_worst_case(
    offset: float, theta: float, sigma: float, seed: int
) -> None:
    w = unit_direction(3)
    encoder = TwoValueEncoder(w, b=0.0, theta=theta)
    z = offset * sigma
    radii = [0.0, 0.25 * sigma, 0.5 * sigma, sigma, 2 * sigma]
    cert = SmoothedEncoder(encoder, batch_size=256).certify(
        point_at(w, z), SmoothingConfig(sigma, n0=64, n=1000, alpha=0.001), radii, seed=seed
    )
    u = cert.direction.double().numpy()
    truth_direction = float(encoder.smoothed(z, sigma) @ u)
    score = float(np.linalg.norm(encoder.smoothed(z, sigma)))
    # û is float32: its norm is 1 within ~1e-7, so <F(x), û> may pass ||F(x)|| by that much
    assert cert.score_lower <= truth_direction <= score + 1e-6
    served = cert.smoothed_feature.double().numpy()
    for eps, certified, served_bound in zip(radii, cert.certified_fcsb, cert.served_fcsb):
        if certified is not None:
            assert certified <= encoder.worst_cosine(z, sigma, eps) + 1e-9
            # the lemma with the fixed û bounds <F(x'), û> by the same number (û float32: 1e-6)
            assert certified <= encoder.worst_projection(z, sigma, eps, u) + 1e-6
        if served_bound is not None:  # F(x') runs along a segment: its worst angle to F̂ is at an end
            worst = min(cosine(served, encoder.smoothed(z + shift, sigma)) for shift in (-eps, eps))
            assert served_bound <= worst + 1e-6


@pytest.mark.parametrize("z_over_sigma", [0.5, 1.5, 3.0])
def test_direct_bound_is_tight_where_the_lemma_is(z_over_sigma: float) -> None:
    """Sign encoder, n = 20000: FCSB(p̲) bounds <F(x'), û> over the ball, and loses almost nothing against its true
    minimum. That minimum is FCSB of the true <F(x), û> (the lemma is exact for the sign encoder); the c_i's mean
    is within 5 standard errors of that truth (a seed that fails has probability 6e-7), and p̲ within 0.03 of the
    mean (the confidence bound's width at n = 20000, α = 0.001; Hoeffding's would be 0.037)."""
    sigma = 0.25
    w = unit_direction(4)
    encoder = TwoValueEncoder(w, b=0.0, theta=math.pi)
    z = z_over_sigma * sigma
    radii = [0.05, 0.1, 0.2]
    cert = SmoothedEncoder(encoder, batch_size=4096).certify(
        point_at(w, z), SmoothingConfig(sigma, n0=100, n=20000, alpha=0.001), radii, seed=7
    )
    u = cert.direction.double().numpy()
    truth = encoder.worst_projection(z, sigma, 0.0, u)  # <F(x), û>, what p̲ bounds
    assert cert.samples is not None
    values = cert.samples[:, 0]
    assert abs(values.mean() - truth) <= 5 * values.std() / math.sqrt(values.size)
    assert values.mean() - 0.03 <= cert.score_lower <= values.mean()
    for eps, direction in zip(radii, cert.certified_fcsb):
        worst = encoder.worst_projection(z, sigma, eps, u)
        assert float(fcsb(truth, sigma, eps)) == pytest.approx(worst, abs=1e-6)  # the lemma is exact here
        if worst > 0.05:
            assert direction is not None
            assert direction == pytest.approx(float(fcsb(cert.score_lower, sigma, eps)), abs=1e-12)
            assert direction <= worst + 1e-9


def test_rotation_encoder_certificate_is_sound_and_its_score_estimate_accurate() -> None:
    w = unit_direction(5)
    encoder = RotationEncoder(w, a=2.0)
    sigma = 0.25
    radii = [0.05, 0.1, 0.2, 0.3]
    cert = SmoothedEncoder(encoder, batch_size=2048).certify(
        point_at(w, 0.4), SmoothingConfig(sigma, n0=100, n=10000, alpha=0.001), radii, seed=11
    )
    assert cert.score_estimate == pytest.approx(encoder.score(sigma), abs=0.01)
    assert cert.score_lower <= encoder.score(sigma)
    assert cert.score_lower > encoder.score(sigma) - 0.03
    assert all(c is not None for c in cert.certified_fcsb)  # S ≈ 0.88: the direct bound reaches ε = 0.3 (0.25)
    for eps, certified in zip(radii, cert.certified_fcsb):
        assert certified <= encoder.worst_cosine(eps)


def test_abstains_when_noise_scatters_the_features() -> None:
    """A fast-rotating encoder has S ≈ 0: no certificate, not a made-up number."""
    w = unit_direction(6)
    cert = SmoothedEncoder(RotationEncoder(w, a=40.0), batch_size=512).certify(
        point_at(w, 0.1), SmoothingConfig(0.25, n0=50, n=500, alpha=0.001), [0.0, 0.1], seed=3
    )
    assert cert.abstain
    assert cert.certified_fcsb == (None, None) and cert.served_fcsb == (None, None)
    assert cert.certified_radius(0.5) is None


def test_certified_radius_of_a_certificate_inverts_its_certified_fcsb() -> None:
    w = unit_direction(7)
    encoder = RotationEncoder(w, a=1.0)
    smoother = SmoothedEncoder(encoder, batch_size=1024)
    config = SmoothingConfig(0.5, n0=100, n=5000)
    cert = smoother.certify(point_at(w, 0.2), config, [0.0], seed=5)
    radius = cert.certified_radius(0.4)
    assert radius is not None and radius > 0
    at_radius = smoother.certify(point_at(w, 0.2), config, [radius, radius * 1.01], seed=5)
    assert at_radius.certified_fcsb[0] == pytest.approx(0.4, abs=1e-6)
    assert at_radius.certified_fcsb[1] < 0.4
    assert cert.certified_radius(cert.score_lower + 0.01) is None
    assert cert.certified_radius(cert.score_lower) == 0.0  # the target holds at the image itself, at radius 0
    with pytest.raises(ValueError, match="target_cos"):
        cert.certified_radius(1.0)


def test_orthogonal_components_of_the_input_do_not_matter() -> None:
    """Sanity check of the analytic encoders themselves (they depend on <w, x> only)."""
    w = unit_direction(8)
    encoder = TwoValueEncoder(w, b=0.0, theta=1.0)
    a, b = point_at(w, 0.2, offset_seed=1), point_at(w, 0.2, offset_seed=2)
    assert not torch.equal(a, b)
    assert torch.equal(encoder(a[None]), encoder(b[None]))
