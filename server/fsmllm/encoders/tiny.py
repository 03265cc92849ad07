"""Tiny random encoders for fast tests: a small conv net and a one-block ViT, a few thousand parameters each.

Their weights depend only on ``seed`` (the global torch RNG is neither used nor disturbed), so two encoders
built with the same arguments are identical. They behave like real encoders where tests need it: inputs in
[0, 1] normalised inside ``forward``, frozen parameters, gradients flow to the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsmllm.encoders._common import PixelNormalize, check_pixels, freeze
from fsmllm.encoders.base import VisionEncoder

_HALF = (0.5, 0.5, 0.5)


class TinyCNNEncoder(VisionEncoder):
    """Two stride-2 convolutions (3 -> 8 -> ``width`` channels, ReLU), average-pooled to a ``grid`` x ``grid``
    token grid: tokens [B, grid², width]. About 1.4 k parameters with the defaults.
    """

    name = "tiny-cnn"

    def __init__(self, image_size: int = 32, *, seed: int = 0, width: int = 16, grid: int = 2) -> None:
        super().__init__()
        if image_size < 4 * grid:
            raise ValueError(f"image_size must be at least 4 * grid = {4 * grid}, got {image_size}")
        self.image_size = image_size
        self.grid = grid
        self.num_tokens = grid * grid
        self.token_dim = width
        self.normalize = PixelNormalize(_HALF, _HALF)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, width, kernel_size=3, stride=2, padding=1)
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] in [0, 1] -> tokens [B, grid², width] (in the encoder's dtype, float32 by default)."""
        check_pixels(pixels, self.image_size)
        x = F.relu(self.conv1(self.normalize(pixels.float())))
        x = F.relu(self.conv2(x))
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)


class TinyViTEncoder(VisionEncoder):
    """A one-block pre-norm ViT: ``patch_size`` patches embedded to ``width``, a CLS token, learned position
    embeddings, one attention + MLP block and a final layer norm: tokens [B, 1 + (S / patch_size)², width].
    About 6 k parameters with the defaults (S = 32 -> 17 tokens of width 16).
    """

    name = "tiny-vit"

    def __init__(
        self, image_size: int = 32, *, seed: int = 0, width: int = 16, heads: int = 2, patch_size: int = 8
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % patch_size:
            raise ValueError(f"image_size must be a positive multiple of patch_size={patch_size}, got {image_size}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.image_size = image_size
        self.heads = heads
        self.num_tokens = 1 + (image_size // patch_size) ** 2
        self.token_dim = width
        self.normalize = PixelNormalize(_HALF, _HALF)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
            self.position = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, width))
            self.norm1 = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            self.norm = nn.LayerNorm(width)
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] in [0, 1] -> tokens [B, 1 + (S / patch_size)², width] (in the encoder's dtype,
        float32 by default)."""
        check_pixels(pixels, self.image_size)
        patches = self.patch_embed(self.normalize(pixels.float())).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.position
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        x = x + self.mlp(self.norm2(x))
        return self.norm(x)
