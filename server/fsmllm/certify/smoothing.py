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
sample), never the features. The noise is drawn on the pixels' device (no host-to-device copy per sample), in
their dtype (float32: an encoder in reduced precision casts ``x + δ`` itself, so δ is the stated Gaussian), from
the run's own seeded generator in fixed blocks, and the checkpoints depend only on the sample count, so the
samples — and hence the certificate — do not depend on how an executor packs runs into encoder batches.
:func:`run_batched` is the reference executor; :class:`SmoothedEncoder` wraps it for one image at a time;
:func:`run_shared` drives runs of the same samples (e.g. both granularities) on one encoder pass.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

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
#: what one certificate bounds: the whole feature flattened and normalised once, or every token on its own
Granularity = Literal["global", "token"]
GRANULARITIES: tuple[Granularity, ...] = ("global", "token")
#: the radii (l2, pixels in [0, 1]) certified when a request or a command names none
DEFAULT_RADII = (0.1, 0.25, 0.5)


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

    @classmethod
    def requested(
        cls,
        config: SmoothingConfig,
        radii: Sequence[float],
        stop_at_fcsb: float | None,
        target_cos: float | None = None,
        radius_tolerance: float | None = None,
    ) -> StopRule | None:
        """The rule a request's ``stop_at_fcsb`` or ``radius_tolerance`` (with ``target_cos``) asks for, or None:
        a target alone does not stop early. Raises ``ValueError`` for a combination that cannot stop soundly."""
        if stop_at_fcsb is None and radius_tolerance is None:
            return None
        if config.bound not in ANYTIME_METHODS:
            raise ValueError(
                f"stopping early needs an anytime-valid bound: use bound 'betting' (the default), not {config.bound!r}"
            )
        if stop_at_fcsb is not None and radius_tolerance is not None:
            raise ValueError("give stop_at_fcsb (stop at a certified cosine) or radius_tolerance (with target_cos), not both")
        if radius_tolerance is not None:
            if target_cos is None:
                raise ValueError("radius_tolerance stops a target_cos request: give target_cos too")
            return cls(target_cos=target_cos, tolerance=radius_tolerance)
        if not radii:
            raise ValueError("stop_at_fcsb needs at least one radius")
        return cls(fcsb=stop_at_fcsb, radii=tuple(radii))

    def decide(self, lower: float, upper_bound: Callable[[], float], sigma: float) -> str | None:
        """The reason to stop given the score's lower confidence bound and its upper one (computed only when the
        rule needs it), or None to go on."""
        if self.fcsb is not None:
            # the score that certifies fcsb at the largest radius: FCSB(p) ≥ C ⇔ p ≥ 2Φ(Φ⁻¹((1+C)/2) + ε/σ) − 1
            needed = float(1.0 - 2.0 * norm.sf(norm.isf((1.0 - self.fcsb) / 2.0) + max(self.radii) / sigma))
            if lower >= needed:
                return "target_reached"
            return "target_unreachable" if upper_bound() < needed else None
        assert self.target_cos is not None and self.tolerance is not None
        upper = upper_bound()
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
    granularity: Granularity = "global"

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
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")


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
class TokenBounds:
    """Per-token numbers of a ``token`` certificate (index t = the encoder's token t)."""

    score_estimate: tuple[float, ...]
    score_lower: tuple[float, ...]
    served_angle: tuple[float, ...]


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

    With ``granularity == "token"`` every token t is smoothed on its own (F_t, û_t, F̂_t; method.md, "Token-level
    certificates") and the statements hold for every token at once (α split over the T tokens): the headline
    numbers are the worst token's (``worst_token``; ``served_fcsb`` the smallest over the tokens), ``tokens``
    has each token's score bounds and served angle.

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
    worst_token: int | None = None
    tokens: TokenBounds | None = field(default=None, repr=False)

    @property
    def abstain(self) -> bool:
        """True when no requested radius is certified (every ``certified_fcsb`` is None; with no radii asked,
        when the score itself is not certified positive)."""
        if not self.radii:
            return self.score_lower <= 0
        return all(value is None for value in self.certified_fcsb)

    @property
    def score_alpha(self) -> float:
        """The share of α spent on each score bound: halved when a prediction is certified too, split over the
        tokens of a token-level certificate."""
        alpha = self.config.alpha / 2 if self.prediction is not None else self.config.alpha
        return alpha / (len(self.tokens.score_lower) if self.tokens is not None else 1)

    def token_certified_fcsb(self) -> list[list[float | None]]:
        """Per token, the certified FCSB at each radius (a token-level certificate only)."""
        if self.tokens is None:
            raise ValueError("per-token values exist only for a token-level certificate (granularity 'token')")
        radii = np.asarray(self.radii, dtype=np.float64)
        return [list(_optional(certified_fcsb(lower, self.config.sigma, radii))) for lower in self.tokens.score_lower]

    def to_dict(self, per_token: bool = False) -> dict[str, object]:
        """A JSON-ready summary (no tensors): every number plus what is needed to reproduce it; ``per_token``
        adds each token's values to a token-level certificate."""
        cfg = self.config
        summary: dict[str, object] = {
            "granularity": cfg.granularity,
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
        if self.worst_token is not None:
            summary["worst_token"] = self.worst_token
        if per_token and self.tokens is not None:
            summary["tokens"] = [
                {"token": t, "score_estimate": e, "score_lower": p, "served_angle": a, "certified_fcsb": c}
                for t, (e, p, a, c) in enumerate(
                    zip(self.tokens.score_estimate, self.tokens.score_lower, self.tokens.served_angle, self.token_certified_fcsb())
                )
            ]
        if self.stop is not None:
            summary["stop"] = asdict(self.stop)
        if self.prediction is not None:
            summary["prediction"] = asdict(self.prediction)
        if self.clean_score is not None:
            summary["clean_score"] = self.clean_score
        return summary

    def certified_radius(self, target_cos: float) -> float | None:
        """Largest ε at which the certified FCSB is still ≥ ``target_cos``: ``σ (Φ⁻¹((1+p̲)/2) − Φ⁻¹((1+c)/2))``
        (0 when c = p̲); None when not even ε = 0 is (c > p̲). For a token-level certificate, p̲ is the worst
        token's: the smallest radius over the tokens."""
        if not 0 <= target_cos < 1:
            raise ValueError(f"target_cos must lie in [0, 1), got {target_cos}")
        if self.score_lower <= 0 or target_cos > self.score_lower:
            return None
        return float(certified_radius(self.score_lower, self.config.sigma, target_cos))


def per_token_features(global_mean: torch.Tensor, token_mean: torch.Tensor) -> torch.Tensor:
    """The features handed to the language model under ``token`` granularity, [..., T, W]: each token's mean
    direction (``token_mean``: the mean of the per-token unit rows) at the norm that token has in the mean of
    the flattened unit features (``global_mean``), which is what the ``global`` path serves, so the model sees
    token magnitudes as it does there (method.md, "Token-level certificates")."""
    return F.normalize(token_mean, dim=-1) * global_mean.norm(dim=-1, keepdim=True)


def _score_estimates(sums: torch.Tensor, count: int) -> np.ndarray:
    """Per row of ``sums`` (Σ of ``count`` unit vectors): ||Σ f̃_i||² = m + Σ_{i≠j} <f̃_i, f̃_j>, so the mean
    off-diagonal term is unbiased for ||F||²; its square root (clipped to [0, 1]) estimates S = ||F||."""
    pair_mean = (sums.double().square().sum(-1).cpu().numpy() - count) / (count * (count - 1))
    return np.sqrt(np.clip(pair_mean, 0.0, 1.0))


def _angles(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise angles (radians) between a and b [..., W]."""
    return np.arccos(np.clip(F.cosine_similarity(a.double(), b.double(), dim=-1).cpu().numpy(), -1.0, 1.0))


class NoisyCopies:
    """The noisy copies ``x + σ δ_i``, δ_i ~ N(0, I), of one image [C, H, W] from a seeded generator on the image's
    device. The noise is drawn in blocks of NOISE_BLOCK, so the i-th copy depends only on the seed and i, never
    on how many copies each call asks for. The noise is drawn in the image's dtype, float32 (or float64): 16-bit
    noise would not be the stated Gaussian (a reduced-precision encoder casts ``x + σ δ`` itself)."""

    def __init__(self, pixels: torch.Tensor, sigma: float, seed: int) -> None:
        if pixels.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"pixels must be float32 (or float64), got {pixels.dtype}: the noise is drawn in the pixels' dtype, "
                "and 16-bit noise is not the stated Gaussian; a reduced-precision encoder casts its own input"
            )
        self.pixels = pixels
        self.sigma = sigma
        self._generator = torch.Generator(device=pixels.device).manual_seed(seed)
        self._noise = pixels.new_empty((0, *pixels.shape))

    def draw(self, count: int) -> torch.Tensor:
        """The next ``count`` noisy copies [count, C, H, W]."""
        while self._noise.shape[0] < count:
            block = torch.randn(
                (NOISE_BLOCK, *self.pixels.shape),
                generator=self._generator,
                device=self.pixels.device,
                dtype=self.pixels.dtype,
            )
            self._noise = torch.cat([self._noise, block])
        noise, self._noise = self._noise[:count], self._noise[count:]
        return self.pixels + self.sigma * noise


class SmoothingRun:
    """Streaming Monte Carlo state of one certification: ``take`` noisy inputs, ``consume`` their features.

    Features must be consumed in the order their inputs were taken. Between the selection phase (n0 samples)
    and the estimation phase (up to n samples) the run waits until every selection sample has been consumed,
    since the estimation samples are projected on the direction those define. ``reference`` (optional, a
    clean feature) makes the certificate carry the paper's score E[(1 + cos(f(x + δ), f(x)))/2] as well.

    Internally every feature is a [T, W] matrix of unit rows: the flattened feature (T = 1) for ``global``
    granularity, each token normalised on its own for ``token`` (features [B, T, W]; a single vector [B, D] is
    one token, so both granularities coincide there).
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
        if classifier is not None and config.granularity != "global":
            raise ValueError("a prediction certificate needs granularity 'global' (the classifier reads the whole feature)")
        self.pixels = pixels
        self.config = config
        self.seed = seed
        self.classifier = classifier
        self.stop = stop
        self.issued = 0
        self.consumed = 0
        self.stopped_by: str | None = None
        self._noise = NoisyCopies(pixels, config.sigma, seed)
        self._feature_sum: torch.Tensor | None = None  # Σ of the flattened unit features [D] (the global mean)
        self._token_sum: torch.Tensor | None = None  # Σ of the unit rows [T, W] (token granularity)
        self._reference = None if reference is None else F.normalize(reference.reshape(-1).double(), dim=0)
        self._reference_sum = 0.0
        self._directions: torch.Tensor | None = None  # û, one unit row per token [T, W], after the selection
        self._weights: torch.Tensor | None = None  # classifier label embeddings [K, D]
        self._label_sum: torch.Tensor | None = None
        self._label_sq_sum: torch.Tensor | None = None
        self._kept_labels: list[int] = []  # labels whose every projection is kept (the top ones at selection)
        # kept projections, a row per estimation sample: c_{i,t} for every token, then the kept labels
        self._values = np.empty((min(config.n, 1024), 0))
        self._selected_label: int | None = None
        self._best_lower: np.ndarray | None = None  # per token: the anytime bound, best over the checkpoints
        self._checked = 0
        self._interim: tuple[tuple[int, tuple[float, ...]], dict[str, object]] | None = None

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

    @property
    def num_tokens(self) -> int:
        """T: the rows the certificate bounds (1 for global granularity; for token granularity known once the
        first features arrived, 0 before)."""
        if self.config.granularity == "global":
            return 1
        return 0 if self._token_sum is None else int(self._token_sum.shape[0])

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
        self.issued += count
        return self._noise.draw(count)

    def _rows(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flattened unit features [B, D], unit rows [B, T, W]) of a batch of raw features."""
        count = features.shape[0]
        flat = F.normalize(features.reshape(count, -1).float(), dim=1)
        if self.config.granularity == "global" or features.ndim < 3:
            return flat, flat[:, None, :]
        return flat, F.normalize(features.reshape(count, features.shape[1], -1).float(), dim=2)

    def consume(self, features: torch.Tensor) -> None:
        """Add the base encoder's outputs for the next ``len(features)`` issued inputs ([B, D] or [B, T, W]).

        Once the run is done (budget spent or a stop rule met at a checkpoint) the features of samples past
        that point are discarded: the certificate and the smoothed feature use exactly the samples up to it.
        """
        count = features.shape[0]
        if count > self.issued - self.consumed:
            raise RuntimeError(f"{count} features for {self.issued - self.consumed} outstanding samples")
        if self.done:
            return
        flat, rows = self._rows(features)
        if self._feature_sum is None:
            self._feature_sum = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            if self.config.granularity == "token":
                self._token_sum = torch.zeros(rows.shape[1:], dtype=torch.float64, device=flat.device)
        in_selection = max(0, min(count, self.config.n0 - self.consumed))
        if in_selection:
            self._accumulate(flat[:in_selection], rows[:in_selection])
            self.consumed += in_selection
            if self.consumed == self.config.n0:
                self._start_estimation()
        flat, rows = flat[in_selection:], rows[in_selection:]
        while flat.shape[0] and not self.done:
            # up to the next checkpoint (or the budget), so that a stop never depends on the batch boundaries
            start = self.estimated
            step = next(
                (k for k in range(1, flat.shape[0]) if is_checkpoint(start + k) or start + k == self.config.n),
                flat.shape[0],
            )
            self._estimate(flat[:step], rows[:step])
            flat, rows = flat[step:], rows[step:]
            if self.estimated == self.config.n:
                self._check()
                self.stopped_by = self.stopped_by or "budget"
            elif is_checkpoint(self.estimated):
                self._check()

    def _accumulate(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        assert self._feature_sum is not None
        self._feature_sum += flat.sum(0, dtype=torch.float64)
        if self._token_sum is not None:
            self._token_sum += rows.sum(0, dtype=torch.float64)
        if self._reference is not None:
            self._reference_sum += float((flat.double() @ self._reference.to(flat.device)).sum())

    def _estimate(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        """Project estimation samples on û (per token) and on the labels; keep the values the bounds need."""
        assert self._directions is not None
        self._accumulate(flat, rows)
        columns = [torch.einsum("btw,tw->bt", rows, self._directions).clamp_(-1.0, 1.0).double()]
        if self._weights is not None:
            assert self._label_sum is not None and self._label_sq_sum is not None
            labels = (flat @ self._weights.T).clamp_(-1.0, 1.0).double()
            self._label_sum += labels.sum(0)
            self._label_sq_sum += (labels**2).sum(0)
            columns.append(labels[:, self._kept_labels])
        start, end = self.estimated, self.estimated + flat.shape[0]
        if end > self._values.shape[0]:  # grow by doubling: memory follows the samples used, not the budget
            grown = np.empty((min(self.config.n, max(end, 2 * self._values.shape[0])), self._values.shape[1]))
            grown[:start] = self._values[:start]
            self._values = grown
        self._values[start:end] = torch.cat(columns, dim=1).cpu().numpy()
        self.consumed += flat.shape[0]

    @property
    def projections(self) -> np.ndarray:
        """The c_i = <f̃(x + δ_i), û> of the estimation samples used so far (a copy; for analyses), one column
        per token for token granularity."""
        values = self._values[: self.estimated, : max(self.num_tokens, 1)].copy()
        return values[:, 0] if values.shape[1] == 1 else values

    def _start_estimation(self) -> None:
        """Fix û (per token) from the selection samples (method.md step 1) and, with a classifier, the label k*."""
        assert self._feature_sum is not None
        global_direction = F.normalize(self._feature_sum.float(), dim=0)
        if self._token_sum is not None:
            self._directions = F.normalize(self._token_sum.float(), dim=1)
        else:
            self._directions = global_direction[None]
        if self.classifier is not None:
            weights = self.classifier.weights.to(global_direction.device)
            if weights.shape[1] != global_direction.shape[0]:
                raise ValueError(
                    f"classifier weights have dimension {weights.shape[1]}, the encoder's features {global_direction.shape[0]}"
                )
            scores = weights @ global_direction
            self._selected_label = int(torch.argmax(scores))
            self._kept_labels = [int(k) for k in torch.argsort(scores, descending=True)[: self.KEPT_LABELS]]
            self._weights = weights
            self._label_sum = torch.zeros(weights.shape[0], dtype=torch.float64, device=weights.device)
            self._label_sq_sum = torch.zeros_like(self._label_sum)
        width = self._directions.shape[0] + len(self._kept_labels)
        self._values = np.empty((self._values.shape[0], width))

    @property
    def _horizon(self) -> int | None:
        """The betting bound is tuned for the budget n, or, when a rule may stop it early, for every count."""
        return None if self.stop is not None else self.config.n

    @property
    def _score_alpha(self) -> float:
        """Each token's share of α (Bonferroni over the tokens; half of α goes to a prediction certificate)."""
        alpha = self.config.alpha / 2 if self.classifier is not None else self.config.alpha
        return alpha / self.num_tokens

    def _bounds(self, count: int, bound: Callable[..., float]) -> np.ndarray:
        return np.array(
            [bound(self._values[:count, t], self._score_alpha, self.config.bound, self._horizon) for t in range(self.num_tokens)]
        )

    def _check(self) -> None:
        """At a checkpoint: the anytime bounds now (kept where best so far) and the stop rule on the worst token."""
        count = self.estimated
        if self.config.bound not in ANYTIME_METHODS or count < 2:
            return
        self._checked = count
        lower = self._bounds(count, lower_bound)
        self._best_lower = lower if self._best_lower is None else np.maximum(self._best_lower, lower)
        if self.stop is not None and count < self.config.n:
            self.stopped_by = self.stop.decide(
                float(self._best_lower.min()), lambda: float(self._bounds(count, upper_bound).min()), self.config.sigma
            )

    def interim(self, radii: Sequence[float]) -> dict[str, object] | None:
        """The certificate valid so far (anytime bound, at the last checkpoint): {n, score_lower, radii} (the
        worst token's for token granularity); None before the first checkpoint or with a fixed-n bound."""
        if self.config.bound not in ANYTIME_METHODS or self._best_lower is None:
            return None
        key = (self._checked, tuple(radii))
        if self._interim is None or self._interim[0] != key:  # computed once per checkpoint, not per batch
            lowest = float(self._best_lower.min())
            radii_array = np.asarray(list(radii), dtype=np.float64)
            values = certified_fcsb(lowest, self.config.sigma, radii_array)
            self._interim = (key, {
                "n": self._checked,
                "score_lower": lowest,
                "radii": [{"radius": float(r), "certified_fcsb": c} for r, c in zip(radii_array, _optional(values))],
            })
        return self._interim[1]

    def _served(self, count: int) -> torch.Tensor:
        """The features handed to the language model [D]: the mean of the flattened unit features (global); for
        token granularity each token's mean direction, at the norm that token has in that global mean."""
        assert self._feature_sum is not None
        mean = self._feature_sum / count
        if self._token_sum is None:
            return mean.float()
        return per_token_features(mean.reshape(self._token_sum.shape), self._token_sum).reshape(-1).float()

    def certificate(self, radii: Sequence[float]) -> Certificate:
        """The certificate at each radius (method.md steps 2–4); the run must be done."""
        if not self.done:
            raise RuntimeError(f"run not finished: {self.consumed} of {self.total} samples consumed")
        assert self._feature_sum is not None and self._directions is not None and self.stopped_by is not None
        cfg = self.config
        count, m = self.estimated, self.consumed
        radii_array = np.asarray(list(radii), dtype=np.float64)
        if cfg.bound in ANYTIME_METHODS and self._best_lower is not None:
            lowers = self._best_lower  # the intersection of the confidence sequence over the checkpoints
        else:
            lowers = self._bounds(count, lower_bound)
        served = self._served(m)
        token_mode = cfg.granularity == "token"
        sums = self._token_sum if self._token_sum is not None else self._feature_sum[None]
        estimates = _score_estimates(sums, m)
        angles = _angles(self._directions, served.reshape(self._directions.shape).to(self._directions.device))
        worst = int(np.argmin(lowers))
        certified_rows = [certified_fcsb(float(p), cfg.sigma, radii_array) for p in lowers]
        served_rows = np.array([served_fcsb(c, float(a)) for c, a in zip(certified_rows, angles)])
        # the smallest over the tokens, and abstention (NaN) wherever any token abstains
        served_min = served_rows.min(axis=0) if served_rows.size else np.array([])
        estimated = np.min([fcsb(e, cfg.sigma, radii_array) for e in estimates], axis=0)
        prediction = None
        if self.classifier is not None:
            assert self._selected_label is not None and self._label_sum is not None and self._label_sq_sum is not None
            kept = self._values[:count, self.num_tokens :]
            prediction = certify_prediction(
                self.classifier,
                self._selected_label,
                self._label_sum.cpu().numpy(),
                self._label_sq_sum.cpu().numpy(),
                {label: kept[:, j] for j, label in enumerate(self._kept_labels)},
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
            stopped_by=self.stopped_by,
            score_estimate=float(estimates[worst]),
            score_lower=float(lowers[worst]),
            certified_fcsb=_optional(certified_rows[worst]),
            served_fcsb=_optional(served_min),
            estimated_fcsb=tuple(float(v) for v in np.atleast_1d(estimated)),
            served_angle=float(angles[worst]),
            smoothed_feature=served.cpu(),
            direction=(self._directions.reshape(-1) if not token_mode else self._directions).cpu(),
            prediction=prediction,
            clean_score=None if self._reference is None else (1.0 + self._reference_sum / m) / 2.0,
            stop=self.stop,
            worst_token=worst if token_mode else None,
            tokens=TokenBounds(tuple(map(float, estimates)), tuple(map(float, lowers)), tuple(map(float, angles)))
            if token_mode
            else None,
        )


class SampleRun:
    """The base features of ``count`` noisy copies of one image, kept (for the votes of a certified answer,
    method.md "Certified answers"): the same ``take``/``consume`` protocol as :class:`SmoothingRun`, so the
    device worker batches these samples with every other request's.

    Each of the ``count`` results is the mean of ``inner`` flattened unit features f̃(x + δ) — what the served
    path hands the language model from that many samples (one: f̃(x + δ) itself) — in float32 [count, D].
    """

    def __init__(self, pixels: torch.Tensor, sigma: float, count: int, seed: int, inner: int = 1) -> None:
        if pixels.ndim != 3:
            raise ValueError(f"pixels must be one image [C, H, W], got shape {tuple(pixels.shape)}")
        if count < 1 or inner < 1:
            raise ValueError(f"count and inner must be at least 1, got {count} and {inner}")
        self.count = count
        self.inner = inner
        self.issued = 0
        self.consumed = 0
        self._noise = NoisyCopies(pixels, sigma, seed)
        self._features: list[torch.Tensor] = []

    @property
    def total(self) -> int:
        return self.count * self.inner

    @property
    def done(self) -> bool:
        return self.consumed == self.total

    def take(self, limit: int) -> torch.Tensor | None:
        count = min(limit, self.total - self.issued)
        if count <= 0:
            return None
        self.issued += count
        return self._noise.draw(count)

    def consume(self, features: torch.Tensor) -> None:
        if features.shape[0] > self.issued - self.consumed:
            raise RuntimeError(f"{features.shape[0]} features for {self.issued - self.consumed} outstanding samples")
        self._features.append(F.normalize(features.reshape(features.shape[0], -1).float(), dim=1))
        self.consumed += features.shape[0]

    def interim(self, radii: Sequence[float]) -> None:
        """No certificate exists before the votes are counted."""
        return None

    def features(self) -> torch.Tensor:
        """The ``count`` vote features [count, D] (each the mean of ``inner`` unit features); the run must be done."""
        if not self.done:
            raise RuntimeError(f"run not finished: {self.consumed} of {self.total} samples consumed")
        return torch.cat(self._features).reshape(self.count, self.inner, -1).mean(1)


Run = SmoothingRun | SampleRun
Batch = list[tuple[Run, torch.Tensor]]


def fill_batch(runs: Sequence[Run], batch_size: int) -> Batch:
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
    runs: Sequence[Run],
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


def run_shared(
    runs: Sequence[SmoothingRun],
    encode: Encode,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Drive ``runs`` that draw the same noisy copies (the same image, σ, seed, n0 and n; e.g. one run per
    granularity) with one encoder pass per batch: every run takes the same inputs and consumes the same features,
    so each certificate is exactly the one :func:`run_batched` would give it alone, at the encoder cost of one.

    Raises ValueError when the runs' inputs differ (they would not be the same samples).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    while active := [run for run in runs if not run.done]:
        inputs, *others = [run.take(batch_size) for run in active]  # an active run always has a sample to issue
        if inputs is None or any(other is None or not torch.equal(other, inputs) for other in others):
            raise ValueError("runs that share encoder passes must draw the same noisy copies (image, σ, seed, n0, n)")
        with torch.inference_mode():
            features = encode(inputs)
        for run in active:
            run.consume(features)
        if progress is not None:
            progress(features.shape[0])


def check_radii(radii: Sequence[float]) -> None:
    """Refuse radii that are not l2 norms (negative, NaN or infinite) before any sample is drawn."""
    if bad := [radius for radius in radii if not (math.isfinite(radius) and radius >= 0)]:
        raise ValueError(f"radii must be non-negative l2 norms, got {bad}")


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
        granularity: Granularity = "global",
        classifier: CosineClassifier | None = None,
        stop: StopRule | None = None,
        reference: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Certificate:
        """Certify one image [C, H, W] (method.md steps 1–4); ``stop`` may end sampling before ``n``."""
        config = SmoothingConfig(sigma=self.sigma, n0=n0, n=n, alpha=alpha, bound=bound, granularity=granularity)
        check_radii(radii)
        run = SmoothingRun(
            pixels.to(self.device), config, new_seed() if seed is None else seed, classifier, stop, reference
        )
        run_batched([run], self.base, self.batch_size, progress)
        return run.certificate(radii)
