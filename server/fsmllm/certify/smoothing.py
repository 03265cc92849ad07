"""Monte Carlo estimation of the smoothed encoder and its sound FCSB certificate.

The smoothed encoder is ``F(x) = E_δ[f̃(x + δ)]``, ``δ ~ N(0, σ² I)``, with ``f̃ = f / ||f||`` the base
encoder's flattened, L2-normalised feature (method.md, "Objects"). The certificate follows method.md,
"Estimating it soundly", in the structure of Cohen et al.'s CERTIFY:

1. ``n0`` selection samples fix the direction ``û = normalise(Σ f̃(x + δ_i))``;
2. up to ``n`` fresh estimation samples give i.i.d. ``c_i = <f̃(x + δ_i), û> ∈ [−1, 1]`` and a (1 − α) lower
   confidence bound ``p̲`` on ``<F(x), û> ≤ ||F(x)|| = S(x)`` (:func:`~fsmllm.certify.bounds.lower_bound`);
3. the *direct bound*: for every ``||x' − x|| ≤ ε`` at once, ``cos(F(x), F(x')) ≥ FCSB(p̲, σ, ε)`` (the lemma
   with the fixed unit vector ``u* = F(x)/||F(x)||``, then FCSB increasing in S), and for the features
   handed to the language model, ``F̂`` (the mean of all n0 + n samples),
   ``cos(F̂, F(x')) ≥ cos(arccos FCSB(p̲, σ, ε) + ∠(û, F̂))`` (the lemma with u = û, plus the known angle);
4. abstain where these are not positive.

With the ``betting`` bound (anytime-valid) the estimation phase may stop before ``n`` samples: a
:class:`StopRule` is checked at fixed sample counts (:func:`is_checkpoint`), and the bound at every
checkpoint is valid, so the certificate takes the best of them and progress reports carry a valid certificate.

A :class:`SmoothingRun` is the streaming state of one certification: it hands out noisy copies of the image
and takes back their features in order. It keeps running feature sums and the n scalars c_i (8 bytes a
sample), never the features. The noise is drawn from the run's own seeded generator in fixed blocks, and the
checkpoints depend only on the sample count, so the samples — and hence the certificate — do not depend on
how an executor packs runs into encoder batches. :func:`run_batched` is the reference executor;
:class:`SmoothedEncoder` wraps it for one image at a time.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm

from fsmllm.certify.bounds import (
    ANYTIME_METHODS,
    BOUND_METHODS,
    BoundMethod,
    certified_radius,
    fcsb,
    lower_bound,
    upper_bound,
)
from fsmllm.certify.classify import CosineClassifier, PredictionCertificate, certify_prediction

#: Noise is drawn in blocks of this many samples; it fixes the random stream of a seed.
NOISE_BLOCK = 32
#: Checkpoints of an anytime bound: every block, and past 20 blocks every ~10 % more samples.
CHECKPOINT_GROWTH = 1.1

Encode = Callable[[torch.Tensor], torch.Tensor]


def is_checkpoint(count: int) -> bool:
    """Whether the anytime bound is evaluated after ``count`` estimation samples (a function of the count only,
    so that stopping never depends on batch packing): multiples of NOISE_BLOCK, geometrically spaced past
    20 blocks (about 24 evaluations per tenfold of samples, each O(count))."""
    if count <= 0 or count % NOISE_BLOCK:
        return False
    blocks = count // NOISE_BLOCK
    if blocks <= 20:
        return True
    return math.floor(math.log(blocks, CHECKPOINT_GROWTH)) != math.floor(math.log(blocks - 1, CHECKPOINT_GROWTH))


@dataclass(frozen=True)
class StopRule:
    """When to stop sampling before the budget ``n`` (method.md, "Stopping early"; needs an anytime bound).

    * ``fcsb`` with ``radii``: stop once the certified FCSB is ≥ ``fcsb`` at every radius ("target_reached"),
      or once an upper confidence bound on the score shows it never will be ("target_unreachable");
    * ``target_cos`` with ``tolerance``: stop once the certified radius for ``target_cos`` is within
      ``tolerance`` (l2) of the largest radius the upper confidence bound allows ("radius_converged"), or
      once the target cannot be certified even at radius 0 ("target_unreachable").
    Any rule is sound: the bound holds at every sample count at once, so the choice of when to stop cannot
    break it; the rule only decides how many samples are spent.
    """

    fcsb: float | None = None
    radii: tuple[float, ...] = ()
    target_cos: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if (self.fcsb is None) == (self.target_cos is None):
            raise ValueError("a stop rule needs exactly one of fcsb (with radii) and target_cos (with tolerance)")
        if self.fcsb is not None and not (0 <= self.fcsb < 1 and self.radii):
            raise ValueError(f"stop_at_fcsb must lie in [0, 1) and come with radii, got {self.fcsb}")
        if self.target_cos is not None and not (self.tolerance is not None and self.tolerance > 0):
            raise ValueError(f"radius_tolerance must be a positive l2 norm, got {self.tolerance}")

    def decide(self, lower: float, upper: float, sigma: float) -> str | None:
        """The reason to stop given the score's lower and upper confidence bounds, or None to go on."""
        if self.fcsb is not None:
            # the score that certifies fcsb at the largest radius: FCSB(p) ≥ C ⇔ p ≥ 2Φ(Φ⁻¹((1+C)/2) + ε/σ) − 1
            needed = float(1.0 - 2.0 * norm.sf(norm.isf((1.0 - self.fcsb) / 2.0) + max(self.radii) / sigma))
            if lower >= needed:
                return "target_reached"
            return "target_unreachable" if upper < needed else None
        assert self.target_cos is not None and self.tolerance is not None
        if upper < self.target_cos:
            return "target_unreachable"
        if lower < self.target_cos:
            return None
        reach = certified_radius(np.array([lower, upper]), sigma, self.target_cos)
        return "radius_converged" if reach[0] >= reach[1] - self.tolerance else None


