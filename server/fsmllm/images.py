"""Image loading and the deterministic preprocessing that defines the certified input space.

The certified input x is the image after :func:`to_pixels`: resized so its shorter side is ``size`` (bicubic),
centre-cropped to ``size`` x ``size``, RGB, values in [0, 1]. σ and ε are l2 norms in that space
(method.md, "Objects"), i.e. over all 3·size² values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: Photos bundled with scikit-image that need no download (offline-models.md, "Images").
SAMPLE_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "hubble_deep_field")
SAMPLE_PREFIX = "sample:"


def sample_image(name: str) -> Image.Image:
    """A bundled scikit-image photo by name, e.g. ``"chelsea"`` (a cat) or ``"coffee"``."""
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")
    from skimage import data  # imported lazily: only the CLI and tests use the samples

    # the left view of the stereo pair is the motorcycle photo; the others are plain loaders
    array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    return Image.fromarray(array).convert("RGB")


def load_image(source: str | Path, max_pixels: int = 40_000_000) -> Image.Image:  # the server's default limit
    """Open an image file, or a bundled photo written as ``sample:NAME``; always returns RGB. A file is decoded
    as the server decodes an upload (:func:`fsmllm.api.images.open_image`: the same formats, pixel limit and
    messages, raised as ``ImageError``, a ``ValueError``)."""
    from fsmllm.api.images import open_image

    text = str(source)
    if text.startswith(SAMPLE_PREFIX):
        return sample_image(text[len(SAMPLE_PREFIX):])
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path} (use sample:NAME for a bundled photo: {', '.join(SAMPLE_IMAGES)})")
    return open_image(path.read_bytes(), max_pixels)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The certified input: shorter side resized to ``size`` (bicubic), centre crop, float32 [3, size, size] in [0, 1]."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
