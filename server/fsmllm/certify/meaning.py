"""What a certificate is about (method.md, "What a certificate means"): pure functions on smoothed features.

A certificate bounds cos(F(x), F(x')) for every x' near x; it says something about the image only if F(x) still
carries the image. Three numbers tell:

* the **clean agreement** ⟨F(x), f(x)⟩ of the smoothed feature F(x) (a mean of unit features, norm S ≤ 1) with
  the *base* encoder's clean unit feature f(x): what a frozen model that was trained on clean features reads;
* the **reference cosines** cos(F(x), F(r)) to the smoothed features of other images r (a fixed reference set):
  when they are as high as the certified FCSB, the certificate cannot tell x from another image;
* the **distinct radius**: the largest ε at which the certified FCSB still exceeds the highest reference cosine
  c_max, i.e. ``certified_radius(S̲, σ, c_max)`` with S̲ the certificate's score lower bound (0 when S̲ ≤ c_max:
  never distinct). Within it, every x' provably keeps F(x') nearer F(x) than any reference image is. The
  reference cosines are Monte Carlo estimates, not certified: the distinct radius describes, it does not certify.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsmllm.certify.bounds import certified_radius


def clean_agreement(smoothed: torch.Tensor, clean_tokens: torch.Tensor) -> float:
    """⟨F(x), f(x)⟩: ``smoothed`` the mean unit feature [D] (or [T, W]), ``clean_tokens`` the base encoder's raw
    clean output for the same image ([T, W] or [D]), normalised here as a whole."""
    return float(smoothed.flatten().double() @ F.normalize(clean_tokens.flatten().double(), dim=0))


def reference_cosines(smoothed: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """cos(F(x), F(r)) for each row of ``references`` [R, D] (smoothed features of other images)."""
    return F.cosine_similarity(smoothed.flatten().double()[None], references.flatten(1).double(), dim=1)


def distinct_radius(score_lower: float, sigma: float, highest_reference_cosine: float) -> float:
    """The largest ε whose certified FCSB (from ``score_lower``) still exceeds the highest reference cosine;
    0.0 when it never does. A negative reference cosine counts as 0 (the FCSB is only a bound where ≥ 0)."""
    target = min(max(highest_reference_cosine, 0.0), math.nextafter(1.0, 0.0))
    radius = float(certified_radius(score_lower, sigma, target))
    return 0.0 if math.isnan(radius) else radius
