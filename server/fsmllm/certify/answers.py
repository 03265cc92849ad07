"""Certified answers: CERTIFY (Cohen, Rosenfeld & Kolter 2019) on the whole model's answer (method.md,
"Certified answers").

For a fixed prompt, the base classifier ``h(z)`` is the model's greedy answer, normalised
(:func:`normalise_answer`), from the features of one noisy image ``z = x + δ``, δ ~ N(0, σ² I) — or, with
``inner = k``, from the mean of the unit features of k independent noisy copies. The smoothed classifier
``g(x) = argmax_A P(h(x + δ) = A)`` is certified like any smoothed classifier:

1. ``n0`` selection votes choose the top answer Â;
2. up to ``n`` fresh votes count ``k_A`` agreements and give a (1 − α) lower confidence bound p̲ on
   ``p_A = P(h = Â)``: one-sided Clopper–Pearson at a fixed n (``scipy.stats.binomtest``), or, when sampling
   may stop early, the anytime-valid betting bound on the ±1 agreements
   (:func:`~fsmllm.certify.bounds.betting_lower_bound` with the bet caps of
   :data:`~fsmllm.certify.bounds.VOTE_TRUNCATIONS`, which lose less to a disagreeing vote);
3. if p̲ > 1/2, g(x′) = Â for every ``‖x′ − x‖₂ < R = σ_eff Φ⁻¹(p̲)`` (Cohen et al., Theorem 1, with
   p̄_B = 1 − p̲), where ``σ_eff = σ / √k``: the k copies are one Gaussian vector of dimension k·d around
   (x, …, x), which moves by √k ‖x′ − x‖ when x does; otherwise abstain.

Everything here is pure (no model, no server): the votes arrive as answer strings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.stats import binomtest, norm

from fsmllm.certify.bounds import VOTE_TRUNCATIONS, betting_lower_bound
from fsmllm.certify.smoothing import Encode, SampleRun, bound_checked_after, run_batched

#: characters dropped at the end of an answer before votes are compared ("A cat." and "a cat" agree)
FINAL_PUNCTUATION = ".!?,;:。！？…\"'”’)"
#: how many of the most frequent answers a certificate lists
LISTED_VOTES = 5

#: votes per batch of samples and per batched generation; it fixes which noise each vote of a seed gets
VOTE_CHUNK = 64

AnswerBound = Literal["clopper-pearson", "betting"]
AnswerStop = Literal["budget", "target_reached", "target_unreachable"]
#: the selection votes choose the answer, the estimation votes bound its probability
VotePhase = Literal["selection", "estimation"]


def normalise_answer(text: str) -> str:
    """The form in which votes are compared: whitespace collapsed, case folded, final punctuation dropped."""
    return " ".join(text.split()).casefold().rstrip(FINAL_PUNCTUATION).rstrip()


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion (exact; ``scipy.stats``)."""
    if successes == 0:
        return 0.0
    test = binomtest(successes, trials, alternative="greater")
    return float(test.proportion_ci(confidence_level=1.0 - alpha, method="exact").low)


def answer_radius(p_lower: float, sigma: float, inner: int = 1) -> float | None:
    """``σ/√k · Φ⁻¹(p̲)`` where p̲ > 1/2 (Cohen et al., Theorem 1), else None (abstain)."""
    if not p_lower > 0.5:
        return None
    return float(sigma / math.sqrt(inner) * norm.ppf(p_lower))


def needed_probability(radius: float, sigma: float, inner: int = 1) -> float:
    """The smallest p̲ whose radius reaches ``radius``: ``Φ(radius √k / σ)``."""
    return float(norm.cdf(radius * math.sqrt(inner) / sigma))


@dataclass(frozen=True)
class AnswerConfig:
    """The parameters of one certified answer; ``radius`` (optional) is the target that lets sampling stop
    early (which switches the bound to the anytime-valid betting bound)."""

    sigma: float
    n0: int = 32
    n: int = 256
    alpha: float = 0.001
    inner: int = 1
    radius: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive noise level, got {self.sigma}")
        if self.n0 < 1:
            raise ValueError(f"n0 (selection votes) must be at least 1, got {self.n0}")
        if self.n < 2:
            raise ValueError(f"n (estimation votes) must be at least 2, got {self.n}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.inner < 1:
            raise ValueError(f"inner (noisy copies per vote) must be at least 1, got {self.inner}")
        if self.radius is not None and not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"the target radius must be a positive l2 norm, got {self.radius}")

    @property
    def bound(self) -> AnswerBound:
        return "clopper-pearson" if self.radius is None else "betting"


