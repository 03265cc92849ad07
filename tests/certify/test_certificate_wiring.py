"""What the certificate rests on, checked from the outside: the encoder's inputs and outputs are recorded, and
every certified number is recomputed from them with the public bounds.

* the selection samples (which fix the direction û and the predicted label) and the estimation samples (which
  bound the score) carry different noise: re-drawing the selection noise for the estimation would make the
  bound's samples depend on û, and the certificate would no longer hold;
* ``score_lower`` is the (1 − α) bound on the estimation samples' projections on û, and û comes from the
  selection samples alone;
* the prediction certificate splits α over its K one-sided bounds (Bonferroni): each is taken at α / K.

Only public behaviour is used (``SmoothedEncoder.certify`` and the bound functions), so these tests do not
depend on how a run keeps its state. The bounds computed from running sums are the ones checked here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsmllm.certify import CosineClassifier, SmoothedEncoder, SmoothingConfig
from fsmllm.certify.bounds import lower_bound, mean_lower_bound, mean_upper_bound, prediction_radius, upper_bound
from fsmllm.certify.classify import certify_prediction

SIGMA = 0.25
N0, N = 20, 200
SUM_METHODS = ("hoeffding", "empirical-bernstein")


class Recorder:
    """A small fixed random network whose every input batch and output batch is kept, in call order."""

    def __init__(self, features: int = 6, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, features)).eval().requires_grad_(False)
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.inputs.append(x.detach().clone())
        self.outputs.append(out.detach().clone())
        return out

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, unit features) of every sample, in the order the run issued them."""
        return torch.cat(self.inputs), F.normalize(torch.cat(self.outputs).double(), dim=1)


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))


def certify(recorder: Recorder, pixels: torch.Tensor, seed: int, bound: str, **kwargs: object):
    config = SmoothingConfig(SIGMA, n0=N0, n=N, alpha=0.01, bound=bound)  # type: ignore[arg-type]
    smoother = SmoothedEncoder(recorder, batch_size=7)
    return smoother.certify(pixels, config, [0.1], seed=seed, **kwargs)  # type: ignore[arg-type]


def test_selection_and_estimation_samples_carry_independent_noise() -> None:
    pixels = image()
    recorder = Recorder()
    certify(recorder, pixels, seed=3, bound="empirical-bernstein")
    inputs, _ = recorder.samples()
    assert inputs.shape[0] == N0 + N
    noise = ((inputs - pixels) / SIGMA).flatten(1).double()
    selection, estimation = noise[:N0], noise[N0:]
    # every sample has its own noise: no estimation sample repeats (or shifts, or mirrors) a selection sample
    cosines = F.normalize(estimation, dim=1) @ F.normalize(selection, dim=1).T
    assert float(cosines.abs().max()) < 0.5  # 192-dimensional Gaussians: |cos| ~ 0.07 apart, 0.5 is 7 sd
    within = F.normalize(estimation, dim=1) @ F.normalize(estimation, dim=1).T - torch.eye(N, dtype=torch.float64)
    assert float(within.abs().max()) < 0.5
    # and it is the N(0, σ²) noise asked for
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03) and abs(float(noise.mean())) < 0.03
    # the same seed draws the same noise (the certificate is reproducible); another seed other noise
    again = Recorder()
    certify(again, pixels, seed=3, bound="empirical-bernstein")
    torch.testing.assert_close(again.samples()[0], inputs, rtol=0, atol=0)
    other = Recorder()
    certify(other, pixels, seed=4, bound="empirical-bernstein")
    assert not torch.allclose(other.samples()[0][:N0], inputs[:N0])


@pytest.mark.parametrize("bound", SUM_METHODS)
def test_the_score_bound_is_computed_from_the_estimation_samples_on_the_selected_direction(bound: str) -> None:
    recorder = Recorder()
    certificate = certify(recorder, image(1), seed=5, bound=bound)
    _, features = recorder.samples()
    direction = F.normalize(features[:N0].sum(0), dim=0)
    torch.testing.assert_close(certificate.direction.double(), direction, atol=1e-5, rtol=0)
    projections = (features[N0:] @ direction).clamp(-1, 1).numpy()
    expected = float(mean_lower_bound(projections.sum(), (projections**2).sum(), N, 0.01, bound))  # type: ignore[arg-type]
    assert certificate.score_lower == pytest.approx(expected, abs=1e-5)
    # the selection samples are not used twice: the bound on all samples would differ
    everything = (features @ direction).clamp(-1, 1).numpy()
    assert float(mean_lower_bound(everything.sum(), (everything**2).sum(), N0 + N, 0.01, bound)) != pytest.approx(  # type: ignore[arg-type]
        certificate.score_lower, abs=1e-5)
    assert not certificate.abstain


def classifier(labels: int, features: int = 6, seed: int = 7) -> CosineClassifier:
    weights = torch.randn(labels, features, generator=torch.Generator().manual_seed(seed))
    return CosineClassifier.from_rows([f"label {k}" for k in range(labels)], weights)


