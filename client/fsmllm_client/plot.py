"""Certified and estimated FCSB against radius, drawn with matplotlib (an optional dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fsmllm_client.models import AnswerCertificate, Certificate

#: pixels of the saved figure: FIGSIZE inches x DPI
FIGSIZE = (8.0, 5.0)
DPI = 100
INSTALL_HINT = "--plot needs matplotlib: pip install 'fsmllm-client[plot]' (or 'fsmllm[plot]', or matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail early, before any certification runs, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401  # only: is it installed?
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None


def radius_grid(sigma: float, points: int) -> list[float]:
    """``points`` evenly spaced radii from 0 to 2σ (where the certificates of σ live)."""
    if points < 2:
        return [0.0]
    return [round(2 * sigma * i / (points - 1), 9) for i in range(points)]


def plot_certificate(
    certificate: Certificate,
    path: str | Path,
    highlight: Sequence[float] = (),
    compare: Certificate | None = None,
    answer: AnswerCertificate | None = None,
) -> None:
    """Write a PNG of the certified FCSB (the bound) and the estimated FCSB against the l2 radius.

    ``highlight``: radii the user asked for, marked on the certified curve. A target cosine and its certified
    radius, when the certificate has them, are drawn as guide lines. ``compare``: a second certificate whose
    certified curve is drawn beside (the global one beside a token-level one, from the same noise).
    ``answer``: a certified answer, whose radius is drawn as a vertical line (the answer cannot change within it).
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bounds = sorted(certificate.radii, key=lambda bound: bound.radius)
    radii = [bound.radius for bound in bounds]
    certified = [math.nan if bound.certified_fcsb is None else bound.certified_fcsb for bound in bounds]
    estimated = [bound.estimated_fcsb for bound in bounds]
    served = [math.nan if bound.served_fcsb is None else bound.served_fcsb for bound in bounds]

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(radii, estimated, "--", color="tab:gray", label="estimated FCSB (estimate, not a certificate)")
    token_level = certificate.granularity == "token"
    label = "certified FCSB, worst token" if token_level else "certified FCSB"
    axes.plot(
        radii,
        certified,
        "-o",
        color="tab:blue",
        markersize=3,
        label=f"{label} (probability ≥ 1 − {certificate.alpha:g})",
    )
    if compare is not None:
        others = sorted(compare.radii, key=lambda bound: bound.radius)
        axes.plot(
            [b.radius for b in others],
            [math.nan if b.certified_fcsb is None else b.certified_fcsb for b in others],
            "-s",
            color="tab:orange",
            markersize=3,
            label=f"certified FCSB, {compare.granularity} (same noise)",
        )
    if any(math.isfinite(value) for value in served):
        axes.plot(radii, served, "-", color="tab:purple", linewidth=1, label="served FCSB (the features the LM read)")
    marked = [
        (r, c) for r, c in zip(radii, certified) if math.isfinite(c) and any(math.isclose(r, h) for h in highlight)
    ]
    if marked:
        axes.plot([r for r, _ in marked], [c for _, c in marked], "D", color="tab:red", label="requested radii")
        for point in marked:
            axes.annotate(f"{point[1]:.3f}", point, textcoords="offset points", xytext=(4, 6), fontsize=8)
    target = certificate.certified_radius
    if target is not None:
        axes.axhline(target.target_cos, color="tab:green", linestyle=":", label=f"target cosine {target.target_cos:g}")
        if target.radius is not None:
            axes.axvline(
                target.radius, color="tab:green", linestyle="-.", label=f"certified radius {target.radius:.3g}"
            )
    if answer is not None and answer.radius is not None:
        axes.axvline(
            answer.radius,
            color="tab:brown",
            linestyle="--",
            label=f"answer {answer.answer!r} certified to {answer.radius:.3g}",
        )
    if certificate.abstain:
        note = "abstain: nothing certified at any requested radius (ask for a larger n)"
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", color="tab:red")

    finite = [value for value in certified + estimated if math.isfinite(value)]
    axes.set_ylim(min([0.0, *finite]) - 0.02, 1.02)
    axes.set_xlim(0, max(radii) * 1.02 if radii and max(radii) > 0 else 1)
    axes.set_xlabel("l2 radius ε (pixels in [0,1])")
    axes.set_ylabel("cosine similarity lower bound")
    axes.set_title(
        f"Feature-space smoothing certificate: σ={certificate.sigma:g}, n={certificate.n}, α={certificate.alpha:g}\n"
        f"encoder {certificate.encoder}, booster {certificate.booster}",
        fontsize=11,
    )
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