@dataclass(frozen=True)
class AnswerCertificate:
    """The certified answer of the smoothed model, reproducible from ``(image, prompt, config, seed)``.

    With probability ≥ 1 − α: ``p_lower`` ≤ P(h(x + δ) = answer), hence, unless ``abstain``, the smoothed
    model answers ``answer`` (in normalised form) for every x′ with ``‖x′ − x‖₂ < radius``. ``votes`` are
    the most frequent answers among the ``n`` estimation votes (display text, normalised form, count).
    ``samples`` are the estimation votes in order, +1 where a vote agreed with ``answer`` and −1 where not
    (float64 [n]), from which :func:`~fsmllm.certify.replay.answer_p_lower` recomputes ``p_lower`` bit for bit.
    """

    answer: str
    normalised: str
    p_lower: float
    radius: float | None
    config: AnswerConfig
    seed: int
    n: int
    agree: int
    stopped_by: AnswerStop
    votes: tuple[tuple[str, str, int], ...] = field(default=())
    samples: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)

    @property
    def abstain(self) -> bool:
        return self.radius is None

    def certified_at(self, radius: float) -> bool:
        """True when the answer provably stays the same for every perturbation of l2 norm < ``radius``."""
        return self.radius is not None and radius < self.radius


@dataclass(frozen=True)
class VoteProgress:
    """The votes so far (:meth:`AnswerVoting.progress`, a progress report's): ``done`` of ``total`` (= n0 + n) votes
    counted; once the selection votes chose the answer (the estimation phase), its display text ``answer`` and its
    ``agree``-ing estimation votes of ``estimated``; with a target radius (the anytime-valid betting bound) the bound
    valid so far, ``p_lower`` (the best over the checkpoints passed) and its ``radius`` (None: abstain), valid
    whenever the voting stops (at a fixed n, Clopper-Pearson, no interim bound is valid: ``p_lower`` is None);
    ``stopped_by`` once the voting has ended."""

    done: int
    total: int
    answer: str | None = None
    agree: int | None = None
    estimated: int | None = None
    p_lower: float | None = None
    radius: float | None = None
    stopped_by: AnswerStop | None = None

    @property
    def phase(self) -> VotePhase:
        return "selection" if self.answer is None else "estimation"


