"""The boosted encoder M ∘ f ∘ P and boosters by name (:func:`load_booster`)."""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path

import torch

from fsmllm.booster.conditioned import KIND, ConditionedBooster, ConditionedBoosterConfig
from fsmllm.booster.modules import STEM, Booster, BoosterConfig
from fsmllm.encoders.base import VisionEncoder
from fsmllm.weights import load_weights, read_config

log = logging.getLogger(__name__)


class BoostedEncoder(VisionEncoder):
    """``forward(pixels) = mapper(encoder(purifier(pixels)))``: a :class:`VisionEncoder` like any other.

    The smoothing code adds the noise *before* calling it, so the purifier sees x + δ (method.md: F_B(x) =
    E[f(B(x + δ))]). ``name`` stays the base encoder's (certificates report encoder and booster apart);
    ``booster_name`` is the booster's. A noise-conditioned (v2) booster reads ``sigma``, fixed here: the boosted
    encoder is one deterministic function, as the certificate needs.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        booster: Booster | ConditionedBooster,
        booster_name: str,
        sigma: float | None = None,
    ) -> None:
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
        if isinstance(booster, ConditionedBooster) and sigma is None:
            raise ValueError(f"booster {booster_name!r} is noise-conditioned: give the sigma it serves")
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        self.encoder = encoder
        self.booster = booster
        self.booster_name = booster_name
        self.sigma = sigma
        self.name = encoder.name
        self.image_size = encoder.image_size
        self.num_tokens = encoder.num_tokens
        self.token_dim = encoder.token_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.booster, ConditionedBooster):
            assert self.sigma is not None
            sigma = torch.full((pixels.shape[0],), self.sigma, device=pixels.device)  # every sample's noise level
            return self.booster.boost(self.encoder, pixels, sigma)
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


def read_booster(directory: str | Path, device: str | torch.device = "cpu") -> Booster | ConditionedBooster:
    """The booster saved in ``directory``: a v2 (noise-conditioned) one when its config says ``kind: gsb-v2``,
    else a v1 one (trained for one σ); eval mode on ``device``."""
    config = read_config(directory, STEM)
    if config.get("kind") == KIND:
        booster: Booster | ConditionedBooster = ConditionedBooster(ConditionedBoosterConfig(**config))
    else:
        booster = Booster(BoosterConfig(**config))
    load_weights(booster, directory, STEM, device)
    return booster


def trained_sigmas(booster: Booster | ConditionedBooster) -> tuple[float, ...]:
    """The noise levels a booster was trained at."""
    config = booster.config
    return config.sigmas if isinstance(config, ConditionedBoosterConfig) else (config.sigma,)


def load_booster(name_or_path: str, encoder: VisionEncoder, sigma: float | None = None) -> VisionEncoder:
    """``encoder`` behind the named booster (``"none"`` returns ``encoder`` itself), frozen, eval mode.

    ``sigma``: the noise level the certificates will use. A noise-conditioned (v2) booster needs it and is bound
    to it; a v1 booster (trained for one σ) ignores it. Either way a σ away from the trained ones is logged as a
    warning: the certificates stay valid, the booster just helps less there. The booster's parameters go to the
    encoder's device. ValueError if it was trained for another encoder.
    """
    if name_or_path == "none":
        return encoder
    directory = booster_dir(name_or_path)
    device = next(encoder.parameters()).device
    booster = read_booster(directory, device=device)
    for parameter in booster.parameters():
        parameter.requires_grad_(False)
    name = directory.name if directory.parent == shipped_boosters_dir() else str(directory)
    trained = trained_sigmas(booster)
    if sigma is not None and not min(trained) - 1e-9 <= sigma <= max(trained) + 1e-9:
        log.warning(
            "booster %s was trained at sigma %s, not %g: certificates stay valid, but the booster helps most at the "
            "sigma it was trained for",
            name,
            "/".join(f"{s:g}" for s in trained),
            sigma,
        )
    bound = sigma if isinstance(booster, ConditionedBooster) else None
    return BoostedEncoder(encoder, booster, name, sigma=bound).eval()
