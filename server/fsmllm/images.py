"""Images: decoding untrusted input once, with limits, and the preprocessing that defines the certified input space.

Decoding (:func:`open_image`, :func:`decode_base64_image`): raw bytes of a PNG, JPEG, WebP, GIF (first frame), BMP
or TIFF file; base64 text; a ``data:image/...;base64,`` URL. Refused with an :class:`~fsmllm.errors.ImageError`
whose message a person can act on (the HTTP layer answers it with a 4xx): undecodable or truncated data, other
formats (zero-size files are not identified as images; :class:`~fsmllm.errors.UnsupportedImage`), and images whose
decoded size exceeds the pixel limit (:class:`~fsmllm.errors.ImageTooLarge`; decompression bombs are refused from
the header, before the pixels are decoded).

The certified input x is the image after :func:`to_pixels`: resized so its shorter side is ``size`` (bicubic),
centre-cropped to ``size`` x ``size``, RGB, values in [0, 1]. σ and ε are l2 norms in that space
(method.md, "Objects"), i.e. over all 3·size² values.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fsmllm.errors import ImageError, ImageTooLarge, UnsupportedImage

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?);base64,(?P<data>.*)$", re.DOTALL)


def decode_base64_image(text: str) -> bytes:
    """Bytes from base64 text or a ``data:`` URL (the JSON forms of an image)."""
    text = text.strip()
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if match is None:
            raise ImageError("a data URL must look like data:image/png;base64,<data>")
        if match["mime"] and not match["mime"].startswith("image/"):
            raise ImageError(f"the data URL holds {match['mime']!r}, not an image")
        text = match["data"]
    if not text:
        raise ImageError("the image is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image is not valid base64 (send base64 text or a data:image/...;base64, URL)") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an RGB image, enforcing the format list and ``max_pixels``."""
    if not data:
        raise ImageError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise UnsupportedImage(
                    f"unsupported image format {image.format}; send one of {', '.join(ALLOWED_FORMATS)}"
                )
            width, height = image.size  # never 0: Pillow does not identify a file of zero width or height
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            image.load()
            return image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refuses from the header before our own check when the image is past its own limit, which then
        # is the one that applies (a max_pixels above Image.MAX_IMAGE_PIXELS cannot be reached)
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageTooLarge(f"the image decodes to more than the limit of {limit} pixels") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"the data is not an image this server can read (send {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"the image is corrupt or truncated: {error}") from None


#: Photos bundled with scikit-image (its ``skimage.data`` module), so they need no download.
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
    as the server decodes an upload (:func:`open_image`: the same formats, pixel limit and messages, raised as
    :class:`ImageError`, a ``ValueError``)."""
    text = str(source)
    if text.startswith(SAMPLE_PREFIX):
        return sample_image(text[len(SAMPLE_PREFIX) :])
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"no image file at {path} (use sample:NAME for a bundled photo: {', '.join(SAMPLE_IMAGES)})"
        )
    return open_image(path.read_bytes(), max_pixels)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The certified input: shorter side resized to ``size`` (bicubic), centre crop, float32 [3, size, size] in
    [0, 1]."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