class AnswerVoting:
    """The streaming state of one certified answer: feed it the answers of the votes, in order (:meth:`add`).

    The first ``n0`` answers are the selection votes (they choose Â, the most frequent normalised answer, ties
    to the first seen); the next ones are estimation votes. With a target radius the anytime bound is checked
    at the counts of :func:`~fsmllm.certify.smoothing.bound_checked_after` (functions of the count only, so the
    result never depends on how the votes were batched) and sampling stops once the target is certified or an
    upper confidence bound shows it never will be; answers past the stop are ignored.
    """

    def __init__(self, config: AnswerConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.stopped_by: AnswerStop | None = None
        self._selection: list[str] = []
        self._display: dict[str, str] = {}  # normalised → the first raw answer seen in that form
        self._chosen: str | None = None
        self._counts: Counter[str] = Counter()
        self._agreements = np.empty(0, dtype=np.float64)  # ±1 per estimation vote (for the betting bound)
        self._best_lower = 0.0

    @property
    def done(self) -> bool:
        return self.stopped_by is not None

    @property
    def estimated(self) -> int:
        return self._agreements.size

    @property
    def chosen(self) -> str | None:
        """Â (normalised), once the selection votes are in."""
        return self._chosen

    def wanted(self) -> int:
        """Votes still needed by the phase in progress (0 when done): the selection votes must be counted before
        the estimation votes start, since they choose Â."""
        if self.done:
            return 0
        if self._chosen is None:
            return self.config.n0 - len(self._selection)
        return self.config.n - self.estimated

    def add(self, answers: Sequence[str]) -> None:
        """Count the next votes' answers (raw text)."""
        for text in answers:
            if self.done:
                return
            key = normalise_answer(text)
            self._display.setdefault(key, text.strip())
            if self._chosen is None:
                self._selection.append(key)
                if len(self._selection) == self.config.n0:
                    counts = Counter(self._selection)
                    self._chosen = max(counts, key=lambda answer: (counts[answer], -self._selection.index(answer)))
                continue
            self._counts[key] += 1
            self._agreements = np.append(self._agreements, 1.0 if key == self._chosen else -1.0)
            if self.estimated == self.config.n:
                self._check()
                self.stopped_by = self.stopped_by or "budget"
            elif self.config.radius is not None and bound_checked_after(self.estimated):
                self._check()

    def _check(self) -> None:
        """At a checkpoint (anytime bound only): the bound now, the best so far, and the stop rule."""
        if self.config.radius is None:
            return
        alpha = self.config.alpha
        lower = betting_lower_bound(self._agreements, alpha, truncations=VOTE_TRUNCATIONS)
        self._best_lower = max(self._best_lower, (1.0 + lower) / 2.0)
        if self.estimated == self.config.n:
            return
        needed = needed_probability(self.config.radius, self.config.sigma, self.config.inner)
        if self._best_lower >= needed:
            self.stopped_by = "target_reached"
        elif (1.0 - betting_lower_bound(-self._agreements, alpha, truncations=VOTE_TRUNCATIONS)) / 2.0 < needed:
            self.stopped_by = "target_unreachable"

    def p_lower(self) -> float:
        """The (1 − α) lower confidence bound on P(h = Â) from the estimation votes so far."""
        if self.config.radius is not None:
            return self._best_lower
        agree = int((self._agreements > 0).sum())
        return clopper_pearson_lower(agree, self.estimated, self.config.alpha)

    def progress(self) -> VoteProgress:
        """The votes so far (:class:`VoteProgress`), for a progress event."""
        config = self.config
        done, total = len(self._selection) + self.estimated, config.n0 + config.n
        if self._chosen is None:
            return VoteProgress(done, total)  # the selection phase
        anytime = config.radius is not None
        return VoteProgress(
            done,
            total,
            answer=self._display[self._chosen],
            agree=int((self._agreements > 0).sum()),
            estimated=self.estimated,
            p_lower=self._best_lower if anytime else None,
            radius=answer_radius(self._best_lower, config.sigma, config.inner) if anytime else None,
            stopped_by=self.stopped_by,
        )

    def certificate(self) -> AnswerCertificate:
        if self.stopped_by is None or self._chosen is None:
            raise RuntimeError(f"voting not finished: {self.estimated} of {self.config.n} estimation votes counted")
        p_lower = self.p_lower()
        return AnswerCertificate(
            answer=self._display[self._chosen],
            normalised=self._chosen,
            p_lower=p_lower,
            radius=answer_radius(p_lower, self.config.sigma, self.config.inner),
            config=self.config,
            seed=self.seed,
            n=self.estimated,
            agree=int((self._agreements > 0).sum()),
            stopped_by=self.stopped_by,
            votes=tuple((self._display[key], key, count) for key, count in self._counts.most_common(LISTED_VOTES)),
            samples=self._agreements.copy(),
        )


def vote_chunks(n0: int, n: int) -> list[int]:
    """The sizes of the vote chunks: the selection votes, then the estimation votes, each in chunks of at most
    VOTE_CHUNK (a function of n0 and n only, so that a seed's votes do not depend on the load)."""
    return [min(VOTE_CHUNK, total - start) for total in (n0, n) for start in range(0, total, VOTE_CHUNK)]


def chunk_seed(seed: int, chunk: int) -> int:
    """The noise seed of vote chunk ``chunk`` of an answer certificate with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def certify_answer(
    pixels: torch.Tensor,
    encode: Encode,
    answer: Callable[[torch.Tensor], list[str]],
    config: AnswerConfig,
    seed: int,
    batch_size: int = 64,
) -> AnswerCertificate:
    """The certified answer for one image [C, H, W], computed here, chunk after chunk (the reference executor;
    the server's runtime does the same with shared batches and the next chunk's samples computed while the
    model answers): ``answer(features [k, D])`` gives the greedy answers of k votes from their features."""
    voting = AnswerVoting(config, seed)
    for index, count in enumerate(vote_chunks(config.n0, config.n)):
        run = SampleRun(pixels, config.sigma, count, chunk_seed(seed, index), config.inner)
        run_batched([run], encode, batch_size)
        voting.add(answer(run.features()))
        if voting.done:
            break
    return voting.certificate()
