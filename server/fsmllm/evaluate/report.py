"""The evaluation's summaries and its report: attack rows aggregated per (defence, σ, goal, ε) and the markdown
tables of report.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from fsmllm.evaluate.compute import AttackRow, CurvePoint


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
        group = [
            row for row in rows if (row.defence, row.sigma, row.goal, row.radius) == (defence, sigma, goal, radius)
        ]
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


def report_markdown(
    title: str, attack: dict[str, int], points: Sequence[CurvePoint], summaries: Sequence[AttackSummary], complete: bool
) -> str:
    """report.md: the certified curves' table and figure, then the attacks' table (``attack``: the PGD settings)."""
    return (
        f"# Evaluation: {title}\n\n"
        + ("" if complete else "**Unfinished**: the run stopped or is still going; `--resume` continues it.\n\n")
        + f"## Certified FCSB against ε\n\n{markdown_curves(points)}\n\n"
        f"![certified curves](curves.png)\n\n## White-box PGD (l2, {attack['steps']} steps, {attack['samples']} "
        f"noise samples per step, observed with {attack['observe']})\n\n{markdown_attacks(summaries)}\n"
    )
