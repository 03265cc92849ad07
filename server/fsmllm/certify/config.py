"""What one certification asks for: :class:`SmoothingConfig` (σ, n0, n, α, the bound, the granularity), the
early-stopping :class:`StopRule`, the radii, and the fixed sample counts at which an anytime bound is checked."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import norm

from fsmllm.certify.bounds import (
    ANYTIME_METHODS,
    BOUND_METHODS,
    BoundMethod,
    certified_radius,
)

#: Noise is drawn in blocks of this many samples; it fixes the random stream of a seed.
NOISE_BLOCK = 32
#: Checkpoints of an anytime bound: every block, and past 20 blocks every ~10 % more samples.
BOUND_CHECK_GROWTH = 1.1

Encode = Callable[[torch.Tensor], torch.Tensor]
#: what one certificate bounds: the whole feature flattened and normalised once, or every token on its own
Granularity = Literal["global", "token"]
GRANULARITIES: tuple[Granularity, ...] = ("global", "token")
#: the radii (l2, pixels in [0, 1]) certified when a request or a command names none
DEFAULT_RADII = (0.1, 0.25, 0.5)
#: why sampling ended: the budget was spent, or what a :class:`StopRule` decided
StopReason = Literal["budget", "target_reached", "target_unreachable", "radius_converged"]


def bound_checked_after(count: int) -> bool:
    """Whether the anytime bound is evaluated after ``count`` estimation samples (a function of the count only,
    so that stopping never depends on batch packing): multiples of NOISE_BLOCK, geometrically spaced past
    20 blocks (about 24 evaluations per tenfold of samples, each O(count))."""
    if count <= 0 or count % NOISE_BLOCK:
        return False
    blocks = count // NOISE_BLOCK
    if blocks <= 20:
        return True
    return math.floor(math.log(blocks, BOUND_CHECK_GROWTH)) != math.floor(math.log(blocks - 1, BOUND_CHECK_GROWTH))


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
            raise ValueError(
                "give stop_at_fcsb (stop at a certified cosine) or radius_tolerance (with target_cos), not both"
            )
        if radius_tolerance is not None:
            if target_cos is None:
                raise ValueError("radius_tolerance stops a target_cos request: give target_cos too")
            return cls(target_cos=target_cos, tolerance=radius_tolerance)
        if not radii:
            raise ValueError("stop_at_fcsb needs at least one radius")
        return cls(fcsb=stop_at_fcsb, radii=tuple(radii))

    def decide(self, lower: float, upper_bound: Callable[[], float], sigma: float) -> StopReason | None:
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


def check_radii(radii: Sequence[float]) -> None:
    """Refuse radii that are not l2 norms (negative, NaN or infinite) before any sample is drawn."""
    if bad := [radius for radius in radii if not (math.isfinite(radius) and radius >= 0)]:
        raise ValueError(f"radii must be non-negative l2 norms, got {bad}")


def new_seed() -> int:
    """A fresh random seed, reported in every certificate so that the result can be reproduced."""
    return secrets.randbits(63)
