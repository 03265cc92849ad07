"""Any transformers vision tower saved in a local folder: CLIP, SigLIP, or the tower inside a LLaVA checkpoint.

The folder is what ``save_pretrained`` writes: ``config.json``, ``model.safetensors`` (or sharded safetensors
with an index) and, optionally, ``preprocessor_config.json``. Three layouts are recognised from ``config.json``:

* a bare vision model (``clip_vision_model``, ``siglip_vision_model``, ...): loaded with ``AutoModel``;
* a model with a ``vision_config`` (``clip``, ``siglip``, ``llava``, ...): the vision model is built from
  ``vision_config`` and its weights are taken from the checkpoint under whatever prefix holds them
  (``vision_model.``, ``vision_tower.``, ``model.vision_tower.``, ...);
* for LLaVA, the defaults follow the checkpoint: features from ``hidden_states[vision_feature_layer]`` and,
  with ``vision_feature_select_strategy == "default"``, the CLS token dropped.

Image size and mean/std come from ``preprocessor_config.json`` when present (the crop size when the processor
centre-crops), else from the vision config and the model family's usual statistics. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.utils.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from fsmllm.encoders._common import PixelNormalize, check_pixels, freeze
from fsmllm.encoders.base import VisionEncoder

FeatureLayer = int | Sequence[int] | None


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model as an encoder: tokens = its last hidden state or chosen hidden layers.

    Args:
        model: the vision model (called as ``model(pixel_values=...)``).
        image_size: input side S; position embeddings are interpolated when it differs from ``native_image_size``.
        mean, std: per-channel normalisation applied to pixels in [0, 1] inside :meth:`forward`.
        native_image_size: the size the model's position embeddings were trained for.
        feature_layer: ``None`` for ``last_hidden_state``; an int (or several, concatenated along the width, as
            LLaVA does) indexes ``hidden_states``, where 0 is the embeddings and -1 the last layer's output
            (for SigLIP, ``last_hidden_state`` is that output after the post-layernorm).
        drop_cls: drop the first (CLS) token; an error for models without one (SigLIP).
        name: the encoder's name.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        native_image_size: int,
        feature_layer: FeatureLayer = None,
        drop_cls: bool = False,
        name: str = "hf",
        source: str | None = None,
    ) -> None:
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.name = name
        #: the folder it was loaded from (``name`` keeps only its last part): where its weight files are
        self.source = source
        self.image_size = image_size
        self.interpolate = image_size != native_image_size
        self.feature_layers = None if feature_layer is None else _as_layers(feature_layer)
        self.drop_cls = False
        self.normalize = PixelNormalize(mean, std)
        self.model = freeze(model.float())
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, image_size, image_size))
        if drop_cls:
            patch_size = _side(getattr(model.config, "patch_size", 0)) or 1
            if probe.shape[1] != (image_size // patch_size) ** 2 + 1:
                raise ValueError(f"{name}: drop_cls=True, but the model's {probe.shape[1]} tokens have no CLS token")
            self.drop_cls = True
        self.num_tokens = probe.shape[1] - int(self.drop_cls)
        self.token_dim = probe.shape[2]
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] in [0, 1] -> tokens [B, T, W] (in the encoder's dtype, float32 by default)."""
        check_pixels(pixels, self.image_size)
        kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if self.feature_layers is not None:
            kwargs["output_hidden_states"] = True
        output = self.model(pixel_values=self.normalize(pixels.float()), **kwargs)
        if self.feature_layers is None:
            tokens = output.last_hidden_state
        else:
            tokens = torch.cat([output.hidden_states[layer] for layer in self.feature_layers], dim=-1)
        return tokens[:, 1:] if self.drop_cls else tokens


