"""Robustness evaluation: white-box attacks against the encoder with and without smoothing, and certified curves.

For held-out images x and radii ε (l2, pixel space, method.md "Objects") three defences are compared:

* **none**: the base encoder f; the attack (PGD, :func:`fsmllm.attacks.feature_attack`) minimises
  cos(f(x), f(x')) and the observed cosine is that one;
* **FS**: the smoothed encoder F; the attack minimises the Monte Carlo estimate of cos(F(x), F(x'))
  (expectation over the noise), and the observed cosine is re-estimated with fresh samples;
* **FS+booster**: the same with the booster in front of (and behind) the encoder.

Two attack goals (white-box: the attacker knows the encoder, the booster and the language model):

* **feature** (untargeted): minimise the cosine between the clean and the perturbed feature;
* **answer** (targeted, needs a language model): minimise the language model's cross-entropy of a wrong
  answer ("A photo of {target}.", the next Fashion-MNIST class after the true one) given the perturbed
  feature, through the projector and the frozen LM;
* **token** (smoothed defences only): minimise the worst token's cosine, min_t cos(F_t(x), F_t(x')), every token
  normalised on its own; the observed value is compared with the token-level certificate (method.md,
  "Token-level certificates").

For the smoothed defences each image is certified (n0, n, α) and the fraction of attacked images whose
observed cosine fell below the certified FCSB at that ε is reported, for both goals: it must stay ≤ α, up to
the Monte Carlo error of the observed cosine. With a language model, the answers generated from the clean and
attacked features are compared with the image's true answer: the attack success rate is the fraction of images
answered correctly from clean features whose answer under attack is wrong; for the answer goal, the targeted
success rate is the fraction of those whose answer under attack names the target. Both are reported as counts
with their exact (Clopper-Pearson) 95 % interval, since an evaluation on a CPU attacks a handful of images.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest

from fsmllm.attacks import (
    feature_attack,
    feature_space_attack,
    smoothed_feature,
    token_attack,
    unit_features,
    worst_token_cosine,
)
from fsmllm.certify import Certificate, Encode, Granularity, SmoothingConfig, SmoothingRun, check_radii, run_shared
from fsmllm.encoders.base import VisionEncoder
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.data import FASHION_MNIST_PHRASES, answer_for
from fsmllm.lm.training import answer_loss, names
from fsmllm.lm.vlm import ProjectedVLM

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GOALS = ("feature", "answer", "token")


@dataclass(frozen=True)
class AttackSettings:
    """PGD: ``steps`` steps, ``samples`` noisy copies per step for smoothed targets; ``observe`` samples to
    re-estimate smoothed features afterwards."""

    steps: int = 10
    samples: int = 8
    observe: int = 256


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
                    rows.append(_token_row(index, defence, sigma, float(radius), encode, x, clean_tokens,
                                           token_certificate.certified_fcsb[i], attack, seed))
                continue
            if goal == "feature":
                adversarial = feature_attack(
                    encode, x, radius, sigma if smoothed else None, attack.samples, attack.steps, seed=seed
                )
            else:
                assert model is not None and target is not None
                tokens = (1, encode.num_tokens, encode.token_dim)
                wanted = [answer_for(target)]
                adversarial = feature_space_attack(
                    encode, x, radius, lambda feature: answer_loss(model, feature.reshape(tokens), wanted, prompt),
                    sigma if smoothed else None, attack.samples, attack.steps, seed=seed,
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
                        None if goal != "answer" or answer_attacked is None
                        else target is not None and names(answer_attacked, target)
                    ),
                    sigma=sigma if smoothed else None,
                )
            )
    return rows


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
        image=index, defence=defence, radius=radius, observed_cos=observed, certified_fcsb=bound,
        below_certificate=bound is not None and observed < bound, goal="token", sigma=sigma,
    )


def target_phrase(answer: str) -> str:
    """The targeted-answer attack's goal for an image whose true answer is ``answer``: the next Fashion-MNIST
    class (cyclically), or the first one for other images."""
    phrases = list(FASHION_MNIST_PHRASES)
    return phrases[(phrases.index(answer) + 1) % len(phrases)] if answer in phrases else phrases[0]


@dataclass(frozen=True)
class AttackSummary:
    """Aggregates over images of one (defence, σ, goal, ε)."""

    defence: str
    sigma: float | None
    goal: str
    radius: float
    images: int
    mean_observed_cos: float
    min_observed_cos: float
    mean_certified_fcsb: float | None
    certified_fraction: float
    below_certificate_fraction: float
    answered_right: int | None  # images answered right from clean features: the success rates' denominator
    attack_successes: int | None  # of those, answered wrong under attack
    targeted_successes: int | None  # of those, answered with the target (the answer goal)


def summarise(rows: Sequence[AttackRow]) -> list[AttackSummary]:
    """One :class:`AttackSummary` per (defence, σ, goal, radius), in first-seen order."""
    keys = list(dict.fromkeys((row.defence, row.sigma, row.goal, row.radius) for row in rows))
    summaries = []
    for defence, sigma, goal, radius in keys:
        group = [row for row in rows if (row.defence, row.sigma, row.goal, row.radius) == (defence, sigma, goal, radius)]
        observed = np.array([row.observed_cos for row in group])
        bounds = [row.certified_fcsb for row in group if row.certified_fcsb is not None]
        answered = [row for row in group if row.correct_clean]
        with_answers = group[0].correct_clean is not None
        summaries.append(
            AttackSummary(
                defence=defence,
                sigma=sigma,
                goal=goal,
                radius=radius,
                images=len(group),
                mean_observed_cos=float(observed.mean()),
                min_observed_cos=float(observed.min()),
                mean_certified_fcsb=float(np.mean(bounds)) if bounds else None,
                certified_fraction=len(bounds) / len(group),
                below_certificate_fraction=sum(row.below_certificate for row in group) / len(group),
                answered_right=len(answered) if with_answers else None,
                attack_successes=sum(not row.correct_attacked for row in answered) if with_answers else None,
                targeted_successes=(
                    sum(bool(row.names_target) for row in answered) if with_answers and goal == "answer" else None
                ),
            )
        )
    return summaries


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
    #: the paper's score Ŝ = E[(1 + cos(f(x+δ), f(x)))/2], relative to the clean feature (paper-notes.md)
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


def as_dicts(items: Sequence[object]) -> list[dict[str, object]]:
    return [asdict(item) for item in items]  # type: ignore[call-overload]


def held_out_images(
    count: int, size: int, photos: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
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


def markdown_attacks(summaries: Sequence[AttackSummary]) -> str:
    lines = [
        "| defence | σ | goal | ε | images | mean cos under attack | min cos | mean certified FCSB | certified share "
        "| observed < certified | attack success (answers) [95 % CI] | targeted success [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        bound = "—" if s.mean_certified_fcsb is None else f"{s.mean_certified_fcsb:.3f}"
        success = _successes(s.attack_successes, s.answered_right)
        targeted = _successes(s.targeted_successes, s.answered_right)
        below = "—" if s.defence == "none" else f"{s.below_certificate_fraction:.1%}"
        sigma = "—" if s.sigma is None else f"{s.sigma:g}"
        lines.append(
            f"| {s.defence} | {sigma} | {s.goal} | {s.radius:g} | {s.images} | {s.mean_observed_cos:.3f} "
            f"| {s.min_observed_cos:.3f} | {bound} | {s.certified_fraction:.0%} | {below} | {success} | {targeted} |"
        )
    return "\n".join(lines)


def _successes(count: int | None, of: int | None) -> str:
    """``count`` of ``of`` images, the rate and its exact (Clopper-Pearson) 95 % confidence interval: on a few
    images the interval is wide, and the report says so."""
    if count is None or of is None:
        return "—"
    if of == 0:
        return "none right before the attack"
    interval = binomtest(count, of).proportion_ci(0.95, method="exact")
    return f"{count}/{of} = {count / of:.0%} [{interval.low:.0%}, {interval.high:.0%}]"


def markdown_curves(points: Sequence[CurvePoint]) -> str:
    lines = [
        "| setting | σ | n | ε | mean certified FCSB | q10 | median | q90 | certified share | mean score S "
        "| mean lower bound on S | paper's Ŝ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    show = lambda value: "—" if value is None else f"{value:.3f}"  # noqa: E731 - absent in older results
    for p in points:
        lines.append(
            f"| {p.setting} | {p.sigma:g} | {p.n} | {p.radius:g} | {p.mean:.3f} | {p.q10:.3f} | {p.median:.3f} "
            f"| {p.q90:.3f} | {p.certified_fraction:.0%} | {p.mean_score:.3f} | {show(p.mean_score_lower)} "
            f"| {show(p.mean_paper_score)} |"
        )
    return "\n".join(lines)


def curve_figure(points: Sequence[CurvePoint], title: str) -> Figure:
    """Mean certified FCSB against ε with the 10-90 % band: one panel per (n, σ), a colour per setting (booster
    or not), solid for the whole feature and dashed for the worst token (the "... (token)" settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    token = curve_name("", "token")
    sigmas, ns = sorted({p.sigma for p in points}), sorted({p.n for p in points})
    colours = {base: f"C{i % 10}" for i, base in enumerate(dict.fromkeys(p.setting.removesuffix(token) for p in points))}
    figure, grid = plt.subplots(
        len(ns), len(sigmas), figsize=(1 + 4 * len(sigmas), 1.2 + 2.8 * len(ns)), sharex=True, sharey=True, squeeze=False
    )
    for (row, n), (column, sigma) in itertools.product(enumerate(ns), enumerate(sigmas)):
        axes = grid[row][column]
        panel = [p for p in points if (p.n, p.sigma) == (n, sigma)]
        for setting in dict.fromkeys(p.setting for p in panel):
            line = sorted((p for p in panel if p.setting == setting), key=lambda p: p.radius)
            radii, colour = [p.radius for p in line], colours[setting.removesuffix(token)]
            style = "--" if setting.endswith(token) else "-"
            axes.plot(radii, [p.mean for p in line], marker="o", markersize=4, color=colour, linestyle=style, label=setting)
            axes.fill_between(radii, [p.q10 for p in line], [p.q90 for p in line], alpha=0.12, color=colour)
        axes.set_title(f"σ = {sigma:g}, n = {n}" + ("" if panel else " (not run)"), fontsize=10)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    for axes in grid[-1]:
        axes.set_xlabel("l2 radius ε (pixels in [0, 1])")
    for row in grid:
        row[0].set_ylabel("certified FCSB (abstain = 0)")
    handles = [Line2D([], [], color=colour, marker="o", label=base) for base, colour in colours.items()]
    if any(p.setting.endswith(token) for p in points):
        handles += [Line2D([], [], color="grey", label="whole feature"),
                    Line2D([], [], color="grey", linestyle="--", label="worst token")]
    columns = min(len(handles), 4)
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(handles) / columns)
    figure.tight_layout(rect=(0, (0.1 + 0.22 * legend_rows) / figure.get_figheight(), 1, 1))
    return figure


