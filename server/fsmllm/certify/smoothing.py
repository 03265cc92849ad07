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
:class:`StopRule` is checked at fixed sample counts (:func:`bound_checked_after`), and the bound at every
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

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fsmllm.certify.bounds import (
    ANYTIME_METHODS,
    fcsb,
    lower_bound,
    upper_bound,
)
from fsmllm.certify.certificate import (
    Certificate,
    InterimCertificate,
    TokenBounds,
    certified_fcsb,
    optional_floats,
    per_token_features,
    served_fcsb,
)
from fsmllm.certify.classify import CosineClassifier, certify_prediction
from fsmllm.certify.config import (
    DEFAULT_RADII,
    NOISE_BLOCK,
    Encode,
    SmoothingConfig,
    StopReason,
    StopRule,
    bound_checked_after,
    check_radii,
    new_seed,
)
from fsmllm.certify.sampling import NoisyCopies, SampleRun, run_batched

#: ``SampleRun``, ``bound_checked_after`` and ``Encode`` are also imported from here (by answers.py)
__all__ = ["Encode", "SampleRun", "SmoothedEncoder", "SmoothingRun", "bound_checked_after", "run_batched"]


def _score_estimates(sums: torch.Tensor, count: int) -> np.ndarray:
    """Per row of ``sums`` (Σ of ``count`` unit vectors): ||Σ f̃_i||² = m + Σ_{i≠j} <f̃_i, f̃_j>, so the mean
    off-diagonal term is unbiased for ||F||²; its square root (clipped to [0, 1]) estimates S = ||F||."""
    pair_mean = (sums.double().square().sum(-1).cpu().numpy() - count) / (count * (count - 1))
    return np.sqrt(np.clip(pair_mean, 0.0, 1.0))


def _angles(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise angles (radians) between a and b [..., W]."""
    angles: np.ndarray = np.arccos(
        np.clip(F.cosine_similarity(a.double(), b.double(), dim=-1).cpu().numpy(), -1.0, 1.0)
    )
    return angles


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
            raise ValueError(
                "a prediction certificate needs granularity 'global' (the classifier reads the whole feature)"
            )
        self.pixels = pixels
        self.config = config
        self.seed = seed
        self.classifier = classifier
        self.stop = stop
        self.issued = 0
        self.consumed = 0
        self.stopped_by: StopReason | None = None
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
        self._interim: InterimCertificate | None = None

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

    def take(self, limit: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Up to ``limit`` noisy copies ``x + δ`` [k, C, H, W] (written into ``out`` where it fits, e.g. an
        executor's batch); None when none can be issued now."""
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
        return self._noise.draw(count, out)

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
            # checkpoints are multiples of NOISE_BLOCK: only those counts are looked at, not every sample
            step = next(
                (
                    k
                    for k in range(NOISE_BLOCK - start % NOISE_BLOCK, flat.shape[0], NOISE_BLOCK)
                    if bound_checked_after(start + k)
                ),
                flat.shape[0],
            )
            step = min(step, self.config.n - start)
            self._estimate(flat[:step], rows[:step])
            flat, rows = flat[step:], rows[step:]
            if self.estimated == self.config.n:
                self._check()
                self.stopped_by = self.stopped_by or "budget"
            elif bound_checked_after(self.estimated):
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
                    f"classifier weights have dimension {weights.shape[1]}, "
                    f"the encoder's features {global_direction.shape[0]}"
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
            [
                bound(self._values[:count, t], self._score_alpha, self.config.bound, self._horizon)
                for t in range(self.num_tokens)
            ]
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

    def interim(self, radii: Sequence[float]) -> InterimCertificate | None:
        """The certificate valid so far (anytime bound, at the last checkpoint; the worst token's for token
        granularity); None before the first checkpoint or with a fixed-n bound."""
        if self.config.bound not in ANYTIME_METHODS or self._best_lower is None:
            return None
        asked = tuple(float(radius) for radius in radii)
        if self._interim is None or (self._interim.n, self._interim.radii) != (self._checked, asked):
            lowest = float(self._best_lower.min())  # computed once per checkpoint (and radii), not per batch
            certified = certified_fcsb(lowest, self.config.sigma, np.asarray(asked, dtype=np.float64))
            self._interim = InterimCertificate(self._checked, lowest, asked, optional_floats(certified))
        return self._interim

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
            certified_fcsb=optional_floats(certified_rows[worst]),
            served_fcsb=optional_floats(served_min),
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
            samples=self._values[:count, : self.num_tokens].copy(),
        )


class SmoothedEncoder:
    """The smoothed version of a base encoder, estimated by Monte Carlo (one image at a time).

    ``base`` is any callable mapping an image batch [B, C, H, W] with pixels in [0, 1] to features [B, ...]
    (a :class:`~fsmllm.encoders.base.VisionEncoder`, or a booster followed by one: the lemma applies to any
    base function). σ and the other statistical parameters are the :class:`SmoothingConfig` of each
    :meth:`certify`. Same seed ⇒ same certificate, whatever ``batch_size``.
    """

    def __init__(self, base: Encode, *, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        self.base = base
        self.batch_size = batch_size
        self.device = torch.device(device)

    def certify(
        self,
        pixels: torch.Tensor,
        config: SmoothingConfig,
        radii: Sequence[float] = DEFAULT_RADII,
        *,
        seed: int | None = None,
        classifier: CosineClassifier | None = None,
        stop: StopRule | None = None,
        reference: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Certificate:
        """Certify one image [C, H, W] under ``config`` at ``radii`` (method.md steps 1–4); ``stop`` may end
        sampling before ``config.n``."""
        check_radii(radii)
        run = SmoothingRun(
            pixels.to(self.device), config, new_seed() if seed is None else seed, classifier, stop, reference
        )
        run_batched([run], self.base, self.batch_size, progress)
        return run.certificate(radii)
