"""Token-level certificates (method.md, "Token-level certificates"): every token normalised and smoothed on its
own, bounded for all tokens at once (α split over the tokens), on analytic encoders whose per-token worst case
is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fsmllm.api.schemas import CertificateOut
from fsmllm.certify import SmoothedEncoder, SmoothingConfig, SmoothingRun, StopRule, run_batched, run_shared

from .analytic import RotationEncoder, TokenRotationEncoder, point_at, unit_direction

SIGMA = 0.25


def fragile_encoder() -> TokenRotationEncoder:
    """Three stable tokens with most of the norm and one small token that turns fast (a = 8)."""
    return TokenRotationEncoder(unit_direction(30), rates=(0.2, 0.5, 0.3, 8.0), scales=(3.0, 3.0, 3.0, 0.3))


def test_every_tokens_certificate_stays_below_its_true_worst_case_with_confidence_alpha() -> None:
    """At α = 0.05 over 1500 runs: the share of runs where *any* token's certified FCSB exceeds that token's true
    worst cosine stays within the binomial test's allowance (the α split over the tokens at work)."""
    encoder = TokenRotationEncoder(unit_direction(31), rates=(1.0, 2.0, 3.0), scales=(1.0, 1.0, 1.0))
    radii = [0.02, 0.05, 0.1]
    alpha, repetitions = 0.05, 1500
    config = SmoothingConfig(sigma=SIGMA, n0=10, n=40, alpha=alpha, granularity="token")
    runs = [SmoothingRun(point_at(encoder.w, 0.3), config, seed=seed) for seed in range(repetitions)]
    run_batched(runs, encoder, batch_size=8192)
    failures = 0
    for run in runs:
        cert = run.certificate(radii)
        assert cert.tokens is not None and len(cert.tokens.score_lower) == 3
        per_token = cert.token_certified_fcsb()
        failures += any(
            value is not None and value > encoder.worst_cosine(t, eps)
            for t, row in enumerate(per_token)
            for eps, value in zip(radii, row)
        )
        # the headline is the worst token's
        assert cert.score_lower == min(cert.tokens.score_lower)
        assert cert.worst_token == int(np.argmin(cert.tokens.score_lower))
    assert failures <= binom.isf(1e-4, repetitions, alpha)


def test_a_fragile_token_hides_in_the_global_certificate_but_not_in_the_token_one() -> None:
    encoder = fragile_encoder()
    x = point_at(encoder.w, 0.1)
    smoothed = SmoothedEncoder(encoder, batch_size=1024)
    radii = [0.05, 0.1, 0.2]
    whole = smoothed.certify(x, SmoothingConfig(SIGMA, n0=100, n=2000), radii, seed=1)
    tokens = smoothed.certify(x, SmoothingConfig(SIGMA, n0=100, n=2000, granularity="token"), radii, seed=1)
    assert tokens.worst_token == 3
    assert tokens.tokens is not None
    for t in range(4):
        assert tokens.tokens.score_lower[t] <= encoder.score(t, SIGMA)
        # S² is estimated to about ±0.004 (one standard deviation at n0 + n = 2100), so a small S (token 3: 0.135)
        # to about ±0.015 and a large one to ±0.002: 0.06 is four of the small one's
        assert tokens.tokens.score_estimate[t] == pytest.approx(encoder.score(t, SIGMA), abs=0.06 if t == 3 else 0.01)
    for i, eps in enumerate(radii):
        # the global certificate is high although token 3 can turn by 8ε radians; the token one says so
        assert whole.certified_fcsb[i] > 0.9
        fragile = tokens.certified_fcsb[i]
        assert fragile is None or fragile <= encoder.worst_cosine(3, eps)
        assert (fragile or 0.0) < whole.certified_fcsb[i] - 0.3
    per_token = tokens.token_certified_fcsb()
    assert all(row[0] is not None and row[0] > 0.97 for row in per_token[:3])
    summary = CertificateOut.from_certificate(tokens, "tokens", "none", 8, per_token=True)
    assert summary.granularity == "token" and summary.worst_token == 3 and len(summary.tokens or []) == 4
    assert CertificateOut.from_certificate(tokens, "tokens", "none", 8).tokens is None