@dataclass(frozen=True)
class SmoothingConfig:
    """The statistical parameters of one certification (method.md, "What to measure"); ``n`` is the budget of
    estimation samples (a :class:`StopRule` may use fewer)."""

    sigma: float
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    bound: BoundMethod = "betting"

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


def certified_fcsb(score_lower: float, sigma: float, radii: np.ndarray) -> np.ndarray:
    """The direct bound FCSB(p̲, σ, ε) where it is positive, NaN (abstain) elsewhere (method.md step 3)."""
    bound = fcsb(min(max(score_lower, 0.0), 1.0), sigma, radii)
    return np.where((score_lower > 0) & (bound > 0), bound, np.nan)


def served_fcsb(certified: np.ndarray, offset: float) -> np.ndarray:
    """``cos(arccos b + θ)``: the bound b on the cosine to û moved to a vector at the known angle θ from û;
    NaN where b is not positive or the angles add past π/2 (method.md step 3)."""
    angle = np.arccos(np.clip(certified, -1.0, 1.0)) + offset
    return np.where(np.isfinite(certified) & (angle < np.pi / 2), np.cos(angle), np.nan)


@dataclass(frozen=True)
class Certificate:
    """Everything one certification established, reproducible from ``(image, config, stop rule, seed)``.

    F is the smoothed encoder, û the direction fixed by the selection samples, F̂ the Monte Carlo mean of the
    n0 + n used samples (what the language model reads). With probability ≥ 1 − α, jointly:

    * ``score_lower`` = p̲ ≤ ``<F(x), û>`` ≤ S(x) = ||F(x)||;
    * ``certified_fcsb[i]``: ``cos(F(x), F(x')) ≥`` this for every ``||x' − x|| ≤ radii[i]`` (the direct bound);
    * ``served_fcsb[i]``: ``cos(F̂, F(x')) ≥`` this for the same x' (the features handed to the language
      model, ``served_angle`` = ∠(û, F̂) radians away from û);
    * ``prediction`` (with a classifier): its own statement; α is then split in halves between the two.

    ``score_estimate`` (an estimate of S(x)) and ``estimated_fcsb`` (the paper's FCSB at that estimate) are
    *not* certified. ``None`` in a certified list means abstention at that radius; ``abstain`` means no
    requested radius is certified. ``n`` is the number of estimation samples used, ``stopped_by`` why
    sampling ended ("budget", "target_reached", "target_unreachable", "radius_converged").
    """

    config: SmoothingConfig
    seed: int
    radii: tuple[float, ...]
    n: int
    stopped_by: str
    score_estimate: float
    score_lower: float
    certified_fcsb: tuple[float | None, ...]
    served_fcsb: tuple[float | None, ...]
    estimated_fcsb: tuple[float, ...]
    served_angle: float
    smoothed_feature: torch.Tensor = field(repr=False)
    direction: torch.Tensor = field(repr=False)
    prediction: PredictionCertificate | None = None
    clean_score: float | None = None
    stop: StopRule | None = None

    @property
    def abstain(self) -> bool:
        """True when no requested radius is certified (every ``certified_fcsb`` is None; with no radii asked,
        when the score itself is not certified positive)."""
        if not self.radii:
            return self.score_lower <= 0
        return all(value is None for value in self.certified_fcsb)

    @property
    def score_alpha(self) -> float:
        """The share of α spent on the score bound (half of it when a prediction is certified too)."""
        return self.config.alpha / 2 if self.prediction is not None else self.config.alpha

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary (no tensors): every number plus what is needed to reproduce it."""
        cfg = self.config
        summary: dict[str, object] = {
            "sigma": cfg.sigma,
            "n0": cfg.n0,
            "n": self.n,
            "n_budget": cfg.n,
            "stopped_by": self.stopped_by,
            "alpha": cfg.alpha,
            "bound": cfg.bound,
            "seed": self.seed,
            "score_estimate": self.score_estimate,
            "score_lower": self.score_lower,
            "abstain": self.abstain,
            "served_angle": self.served_angle,
            "radii": [
                {"radius": r, "certified_fcsb": c, "served_fcsb": v, "estimated_fcsb": e}
                for r, c, v, e in zip(self.radii, self.certified_fcsb, self.served_fcsb, self.estimated_fcsb)
            ],
        }
        if self.stop is not None:
            summary["stop"] = asdict(self.stop)
        if self.prediction is not None:
            summary["prediction"] = asdict(self.prediction)
        if self.clean_score is not None:
            summary["clean_score"] = self.clean_score
        return summary

    def certified_radius(self, target_cos: float) -> float | None:
        """Largest ε at which the certified FCSB is still ≥ ``target_cos``: ``σ (Φ⁻¹((1+p̲)/2) − Φ⁻¹((1+c)/2))``
        (0 when c = p̲); None when not even ε = 0 is (c > p̲)."""
        if not 0 <= target_cos < 1:
            raise ValueError(f"target_cos must lie in [0, 1), got {target_cos}")
        if self.score_lower <= 0 or target_cos > self.score_lower:
            return None
        return float(certified_radius(self.score_lower, self.config.sigma, target_cos))


class SmoothingRun:
    """Streaming Monte Carlo state of one certification: ``take`` noisy inputs, ``consume`` their features.

    Features must be consumed in the order their inputs were taken. Between the selection phase (n0 samples)
    and the estimation phase (up to n samples) the run waits until every selection sample has been consumed,
    since the estimation samples are projected on the direction those define. ``reference`` (optional, a
    clean feature) makes the certificate carry the paper's score E[(1 + cos(f(x + δ), f(x)))/2] as well.
    """

    #: classifier labels whose projections are kept for the betting bound (the others use empirical Bernstein)
    KEPT_LABELS = 16

    def __init__(
        self,
        pixels: torch.Tensor,
        config: SmoothingConfig,
        seed: int,
        classifier: CosineClassifier | None = None,
        stop: StopRule | None = None,
        reference: torch.Tensor | None = None,
    ) -> None:
        if pixels.ndim != 3:
            raise ValueError(f"pixels must be one image [C, H, W], got shape {tuple(pixels.shape)}")
        if stop is not None and config.bound not in ANYTIME_METHODS:
            raise ValueError(
                f"stopping early needs an anytime-valid bound ({', '.join(ANYTIME_METHODS)}); "
                f"{config.bound!r} holds only at a sample count fixed in advance"
            )
        if stop is not None and classifier is not None:
            raise ValueError("stopping early is not available with a prediction certificate")
        self.pixels = pixels
        self.config = config
        self.seed = seed
        self.classifier = classifier
        self.stop = stop
        self.issued = 0
        self.consumed = 0
        self.stopped_by: str | None = None
        self._generator = torch.Generator(device=pixels.device).manual_seed(seed)
        self._noise = pixels.new_empty((0, *pixels.shape))
        self._feature_sum: torch.Tensor | None = None
        self._reference = None if reference is None else F.normalize(reference.reshape(-1).double(), dim=0)
        self._reference_sum = 0.0
        self._probes: torch.Tensor | None = None  # [û; w_1 … w_K] once the selection phase is over
        self._probe_sum: torch.Tensor | None = None
        self._probe_sq_sum: torch.Tensor | None = None
        self._kept: list[int] = [0]  # probes whose every projection is kept: û, and the top classifier labels
        self._values = np.empty((min(config.n, 1024), 1))  # kept projections c_i, a row per estimation sample
        self._selected_label: int | None = None
        self._best_lower = -1.0  # the anytime lower bound, best over the checkpoints so far
        self._checked = 0

    @property
    def total(self) -> int:
        return self.config.n0 + self.config.n

    @property
    def estimated(self) -> int:
        """Estimation samples consumed so far."""
        return max(0, self.consumed - self.config.n0)

    @property
    def done(self) -> bool:
        return self.stopped_by is not None

    def take(self, limit: int) -> torch.Tensor | None:
        """Up to ``limit`` noisy copies ``x + δ`` [k, C, H, W]; None when none can be issued now."""
        n0 = self.config.n0
        if self.done:
            return None
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
        """Add the base encoder's outputs for the next ``len(features)`` issued inputs (any trailing shape).

        Once the run is done (budget spent or a stop rule met at a checkpoint) the features of samples past
        that point are discarded: the certificate and the smoothed feature use exactly the samples up to it.
        """
        count = features.shape[0]
        if count > self.issued - self.consumed:
            raise RuntimeError(f"{count} features for {self.issued - self.consumed} outstanding samples")
        if self.done:
            return
        unit = F.normalize(features.reshape(count, -1).float(), dim=1)
        if self._feature_sum is None:
            self._feature_sum = torch.zeros(unit.shape[1], dtype=torch.float64, device=unit.device)
        in_selection = max(0, min(count, self.config.n0 - self.consumed))
        if in_selection:
            self._accumulate(unit[:in_selection])
            self.consumed += in_selection
            if self.consumed == self.config.n0:
                self._start_estimation()
        estimation = unit[in_selection:]
        while estimation.shape[0] and not self.done:
            # up to the next checkpoint (or the budget), so that a stop never depends on the batch boundaries
            start = self.estimated
            step = next(
                (k for k in range(1, estimation.shape[0]) if is_checkpoint(start + k) or start + k == self.config.n),
                estimation.shape[0],
            )
            self._estimate(estimation[:step])
            estimation = estimation[step:]
            if self.estimated == self.config.n:
                self._check()
                self.stopped_by = self.stopped_by or "budget"
            elif is_checkpoint(self.estimated):
                self._check()

    def _accumulate(self, unit: torch.Tensor) -> None:
        assert self._feature_sum is not None
        self._feature_sum += unit.sum(0, dtype=torch.float64)
        if self._reference is not None:
            self._reference_sum += float((unit.double() @ self._reference.to(unit.device)).sum())

    def _estimate(self, unit: torch.Tensor) -> None:
        """Project estimation samples on the probes: running sums for all, kept values for the kept ones."""
        assert self._probes is not None and self._probe_sum is not None and self._probe_sq_sum is not None
        self._accumulate(unit)
        projections = (unit @ self._probes.T).clamp_(-1.0, 1.0).double()
        self._probe_sum += projections.sum(0)
        self._probe_sq_sum += (projections**2).sum(0)
        start, end = self.estimated, self.estimated + unit.shape[0]
        if end > self._values.shape[0]:  # grow by doubling: memory follows the samples used, not the budget
            grown = np.empty((min(self.config.n, max(end, 2 * self._values.shape[0])), self._values.shape[1]))
            grown[:start] = self._values[:start]
            self._values = grown
        self._values[start:end] = projections[:, self._kept].cpu().numpy()
        self.consumed += unit.shape[0]

    @property
    def projections(self) -> np.ndarray:
        """The c_i = <f̃(x + δ_i), û> of the estimation samples used so far (a copy; for analyses)."""
        return self._values[: self.estimated, 0].copy()

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
            scores = weights @ direction
            self._selected_label = int(torch.argmax(scores))
            top = torch.argsort(scores, descending=True)[: self.KEPT_LABELS]
            self._kept = [0, *(1 + int(k) for k in top)]
            self._values = np.empty((self._values.shape[0], len(self._kept)))
            probes.append(weights)
        self._probes = torch.cat(probes)
        self._probe_sum = torch.zeros(self._probes.shape[0], dtype=torch.float64, device=direction.device)
        self._probe_sq_sum = torch.zeros_like(self._probe_sum)

    @property
    def _horizon(self) -> int | None:
        """The betting bound is tuned for the budget n, or, when a rule may stop it early, for every count."""
        return None if self.stop is not None else self.config.n

    def _score_lower(self, count: int) -> float:
        alpha = self.config.alpha / 2 if self.classifier is not None else self.config.alpha
        return lower_bound(self._values[:count, 0], alpha, self.config.bound, self._horizon)

    def _check(self) -> None:
        """At a checkpoint: the anytime bound now (kept if it is the best so far) and the stop rule."""
        count = self.estimated
        if self.config.bound not in ANYTIME_METHODS or count < 2:
            return
        self._checked = count
        self._best_lower = max(self._best_lower, self._score_lower(count))
        if self.stop is not None and count < self.config.n:
            upper = upper_bound(self._values[:count, 0], self.config.alpha, self.config.bound, self._horizon)
            self.stopped_by = self.stop.decide(self._best_lower, upper, self.config.sigma)

    def interim(self, radii: Sequence[float]) -> dict[str, object] | None:
        """The certificate valid so far (anytime bound, at the last checkpoint): {n, score_lower, radii}; None
        before the first checkpoint or with a bound that holds only at the end."""
        if self.config.bound not in ANYTIME_METHODS or self._checked == 0:
            return None
        radii_array = np.asarray(list(radii), dtype=np.float64)
        values = certified_fcsb(self._best_lower, self.config.sigma, radii_array)
        return {
            "n": self._checked,
            "score_lower": self._best_lower,
            "radii": [{"radius": float(r), "certified_fcsb": c} for r, c in zip(radii_array, _optional(values))],
        }

    def certificate(self, radii: Sequence[float]) -> Certificate:
        """The certificate at each radius (method.md steps 2–4); the run must be done."""
        if not self.done:
            raise RuntimeError(f"run not finished: {self.consumed} of {self.total} samples consumed")
        assert self._feature_sum is not None and self._probes is not None
        assert self._probe_sum is not None and self._probe_sq_sum is not None
        cfg = self.config
        count = self.estimated
        radii_array = np.asarray(list(radii), dtype=np.float64)
        if cfg.bound in ANYTIME_METHODS:
            score_lower = self._best_lower  # the intersection of the confidence sequence over the checkpoints
        else:
            score_lower = self._score_lower(count)
        # ||Σ f̃_i||² = m + Σ_{i≠j} <f̃_i, f̃_j>, so the mean off-diagonal term is unbiased for ||F(x)||².
        m = self.consumed
        pair_mean = (float(self._feature_sum.double().square().sum()) - m) / (m * (m - 1))
        score_estimate = math.sqrt(min(max(pair_mean, 0.0), 1.0))
        mean_feature = (self._feature_sum / m).float()
        direction = self._probes[0]
        served_angle = math.acos(min(1.0, float(F.cosine_similarity(mean_feature, direction, dim=0))))
        certified = certified_fcsb(score_lower, cfg.sigma, radii_array)
        prediction = None
        if self.classifier is not None:
            assert self._selected_label is not None
            prediction = certify_prediction(
                self.classifier,
                self._selected_label,
                self._probe_sum[1:].cpu().numpy(),
                self._probe_sq_sum[1:].cpu().numpy(),
                {k - 1: self._values[:count, j] for j, k in enumerate(self._kept) if k > 0},
                count,
                cfg.sigma,
                cfg.alpha / 2,
                cfg.bound,
            )
        return Certificate(
            config=cfg,
            seed=self.seed,
            radii=tuple(float(r) for r in radii_array),
            n=count,
            stopped_by=self.stopped_by or "budget",
            score_estimate=score_estimate,
            score_lower=score_lower,
            certified_fcsb=_optional(certified),
            served_fcsb=_optional(served_fcsb(certified, served_angle)),
            estimated_fcsb=tuple(float(v) for v in fcsb(score_estimate, cfg.sigma, radii_array)),
            served_angle=served_angle,
            smoothed_feature=mean_feature.cpu(),
            direction=direction.cpu(),
            prediction=prediction,
            clean_score=None if self._reference is None else (1.0 + self._reference_sum / m) / 2.0,
            stop=self.stop,
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
        bound: BoundMethod = "betting",
        classifier: CosineClassifier | None = None,
        stop: StopRule | None = None,
        reference: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Certificate:
        """Certify one image [C, H, W] (method.md steps 1–4); ``stop`` may end sampling before ``n``."""
        config = SmoothingConfig(sigma=self.sigma, n0=n0, n=n, alpha=alpha, bound=bound)
        for radius in radii:
            if not (math.isfinite(radius) and radius >= 0):
                raise ValueError(f"radii must be non-negative l2 norms, got {radius}")
        run = SmoothingRun(
            pixels.to(self.device), config, new_seed() if seed is None else seed, classifier, stop, reference
        )
        run_batched([run], self.base, self.batch_size, progress)
        return run.certificate(radii)
