"""The Monte Carlo estimator's engineering contract: reproducibility, batching independence, streaming."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from scipy.stats import norm
import torch
import torch.nn.functional as F

from fsmllm.api.schemas import CertificateOut, InterimCertificateOut, PredictionOut
from fsmllm.certify import (
    NOISE_BLOCK,
    CosineClassifier,
    InterimCertificate,
    SmoothedEncoder,
    SmoothingConfig,
    SmoothingRun,
    StopRule,
    run_batched,
)
from fsmllm.certify.bounds import certified_radius
from fsmllm.certify.certificate import certified_fcsb, served_fcsb
from fsmllm.certify.config import new_seed
from fsmllm.certify.sampling import NoisyCopies, SampleRun

from .analytic import RotationEncoder, TokenRotationEncoder, TwoValueEncoder, point_at, unit_direction


def small_net(seed: int = 0) -> torch.nn.Module:
    """A small random conv net: features that vary smoothly and in many dimensions."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 16)
    ).eval()
    return net.requires_grad_(False)


def certify(batch_size: int, seed: int = 1, **kw):
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    return SmoothedEncoder(small_net(), batch_size=batch_size).certify(
        image, SmoothingConfig(0.25, n0=50, n=300), [0.05, 0.1], seed=seed, **kw
    )


def test_same_seed_same_certificate_whatever_the_batch_size() -> None:
    reference = certify(batch_size=350)
    for batch_size in (1, 7, NOISE_BLOCK, 64):
        other = certify(batch_size=batch_size)
        assert other.score_lower == pytest.approx(reference.score_lower, abs=1e-6)
        assert other.certified_fcsb == pytest.approx(reference.certified_fcsb, abs=1e-6)
        torch.testing.assert_close(other.smoothed_feature, reference.smoothed_feature, atol=1e-6, rtol=0)
    assert certify(batch_size=64, seed=2).score_lower != reference.score_lower


def test_packing_many_runs_into_one_batch_equals_running_them_alone() -> None:
    net = small_net()
    config = SmoothingConfig(sigma=0.5, n0=20, n=100)
    images = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    alone = []
    for i, image in enumerate(images):
        run = SmoothingRun(image, config, seed=i)
        run_batched([run], net, batch_size=16)
        alone.append(run.certificate([0.1]))
    together = [SmoothingRun(image, config, seed=i) for i, image in enumerate(images)]
    batch_sizes: list[int] = []
    run_batched(together, lambda x: (batch_sizes.append(len(x)), net(x))[1], batch_size=64)
    assert max(batch_sizes) == 64  # samples of several runs really shared batches
    for single, packed in zip(alone, (run.certificate([0.1]) for run in together)):
        assert packed.score_lower == pytest.approx(single.score_lower, abs=1e-6)
        torch.testing.assert_close(packed.direction, single.direction, atol=1e-6, rtol=0)


def tensor_elements(run: SmoothingRun) -> int:
    return sum(v.numel() for v in vars(run).values() if isinstance(v, torch.Tensor))


def array_bytes(run: SmoothingRun) -> int:
    return sum(v.nbytes for v in vars(run).values() if isinstance(v, np.ndarray))


def test_memory_does_not_grow_with_the_number_of_samples() -> None:
    """The run keeps running sums and at most one block of noise, however many samples it draws; besides them
    only the n scalars c_i (8 bytes each, grown by doubling), never a feature per sample."""
    w = unit_direction(0)
    encoder = RotationEncoder(w, a=2.0)
    image = point_at(w, 0.1)
    peaks = []
    for n in (100, 5000):
        run = SmoothingRun(image, SmoothingConfig(sigma=0.25, n0=NOISE_BLOCK, n=n), seed=0)
        peak = 0

        def encode(x: torch.Tensor) -> torch.Tensor:
            nonlocal peak
            peak = max(peak, tensor_elements(run))
            return encoder(x)

        run_batched([run], encode, batch_size=7)
        peaks.append(max(peak, tensor_elements(run)))
        assert array_bytes(run) <= 8 * max(2 * n, 1024)
    assert max(peaks) <= (NOISE_BLOCK + 1) * image.numel() + 64  # image, one noise block, sums


