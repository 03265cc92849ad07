"""The Gaussian Smoothness Booster (method.md): a purifier before the frozen encoder, a mapper after it.

* :class:`ConditionedBooster` (v2: one booster for every σ, FiLM on σ; :mod:`fsmllm.booster.conditioned`) and
  :class:`Booster` (v1: trained for one σ; the shipped gsb-dinov2-s-0.25/-0.5 still load) — the modules.
* :func:`load_booster` — an encoder behind a shipped booster (by name) or a saved one (by folder).
* :mod:`fsmllm.booster.training` — ``fsmllm train-booster`` (imported on use).
"""

from fsmllm.booster.boosted import BoostedEncoder, available_boosters, load_booster
from fsmllm.booster.conditioned import ConditionedBooster, ConditionedBoosterConfig
from fsmllm.booster.modules import Booster, BoosterConfig, Purifier, SmoothnessMapper

__all__ = [
    "BoostedEncoder",
    "Booster",
    "BoosterConfig",
    "ConditionedBooster",
    "ConditionedBoosterConfig",
    "Purifier",
    "SmoothnessMapper",
    "available_boosters",
    "load_booster",
]
