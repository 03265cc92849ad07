"""Certified answers through the real runtime (device worker, vote chunks, batched generation) against ground
truth: a "language model" whose answer is which side of a hyperplane the image lies on, so the smoothed
answer's probability Φ(z/σ) and its true radius z (the distance to the hyperplane) are known in closed form."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binom, norm

from fsmllm.api.serve import policy_from
from fsmllm.api.settings import Settings
from fsmllm.encoders.base import VisionEncoder
from fsmllm.certify.answers import certify_answer, vote_chunks
from fsmllm.engine.runtime import Runtime
from fsmllm.lm.base import Generation, SamplingParams, TextStream

from ..certify.analytic import unit_direction

SIGMA = 0.25


class HalfSpaceEncoder(VisionEncoder):
    """``f(x) = (<w, x> − b, 0)`` as one token of width 2 (4 px images, ‖w‖ = 1): its unit feature is (±1, 0)."""

    name = "half-space"
    image_size = 4
    num_tokens = 1
    token_dim = 2

    def __init__(self, b: float) -> None:
        super().__init__()
        self.w = unit_direction(0).reshape(-1)
        self.b = b

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        z = pixels.reshape(pixels.shape[0], -1) @ self.w - self.b
        return torch.stack([z, torch.zeros_like(z)], dim=1)[:, None, :]


class SideModel:
    """Answers "Left." when the first feature is positive, "right" otherwise (the two normalise apart)."""

    name = "side"
    max_concurrency = 1
    precision = "float32"

    def generate_batch(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> list[Generation]:
        return [Generation("Left." if v > 0 else "right", (), "stop", 1) for v in visual_tokens[:, 0, 0].tolist()]

    def generate(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> Generation:
        return self.generate_batch(visual_tokens[None], prompt, params)[0]

    def stream(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> TextStream:
        raise NotImplementedError("certified answers never stream")


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8))


def runtime_at(z: float, batch_size: int = 64) -> Runtime:
    """A runtime whose image lies at signed distance ``z`` from the hyperplane."""
    settings = Settings(model="none", max_n=100_000, _env_file=None)
    probe = HalfSpaceEncoder(0.0)
    x = Runtime(probe, policy_from(settings)).pixels(IMAGE).reshape(-1)
    encoder = HalfSpaceEncoder(float(x @ probe.w) - z)
    return Runtime(encoder, policy_from(settings), model=SideModel(), batch_size=batch_size, queue_capacity=128)


def certify_all(runtime: Runtime, requests: list[tuple]) -> list:
    """Certified answers for ``(n0, n, seed, target radius[, copies per vote])`` requests, run concurrently on
    ``runtime``."""

    async def main() -> list:
        configs = [runtime.policy.answer_config(SIGMA, r[0], r[1], 0.2, inner=(r + (1,))[4], radius=r[3]) for r in requests]
        return await asyncio.gather(
            *(runtime.certify_answer(IMAGE, "Which side?", c, SamplingParams(max_tokens=4), seed=r[2]) for c, r in zip(configs, requests))
        )

    runtime.start()
    try:
        return asyncio.run(main())
    finally:
        runtime.stop()


def test_radius_and_vote_share_match_the_half_space_ground_truth() -> None:
    """p = 0.85 at the image: over 40 certificates (4000 votes) the share of "left" votes is 0.85 within 5
    standard errors (the noise really is N(0, σ² I) on the pixels, through worker and chunks), and the
    certified radius exceeds the true radius z = σ Φ⁻¹(0.85) in no more than a share α = 0.2 of them. The n0 = 8
    selection votes pick "right" only where at most 4 of them say "left" (2 % of the seeds), which abstains."""
    p = 0.85
    z = SIGMA * norm.ppf(p)
    trials = 40
    certificates = certify_all(runtime_at(z), [(8, 100, seed, None) for seed in range(trials)])
    picked = [c.normalised for c in certificates]
    assert set(picked) <= {"left", "right"} and all(c.answer == "Left." for c in certificates if c.normalised == "left")
    assert picked.count("right") <= binom.isf(1e-6, trials, binom.cdf(4, 8, p))
    assert all(c.abstain for c in certificates if c.normalised == "right")
    share = sum(c.agree if c.normalised == "left" else c.n - c.agree for c in certificates) / (100 * trials)
    assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / (100 * trials))
    failures = sum(c.radius is not None and c.radius > z for c in certificates)
    assert failures <= binom.isf(1e-6, trials, 0.2)
    assert sum(not c.abstain for c in certificates) > trials / 2  # and it does certify


def test_same_seed_same_certificate_whatever_the_batching() -> None:
    """The votes' noise depends on (seed, chunk) only: a worker batch of 7 and one of 64, alone or beside other
    requests, give identical certificates (early stopping included)."""
    z = SIGMA * norm.ppf(0.95)
    requests = [(8, 200, 5, None), (8, 500, 6, 0.3)]
    alone = certify_all(runtime_at(z, batch_size=64), requests)
    packed = certify_all(runtime_at(z, batch_size=7), requests + [(8, 100, 9, None)])[:2]
    assert alone == packed
    assert alone[1].stopped_by == "target_reached" and alone[1].n < 500


def test_the_runtime_equals_the_reference_executor() -> None:
    """The server's path (worker jobs, prefetched chunks, LM threads) gives exactly the certificate that
    certify_answer computes in one thread from the same seed."""
    runtime = runtime_at(SIGMA * norm.ppf(0.9))
    requests = [(8, 150, 11, None, 1), (70, 200, 12, 0.2, 1), (8, 100, 13, None, 3)]  # the last: 3 copies per vote
    served = certify_all(runtime, requests)
    model = SideModel()
    pixels = runtime.pixels(IMAGE)
    assert served[2].config.inner == 3
    for certificate, (n0, n, seed, radius, inner) in zip(served, requests):
        config = runtime.policy.answer_config(SIGMA, n0, n, 0.2, inner=inner, radius=radius)

        def answer(features: torch.Tensor) -> list[str]:
            tokens = features.reshape(-1, 1, 2)
            return [g.text for g in model.generate_batch(tokens, "Which side?", SamplingParams(max_tokens=4))]

        assert certify_answer(pixels, runtime.encoder, answer, config, seed, batch_size=13) == certificate


def test_other_seeds_other_votes_and_the_far_side_answers_right() -> None:
    z = -SIGMA * norm.ppf(0.9)
    a, b = certify_all(runtime_at(z), [(8, 100, 1, None), (8, 100, 2, None)])
    assert a.normalised == b.normalised == "right"
    assert a.agree != b.agree or a.votes != b.votes


def test_vote_chunks_split_each_phase() -> None:
    assert vote_chunks(32, 256) == [32, 64, 64, 64, 64]
    assert vote_chunks(100, 70) == [64, 36, 64, 6]


def test_policy_bounds_the_votes_samples() -> None:
    policy = policy_from(Settings(model="none", default_n=800, max_n=1000, _env_file=None))
    assert policy.answer_config(SIGMA, 50, 200, 0.001, inner=4).inner == 4  # (50 + 200) x 4 = 1000: at the limit
    with pytest.raises(ValueError, match="exceeds this deployment's maximum of 1000"):
        policy.answer_config(SIGMA, 32, 256, 0.001, inner=4)
