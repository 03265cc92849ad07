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
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fsmllm.certify.bounds import ANYTIME_METHODS, BoundMethod, lower_bound
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