def test_progress_reports_every_sample_once() -> None:
    done: list[int] = []
    certify(batch_size=64, progress=done.append)
    assert sum(done) == 350


def test_selection_and_estimation_phases_are_kept_apart() -> None:
    w = unit_direction(1)
    run = SmoothingRun(point_at(w, 0.1), SmoothingConfig(sigma=0.25, n0=10, n=20), seed=0)
    first = run.take(100)
    assert first is not None and first.shape[0] == 10  # never more than the selection samples
    assert run.take(100) is None  # the estimation samples need û: wait for the features
    with pytest.raises(RuntimeError, match="outstanding"):
        run.consume(torch.zeros(11, 2))
    with pytest.raises(RuntimeError, match="not finished"):
        run.certificate([0.1])
    run.consume(RotationEncoder(w, 2.0)(first))
    second = run.take(100)
    assert second is not None and second.shape[0] == 20


def test_noise_has_the_requested_scale() -> None:
    image = torch.full((3, 16, 16), 0.5)
    run = SmoothingRun(image, SmoothingConfig(sigma=0.3, n0=500, n=2), seed=0)
    noisy = run.take(500)
    assert noisy is not None
    assert float((noisy - image).std()) == pytest.approx(0.3, rel=0.01)
    assert float((noisy - image).mean()) == pytest.approx(0.0, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": math.nan}, "sigma"),
        ({"sigma": 0.25, "n0": 0}, "n0"),
        ({"sigma": 0.25, "n": 1}, "at least 2"),
        ({"sigma": 0.25, "alpha": 0.0}, "alpha"),
        ({"sigma": 0.25, "bound": "magic"}, "unknown bound"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SmoothingConfig(**kwargs)


def test_bad_inputs_to_certify() -> None:
    smoother = SmoothedEncoder(small_net())
    with pytest.raises(ValueError, match="radii"):
        smoother.certify(torch.rand(3, 4, 4), SmoothingConfig(0.25, n0=10, n=10), [-0.1])
    with pytest.raises(ValueError, match="one image"):
        smoother.certify(torch.rand(2, 3, 4, 4), SmoothingConfig(0.25, n0=10, n=10))


def test_random_seed_is_reported_and_reproduces_the_certificate() -> None:
    first = certify(batch_size=64, seed=None)
    again = certify(batch_size=64, seed=first.seed)
    assert again.score_lower == first.score_lower


def test_prediction_certificate_on_a_two_label_step() -> None:
    """f = e1 beyond a hyperplane, e2 before it: the true robust radius is the distance z to it."""
    w = unit_direction(2)
    encoder = TwoValueEncoder(w, b=0.0, theta=math.pi / 2)
    classifier = CosineClassifier.from_rows(["beyond", "before"], torch.eye(2))
    sigma, z = 0.25, 0.4
    cert = SmoothedEncoder(encoder, batch_size=2048).certify(
        point_at(w, z), SmoothingConfig(sigma, n0=100, n=10000), [0.0], seed=0, classifier=classifier
    )
    prediction = cert.prediction
    assert prediction is not None and prediction.label == "beyond" and prediction.runner_up_index == 1
    assert prediction.radius is not None and 0 < prediction.radius <= z
    assert prediction.certified_at(prediction.radius * 0.99) and not prediction.certified_at(prediction.radius)
    far = SmoothedEncoder(encoder, batch_size=2048).certify(
        point_at(w, -0.01), SmoothingConfig(sigma, n0=100, n=2000), [0.0], seed=0, classifier=classifier
    )
    assert far.prediction is not None and far.prediction.abstain  # on the boundary: nothing to certify


def test_classifier_validation() -> None:
    with pytest.raises(ValueError, match="one row per name"):
        CosineClassifier.from_rows(["a", "b"], torch.eye(3))
    with pytest.raises(ValueError, match="^a classifier needs at least two labels$"):
        CosineClassifier.from_rows(["a"], torch.ones(1, 3))
    classifier = CosineClassifier.from_rows(["a", "b"], torch.eye(2) * 3)
    torch.testing.assert_close(classifier.weights.norm(dim=1), torch.ones(2))
    w = unit_direction(3)
    with pytest.raises(ValueError, match="dimension"):
        SmoothedEncoder(RotationEncoder(w, 1.0)).certify(
            point_at(w, 0.1),
            SmoothingConfig(0.25, n0=10, n=10),
            classifier=CosineClassifier.from_rows(["a", "b"], torch.eye(3)[:2]),
        )


def test_the_paper_score_relative_to_the_clean_feature_is_reported_when_asked() -> None:
    """Ŝ = E[(1 + cos(f(x+δ), f(x)))/2] (docs/paper-notes.md) on the rotation encoder: E[cos(a(z+g) − az)] with
    g ~ N(0, σ²) is e^{−a²σ²/2}, so Ŝ = (1 + S)/2 exactly."""
    w = unit_direction(9)
    encoder = RotationEncoder(w, a=2.0)
    x = point_at(w, 0.2)
    cert = SmoothedEncoder(encoder, batch_size=512).certify(
        x, SmoothingConfig(0.25, n0=100, n=4000), [0.1], seed=1, reference=encoder(x[None])[0]
    )
    assert cert.clean_score == pytest.approx((1 + encoder.score(0.25)) / 2, abs=0.005)
    assert certify(batch_size=64).clean_score is None


def test_interim_certificates_exist_only_for_anytime_bounds_and_only_after_a_checkpoint() -> None:
    w = unit_direction(10)
    for bound, expected in (("betting", True), ("empirical-bernstein", False)):
        run = SmoothingRun(point_at(w, 0.1), SmoothingConfig(sigma=0.25, n0=10, n=200, bound=bound), seed=0)
        run.consume(RotationEncoder(w, 1.0)(run.take(10)))
        assert run.interim([0.1]) is None
        run.consume(RotationEncoder(w, 1.0)(run.take(NOISE_BLOCK)))
        interim = run.interim([0.1])
        assert (interim is not None) is expected
        if interim is not None:
            assert interim.n == NOISE_BLOCK and interim.radii == (0.1,)


def test_interim_is_the_certificate_of_the_last_checkpoint_and_is_computed_once_per_checkpoint() -> None:
    """The interim certificate (a progress event's) states the best anytime lower bound p̲ over the checkpoints so
    far, at n = the last checkpoint's sample count, and FCSB(p̲, σ, ε) at each asked radius; it is computed once
    per checkpoint and radii (the same object until either changes). Its JSON is the progress event's."""
    w = unit_direction(11)
    encoder = RotationEncoder(w, 1.0)
    sigma, radii = 0.25, [0.05, 0.2]
    run = SmoothingRun(point_at(w, 0.1), SmoothingConfig(sigma=sigma, n0=10, n=4 * NOISE_BLOCK), seed=0)
    run.consume(encoder(run.take(10)))
    seen = []
    for _ in range(2):
        run.consume(encoder(run.take(NOISE_BLOCK)))
        interim = run.interim(radii)
        assert interim is run.interim(radii) and interim is not run.interim(radii[:1])
        lower = float(run._best_lower.min())
        values = [None if math.isnan(v) else float(v) for v in certified_fcsb(lower, sigma, np.array(radii))]
        assert values[0] is not None  # (the other radius abstains: None, as in a certificate)
        assert interim == InterimCertificate(run.estimated, lower, tuple(radii), tuple(values))
        assert json.loads(json.dumps(InterimCertificateOut.of(interim).model_dump())) == {
            "n": run.estimated,
            "score_lower": lower,
            "radii": [{"radius": r, "certified_fcsb": v} for r, v in zip(radii, values)],
        }
        seen.append(run.interim(radii[:1]))
    assert [s.n for s in seen] == [NOISE_BLOCK, 2 * NOISE_BLOCK]  # a new checkpoint: a new certificate


@pytest.mark.parametrize("granularity", ["global", "token"])
def test_the_json_states_every_number_of_the_certificate_under_its_documented_name(granularity: str) -> None:
    """The certificate's JSON (the server's and the CLI's, rendered by the API schema): plain JSON, every number of
    the certificate and what reproduces it; the optional parts (worst token, per-token values, stop rule) exactly
    when they exist."""
    encoder = TokenRotationEncoder(unit_direction(12), rates=(0.5, 2.0), scales=(1.0, 1.0))
    x = point_at(encoder.w, 0.2)
    stop = StopRule(fcsb=0.1, radii=(0.05,))
    cert = SmoothedEncoder(encoder, batch_size=256).certify(
        x, SmoothingConfig(0.25, n0=20, n=3 * NOISE_BLOCK, alpha=0.01, granularity=granularity), [0.05, 0.5], seed=5,
        stop=stop, reference=encoder(x[None])[0] if granularity == "global" else None,
    )
    def rendered(per_token: bool) -> dict[str, object]:
        out = CertificateOut.from_certificate(cert, "rotation", "none", 4, per_token=per_token).model_dump()
        return json.loads(json.dumps(out, allow_nan=False))  # plain JSON (no tensors, no NaN)

    summary = rendered(per_token=True)
    expected: dict[str, object] = {
        "granularity": granularity, "sigma": 0.25, "n0": 20, "n": cert.n, "n_budget": 3 * NOISE_BLOCK,
        "stopped_by": cert.stopped_by, "alpha": 0.01, "bound": "betting", "seed": 5,
        "score_estimate": cert.score_estimate, "score_lower": cert.score_lower, "abstain": cert.abstain,
        "served_angle": cert.served_angle,
        "radii": [
            {"radius": r, "certified_fcsb": c, "served_fcsb": v, "estimated_fcsb": e}
            for r, c, v, e in zip([0.05, 0.5], cert.certified_fcsb, cert.served_fcsb, cert.estimated_fcsb)
        ],
        "stop": {"fcsb": 0.1, "radii": [0.05], "target_cos": None, "tolerance": None},
    }
    if granularity == "token":
        assert cert.tokens is not None and cert.worst_token is not None
        per_token = cert.token_certified_fcsb()
        expected["worst_token"] = cert.worst_token
        expected["tokens"] = [
            {"token": t, "score_estimate": cert.tokens.score_estimate[t], "score_lower": cert.tokens.score_lower[t],
             "served_angle": cert.tokens.served_angle[t], "certified_fcsb": per_token[t]}
            for t in range(2)
        ]
        assert rendered(per_token=False)["tokens"] is None and rendered(per_token=False)["worst_token"] == cert.worst_token
    else:
        expected |= {"worst_token": None, "tokens": None}
        message = "per-token values exist only for a token-level certificate (granularity 'token')"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            cert.token_certified_fcsb()
    assert {name: summary[name] for name in expected} == expected


def test_the_prediction_certificate_renders_every_field() -> None:
    w = unit_direction(13)
    classifier = CosineClassifier.from_rows(["beyond", "before"], torch.eye(2))
    cert = SmoothedEncoder(TwoValueEncoder(w, b=0.0, theta=math.pi / 2), batch_size=512).certify(
        point_at(w, 0.4), SmoothingConfig(0.25, n0=50, n=500), [0.0], seed=0, classifier=classifier
    )
    prediction = cert.prediction
    assert prediction is not None and prediction.radius is not None
    assert json.loads(json.dumps(PredictionOut.of(prediction).model_dump())) == {
        "label_index": 0,
        "label": "beyond",
        "top_lower": prediction.top_lower,
        "runner_up_index": 1,
        "runner_up_upper": prediction.runner_up_upper,
        "radius": prediction.radius,
        "alpha": 0.0005,
    }


def test_a_drawn_seed_is_one_a_request_may_send_back() -> None:
    """Seeds are reported so that a certificate can be reproduced: a drawn one must be a valid request seed,
    0 ≤ seed < 2⁶³ (a signed 64-bit integer, as the API and JSON clients accept it)."""
    seeds = [new_seed() for _ in range(200)]
    assert all(0 <= seed < 2**63 for seed in seeds) and len(set(seeds)) == len(seeds)
    assert max(seeds) >= 2**61  # all 63 bits are drawn (fails with probability 4^-200 when they are)


def test_the_certified_radius_of_a_certificate_at_the_edges() -> None:
    """c = p̲ is certified at radius 0; c > p̲ not at all (None); c = 0 is a valid target; a certificate whose
    score is not certified positive (p̲ ≤ 0) certifies nothing, not even c = 0."""
    cert = certify(batch_size=350)
    assert cert.score_lower > 0.1
    assert cert.certified_radius(cert.score_lower) == 0.0
    assert cert.certified_radius(min(cert.score_lower + 1e-9, 0.999)) is None
    assert cert.certified_radius(0.0) == pytest.approx(float(certified_radius(cert.score_lower, 0.25, 0.0)))
    assert dataclasses.replace(cert, score_lower=0.0).certified_radius(0.0) is None
    with pytest.raises(ValueError, match=r"target_cos must lie in \[0, 1\), got 1.0"):
        cert.certified_radius(1.0)


def test_certify_defaults() -> None:
    """Unset, a certification draws n0 = 100 selection and n = 1000 estimation samples at α = 0.001 with the
    betting bound, for the radii 0.1, 0.25 and 0.5."""
    w = unit_direction(14)
    cert = SmoothedEncoder(RotationEncoder(w, 1.0)).certify(point_at(w, 0.1), SmoothingConfig(0.25), seed=0)
    config = cert.config
    assert (config.n0, config.n, config.alpha, config.bound, config.granularity) == (100, 1000, 0.001, "betting", "global")
    assert cert.radii == (0.1, 0.25, 0.5) and cert.n == 1000


def test_stop_rule_validation() -> None:
    message = "a stop rule needs exactly one of fcsb (with radii) and target_cos (with tolerance)"
    for kwargs in ({}, {"fcsb": 0.5, "radii": (0.1,), "target_cos": 0.5, "tolerance": 0.01}):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            StopRule(**kwargs)  # type: ignore[arg-type]
    for kwargs in ({"fcsb": 1.0, "radii": (0.1,)}, {"fcsb": -0.1, "radii": (0.1,)}, {"fcsb": 0.5}):
        with pytest.raises(ValueError, match=r"stop_at_fcsb must lie in \[0, 1\) and come with radii"):
            StopRule(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius_tolerance must be a positive l2 norm, got 0"):
        StopRule(target_cos=0.5, tolerance=0.0)
    assert StopRule(fcsb=0.0, radii=(0.1,)).fcsb == 0.0 and StopRule(target_cos=0.5, tolerance=0.01).tolerance == 0.01


def never_called() -> float:
    raise AssertionError("the upper bound was computed although the rule did not need it")


def test_the_fcsb_stop_rule_stops_exactly_when_the_target_is_certified_or_out_of_reach() -> None:
    """``stop_at_fcsb`` C at radii R: target reached ⇔ FCSB(p̲, σ, max R) ≥ C (the largest radius decides);
    unreachable ⇔ even the upper confidence bound p̄ cannot certify C; otherwise go on."""
    from fsmllm.certify.bounds import fcsb

    sigma, rule = 0.25, StopRule(fcsb=0.8, radii=(0.05, 0.2))
    grid = np.linspace(0.5, 0.999, 400)
    reached = [rule.decide(p, lambda: 0.999, sigma) == "target_reached" for p in grid]
    assert reached == [bool(fcsb(p, sigma, 0.2) >= 0.8) for p in grid] and any(reached) and not all(reached)
    for p, done in zip(grid, reached):
        if done:  # p̄ is not computed then
            assert rule.decide(p, never_called, sigma) == "target_reached"
        else:
            assert rule.decide(p, lambda: 0.999, sigma) is None  # p̄ = 0.999 certifies 0.8 at 0.2: go on
            assert rule.decide(p, lambda: p, sigma) == "target_unreachable"
    needed = float(grid[np.array(reached)][0])
    assert rule.decide(0.0, lambda: needed, sigma) is None  # a p̄ that would certify the target: go on
    assert rule.decide(1.0, never_called, sigma) == "target_reached"
    # at the edge: a p̲ exactly at the needed score certifies C (FCSB ≥ C); a p̄ exactly there can still reach it
    exact = float(1.0 - 2.0 * norm.sf(norm.isf(0.1) + 0.2 / sigma))
    assert fcsb(exact, sigma, 0.2) == pytest.approx(0.8)
    assert rule.decide(exact, never_called, sigma) == "target_reached"
    assert rule.decide(0.0, lambda: exact, sigma) is None


def test_the_radius_stop_rule_stops_when_the_certified_radius_is_pinned_down() -> None:
    """``target_cos`` c with ``radius_tolerance`` τ: unreachable when p̄ < c (no radius certifies c); go on while
    p̲ < c; stop once R(p̲) ≥ R(p̄) − τ, R the certified radius of c (the radius is known to within τ)."""
    sigma, rule = 0.25, StopRule(target_cos=0.9, tolerance=0.01)
    assert rule.decide(0.5, lambda: 0.89, sigma) == "target_unreachable"
    assert rule.decide(0.5, lambda: 0.95, sigma) is None
    assert rule.decide(0.89, lambda: 0.9, sigma) is None  # p̄ = c exactly is not out of reach
    assert rule.decide(0.9, lambda: 0.9, sigma) == "radius_converged"  # both radii 0
    for lower, upper in [(0.95, 0.951), (0.95, 0.97), (0.97, 0.975), (0.9, 0.95)]:
        radii = certified_radius(np.array([lower, upper]), sigma, 0.9)
        converged = radii[0] >= radii[1] - 0.01
        assert rule.decide(lower, lambda: upper, sigma) == ("radius_converged" if converged else None)
    assert rule.decide(0.95, lambda: 0.951, sigma) == "radius_converged"
    assert rule.decide(0.9, lambda: 0.97, sigma) is None
    # at the edge: R(p̲) = R(p̄) − τ exactly counts as pinned down
    low, high = certified_radius(np.array([0.95, 0.96]), sigma, 0.9)
    edge = StopRule(target_cos=0.9, tolerance=float(high - low))
    assert high - edge.tolerance == low and edge.decide(0.95, lambda: 0.96, sigma) == "radius_converged"


def test_a_checkpoint_on_the_first_sample_of_a_batch_is_not_skipped() -> None:
    """Estimation batches of 63 start at sample 63, one before the checkpoint at 64: a stop rule first met there
    stops there, as it does when the samples come one by one (checkpoints are counts, not batch ends)."""
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    rule = StopRule(fcsb=0.5, radii=(0.01,))
    for batch_size in (1, 63):
        certificate = SmoothedEncoder(small_net(), batch_size=batch_size).certify(
            image, SmoothingConfig(0.25, n0=10, n=1000), [0.01], seed=3, stop=rule
        )
        assert (certificate.n, certificate.stopped_by) == (2 * NOISE_BLOCK, "target_reached")


@pytest.mark.parametrize("granularity", ["global", "token"])
def test_the_feature_sums_are_accumulated_in_float64(granularity: str) -> None:
    """The score estimate Ŝ² = (‖Σ f̃_i‖² − m)/(m(m − 1)) subtracts two numbers of order m²: the running sums
    must be float64 (float32 sums are off by ~1e-6 at m = 4000). Features: two fixed unit directions (cosine
    0.48) in two tokens, chosen by a noisy pixel, so the exact value follows from the unit features drawn.
    Those are the run's own: each batch the encoder returns is normalised by the same call on the same tensor
    as in ``SmoothingRun``, then summed exactly: a lone vector normalised instead can come out an ulp apart on
    another CPU's kernel, which moves the estimate by about 2e-8, as much as float32 sums do (2e-8 to 6e-8)."""
    u, v = F.normalize(torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]), dim=1)
    batches: list[torch.Tensor] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        pick = x.reshape(x.shape[0], -1)[:, 0] > 0.5
        batches.append(torch.where(pick[:, None], u, v)[:, None, :].repeat(1, 2, 1))
        return batches[-1]

    certificate = SmoothedEncoder(encode, batch_size=64).certify(
        torch.full((3, 4, 4), 0.5),
        SmoothingConfig(0.25, n0=100, n=3900, bound="hoeffding", granularity=granularity),
        [0.1],
        seed=0,
    )
    features = torch.cat(batches)
    m, a = features.shape[0], int((features[:, 0, 0] > 0).sum())
    if granularity == "global":
        units = torch.cat([F.normalize(batch.reshape(batch.shape[0], -1), dim=1) for batch in batches])
    else:
        units = torch.cat([F.normalize(batch, dim=2) for batch in batches])[:, 0]
    squared_norm = float(units.double().sum(0).square().sum())  # float64 sums of float32 numbers: exact here
    exact = math.sqrt((squared_norm - m) / (m * (m - 1)))
    assert m == 4000 and 1000 < a < 3000 and abs(certificate.score_estimate - exact) < 1e-10


def test_a_sample_run_keeps_the_mean_unit_feature_of_each_votes_copies() -> None:
    """SampleRun (the votes of a certified answer): ``count`` results, each the mean of ``inner`` unit features of
    consecutive noisy copies, drawn from the seed's noise whatever the batches; the take/consume protocol of
    SmoothingRun, and no result before every sample is in."""
    pixels = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    net = small_net()
    run = SampleRun(pixels, 0.25, count=3, seed=5, inner=2)
    assert (run.total, run.done, run.interim([0.1])) == (6, False, None)
    with pytest.raises(RuntimeError, match=r"^run not finished: 0 of 6 samples consumed$"):
        run.features()
    first, second = run.take(4), run.take(10)
    assert first is not None and second is not None and (first.shape[0], second.shape[0]) == (4, 2)
    assert run.take(1) is None
    with pytest.raises(RuntimeError, match=r"^7 features for 6 outstanding samples$"):
        run.consume(torch.zeros(7, 16))
    run.consume(net(first))
    assert not run.done
    with pytest.raises(RuntimeError, match=r"^3 features for 2 outstanding samples$"):
        run.consume(torch.zeros(3, 16))
    run.consume(net(second))
    inputs = NoisyCopies(pixels, 0.25, 5).draw(6)
    torch.testing.assert_close(torch.cat([first, second]), inputs)
    torch.testing.assert_close(run.features(), F.normalize(net(inputs), dim=1).reshape(3, 2, -1).mean(1))
    assert run.done and SampleRun(pixels, 0.25, count=2, seed=0).total == 2  # one copy per vote by default


@pytest.mark.parametrize(
    ("pixels", "count", "inner", "message"),
    [
        (torch.rand(2, 3, 4, 4), 2, 1, r"pixels must be one image \[C, H, W\], got shape \(2, 3, 4, 4\)"),
        (torch.rand(3, 4, 4), 0, 1, "count and inner must be at least 1, got 0 and 1"),
        (torch.rand(3, 4, 4), 1, 0, "count and inner must be at least 1, got 1 and 0"),
    ],
)
def test_a_sample_run_refuses_what_it_cannot_draw(pixels: torch.Tensor, count: int, inner: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        SampleRun(pixels, 0.25, count=count, seed=0, inner=inner)
    assert SampleRun(torch.rand(3, 4, 4), 0.25, count=1, seed=0, inner=1).total == 1


def test_the_served_bound_moves_the_certified_angle_by_the_offset_and_abstains_past_a_right_angle() -> None:
    """cos(arccos b + θ) while the angle stays below π/2; NaN (abstain) where b is NaN or the angles add to π/2 or
    more: past π the cosine would rise again and claim more than the triangle inequality gives."""
    served = served_fcsb(np.array([0.5, 0.9, 0.0, -0.9, np.nan]), 0.3)
    assert served[0] == pytest.approx(math.cos(math.acos(0.5) + 0.3)) and served[1] == pytest.approx(math.cos(math.acos(0.9) + 0.3))
    assert np.isnan(served[2:]).all()
    assert served_fcsb(np.array([0.9]), 0.0)[0] == pytest.approx(0.9)


def test_a_constant_encoder_is_certified_with_score_one() -> None:
    """Every noisy copy with the same feature: S = 1 exactly, although that float32 unit feature's squared norm
    is 1 + 2e-7 (the estimate is clipped to [0, 1], so the certificate does not fail on a score above 1)."""
    feature = torch.randn(8, generator=torch.Generator().manual_seed(0))
    assert float(F.normalize(feature, dim=0).double().square().sum()) > 1.0
    certificate = SmoothedEncoder(lambda x: feature.expand(x.shape[0], 8)).certify(
        torch.rand(3, 4, 4), SmoothingConfig(0.25, n0=10, n=100), [0.1], seed=0
    )
    assert certificate.score_estimate == 1.0 and certificate.estimated_fcsb[0] <= 1.0
    assert certificate.stopped_by == "budget"  # no stop rule: all n estimation samples


def test_pixels_must_be_float32_or_float64() -> None:
    message = "pixels must be float32 (or float64), got torch.float16: the noise is drawn in the pixels' dtype"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        SmoothingRun(torch.rand(3, 4, 4).half(), SmoothingConfig(sigma=0.25, n0=2, n=2), seed=0)


def test_the_label_sums_are_accumulated_in_float64() -> None:
    """The prediction certificate's mean label cosine comes from running sums that must be float64, like the
    feature sums: with a constant feature every sample has the same cosine c to the chosen label, so the
    Hoeffding lower bound must be exactly that of the mean c over n = 4000 (a float32 sum drifts by ~1e-5).
    The feature is a basis vector, so every sample's float32 cosine is exactly ``w_near[0]`` whatever kernel
    computes the product (the other terms are exact zeros): the expected value is the code's own per-sample
    cosine on any CPU, not one computed another way (which can differ by an ulp on AVX-512/AMX)."""
    from fsmllm.certify.bounds import mean_lower_bound

    feature = torch.zeros(8)
    feature[0] = 1.0
    classifier = CosineClassifier(("near", "far"), torch.stack([feature + 0.3, -feature]))
    certificate = SmoothedEncoder(lambda x: feature.expand(x.shape[0], 8), batch_size=64).certify(
        torch.rand(3, 4, 4),
        SmoothingConfig(0.25, n0=100, n=4000, bound="hoeffding"),
        [0.1],
        seed=0,
        classifier=classifier,
    )
    prediction = certificate.prediction
    assert prediction is not None and prediction.label == "near"
    c = float(classifier.weights[0, 0])  # exactly the float32 cosine of every sample
    exact = float(mean_lower_bound(4000 * c, 4000 * c * c, 4000, prediction.alpha / 2, "hoeffding"))
    assert abs(prediction.top_lower - exact) < 1e-10


def test_the_stop_rule_a_request_asks_for() -> None:
    betting = SmoothingConfig(0.25, bound="betting")
    assert StopRule.requested(betting, [0.1], None) is None
    assert StopRule.requested(betting, [0.1], None, target_cos=0.5) is None  # a target alone does not stop early
    assert StopRule.requested(betting, [0.1, 0.2], 0.8) == StopRule(fcsb=0.8, radii=(0.1, 0.2))
    assert StopRule.requested(betting, [], None, 0.5, 0.01) == StopRule(target_cos=0.5, tolerance=0.01)
    fixed = SmoothingConfig(0.25, bound="empirical-bernstein")
    with pytest.raises(ValueError, match="stopping early needs an anytime-valid bound: use bound 'betting'.*'empirical-bernstein'"):
        StopRule.requested(fixed, [0.1], 0.8)
    with pytest.raises(ValueError, match="anytime-valid"):
        StopRule.requested(fixed, [], None, 0.5, 0.01)
    with pytest.raises(ValueError, match="give stop_at_fcsb .* or radius_tolerance .*, not both"):
        StopRule.requested(betting, [0.1], 0.8, 0.5, 0.01)
    with pytest.raises(ValueError, match="^radius_tolerance stops a target_cos request: give target_cos too$"):
        StopRule.requested(betting, [0.1], None, None, 0.01)
    with pytest.raises(ValueError, match="^stop_at_fcsb needs at least one radius$"):
        StopRule.requested(betting, [], 0.8)
