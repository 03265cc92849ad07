"""Prediction-wise certification of a smoothed cosine classifier (method.md, "Prediction-wise certification").

A cosine classifier embeds each label k as a unit vector w_k in feature space; the smoothed prediction is
``k* = argmax_k <F(x), w_k>``. Each ``<F(x), w_k>`` is the mean of the bounded variable ``<f(x + δ), w_k>``,
so it gets a one-sided confidence bound from the same estimation samples as the feature certificate. With
K labels, the K one-sided bounds (a lower one for k*, upper ones for the rest) share α by Bonferroni, so the
certified radius holds with probability ≥ 1 − α. With the betting bound, the labels whose every projection
was kept (k* and the best runners-up on the selection samples) get it; the others, whose sums alone are kept,
get the empirical-Bernstein bound: each bound is valid at its share of α, whichever method computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fsmllm.certify.bounds import (
    SUM_METHODS,
    BoundMethod,
    lower_bound,
    mean_lower_bound,
    mean_upper_bound,
    prediction_radius,
    upper_bound,
)


@dataclass(frozen=True)
class CosineClassifier:
    """Label names and their unit embeddings ``weights[k] = w_k`` (rows are L2-normalised on creation)."""

    names: tuple[str, ...]
    weights: torch.Tensor

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.weights.shape[0] != len(self.names):
            raise ValueError(
                f"weights must be [num_labels, feature_dim] with one row per name; got {tuple(self.weights.shape)}"
                f" for {len(self.names)} names"
            )
        if len(self.names) < 2:
            raise ValueError("a classifier needs at least two labels")
        object.__setattr__(self, "weights", torch.nn.functional.normalize(self.weights.float(), dim=1))

    @classmethod
    def from_rows(cls, names: Sequence[str], weights: torch.Tensor) -> CosineClassifier:
        return cls(tuple(names), weights)


@dataclass(frozen=True)
class PredictionCertificate:
    """The certified smoothed prediction; ``radius`` is None when the classifier abstains."""

    label_index: int
    label: str
    top_lower: float
    runner_up_index: int
    runner_up_upper: float
    radius: float | None
    alpha: float

    @property
    def abstain(self) -> bool:
        return self.radius is None

    def certified_at(self, radius: float) -> bool:
        """True when the prediction provably stays ``label`` for every perturbation of l2 norm ≤ ``radius``."""
        return self.radius is not None and radius < self.radius


def certify_prediction(
    classifier: CosineClassifier,
    selected: int,
    total: np.ndarray,
    total_sq: np.ndarray,
    kept: dict[int, np.ndarray],
    count: int,
    sigma: float,
    alpha: float,
    method: BoundMethod,
) -> PredictionCertificate:
    """Certificate for label ``selected`` (chosen on the selection samples) from the estimation samples.

    ``total[k] = Σ_i <f(x + δ_i), w_k>`` and ``total_sq[k]`` the sums of squares, over ``count`` fresh samples;
    ``kept[k]`` every projection of label k where they were kept (it must include ``selected`` for the
    betting bound).
    """
    per_bound_alpha = alpha / len(classifier.names)
    if method in SUM_METHODS:
        lower = float(mean_lower_bound(total[selected], total_sq[selected], count, per_bound_alpha, method))
        upper = mean_upper_bound(total, total_sq, count, per_bound_alpha, method)
    else:
        lower = lower_bound(kept[selected], per_bound_alpha, method, count)
        upper = mean_upper_bound(total, total_sq, count, per_bound_alpha, "empirical-bernstein")
        for label, values in kept.items():
            upper[label] = upper_bound(values, per_bound_alpha, method, count)
    upper[selected] = -np.inf
    runner_up = int(np.argmax(upper))
    radius = float(prediction_radius(lower, upper[runner_up], sigma))
    return PredictionCertificate(
        label_index=selected,
        label=classifier.names[selected],
        top_lower=lower,
        runner_up_index=runner_up,
        runner_up_upper=float(upper[runner_up]),
        radius=None if np.isnan(radius) else radius,
        alpha=alpha,
    )
