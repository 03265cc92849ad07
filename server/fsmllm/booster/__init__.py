"""The Gaussian Smoothness Booster (method.md): a purifier before the frozen encoder, a mapper after it.

* :class:`Booster` (:class:`Purifier` + :class:`SmoothnessMapper`), :class:`BoosterConfig` — the module.
* :func:`load_booster` — an encoder behind a shipped booster (by name) or a saved one (by folder).
* :mod:`fsmllm.booster.training` — ``fsmllm train-booster`` (imported on use).
"""

from fsmllm.booster.boosted import BoostedEncoder, available_boosters, load_booster
from fsmllm.booster.modules import Booster, BoosterConfig, Purifier, SmoothnessMapper

__all__ = [
    "BoostedEncoder", "Booster", "BoosterConfig", "Purifier", "SmoothnessMapper", "available_boosters", "load_booster",
]
