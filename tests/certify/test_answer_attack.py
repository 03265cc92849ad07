"""PGD against a certified answer's smoothed classifier (tiny encoder and language model, real transformers code):
within the certified radius the attack cannot push the vote share of the certified answer below what the
certificate guarantees, Φ(Φ⁻¹(p̲) − ε/σ) (Cohen et al., Theorem 1 applied at the attacked image)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image
from scipy.stats import norm

from fsmllm.attacks import vote_attack
from fsmllm.certify.answers import AnswerConfig, certify_answer, normalise_answer
from fsmllm.certify.sampling import SampleRun, run_batched
from fsmllm.encoders import load_encoder
from fsmllm.images import to_pixels
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.models import load_model
from fsmllm.lm.training import answer_loss

from ..api.live import png_bytes

SIGMA = 0.25
PROMPT = "What is this?"
GREEDY = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module")
def parts():
    model = load_model("tiny-test")
    encoder = load_encoder("tiny-cnn", image_size=16).eval().requires_grad_(False)
    return model, encoder


def answers(model, encoder, features: torch.Tensor) -> list[str]:
    tokens = features.reshape(features.shape[0], encoder.num_tokens, encoder.token_dim)
    return [g.text for g in model.generate_batch(tokens, PROMPT, GREEDY)]


def test_pgd_within_the_radius_keeps_the_guaranteed_vote_share(parts) -> None:
    model, encoder = parts
    x = to_pixels(Image.open(io.BytesIO(png_bytes(3))), 16)
    config = AnswerConfig(sigma=SIGMA, n0=16, n=300, alpha=0.01)
    certificate = certify_answer(x, encoder, lambda f: answers(model, encoder, f), config, seed=1)
    assert not certificate.abstain, certificate
    others = [text for text, key, _ in certificate.votes if key != certificate.normalised]
    target = others[0] if others else "a dog"
    eps = certificate.radius / 2
    shape = (-1, encoder.num_tokens, encoder.token_dim)

    def wrong_answer_loss(features: torch.Tensor) -> torch.Tensor:  # the wrong answer's likelihood over the votes
        return answer_loss(model, features.reshape(shape), [target] * features.shape[0], PROMPT)

    attacked = vote_attack(encoder, x, eps, wrong_answer_loss, SIGMA, samples=8, steps=10, seed=2)
    assert float((attacked - x).norm()) <= eps + 1e-5

    votes = 800

    def share(image: torch.Tensor) -> float:
        """The certified answer's vote share at ``image`` (fresh noise), an estimate of p_A there."""
        run = SampleRun(image, SIGMA, votes, seed=99)
        run_batched([run], encoder, 128)
        return sum(normalise_answer(a) == certificate.normalised for a in answers(model, encoder, run.features())) / votes

    guaranteed = norm.cdf(norm.ppf(certificate.p_lower) - eps / SIGMA)
    assert guaranteed > 0.5
    # the observed share estimates p_A(x') ≥ guaranteed; 4 standard errors of Monte Carlo slack
    assert share(attacked) >= guaranteed - 4 * math.sqrt(guaranteed * (1 - guaranteed) / votes)
    # the attack has teeth: far outside the radius (4 R) it does move the votes (0.92 -> 0.55 when written)
    far = vote_attack(encoder, x, 4 * certificate.radius, wrong_answer_loss, SIGMA, samples=8, steps=10, seed=2)
    assert share(far) < share(x) - 0.15
