"""The Gaussian Smoothness Booster (GSB): a purifier in front of the frozen encoder, a mapper behind it.

method.md, "The Gaussian Smoothness Booster": the booster B is part of the base function, so the smoothed
encoder becomes F_B(x) = E_δ[ u(M(f(P(x + δ)))) ] with u the flatten-and-normalise map, and the FCSB of
method.md applies to it unchanged (the lemma holds for any base function). Following the paper's v1 design
("Purifier and Smoothness Mapper", docs/paper-notes.md):

* :class:`Purifier` P: a small residual convolutional denoiser, pixels -> pixels, trained for one noise level
  σ. The paper's purifier is diffusion-based; ours is the one-step denoiser a CPU can train (*our choice*: one
  reverse step at a known noise level, i.e. a learned MMSE-style estimate of the clean image).
* :class:`SmoothnessMapper` M: a residual MLP on the encoder's tokens, tokens -> tokens.

Both residual branches end in a zero-initialised layer, so an untrained booster is exactly the identity and
the boosted encoder equals the base encoder: training can only move away from the base certificate if its
objective improves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STEM = "booster"


@dataclass(frozen=True)
class BoosterConfig:
    """What a booster was built and trained for: the encoder (by name, and its input size) and the noise level."""

    encoder: str
    image_size: int
    num_tokens: int
    token_dim: int
    sigma: float
    width: int = 32
    mapper_hidden: int = 384

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        for key in ("image_size", "num_tokens", "token_dim", "width", "mapper_hidden"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")


class _ResidualBlock(nn.Module):
    """x + conv(GELU(conv(x))), 3 x 3 convolutions at constant width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Purifier(nn.Module):
    """``forward(noisy pixels [B, 3, S, S]) -> pixels [B, 3, S, S]``: x − r(x), a one-level U-Net residual r.

    Full resolution (width w) -> stride-2 convolution (2w) -> two residual blocks -> transposed convolution back
    -> concatenated with the full-resolution features -> 3 x 3 convolution to the residual (zero-initialised).
    The noise level is not an input: a purifier is trained for the one σ in its :class:`BoosterConfig`.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.middle = nn.Sequential(_ResidualBlock(2 * width), _ResidualBlock(2 * width))
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        last = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(last.weight)
        assert last.bias is not None
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.GELU(), last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        skip = self.stem(pixels)
        coarse = self.up(self.middle(self.down(skip)))[..., : skip.shape[-2], : skip.shape[-1]]
        return pixels - self.head(torch.cat([skip, coarse], dim=1))


class SmoothnessMapper(nn.Module):
    """``forward(tokens [B, T, W]) -> tokens + Linear(GELU(Linear(LayerNorm(tokens))))`` (last layer zero-init).

    The LayerNorm makes the correction independent of the encoder's token scale; the residual keeps the
    tokens in the encoder's own space, which the projector of the language model was trained on.
    """

    def __init__(self, token_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.fc1 = nn.Linear(token_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, token_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.fc2(self.act(self.fc1(self.norm(tokens))))


class Booster(nn.Module):
    """The pair (:class:`Purifier`, :class:`SmoothnessMapper`) with its config (read by
    :func:`fsmllm.booster.boosted.read_booster`; v1 boosters are no longer trained, the shipped ones still load)."""

    def __init__(self, config: BoosterConfig) -> None:
        super().__init__()
        self.config = config
        self.purifier = Purifier(config.width)
        self.mapper = SmoothnessMapper(config.token_dim, config.mapper_hidden)