def plot_curves(points: Sequence[CurvePoint], path: str, title: str) -> None:
    """Write :func:`curve_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    figure = curve_figure(points, title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(
    encoder_name: str,
    boosters: Sequence[str],
    sigmas: Sequence[float],
    ns: Sequence[int],
    radii: Sequence[float],
    images: int,
    attack_images: int,
    attack: AttackSettings,
    n0: int,
    alpha: float,
    model_name: str | None,
    out: str,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    goals: Sequence[str] | None = None,
    photos: int | None = None,
    resume: bool = False,
    granularities: Sequence[Granularity] = ("global",),
) -> dict[str, object]:
    """The whole evaluation; writes ``results.json``, ``report.md`` and ``curves.png`` into ``out`` after every
    finished curve and attacked image (``"complete": false`` until the end).

    ``goals``: the attack goals (default: both with a model, the feature goal without); ``photos``: how many
    bundled photos join the ``images`` Fashion-MNIST test images (default: all six); ``resume``: keep the curves
    and attacked images already in ``out/results.json`` (from a run with the same settings that stopped early, or
    one with fewer σ, n or boosters) and compute only the rest. ``granularities``: certified curves for the
    whole feature ("global") and/or the worst token ("token": settings named "... (token)")."""
    from fsmllm.encoders import load_encoder

    check_radii(radii)

    encoder = load_encoder(encoder_name).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    pixels, answers = held_out_images(images, encoder.image_size, photos=photos, seed=seed)
    goals = tuple(goals or (("feature", "answer") if model_name else ("feature",)))
    attacked_images = min(attack_images, len(pixels))
    settings = {
        "encoder": encoder.name,
        "image_size": encoder.image_size,
        "model": model_name,
        "images": len(pixels),
        "photos": photos,
        "attack": asdict(attack),
        "goals": list(goals),
        "n0": n0,
        "alpha": alpha,
        "seed": seed,
        "radii": [float(r) for r in radii],
    }
    report = _Report(Path(out), settings, resume)
    model = None
    if model_name:
        from fsmllm.lm.models import load_model

        model = load_model(model_name)

    def boosted(name: str, sigma: float) -> VisionEncoder:
        from fsmllm.booster import load_booster

        return load_booster(name.format(sigma=sigma), encoder)

    for sigma in sigmas:
        variants: dict[str, VisionEncoder | None] = {"none": None, "FS": encoder}
        variants.update({f"FS+{b.format(sigma=sigma)}": boosted(b, sigma) for b in boosters})
        for n in ns:
            for setting, variant in variants.items():
                missing = [g for g in granularities if not report.has_curve(curve_name(setting, g), sigma, n)]
                if variant is None or not missing:
                    continue
                names = ", ".join(curve_name(setting, g) for g in missing)
                progress(f"certified curve: {names}, σ={sigma}, n={n}, {len(pixels)} images")
                report.add_curve(
                    certified_curves(setting, variant, pixels, sigma, n0, n, alpha, radii, seed=seed, granularities=missing)
                )
        for i in range(attacked_images):
            if report.has_attacked(sigma, i):
                continue
            progress(f"attacks: σ={sigma}, image {i + 1}/{attacked_images}")
            rows = attack_image(
                i, pixels[i], variants, encoder, sigma, radii, attack, n0, max(ns), alpha, seed + i,
                model=model, answer=answers[i], goals=goals,
            )
            # the undefended encoder does not depend on σ: attacked once, with the first σ
            report.add_attacked([row for row in rows if sigma == sigmas[0] or row.defence != "none"])
    return report.finish()


class _Report:
    """The results of :func:`run` so far, rewritten to ``directory`` (results.json, report.md, curves.png) after
    each addition, so that a run that stops early leaves what it finished, and ``resume`` can go on from it."""

    def __init__(self, directory: Path, settings: dict[str, object], resume: bool) -> None:
        self.directory = directory
        self.settings = settings
        self.points: list[CurvePoint] = []
        self.rows: list[AttackRow] = []
        saved = directory / "results.json"
        if resume and saved.exists():
            previous = json.loads(saved.read_text())
            differing = sorted(key for key, value in settings.items() if previous.get(key) != value)
            if differing:
                raise ValueError(
                    f"{saved} holds a run with other settings ({', '.join(differing)} differ): resume it with the "
                    "same settings, or write to another --out"
                )
            self.points = [CurvePoint(**point) for point in previous["curves"]]
            self.rows = [AttackRow(**row) for row in previous["attack_rows"]]
        directory.mkdir(parents=True, exist_ok=True)

    def has_curve(self, setting: str, sigma: float, n: int) -> bool:
        return any((p.setting, p.sigma, p.n) == (setting, sigma, n) for p in self.points)

    def has_attacked(self, sigma: float, image: int) -> bool:
        """Whether ``image`` was attacked at ``sigma``: then its plain-FS rows (every attack has them) are here."""
        return any((row.sigma, row.image) == (sigma, image) for row in self.rows)

    def add_curve(self, points: list[CurvePoint]) -> None:
        self.points += points
        self._write(complete=False)

    def add_attacked(self, rows: list[AttackRow]) -> None:
        self.rows += rows
        self._write(complete=False)

    def finish(self) -> dict[str, object]:
        return self._write(complete=True)

    def _write(self, complete: bool) -> dict[str, object]:
        summaries = summarise(self.rows)
        results = {
            **self.settings,
            "complete": complete,
            "attack_images": len({row.image for row in self.rows}),
            "curves": as_dicts(self.points),
            "attacks": as_dicts(summaries),
            "attack_rows": as_dicts(self.rows),
        }
        (self.directory / "results.json").write_text(json.dumps(results, indent=1))
        s = self.settings
        title = f"{s['encoder']} @ {s['image_size']}px, α={s['alpha']}, n0={s['n0']}, {s['images']} held-out images"
        if self.points:
            plot_curves(self.points, str(self.directory / "curves.png"), title)
        attack = s["attack"]
        assert isinstance(attack, dict)
        (self.directory / "report.md").write_text(
            f"# Evaluation: {title}\n\n"
            + ("" if complete else "**Unfinished**: the run stopped or is still going; `--resume` continues it.\n\n")
            + f"## Certified FCSB against ε\n\n{markdown_curves(self.points)}\n\n"
            f"![certified curves](curves.png)\n\n## White-box PGD (l2, {attack['steps']} steps, {attack['samples']} "
            f"noise samples per step, observed with {attack['observe']})\n\n{markdown_attacks(summaries)}\n"
        )
        return results
