"""The evaluation's measurements: white-box attacks on one image under each defence (:func:`attack_image`), and
certified curves over images (:func:`certified_curves`), on held-out images (:func:`held_out_images`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fsmllm.attacks import (
    feature_attack,
    feature_space_attack,
    smoothed_feature,
    token_attack,
    unit_features,
    worst_token_cosine,
)
from fsmllm.certify import Certificate, Encode, Granularity, SmoothingConfig, SmoothingRun, run_shared
from fsmllm.encoders.base import VisionEncoder
from fsmllm.evaluate.config import GOALS, AttackSettings
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.data import FASHION_MNIST_PHRASES, answer_for
from fsmllm.lm.training import answer_loss, names
from fsmllm.lm.vlm import ProjectedVLM


@dataclass(frozen=True)
class AttackRow:
    """One (image, defence, goal, ε) outcome; ``sigma`` is the smoothing σ (``None`` for the undefended encoder)."""

    image: int
    defence: str
    radius: float
    observed_cos: float
    certified_fcsb: float | None
    below_certificate: bool
    answer_clean: str | None = None
    answer_attacked: str | None = None
    correct_clean: bool | None = None
    correct_attacked: bool | None = None
    goal: str = "feature"
    target: str | None = None
    names_target: bool | None = None
    sigma: float | None = None


def _tokens(encoder: VisionEncoder, unit_flat: torch.Tensor) -> torch.Tensor:
    return unit_flat.reshape(encoder.num_tokens, encoder.token_dim)


def attack_image(
    index: int,
    x: torch.Tensor,
    defences: dict[str, VisionEncoder | None],
    base: VisionEncoder,
    sigma: float,
    radii: Sequence[float],
    attack: AttackSettings,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    model: ProjectedVLM | None = None,
    answer: str | None = None,
    prompt: str = "What is this?",
    goals: Sequence[str] = ("feature",),
) -> list[AttackRow]:
    """Attack one image [3, S, S] at every radius under every defence (``None`` = the undefended ``base``),
    with every goal in ``goals`` ("answer" needs ``model`` and the true ``answer``)."""
    unknown = set(goals) - set(GOALS)
    if unknown:
        raise ValueError(f"unknown attack goals {sorted(unknown)}; choose from {', '.join(GOALS)}")
    if "answer" in goals and (model is None or answer is None):
        raise ValueError("the answer goal needs a language model and the image's true answer")
    rows: list[AttackRow] = []
    greedy = SamplingParams(max_tokens=16)
    target = target_phrase(answer) if answer is not None else None

    def ask(encoder: VisionEncoder, feature: torch.Tensor) -> tuple[str | None, bool | None]:
        if model is None:
            return None, None
        text = model.generate(_tokens(encoder, feature), prompt, greedy).text
        return text, None if answer is None else names(text, answer)

    for defence, encoder in defences.items():
        smoothed = encoder is not None
        encode = encoder if encoder is not None else base
        if smoothed:
            certificate, *token_certificates = certify_granularities(
                encode, x, sigma, n0, n, alpha, radii, seed, ("global", "token") if "token" in goals else ("global",)
            )
            clean = smoothed_feature(encode, x, sigma, attack.observe, seed=seed + 1)
            if "token" in goals:
                (token_certificate,) = token_certificates
                clean_tokens = smoothed_feature(encode, x, sigma, attack.observe, seed=seed + 1, per_token=True)
        else:
            with torch.inference_mode():
                clean = unit_features(encode, x[None])[0]
        answer_clean, correct_clean = ask(encode, clean)
        for (i, radius), goal in itertools.product(enumerate(radii), goals):
            if goal == "token":
                if smoothed:  # the undefended encoder has no token-level certificate to compare with
                    rows.append(
                        _token_row(
                            index,
                            defence,
                            sigma,
                            float(radius),
                            encode,
                            x,
                            clean_tokens,
                            token_certificate.certified_fcsb[i],
                            attack,
                            seed,
                        )
                    )
                continue
            if goal == "feature":
                adversarial = feature_attack(
                    encode, x, radius, sigma if smoothed else None, attack.samples, attack.steps, seed=seed
                )
            else:
                assert model is not None and target is not None
                adversarial = feature_space_attack(
                    encode,
                    x,
                    radius,
                    _answer_objective(model, encode, target, prompt),
                    sigma if smoothed else None,
                    attack.samples,
                    attack.steps,
                    seed=seed,
                )
            if smoothed:
                attacked = smoothed_feature(encode, adversarial, sigma, attack.observe, seed=seed + 2)
                bound = certificate.certified_fcsb[i]
            else:
                with torch.inference_mode():
                    attacked = unit_features(encode, adversarial[None])[0]
                bound = None
            observed = float(F.cosine_similarity(clean, attacked, dim=0))
            answer_attacked, correct_attacked = ask(encode, attacked)
            rows.append(
                AttackRow(
                    image=index,
                    defence=defence,
                    radius=float(radius),
                    observed_cos=observed,
                    certified_fcsb=bound,
                    below_certificate=bound is not None and observed < bound,
                    answer_clean=answer_clean,
                    answer_attacked=answer_attacked,
                    correct_clean=correct_clean,
                    correct_attacked=correct_attacked,
                    goal=goal,
                    target=target if goal == "answer" else None,
                    names_target=(
                        None
                        if goal != "answer" or answer_attacked is None
                        else target is not None and names(answer_attacked, target)
                    ),
                    sigma=sigma if smoothed else None,
                )
            )
    return rows


def _answer_objective(
    model: ProjectedVLM, encoder: VisionEncoder, target: str, prompt: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The answer goal's loss of a flat feature: the language model's cross-entropy of the target answer."""
    tokens = (1, encoder.num_tokens, encoder.token_dim)
    wanted = [answer_for(target)]
    return lambda feature: answer_loss(model, feature.reshape(tokens), wanted, prompt)


