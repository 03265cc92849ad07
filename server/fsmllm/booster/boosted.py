"""The boosted encoder M ∘ f ∘ P and boosters by name (:func:`load_booster`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from fsmllm.booster.modules import STEM, Booster
from fsmllm.encoders.base import VisionEncoder


class BoostedEncoder(VisionEncoder):
    """``forward(pixels) = mapper(encoder(purifier(pixels)))``: a :class:`VisionEncoder` like any other.

    The smoothing code adds the noise *before* calling it, so the purifier sees x + δ (method.md: F_B(x) =
    E[f(B(x + δ))]). ``name`` stays the base encoder's (certificates report encoder and booster apart);
    ``booster_name`` is the booster's.
    """

    def __init__(self, encoder: VisionEncoder, booster: Booster, booster_name: str) -> None:
        super().__init__()
        config = booster.config
        if (config.encoder, config.image_size) != (encoder.name, encoder.image_size):
            raise ValueError(
                f"booster {booster_name!r} was trained for {config.encoder} at {config.image_size} px, "
                f"not {encoder.name} at {encoder.image_size} px"
            )
        if (config.num_tokens, config.token_dim) != (encoder.num_tokens, encoder.token_dim):
            raise ValueError(
                f"booster {booster_name!r} maps {config.num_tokens} x {config.token_dim} tokens, "
                f"the encoder gives {encoder.num_tokens} x {encoder.token_dim}"
            )
        self.encoder = encoder
        self.booster = booster
        self.booster_name = booster_name
        self.name = encoder.name
        self.image_size = encoder.image_size
        self.num_tokens = encoder.num_tokens
        self.token_dim = encoder.token_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.booster.mapper(self.encoder(self.booster.purifier(pixels)).float())  # a 16-bit encoder's tokens


def shipped_boosters_dir() -> Path:
    """The folder of shipped boosters, ``fsmllm/models/boosters/``."""
    return Path(str(resources.files("fsmllm").joinpath("models", "boosters")))


def available_boosters() -> list[str]:
    """Names of the shipped boosters (folders under :func:`shipped_boosters_dir` holding a booster)."""
    root = shipped_boosters_dir()
    return sorted(p.name for p in root.iterdir() if (p / f"{STEM}.json").is_file()) if root.is_dir() else []


def booster_dir(name_or_path: str) -> Path:
    """The folder of a shipped booster by name, or an existing folder path; FileNotFoundError listing names."""
    shipped = shipped_boosters_dir() / name_or_path
    if "/" not in name_or_path and (shipped / f"{STEM}.json").is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if (path / f"{STEM}.json").is_file():
        return path
    names = ", ".join(available_boosters()) or "(none shipped)"
    raise FileNotFoundError(
        f"no booster {name_or_path!r}: not a shipped name ({names}) nor a folder holding {STEM}.json"
    )


def load_booster(name_or_path: str, encoder: VisionEncoder) -> VisionEncoder:
    """``encoder`` behind the named booster (``"none"`` returns ``encoder`` itself), frozen, eval mode.

    The booster's parameters go to the encoder's device. ValueError if it was trained for another encoder.
    """
    if name_or_path == "none":
        return encoder
    directory = booster_dir(name_or_path)
    device = next(encoder.parameters()).device
    booster = Booster.load(directory, device=device)
    for parameter in booster.parameters():
        parameter.requires_grad_(False)
    name = directory.name if directory.parent == shipped_boosters_dir() else str(directory)
    return BoostedEncoder(encoder, booster, name).eval()
