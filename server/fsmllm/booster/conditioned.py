"""Booster v2: one noise-conditioned booster for every σ (method.md, "The Gaussian Smoothness Booster").

The boosted base function is f_B,σ(z) = M_σ(f(P_σ(z))), evaluated at z = x + δ with δ ~ N(0, σ² I): the
purifier P_σ and the mapper M_σ read the noise level σ through FiLM (feature-wise affine modulation, as the
paper's noise-aware mapper, docs/paper-notes.md). σ is fixed when the booster is loaded (one deterministic function
per certificate), so the FCSB of method.md holds for it unchanged: the lemma needs a fixed base function, not
one trained for a particular σ.

* :class:`UNetPurifier` P_σ: a three-level U-Net (at half resolution) predicting the noise, ``P_σ(z) = z − r_σ(z)``.
* :class:`TokenMapper` M_σ: per-token residual MLP (FiLM on σ) and a token-mixing self-attention branch.

Every residual branch ends in a zero-initialised layer and every FiLM starts at (γ, β) = (0, 0), so an untrained
booster is exactly the identity, at every σ: the boosted encoder starts as the base encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

#: ``kind`` written into booster.json by this module (v1 boosters, :mod:`fsmllm.booster.modules`, have none)
KIND = "gsb-v2"


@dataclass(frozen=True)
class ConditionedBoosterConfig:
    """A v2 booster: the encoder it wraps (name, input size, token layout) and the σ it was trained on."""

    encoder: str
    image_size: int
    num_tokens: int
    token_dim: int
    sigmas: tuple[float, ...]
    width: int = 48
    mapper_hidden: int = 768
    heads: int = 6
    kind: str = KIND

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if not self.sigmas or not all(s > 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be positive noise levels, got {list(self.sigmas)}")
        for key in ("image_size", "num_tokens", "token_dim", "width", "mapper_hidden", "heads"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.token_dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide token_dim ({self.token_dim})")
        if self.kind != KIND:
            raise ValueError(f"not a {KIND} booster config: kind {self.kind!r}")

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "sigmas": list(self.sigmas)}


class NoiseEmbedding(nn.Module):
    """σ -> a vector: sinusoidal features of log σ through a small MLP (``dim`` outputs)."""

    FREQUENCIES = 8

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * self.FREQUENCIES, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma`` [B] -> [B, dim]."""
        scales = 2.0 ** torch.arange(self.FREQUENCIES, device=sigma.device, dtype=torch.float32)
        angle = torch.log(sigma.float())[:, None] * scales
        return self.mlp(torch.cat([angle.sin(), angle.cos()], dim=-1))


class FiLM(nn.Module):
    """h -> h · (1 + γ(e)) + β(e) per channel (the last axis for tokens, axis 1 for images); starts at identity."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(embedding).chunk(2, dim=-1)
        shape = (h.shape[0], -1, 1, 1) if h.ndim == 4 else (h.shape[0], *([1] * (h.ndim - 2)), h.shape[-1])
        return h * (1 + gamma.reshape(shape)) + beta.reshape(shape)


class ConvBlock(nn.Module):
    """x + conv(GELU(FiLM(norm(conv(GELU(norm(x))))))): a pre-norm residual block conditioned on σ."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.film = FiLM(embed_dim, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.film(self.norm2(h), embedding)))


