"""The contract every vision encoder in fsmllm fulfils.

An encoder maps a batch of images, pixels in [0, 1] *before* any mean/std normalisation (the space in which
σ and ε are measured, method.md "Objects"), to a sequence of visual tokens. The certified feature is the whole
token sequence flattened and L2-normalised (method.md: "the feature is the whole sequence flattened, then
normalised"); that normalisation is done by the smoothing code, not by the encoder, so that the language model
can also use the raw tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class VisionEncoder(nn.Module, ABC):
    """Base class: ``forward(pixels [B, 3, S, S] in [0, 1]) -> tokens [B, T, W]`` (raw, not normalised).

    Subclasses set ``name``, ``image_size`` (S), ``num_tokens`` (T) and ``token_dim`` (W), and do their own
    mean/std normalisation inside ``forward``. Encoders are frozen and used in eval mode.
    """

    name: str
    image_size: int
    num_tokens: int
    token_dim: int

    @property
    def feature_dim(self) -> int:
        """D = T * W, the dimension of the flattened feature that is certified."""
        return self.num_tokens * self.token_dim

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        ...