def test_both_granularities_from_one_encoder_pass_equal_each_run_alone() -> None:
    """run_shared feeds the same samples to a global and a token run: each certificate is exactly its own run's
    alone, for half the encoder passes."""
    encoder = fragile_encoder()
    x = point_at(encoder.w, 0.1)
    radii = [0.05, 0.1]
    configs = [SmoothingConfig(sigma=SIGMA, n0=64, n=500, granularity=g) for g in ("global", "token")]
    alone = []
    for config in configs:
        run = SmoothingRun(x, config, seed=3)
        run_batched([run], encoder, batch_size=100)
        alone.append(run.certificate(radii))
    passes: list[int] = []
    shared = [SmoothingRun(x, config, seed=3) for config in configs]
    run_shared(shared, lambda batch: (passes.append(len(batch)), encoder(batch))[1], batch_size=100)
    assert sum(passes) == 564  # n0 + n samples encoded once for both runs
    for single, run in zip(alone, shared):
        together = run.certificate(radii)
        assert together.score_lower == single.score_lower
        assert together.certified_fcsb == single.certified_fcsb
        torch.testing.assert_close(together.smoothed_feature, single.smoothed_feature, atol=0, rtol=0)
    assert alone[1].worst_token == 3 and alone[0].score_lower > alone[1].score_lower


def test_runs_of_different_samples_cannot_share_encoder_passes() -> None:
    encoder = fragile_encoder()
    x = point_at(encoder.w, 0.1)
    config = SmoothingConfig(sigma=SIGMA, n0=64, n=500, granularity="token")
    for other in (SmoothingRun(x, config, seed=4), SmoothingRun(x, SmoothingConfig(sigma=SIGMA, n0=32, n=500), seed=3)):
        with pytest.raises(ValueError, match="same noisy copies"):
            run_shared([SmoothingRun(x, config, seed=3), other], encoder, batch_size=100)


def test_both_granularities_coincide_for_a_single_vector() -> None:
    """An encoder with one token (a pooled vector, like EfficientNet's [B, 1, D], or a flat [B, D])."""
    w = unit_direction(32)
    rotation = RotationEncoder(w, a=2.0)
    for encoder in (rotation, lambda x: rotation(x)[:, None, :]):
        smoothed = SmoothedEncoder(encoder, batch_size=256)
        configs = [SmoothingConfig(SIGMA, n0=50, n=500, granularity=granularity) for granularity in ("global", "token")]
        certificates = [smoothed.certify(point_at(w, 0.2), config, [0.05, 0.1], seed=3) for config in configs]
        whole, token = certificates
        # the two paths normalise the same float32 features by different calls ([B, D] rows, [B, 1, D] tokens),
        # which may round an ulp apart on some kernels: equal to float32 precision, not bit for bit
        assert token.score_lower == pytest.approx(whole.score_lower, abs=1e-6)
        assert token.certified_fcsb == pytest.approx(whole.certified_fcsb, abs=1e-6)
        assert token.served_fcsb == pytest.approx(whole.served_fcsb, abs=1e-6)
        torch.testing.assert_close(token.smoothed_feature, whole.smoothed_feature, atol=1e-6, rtol=0)
        assert token.worst_token == 0 and whole.worst_token is None