def _token_row(
    index: int,
    defence: str,
    sigma: float,
    radius: float,
    encode: VisionEncoder,
    x: torch.Tensor,
    clean_tokens: torch.Tensor,
    bound: float | None,
    attack: AttackSettings,
    seed: int,
) -> AttackRow:
    """The per-token goal at one radius: attack the worst token, observe min_t cos(F_t(x), F_t(x')) with fresh
    samples, and compare it with the token-level certificate (the worst token's certified FCSB)."""
    adversarial = token_attack(encode, x, radius, sigma, attack.samples, attack.steps, seed=seed)
    attacked = smoothed_feature(encode, adversarial, sigma, attack.observe, seed=seed + 2, per_token=True)
    observed = float(worst_token_cosine(clean_tokens, attacked))
    return AttackRow(
        image=index,
        defence=defence,
        radius=radius,
        observed_cos=observed,
        certified_fcsb=bound,
        below_certificate=bound is not None and observed < bound,
        goal="token",
        sigma=sigma,
    )


def target_phrase(answer: str) -> str:
    """The targeted-answer attack's goal for an image whose true answer is ``answer``: the next Fashion-MNIST
    class (cyclically), or the first one for other images."""
    phrases = list(FASHION_MNIST_PHRASES)
    return phrases[(phrases.index(answer) + 1) % len(phrases)] if answer in phrases else phrases[0]


@dataclass(frozen=True)
class CurvePoint:
    """Certified FCSB at one radius over images: mean (abstentions count as 0), quantiles, certified share."""

    setting: str
    sigma: float
    n: int
    radius: float
    mean: float
    q10: float
    median: float
    q90: float
    certified_fraction: float
    mean_score: float
    per_image: list[float] = field(default_factory=list)
    #: the paper's score Ŝ = E[(1 + cos(f(x+δ), f(x)))/2], relative to the clean feature (docs/paper-notes.md)
    mean_paper_score: float | None = None
    mean_score_lower: float | None = None


