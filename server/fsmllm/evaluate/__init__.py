"""Robustness evaluation: white-box attacks against the encoder with and without smoothing, and certified curves.

For held-out images x and radii ε (l2, pixel space, method.md "Objects") three defences are compared:

* **none**: the base encoder f; the attack (PGD, :func:`fsmllm.attacks.feature_attack`) minimises
  cos(f(x), f(x')) and the observed cosine is that one;
* **FS**: the smoothed encoder F; the attack minimises the Monte Carlo estimate of cos(F(x), F(x'))
  (expectation over the noise), and the observed cosine is re-estimated with fresh samples;
* **FS+booster**: the same with the booster in front of (and behind) the encoder.

Two attack goals (white-box: the attacker knows the encoder, the booster and the language model):

* **feature** (untargeted): minimise the cosine between the clean and the perturbed feature;
* **answer** (targeted, needs a language model): minimise the language model's cross-entropy of a wrong
  answer ("A photo of {target}.", the next Fashion-MNIST class after the true one) given the perturbed
  feature, through the projector and the frozen LM;
* **token** (smoothed defences only): minimise the worst token's cosine, min_t cos(F_t(x), F_t(x')), every token
  normalised on its own; the observed value is compared with the token-level certificate (method.md,
  "Token-level certificates").

For the smoothed defences each image is certified (n0, n, α) and the fraction of attacked images whose
observed cosine fell below the certified FCSB at that ε is reported, for both goals: it must stay ≤ α, up to
the Monte Carlo error of the observed cosine. With a language model, the answers generated from the clean and
attacked features are compared with the image's true answer: the attack success rate is the fraction of images
answered correctly from clean features whose answer under attack is wrong; for the answer goal, the targeted
success rate is the fraction of those whose answer under attack names the target. Both are reported as counts
with their exact (Clopper-Pearson) 95 % interval, since an evaluation on a CPU attacks a handful of images.

The package: :mod:`~fsmllm.evaluate.config` (what runs; the flags of ``fsmllm evaluate``),
:mod:`~fsmllm.evaluate.compute` (attacks and certified curves), :mod:`~fsmllm.evaluate.report` (summaries and
markdown), :mod:`~fsmllm.evaluate.plot` (curves.png), :mod:`~fsmllm.evaluate.persist` (the output folder, resumable)
and :mod:`~fsmllm.evaluate.pipeline` (the whole run).
"""

from fsmllm.evaluate.compute import (
    AttackRow,
    CurvePoint,
    attack_image,
    certified_curves,
    certify_granularities,
    curve_name,
    held_out_images,
    target_phrase,
)
from fsmllm.evaluate.config import GOALS, AttackSettings, EvaluateConfig
from fsmllm.evaluate.pipeline import run
from fsmllm.evaluate.plot import curve_figure, plot_curves
from fsmllm.evaluate.report import AttackSummary, markdown_attacks, markdown_curves, summarise

__all__ = [
    "GOALS",
    "AttackRow",
    "AttackSettings",
    "AttackSummary",
    "CurvePoint",
    "EvaluateConfig",
    "attack_image",
    "certified_curves",
    "certify_granularities",
    "curve_figure",
    "curve_name",
    "held_out_images",
    "markdown_attacks",
    "markdown_curves",
    "plot_curves",
    "run",
    "summarise",
    "target_phrase",
]
