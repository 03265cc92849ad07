"""Monte Carlo estimation of the smoothed encoder and its sound FCSB certificate.

The smoothed encoder is ``F(x) = E_δ[f̃(x + δ)]``, ``δ ~ N(0, σ² I)``, with ``f̃ = f / ||f||`` the base
encoder's flattened, L2-normalised feature (method.md, "Objects"). The certificate follows method.md,
"Estimating it soundly", in the structure of Cohen et al.'s CERTIFY:

1. ``n0`` selection samples fix the direction ``û = normalise(Σ f̃(x + δ_i))``;
2. ``n`` fresh estimation samples give i.i.d. ``c_i = <f̃(x + δ_i), û> ∈ [−1, 1]`` and a (1 − α) lower
   confidence bound ``p̲`` on ``<F(x), û>`` (:func:`~fsmllm.certify.bounds.mean_lower_bound`);
3. for every ``||x' − x|| ≤ ε``: ``<F(x'), û> ≥ b(ε) = FCSB(p̲, σ, ε)`` (the *direction* bound) and
   ``cos(F(x), F(x')) ≥ cos(arccos p̲ + arccos b(ε))`` (the *certified* FCSB), both with probability ≥ 1 − α;
4. abstain where these are not positive.

A :class:`SmoothingRun` is the streaming state of one certification: it hands out noisy copies of the image
and takes back their features in order, keeping only running sums (memory does not grow with n). The noise
is drawn from the run's own seeded generator in fixed blocks, so the samples — and hence the certificate —
do not depend on how an executor packs runs into encoder batches. :func:`run_batched` is the reference
executor; :class:`SmoothedEncoder` wraps it for one image at a time.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fsmllm.certify.bounds import (
    BOUND_METHODS,
    BoundMethod,
    certified_radius,
    combined_cosine_bound,
    fcsb,
    mean_lower_bound,
)
from fsmllm.certify.classify import CosineClassifier, PredictionCertificate, certify_prediction

#: Noise is drawn in blocks of this many samples; it fixes the random stream of a seed.
NOISE_BLOCK = 32

Encode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SmoothingConfig:
    """The statistical parameters of one certification (method.md, "What to measure")."""

    sigma: float
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    bound: BoundMethod = "empirical-bernstein"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive noise level, got {self.sigma}")
        if self.n0 < 1:
            raise ValueError(f"n0 (selection samples) must be at least 1, got {self.n0}")
        if self.n < 2:
            raise ValueError(f"n (estimation samples) must be at least 2, got {self.n}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.bound not in BOUND_METHODS:
            raise ValueError(f"unknown bound {self.bound!r}; choose one of {', '.join(BOUND_METHODS)}")


def _optional(values: np.ndarray) -> tuple[float | None, ...]:
    return tuple(None if math.isnan(v) else float(v) for v in values)


@dataclass(frozen=True)
class Certificate:
    """Everything one certification established, reproducible from ``(image, config, seed)``.

    * ``score_estimate``: an unbiased-in-square estimate of ``S(x) = ||F(x)||`` from all n0 + n samples
      (not a certified quantity);
    * ``score_lower``: ``p̲``, the (1 − α) lower bound on ``<F(x), û>``, hence on S(x);
    * ``direction_fcsb[i]``: certified lower bound on ``<F(x'), û>`` for ``||x' − x|| ≤ radii[i]``;
    * ``certified_fcsb[i]``: certified lower bound on ``cos(F(x), F(x'))`` at ``radii[i]``;
    * ``estimated_fcsb[i]``: the paper's headline number, ``FCSB(score_estimate, σ, ε)``: an *estimate*;
    * ``None`` in a certified list means abstention at that radius; ``abstain`` means no radius is certified.
    """

    config: SmoothingConfig
    seed: int
    radii: tuple[float, ...]
    score_estimate: float
    score_lower: float
    direction_fcsb: tuple[float | None, ...]
    certified_fcsb: tuple[float | None, ...]
    estimated_fcsb: tuple[float, ...]
    smoothed_feature: torch.Tensor = field(repr=False)
    direction: torch.Tensor = field(repr=False)
    prediction: PredictionCertificate | None = None

    @property
    def abstain(self) -> bool:
        return self.score_lower <= 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary (no tensors): every number plus what is needed to reproduce it."""
        cfg = self.config
        summary: dict[str, object] = {
            "sigma": cfg.sigma,
            "n0": cfg.n0,
            "n": cfg.n,
            "alpha": cfg.alpha,
            "bound": cfg.bound,
            "seed": self.seed,
            "score_estimate": self.score_estimate,
            "score_lower": self.score_lower,
            "abstain": self.abstain,
            "radii": [
                {"radius": r, "certified_fcsb": c, "direction_fcsb": d, "estimated_fcsb": e}
                for r, c, d, e in zip(self.radii, self.certified_fcsb, self.direction_fcsb, self.estimated_fcsb)
            ],
        }
        if self.prediction is not None:
            summary["prediction"] = asdict(self.prediction)
        return summary

    def certified_radius(self, target_cos: float) -> float | None:
        """Largest ε at which the certified FCSB is still ≥ ``target_cos``; None if not even ε = 0 is.

        Inverts ``cos(arccos p̲ + arccos b(ε)) ≥ c``: ``b(ε) ≥ cos(arccos c − arccos p̲)``, then the exact
        inverse of the FCSB (:func:`~fsmllm.certify.bounds.certified_radius`).
        """
        if not 0 <= target_cos < 1:
            raise ValueError(f"target_cos must lie in [0, 1), got {target_cos}")
        if self.abstain or target_cos > self.score_lower:
            return None
        needed = math.cos(math.acos(target_cos) - math.acos(self.score_lower))
        radius = float(certified_radius(self.score_lower, self.config.sigma, min(needed, math.nextafter(1.0, 0))))
        return None if math.isnan(radius) else radius


class SmoothingRun:
    """Streaming Monte Carlo state of one certification: ``take`` noisy inputs, ``consume`` their features.

    Features must be consumed in the order their inputs were taken. Between the selection phase (n0 samples)
    and the estimation phase (n samples) the run waits until every selection sample has been consumed, since
    the estimation samples are projected on the direction those define.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        config: SmoothingConfig,
        seed: int,
        classifier: CosineClassifier | None = None,
    ) -> None:
        if pixels.ndim != 3:
            raise ValueError(f"pixels must be one image [C, H, W], got shape {tuple(pixels.shape)}")
        self.pixels = pixels
        self.config = config
        self.seed = seed
        self.classifier = classifier
        self.issued = 0
        self.consumed = 0
        self._generator = torch.Generator(device=pixels.device).manual_seed(seed)
        self._noise = pixels.new_empty((0, *pixels.shape))
        self._feature_sum: torch.Tensor | None = None
        self._probes: torch.Tensor | None = None  # [û; w_1 … w_K] once the selection phase is over
        self._probe_sum: torch.Tensor | None = None
        self._probe_sq_sum: torch.Tensor | None = None
        self._selected_label: int | None = None

    @property
    def total(self) -> int:
        return self.config.n0 + self.config.n

    @property
    def done(self) -> bool:
        return self.consumed == self.total

    def take(self, limit: int) -> torch.Tensor | None:
        """Up to ``limit`` noisy copies ``x + δ`` [k, C, H, W]; None when none can be issued now."""
        n0 = self.config.n0
        if self.issued < n0:
            available = n0 - self.issued
        elif self.consumed < n0:
            return None  # the direction û is not known yet
        else:
            available = self.total - self.issued
        count = min(limit, available)
        if count <= 0:
            return None
        while self._noise.shape[0] < count:
            block = torch.randn(
                (NOISE_BLOCK, *self.pixels.shape),
                generator=self._generator,
                device=self.pixels.device,
                dtype=self.pixels.dtype,
            )
            self._noise = torch.cat([self._noise, block])
        noise, self._noise = self._noise[:count], self._noise[count:]
        self.issued += count
        return self.pixels + self.config.sigma * noise

    def consume(self, features: torch.Tensor) -> None:
        """Add the base encoder's outputs for the next ``len(features)`` issued inputs (any trailing shape)."""
        count = features.shape[0]
        if count > self.issued - self.consumed:
            raise RuntimeError(f"{count} features for {self.issued - self.consumed} outstanding samples")
        unit = F.normalize(features.reshape(count, -1).float(), dim=1)
        if self._feature_sum is None:
            self._feature_sum = torch.zeros(unit.shape[1], dtype=torch.float64, device=unit.device)
        self._feature_sum += unit.sum(0, dtype=torch.float64)
        in_selection = max(0, min(count, self.config.n0 - self.consumed))
        self.consumed += in_selection
        if in_selection and self.consumed == self.config.n0:
            self._start_estimation()
        estimation = unit[in_selection:]
        if estimation.shape[0]:
            assert self._probes is not None and self._probe_sum is not None and self._probe_sq_sum is not None
            projections = (estimation @ self._probes.T).clamp_(-1.0, 1.0).double()
            self._probe_sum += projections.sum(0)
            self._probe_sq_sum += (projections**2).sum(0)
            self.consumed += estimation.shape[0]

    def _start_estimation(self) -> None:
        """Fix û from the selection samples (method.md step 1) and, with a classifier, the label k*."""
        assert self._feature_sum is not None
        direction = F.normalize(self._feature_sum.float(), dim=0)
        probes = [direction[None]]
        if self.classifier is not None:
            weights = self.classifier.weights.to(direction.device)
            if weights.shape[1] != direction.shape[0]:
                raise ValueError(
                    f"classifier weights have dimension {weights.shape[1]}, the encoder's features {direction.shape[0]}"
                )
            self._selected_label = int(torch.argmax(weights @ direction))
            probes.append(weights)
        self._probes = torch.cat(probes)
        self._probe_sum = torch.zeros(self._probes.shape[0], dtype=torch.float64, device=direction.device)
        self._probe_sq_sum = torch.zeros_like(self._probe_sum)

    def certificate(self, radii: Sequence[float]) -> Certificate:
        """The certificate at each radius (method.md steps 2–4); the run must be done."""
        if not self.done:
            raise RuntimeError(f"run not finished: {self.consumed} of {self.total} samples consumed")
        assert self._feature_sum is not None and self._probes is not None
        assert self._probe_sum is not None and self._probe_sq_sum is not None
        cfg = self.config
        radii_array = np.asarray(list(radii), dtype=np.float64)
        sums = self._probe_sum.cpu().numpy()
        sq_sums = self._probe_sq_sum.cpu().numpy()
        score_lower = float(mean_lower_bound(sums[0], sq_sums[0], cfg.n, cfg.alpha, cfg.bound))
        direction_bound = np.where(score_lower > 0, fcsb(max(score_lower, 0.0), cfg.sigma, radii_array), np.nan)
        direction_bound = np.where(direction_bound > 0, direction_bound, np.nan)
        # ||Σ f̃_i||² = m + Σ_{i≠j} <f̃_i, f̃_j>, so the mean off-diagonal term is unbiased for ||F(x)||².
        m = self.total
        pair_mean = (float(self._feature_sum.double().square().sum()) - m) / (m * (m - 1))
        score_estimate = math.sqrt(min(max(pair_mean, 0.0), 1.0))
        prediction = None
        if self.classifier is not None:
            assert self._selected_label is not None
            prediction = certify_prediction(
                self.classifier, self._selected_label, sums[1:], sq_sums[1:], cfg.n, cfg.sigma, cfg.alpha, cfg.bound
            )
        return Certificate(
            config=cfg,
            seed=self.seed,
            radii=tuple(float(r) for r in radii_array),
            score_estimate=score_estimate,
            score_lower=score_lower,
            direction_fcsb=_optional(direction_bound),
            certified_fcsb=_optional(combined_cosine_bound(score_lower, direction_bound)),
            estimated_fcsb=tuple(float(v) for v in fcsb(score_estimate, cfg.sigma, radii_array)),
            smoothed_feature=(self._feature_sum / m).float().cpu(),
            direction=self._probes[0].cpu(),
            prediction=prediction,
        )


Batch = list[tuple[SmoothingRun, torch.Tensor]]


def fill_batch(runs: Sequence[SmoothingRun], batch_size: int) -> Batch:
    """Take noisy inputs from ``runs`` in order until ``batch_size`` samples are gathered (or none is left)."""
    parts: Batch = []
    room = batch_size
    for run in runs:
        if room == 0:
            break
        if not run.done and (inputs := run.take(room)) is not None:
            parts.append((run, inputs))
            room -= inputs.shape[0]
    return parts


def deliver(parts: Batch, features: torch.Tensor) -> None:
    """Hand each run the slice of ``features`` that belongs to the inputs it contributed to the batch."""
    start = 0
    for run, inputs in parts:
        run.consume(features[start : start + inputs.shape[0]])
        start += inputs.shape[0]


def run_batched(
    runs: Sequence[SmoothingRun],
    encode: Encode,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Drive ``runs`` to completion, packing the noisy samples of all of them into batches of ≤ batch_size.

    This is the reference executor (the server's device worker does the same across requests). ``progress``
    is called with the number of samples finished after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    while parts := fill_batch(runs, batch_size):
        with torch.inference_mode():
            features = encode(torch.cat([inputs for _, inputs in parts]))
        deliver(parts, features)
        if progress is not None:
            progress(features.shape[0])


def new_seed() -> int:
    """A fresh random seed, reported in every certificate so that the result can be reproduced."""
    return secrets.randbits(63)


class SmoothedEncoder:
    """The smoothed version of a base encoder, estimated by Monte Carlo (one image at a time).

    ``base`` is any callable mapping an image batch [B, C, H, W] with pixels in [0, 1] to features [B, ...]
    (a :class:`~fsmllm.encoders.base.VisionEncoder`, or a booster followed by one: the lemma applies to any
    base function). Same seed ⇒ same certificate, whatever ``batch_size``.
    """

    def __init__(self, base: Encode, sigma: float, *, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        self.base = base
        self.sigma = sigma
        self.batch_size = batch_size
        self.device = torch.device(device)

    def certify(
        self,
        pixels: torch.Tensor,
        *,
        n0: int = 100,
        n: int = 1000,
        alpha: float = 0.001,
        radii: Sequence[float] = (0.1, 0.25, 0.5),
        seed: int | None = None,
        bound: BoundMethod = "empirical-bernstein",
        classifier: CosineClassifier | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Certificate:
        """Certify one image [C, H, W] (method.md steps 1–4)."""
        config = SmoothingConfig(sigma=self.sigma, n0=n0, n=n, alpha=alpha, bound=bound)
        for radius in radii:
            if not (math.isfinite(radius) and radius >= 0):
                raise ValueError(f"radii must be non-negative l2 norms, got {radius}")
        run = SmoothingRun(pixels.to(self.device), config, new_seed() if seed is None else seed, classifier)
        run_batched([run], self.base, self.batch_size, progress)
        return run.certificate(radii)