def certify_granularities(
    encode: Encode,
    x: torch.Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    radii: Sequence[float],
    seed: int,
    granularities: Sequence[Granularity],
    reference: torch.Tensor | None = None,
    batch_size: int = 64,
) -> list[Certificate]:
    """One certificate of image x [3, S, S] per granularity, all from the same noisy samples, encoded once
    (:func:`~fsmllm.certify.run_shared`): each is the one ``SmoothedEncoder.certify`` gives with that seed."""
    runs = [
        SmoothingRun(x, SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, granularity=g), seed, reference=reference)
        for g in granularities
    ]
    run_shared(runs, encode, batch_size)
    return [run.certificate(radii) for run in runs]


def curve_name(setting: str, granularity: str) -> str:
    """The setting's name in the results: ``setting`` for the whole feature, ``"setting (token)"`` for the worst
    token."""
    return setting if granularity == "global" else f"{setting} ({granularity})"


def certified_curves(
    setting: str,
    encode: Encode,
    images: torch.Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    radii: Sequence[float],
    seed: int = 0,
    batch_size: int = 64,
    granularities: Sequence[Granularity] = ("global",),
) -> list[CurvePoint]:
    """Certify every image [N, 3, S, S] at every granularity and summarise the certified FCSB per radius (abstain
    counts as 0; the worst token's for "token", named by :func:`curve_name`). The granularities share the same
    noisy samples, encoded once (:func:`~fsmllm.certify.run_shared`). Each point keeps the per-image values, in
    image order, so runs at different n can be compared image by image."""
    values = np.zeros((len(granularities), len(images), len(radii)))
    scores, paper_scores, lowers = (np.zeros((len(granularities), len(images))) for _ in range(3))
    for i, x in enumerate(images):
        with torch.inference_mode():
            clean = encode(x[None])[0]
        certificates = certify_granularities(
            encode, x, sigma, n0, n, alpha, radii, seed + i, granularities, reference=clean, batch_size=batch_size
        )
        for g, certificate in enumerate(certificates):
            values[g, i] = [0.0 if c is None else c for c in certificate.certified_fcsb]
            scores[g, i] = certificate.score_estimate
            paper_scores[g, i] = certificate.clean_score
            lowers[g, i] = certificate.score_lower
    certified = values > 0
    return [
        CurvePoint(
            setting=curve_name(setting, granularity),
            sigma=sigma,
            n=n,
            radius=float(radius),
            mean=float(values[g, :, j].mean()),
            q10=float(np.quantile(values[g, :, j], 0.1)),
            median=float(np.median(values[g, :, j])),
            q90=float(np.quantile(values[g, :, j], 0.9)),
            certified_fraction=float(certified[g, :, j].mean()),
            mean_score=float(scores[g].mean()),
            per_image=[float(v) for v in values[g, :, j]],
            mean_paper_score=float(paper_scores[g].mean()),
            mean_score_lower=float(lowers[g].mean()),
        )
        for g, granularity in enumerate(granularities)
        for j, radius in enumerate(radii)
    ]


def held_out_images(count: int, size: int, photos: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``count`` Fashion-MNIST *test* images (never used in training) and the first ``photos`` bundled photos
    (``None``: all six), as pixels [N, 3, size, size] with their true answers (the phrases the demo model is
    taught)."""
    from fsmllm.images import load_image, to_pixels
    from fsmllm.lm.data import SAMPLE_PHOTO_PHRASES, grey_to_pixels, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    chosen = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    pixels = [grey_to_pixels(images[chosen], size)]
    answers = [FASHION_MNIST_PHRASES[int(label)] for label in labels[chosen]]
    for name, phrase in list(SAMPLE_PHOTO_PHRASES.items())[:photos]:
        pixels.append(to_pixels(load_image(f"sample:{name}"), size)[None])
        answers.append(phrase)
    return torch.cat(pixels), answers