def load_hf_vision_encoder(
    folder: str | Path,
    *,
    image_size: int | None = None,
    feature_layer: FeatureLayer = None,
    drop_cls: bool | None = None,
) -> HFVisionEncoder:
    """Load the vision tower saved in ``folder`` (see the module docstring for the layouts recognised).

    ``image_size`` defaults to the preprocessor's; ``feature_layer`` and ``drop_cls`` default to the LLaVA
    checkpoint's choice (``vision_feature_layer``, CLS dropped for the "default" strategy) and otherwise to
    ``last_hidden_state`` with every token kept.
    """
    path = Path(folder).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved transformers model (no config.json)")
    raw_config = json.loads(config_file.read_text(encoding="utf-8"))
    if "vision_config" in raw_config:
        outer = AutoConfig.from_pretrained(path)
        vision_config = outer.vision_config
        model = AutoModel.from_config(vision_config)
        _load_submodel_weights(model, path)
        if feature_layer is None:
            feature_layer = getattr(outer, "vision_feature_layer", None)
        if drop_cls is None:
            drop_cls = getattr(outer, "vision_feature_select_strategy", None) == "default"
    else:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        vision_config = model.config
    native = _side(getattr(vision_config, "image_size", 0))
    preprocessor_size, mean, std = _preprocessing(path, vision_config)
    return HFVisionEncoder(
        model,
        image_size=image_size or preprocessor_size or native,
        mean=mean,
        std=std,
        native_image_size=native,
        feature_layer=feature_layer,
        drop_cls=bool(drop_cls),
        name=f"hf:{path.name}",
        source=str(path.resolve()),
    )


def default_image_size(folder: str | Path) -> int:
    """The input side :func:`load_hf_vision_encoder` chooses for ``folder`` without an ``image_size``: the
    preprocessor's, else the vision config's."""
    path = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None) or config
    return _preprocessing(path, vision_config)[0] or _side(getattr(vision_config, "image_size", 0))


def _as_layers(feature_layer: int | Sequence[int]) -> tuple[int, ...]:
    return (feature_layer,) if isinstance(feature_layer, int) else tuple(int(layer) for layer in feature_layer)


def _side(size: int | Sequence[int] | dict[str, int] | None) -> int:
    """The side of a square size given as an int, a pair or a processor dict; 0 when unknown or not square."""
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        size = (size.get("height", 0), size.get("width", 0))
    if isinstance(size, Sequence):
        return int(size[0]) if len(set(size)) == 1 else 0
    return int(size or 0)


def _default_statistics(model_type: str) -> tuple[Sequence[float], Sequence[float]]:
    if "clip" in model_type:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if "siglip" in model_type:
        return IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _preprocessing(path: Path, vision_config: PretrainedConfig) -> tuple[int, Sequence[float], Sequence[float]]:
    """(image size or 0, mean, std) from ``preprocessor_config.json``, falling back to the family's defaults."""
    mean, std = _default_statistics(vision_config.model_type)
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return 0, mean, std
    processor = json.loads(file.read_text(encoding="utf-8"))
    if processor.get("do_normalize", True):
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if processor.get("do_center_crop") and processor.get("crop_size"):
        return _side(processor["crop_size"]), mean, std
    return _side(processor.get("size")), mean, std


def _checkpoint_keys(path: Path) -> dict[str, Path]:
    """Every tensor name of the folder's safetensors checkpoint (single file or sharded) -> the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: path / shard for key, shard in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (or sharded index); re-save it with safetensors")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _load_submodel_weights(model: nn.Module, path: Path) -> None:
    """Fill ``model`` from the checkpoint tensors whose names are ``prefix + <model's name>`` for one prefix."""
    checkpoint = _checkpoint_keys(path)
    wanted = [name for name, _ in model.named_parameters()]
    probe = wanted[0]
    prefixes = {key[: -len(probe)] for key in checkpoint if key == probe or key.endswith("." + probe)}
    prefix = next((p for p in sorted(prefixes, key=len) if all(p + name in checkpoint for name in wanted)), None)
    if prefix is None:
        raise ValueError(f"{path}: the checkpoint holds no complete {type(model).__name__} under any prefix")
    names = [name for name in model.state_dict() if prefix + name in checkpoint]
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint[prefix + name], []).append(name)
    state = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            state.update({name: handle.get_tensor(prefix + name) for name in file_names})
    model.load_state_dict(state, strict=False)
