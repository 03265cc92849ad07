"""Decoding untrusted image input once, with limits, into an RGB ``PIL.Image``.

Accepted: raw bytes of a PNG, JPEG, WebP, GIF (first frame), BMP or TIFF file; base64 text; a
``data:image/...;base64,`` URL. Refused with :class:`ImageError` (a 4xx with a message a person can act on):
undecodable or truncated data, other formats (zero-size files are not identified as images), and images whose decoded size exceeds the
pixel limit (decompression bombs are refused from the header, before the pixels are decoded).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?);base64,(?P<data>.*)$", re.DOTALL)


class ImageError(ValueError):
    """The image cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
                raise ImageError(
                    f"unsupported image format {image.format}; send one of {', '.join(ALLOWED_FORMATS)}", status=415
                )
            width, height = image.size  # never 0: Pillow does not identify a file of zero width or height
            if width * height > max_pixels:
                raise ImageError(
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", status=413
                )
            image.load()
            return image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refuses from the header before our own check when the image is past its own limit, which then
        # is the one that applies (a max_pixels above Image.MAX_IMAGE_PIXELS cannot be reached)
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageError(f"the image decodes to more than the limit of {limit} pixels", status=413) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"the data is not an image this server can read (send {', '.join(ALLOWED_FORMATS)})", status=415
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"the image is corrupt or truncated: {error}") from None
