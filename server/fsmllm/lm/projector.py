"""The projector: visual tokens [T, W] of the frozen encoder -> input embeddings [T, H] of the frozen LM.

Each token is layer-normalised first. That makes the projector invariant to the scale of its input: the
language model reads the *smoothed* feature (a mean of L2-normalised noisy features, method.md "Objects"),
whose norm is below 1 and shrinks as noise scatters the features, and a clean feature in the same layout;
both give tokens of the same scale after the norm. Then a two-layer MLP (W -> H -> H, GELU) and a learned
per-position embedding (the 17 tokens of the demo encoder are a CLS token and a 4x4 grid).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fsmllm.weights import load_weights, read_config, save_module

STEM = "projector"


@dataclass(frozen=True)
class ProjectorConfig:
    """Shapes of a :class:`Projector`: T visual tokens of width W into the LM's hidden size H."""

    num_tokens: int
    token_dim: int
    hidden_size: int

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")


class Projector(nn.Module):
    """``forward(tokens [..., T, W]) -> [..., T, H]``: LayerNorm(W) -> Linear(W, H) -> GELU -> Linear(H, H) + pos."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        # eps far below the variance of a unit feature's entries (~1/(T·W)), so that the scale drops out
        self.norm = nn.LayerNorm(config.token_dim, eps=1e-10)
        self.fc1 = nn.Linear(config.token_dim, config.hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.position = nn.Parameter(torch.zeros(config.num_tokens, config.hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_tokens, self.config.token_dim)
        if tuple(tokens.shape[-2:]) != expected:
            raise ValueError(
                f"projector expects visual tokens [..., {expected[0]}, {expected[1]}], got {list(tokens.shape)}"
            )
        return self.fc2(self.act(self.fc1(self.norm(tokens)))) + self.position

    def save(self, directory: str | Path) -> Path:
        """Write ``projector.json`` (config) and ``projector.safetensors`` (float32 weights) into ``directory``."""
        return save_module(self, asdict(self.config), directory, STEM)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Projector:
        """A projector saved by :meth:`save`, in eval mode on ``device``."""
        projector = cls(ProjectorConfig(**read_config(directory, STEM)))
        load_weights(projector, directory, STEM, device)
        return projector


def unit_feature_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Raw encoder tokens [..., T, W] -> the L2-normalised flattened feature, back in the layout [..., T, W].

    This is one term of the smoothed feature's mean (method.md, "Objects"): the language model reads either a
    mean of such terms (the smoothed feature) or a single one (the clean feature).
    """
    flat = torch.nn.functional.normalize(tokens.flatten(-2).float(), dim=-1)
    return flat.reshape(tokens.shape)