@pytest.mark.parametrize("labels", [2, 5])
@pytest.mark.parametrize("bound", SUM_METHODS)
def test_the_prediction_certificate_splits_alpha_over_its_labels(bound: str, labels: int) -> None:
    recorder = Recorder()
    chosen = classifier(labels)
    certificate = certify(recorder, image(2), seed=6, bound=bound, classifier=chosen)
    prediction = certificate.prediction
    # the score bound and the prediction share α in halves (their joint statement holds with 1 − α)
    assert prediction is not None and prediction.alpha == 0.005
    assert certificate.score_alpha == 0.005
    _, features = recorder.samples()
    weights = chosen.weights.double()
    selected = int(torch.argmax(weights @ F.normalize(features[:N0].sum(0), dim=0)))  # chosen on the selection
    assert prediction.label_index == selected and prediction.label == f"label {selected}"
    projections = (features[N0:] @ weights.T).clamp(-1, 1).numpy()
    total, total_sq = projections.sum(0), (projections**2).sum(0)
    share = 0.005 / labels
    lower = float(mean_lower_bound(total[selected], total_sq[selected], N, share, bound))  # type: ignore[arg-type]
    upper = mean_upper_bound(total, total_sq, N, share, bound)  # type: ignore[arg-type]
    upper[selected] = -np.inf
    assert prediction.top_lower == pytest.approx(lower, abs=1e-5)
    assert prediction.runner_up_index == int(np.argmax(upper))
    assert prediction.runner_up_upper == pytest.approx(float(upper.max()), abs=1e-5)
    # the same samples with the whole α on each bound would give a visibly tighter (unsound) bound
    unsplit = float(mean_lower_bound(total[selected], total_sq[selected], N, 0.005, bound))  # type: ignore[arg-type]
    assert unsplit - lower > 1e-3


def test_more_labels_make_each_bound_wider() -> None:
    """Adding labels that are never chosen still costs confidence: α is shared by more bounds."""
    direction = certify(Recorder(), image(3), seed=8, bound="hoeffding").direction  # what the selection picks
    other = torch.randn(direction.shape[0], generator=torch.Generator().manual_seed(9))
    two = CosineClassifier.from_rows(["this", "other"], torch.stack([direction, other]))
    more = CosineClassifier.from_rows(["this", "other", "far a", "far b"], torch.stack([direction, other, -direction, -other]))
    results = [certify(Recorder(), image(3), seed=8, bound="hoeffding", classifier=c).prediction for c in (two, more)]
    assert results[0] is not None and results[1] is not None
    assert results[0].label == results[1].label == "this"
    # Hoeffding's margin depends on α only: the lower bound drops by exactly the change of margin
    # (α = 0.01 is split in halves between the score and the prediction, then over the labels)
    widening = float(mean_lower_bound(0.0, N, N, 0.005 / 2, "hoeffding") - mean_lower_bound(0.0, N, N, 0.005 / 4, "hoeffding"))
    assert results[0].top_lower - results[1].top_lower == pytest.approx(widening, abs=1e-6)
    assert widening == pytest.approx(2 * (math.sqrt(math.log(800) / (2 * N)) - math.sqrt(math.log(400) / (2 * N))))


@pytest.mark.parametrize("runner_up_kept", [True, False])
def test_the_betting_prediction_certificate_bounds_kept_labels_by_betting_and_the_others_from_their_sums(
    runner_up_kept: bool,
) -> None:
    """With the betting bound, the labels whose projections were kept (the top ones at selection) are bounded
    by betting, tuned for the fixed count n (a prediction certificate never stops early); the others by
    empirical Bernstein from their running sums. Each at α / K. Label 2 is the runner-up either way."""
    rng = np.random.default_rng(0)
    count, alpha, labels = 400, 0.01, 3
    projections = np.clip(rng.normal([0.6, 0.1, 0.3], 0.2, size=(count, labels)), -1, 1)
    kept_labels = (0, 2) if runner_up_kept else (0, 1)
    prediction = certify_prediction(
        classifier(labels), 0, projections.sum(0), (projections**2).sum(0),
        {k: projections[:, k] for k in kept_labels}, count, SIGMA, alpha, "betting",
    )
    share = alpha / labels
    assert prediction.top_lower == pytest.approx(lower_bound(projections[:, 0], share, "betting", count), abs=1e-12)
    assert prediction.top_lower != pytest.approx(lower_bound(projections[:, 0], share, "betting"), abs=1e-6)
    if runner_up_kept:
        runner_up = upper_bound(projections[:, 2], share, "betting", count)
        assert runner_up != pytest.approx(upper_bound(projections[:, 2], share, "betting"), abs=1e-6)
    else:
        column = projections[:, 2]
        runner_up = float(mean_upper_bound(column.sum(), (column**2).sum(), count, share, "empirical-bernstein"))
        assert runner_up > upper_bound(projections[:, 1], share, "betting", count)
    assert prediction.runner_up_index == 2 and prediction.runner_up_upper == pytest.approx(runner_up, abs=1e-12)
    assert prediction.radius == pytest.approx(float(prediction_radius(prediction.top_lower, runner_up, SIGMA)))