def test_served_token_features_are_each_tokens_mean_direction_at_the_global_means_token_norm() -> None:
    encoder = fragile_encoder()
    x = point_at(encoder.w, 0.1)
    recorded: list[torch.Tensor] = []

    def encode(inputs: torch.Tensor) -> torch.Tensor:
        recorded.append(encoder(inputs))
        return recorded[-1]

    config = SmoothingConfig(SIGMA, n0=32, n=320, granularity="token")
    cert = SmoothedEncoder(encode, batch_size=64).certify(x, config, [0.1], seed=2)
    features = torch.cat(recorded).double()
    flat = torch.nn.functional.normalize(features.reshape(len(features), -1), dim=1).mean(0).reshape(4, 2)
    directions = torch.nn.functional.normalize(torch.nn.functional.normalize(features, dim=2).mean(0), dim=1)
    expected = directions * flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cert.smoothed_feature.double(), expected.reshape(-1), atol=1e-5, rtol=0)
    # each token's served bound: the certified one moved by that token's angle between û_t and what is served
    assert cert.tokens is not None and all(0 <= a < 0.05 for a in cert.tokens.served_angle[:3])
    assert cert.served_angle == cert.tokens.served_angle[3]  # the worst token's (its û_t is noisy: S_3 ≈ 0.14)
    assert cert.served_fcsb[0] is None or cert.served_fcsb[0] <= cert.certified_fcsb[0]


def test_early_stopping_watches_the_worst_token() -> None:
    stable = TokenRotationEncoder(unit_direction(33), rates=(0.2, 0.5, 1.0), scales=(1.0, 1.0, 1.0))
    config = SmoothingConfig(SIGMA, n0=64, n=20_000, granularity="token")
    reached = SmoothedEncoder(stable, batch_size=256).certify(
        point_at(stable.w, 0.1), config, [0.0], seed=4, stop=StopRule(fcsb=0.6, radii=(0.0,))
    )
    assert reached.stopped_by == "target_reached" and reached.n < 20_000 and reached.certified_fcsb[0] >= 0.6
    assert reached.tokens is not None and min(reached.tokens.score_lower) == reached.score_lower >= 0.6
    # the fragile encoder's token 3 has score e^{-2} ≈ 0.135: a certified 0.5 is out of reach for it alone
    encoder = fragile_encoder()
    x = point_at(encoder.w, 0.1)
    smoothed = SmoothedEncoder(encoder, batch_size=256)
    hopeless = smoothed.certify(x, config, [0.0], seed=4, stop=StopRule(fcsb=0.5, radii=(0.0,)))
    assert hopeless.stopped_by == "target_unreachable" and hopeless.n < 20_000


def test_a_prediction_certificate_needs_global_granularity() -> None:
    from fsmllm.certify import CosineClassifier

    classifier = CosineClassifier.from_rows(["a", "b"], torch.eye(2))
    config = SmoothingConfig(sigma=SIGMA, granularity="token")
    with pytest.raises(ValueError, match="granularity 'global'"):
        SmoothingRun(torch.zeros(3, 4, 4), config, seed=0, classifier=classifier)
    with pytest.raises(ValueError, match="unknown granularity"):
        SmoothingConfig(sigma=SIGMA, granularity="patch")  # type: ignore[arg-type]


def test_answer_benchmark_features_are_the_servers_token_features() -> None:
    """benchmarks/booster_answers.py --granularity token feeds the model what the server serves: the smoothed
    features of a token-level run with the same noise."""
    from fsmllm.encoders import load_encoder
    from fsmllm.lm.training import encode_features

    encoder = load_encoder("tiny-vit", image_size=16).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(5)
    noisy = x[None] + SIGMA * torch.randn((8, 1, 3, 16, 16), generator=generator)
    with torch.no_grad():
        raw = encoder(noisy.flatten(0, 1))
        _, served = encode_features(encoder, x, SIGMA, copies=8, seed=5, granularity="token")
        _, whole = encode_features(encoder, x, SIGMA, copies=8, seed=5)
    flat = torch.nn.functional.normalize(raw.flatten(1), dim=1).mean(0).reshape(raw.shape[1:])
    directions = torch.nn.functional.normalize(torch.nn.functional.normalize(raw, dim=2).mean(0), dim=1)
    torch.testing.assert_close(served[0], directions * flat.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[0], flat, atol=1e-6, rtol=0)
