"""Recomputing a certificate's numbers from its recorded samples, as a verifier does (no model, no noise).

A :class:`~fsmllm.certify.smoothing.SmoothingRun` bounds the score from the estimation samples
``c_i = <f̃(x + δ_i), û>`` (method.md, "Estimating it soundly", step 2). Given those c_i (float64, one column per
token) and the certificate's parameters, :func:`score_lower` evaluates the same bounds at the same sample counts
in the same order, so it returns the served ``score_lower`` bit for bit:

* a fixed-n bound (empirical Bernstein, Hoeffding): the bound of all n samples, at level α_s;
* the anytime betting bound: the largest of the bounds at every count ``t ≤ n`` where it is checked
  (:func:`bound_checked_after`) and
  at the budget when it was spent, each of the first t samples (the intersection of the confidence sequence),
  with the bets tuned for the budget unless a stop rule could end sampling early.

α_s is α per token (Bonferroni over the T tokens of a token-level certificate). The FCSB at each radius then
follows from ``score_lower`` by the closed form (:func:`~fsmllm.certify.certificate.certified_fcsb`).

A certified answer's p̲ is recomputed the same way from its estimation votes (±1: agreed with the answer or not;
:func:`answer_p_lower`): Clopper–Pearson on their count at a fixed n, or the best betting bound (vote caps) over
the same checkpoints with a target radius; its radius then follows by
:func:`~fsmllm.certify.answers.answer_radius`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fsmllm.certify.answers import clopper_pearson_lower
from fsmllm.certify.bounds import ANYTIME_METHODS, VOTE_TRUNCATIONS, BoundMethod, betting_lower_bound, lower_bound
from fsmllm.certify.config import bound_checked_after


def bound_counts(used: int, budget: int) -> list[int]:
    """The sample counts at which a run evaluated its anytime bound: every checkpoint up to ``used``, and the
    budget when it was spent (counts below 2 carry no bound)."""
    counts = [count for count in range(2, used + 1) if bound_checked_after(count)]
    if used == budget and (not counts or counts[-1] != budget):
        counts.append(budget)
    return counts


def score_lower(
    samples: NDArray[np.float64], alpha: float, bound: BoundMethod, budget: int, stoppable: bool
) -> NDArray[np.float64]:
    """Per token, the lower confidence bound on ``<F(x), û>`` a run gave from ``samples`` [n, T] (its c_i) at
    level ``alpha`` per token, with ``budget`` the n it was allowed and ``stoppable`` whether a stop rule ran."""
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    used, tokens = values.shape
    if used < 2 or used > budget:
        raise ValueError(f"{used} recorded samples for a budget of {budget}: a bound needs 2 to {budget}")
    columns = [np.ascontiguousarray(values[:, t]) for t in range(tokens)]
    if bound not in ANYTIME_METHODS:
        return np.array([lower_bound(column, alpha, bound) for column in columns])
    horizon = None if stoppable else budget
    counts = bound_counts(used, budget)
    if not counts:
        raise ValueError(f"an anytime bound stopped after {used} samples, at no checkpoint")
    return np.array([max(lower_bound(column[:count], alpha, bound, horizon) for count in counts) for column in columns])


def answer_p_lower(votes: NDArray[np.float64], alpha: float, budget: int, anytime: bool) -> float:
    """The p̲ a certified answer gave from its estimation ``votes`` (±1, in order) at level ``alpha``, with
    ``budget`` the votes it was allowed and ``anytime`` whether it ran to a target radius (the betting bound,
    evaluated where :class:`~fsmllm.certify.answers.AnswerVoting` evaluates it) or not (Clopper–Pearson)."""
    values = np.asarray(votes, dtype=np.float64)
    if values.ndim != 1 or not np.isin(values, (-1.0, 1.0)).all():
        raise ValueError("the votes of an answer are a list of +1 (agreed with the answer) and -1")
    if not 1 <= values.size <= budget:
        raise ValueError(f"{values.size} recorded votes for a budget of {budget}")
    if not anytime:
        return clopper_pearson_lower(int((values > 0).sum()), values.size, alpha)
    counts = bound_counts(values.size, budget)
    if not counts:
        raise ValueError(f"an anytime bound stopped after {values.size} votes, at no checkpoint")
    bounds = (
        (1.0 + betting_lower_bound(values[:count], alpha, truncations=VOTE_TRUNCATIONS)) / 2.0 for count in counts
    )
    return max(0.0, *bounds)