class UNetPurifier(nn.Module):
    """``forward(noisy pixels [B, 3, S, S], σ [B]) -> pixels``: z − r_σ(z), r a three-level U-Net.

    As FFDNet, the U-Net runs at half resolution on the 2 x 2 pixel-unshuffled image (12 channels), which
    keeps every pixel at a quarter of the cost: widths w, 2w, 4w at S/2, S/4, S/8 (two blocks at the coarsest),
    skip connections by concatenation, a zero-initialised head shuffled back to full resolution: the identity
    until trained. Odd sides are padded by one pixel (replicated) and cropped back.
    """

    EMBED = 64

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.embed = NoiseEmbedding(self.EMBED)
        self.stem = nn.Conv2d(12, w, 3, padding=1)
        self.enc1 = ConvBlock(w, self.EMBED)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.enc2 = ConvBlock(2 * w, self.EMBED)
        self.down2 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ConvBlock(4 * w, self.EMBED), ConvBlock(4 * w, self.EMBED)])
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1)
        self.dec2 = nn.Conv2d(4 * w, 2 * w, 1)
        self.block2 = ConvBlock(2 * w, self.EMBED)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.dec1 = nn.Conv2d(2 * w, w, 1)
        self.block1 = ConvBlock(w, self.EMBED)
        self.head = nn.Conv2d(w, 12, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        e = self.embed(sigma)
        height, width = pixels.shape[-2:]
        padded = nn.functional.pad(pixels, (0, width % 2, 0, height % 2), mode="replicate")
        s1 = self.enc1(self.stem(nn.functional.pixel_unshuffle(padded, 2)), e)
        s2 = self.enc2(self.down1(s1), e)
        h = self.down2(s2)
        for block in self.mid:
            h = block(h, e)
        h = self.block2(self.dec2(torch.cat([s2, _fit(self.up2(h), s2)], 1)), e)
        h = self.block1(self.dec1(torch.cat([s1, _fit(self.up1(h), s1)], 1)), e)
        residual = nn.functional.pixel_shuffle(self.head(h), 2)[..., :height, :width]
        return pixels - residual


def _fit(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop (or zero-pad) ``h`` to the spatial size of ``like`` (odd sizes lose a pixel on the way down)."""
    dh, dw = like.shape[-2] - h.shape[-2], like.shape[-1] - h.shape[-1]
    return nn.functional.pad(h, (0, dw, 0, dh)) if dh > 0 or dw > 0 else h[..., : like.shape[-2], : like.shape[-1]]


class TokenMapper(nn.Module):
    """``forward(tokens [B, T, W], σ [B]) -> tokens``: two residual branches, both zero-initialised.

    1. token mixing: multi-head self-attention over the T tokens (a token can borrow what noise hid in it from
       the others, e.g. the global CLS token);
    2. per token: Linear(GELU(FiLM_σ(Linear(LayerNorm(tokens))))).
    The LayerNorms make the corrections independent of the encoder's token scale; the residuals keep the tokens
    in the encoder's own space, which a frozen projector was trained on.
    """

    EMBED = 64

    def __init__(self, token_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.embed = NoiseEmbedding(self.EMBED)
        self.norm_attn = nn.LayerNorm(token_dim)
        self.attn = nn.MultiheadAttention(token_dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.norm_mlp = nn.LayerNorm(token_dim)
        self.fc1 = nn.Linear(token_dim, hidden)
        self.film = FiLM(self.EMBED, hidden)
        self.fc2 = nn.Linear(hidden, token_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        e = self.embed(sigma)
        normed = self.norm_attn(tokens)
        tokens = tokens + self.attn(normed, normed, normed, need_weights=False)[0]
        hidden = self.film(self.fc1(self.norm_mlp(tokens)), e)
        return tokens + self.fc2(nn.functional.gelu(hidden))


class ConditionedBooster(nn.Module):
    """(:class:`UNetPurifier`, :class:`TokenMapper`) with its :class:`ConditionedBoosterConfig`."""

    def __init__(self, config: ConditionedBoosterConfig) -> None:
        super().__init__()
        self.config = config
        self.purifier = UNetPurifier(config.width)
        self.mapper = TokenMapper(config.token_dim, config.mapper_hidden, config.heads)

    def boost(self, encode: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """M_σ(f(P_σ(z))) for noisy pixels z [B, 3, S, S] and their noise levels σ [B]: tokens [B, T, W]."""
        tokens = encode(self.purifier(noisy, sigma)).float()  # a 16-bit encoder's tokens
        return self.mapper(tokens, sigma)
