"""Vision encoders: pixels [B, 3, S, S] in [0, 1] -> visual tokens [B, T, W] (see :mod:`fsmllm.encoders.base`).

* :func:`load_encoder` — an encoder by name: ``"dinov2-s"``, ``"efficientnet-lite0"``, ``"tiny-cnn"``,
  ``"tiny-vit"`` or ``"hf:/path/to/folder"``; :func:`available_encoders` lists them.
* :func:`load_classifier` — the cosine classifier of an encoder (``"efficientnet-lite0"``'s ImageNet head).
* Modules: :mod:`~fsmllm.encoders.dinov2_imgfocus`, :mod:`~fsmllm.encoders.efficientnet`,
  :mod:`~fsmllm.encoders.hf_vision`, :mod:`~fsmllm.encoders.tiny` (imported on first use).
"""

from fsmllm.encoders._common import MissingWeightsError
from fsmllm.encoders.base import VisionEncoder
from fsmllm.encoders.registry import available_encoders, load_classifier, load_encoder

__all__ = ["MissingWeightsError", "VisionEncoder", "available_encoders", "load_classifier", "load_encoder"]
