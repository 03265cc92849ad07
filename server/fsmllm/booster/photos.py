"""Training images for a booster: any folders of photos (``fsmllm train-booster --images DIR``), as random crops.

Every file under the folders (recursively) whose suffix Pillow knows is decoded; one that does not decode is
skipped with a warning, and so is any of the project's evaluation photos (:data:`fsmllm.images.SAMPLE_IMAGES`,
recognised by their decoded pixels, whatever the file's name or format), so that a booster never sees the images
it is judged on. The same photo at several resolutions (wallpaper packages ship many) is kept once, the largest:
two images are one photo when the 8 x 8 average hashes of their central squares differ in at most 4 of 64 bits.
Photos are kept in memory with the shorter side at most ``max_side`` pixels; each training
example is a random square crop of one of them (10-100 % of the shorter side, log-uniform, maybe mirrored)
resized to the encoder's input size, and with ``jitter`` > 0 its colours varied (:func:`colour_jitter`): a few
dozen photos then give many more distinct training images.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsmllm.images import SAMPLE_IMAGES, sample_image, to_pixels

log = logging.getLogger(__name__)


def _pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@cache
def evaluation_digests() -> frozenset[str]:
    """SHA-256 of the decoded RGB pixels of each evaluation photo."""
    return frozenset(_pixel_digest(sample_image(name)) for name in SAMPLE_IMAGES)


def average_hash(image: Image.Image) -> int:
    """The 64-bit average hash of the central square of ``image`` (grey, 8 x 8: a bit per cell above the mean)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    cells = np.asarray(
        image.crop((left, top, left + side, top + side)).convert("L").resize((8, 8), Image.Resampling.BOX),
        dtype=np.float64,
    )
    return int("".join("1" if v else "0" for v in (cells > cells.mean()).ravel()), 2)


def image_files(folders: Iterable[str | Path]) -> list[Path]:
    """Files under ``folders`` (recursively, sorted) whose suffix is an image format Pillow reads."""
    suffixes = {suffix.lower() for suffix, _ in Image.registered_extensions().items()}
    files: list[Path] = []
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--images {folder}: no such folder")
        files.extend(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return sorted(set(files))


def read_photos(folders: Iterable[str | Path], max_side: int = 512) -> list[Image.Image]:
    """The decodable, non-evaluation images under ``folders`` as RGB, shorter side at most ``max_side``.

    ValueError when none is left (the message says how many files were seen and why they were skipped).
    """
    files = image_files(folders)
    photos: dict[int, tuple[int, Image.Image]] = {}  # average hash -> (original shorter side, photo)
    skipped_eval = 0
    for path in files:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            log.warning("skipping %s: not a readable image (%s)", path, error)
            continue
        if _pixel_digest(image) in evaluation_digests():
            log.warning("skipping %s: it is one of the evaluation photos (%s)", path, ", ".join(SAMPLE_IMAGES))
            skipped_eval += 1
            continue
        digest, short = average_hash(image), min(image.size)
        same = next((h for h in photos if bin(h ^ digest).count("1") <= 4), None)
        if same is not None:
            if photos[same][0] >= short:
                continue
            del photos[same]
        scale = max_side / short
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
            )
        photos[digest] = (short, image)
    if not photos:
        raise ValueError(
            f"no training image found: {len(files)} image files under the folders, {skipped_eval} of them "
            "evaluation photos, the rest unreadable"
        )
    log.info("%d training photos from %d image files", len(photos), len(files))
    return [image for _, image in photos.values()]


def colour_jitter(pixels: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """``pixels`` [3, H, W] in [0, 1] with brightness, contrast and saturation each scaled by a factor
    exp(U(−strength, strength)) (contrast about the mean grey, saturation about each pixel's grey), clipped to [0, 1].
    """
    brightness, contrast, saturation = np.exp(rng.uniform(-strength, strength, size=3))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=pixels.dtype)
    out = pixels * float(brightness)
    grey = (out * luma[:, None, None]).sum(0, keepdim=True)
    out = grey.mean() + (out - grey.mean()) * float(contrast)
    grey = (out * luma[:, None, None]).sum(0, keepdim=True)
    out = grey + (out - grey) * float(saturation)
    return out.clamp(0, 1)


def random_crop(
    image: Image.Image, size: int, rng: np.random.Generator, smallest: float = 0.1, jitter: float = 0.0
) -> torch.Tensor:
    """A random square crop of ``image`` (side log-uniform in [smallest, 1] of the shorter side, at least
    ``size // 2`` pixels), mirrored half of the time, as pixels [3, size, size] in [0, 1]; with ``jitter`` > 0
    its colours varied by :func:`colour_jitter` of that strength (no random draw for it otherwise)."""
    short = min(image.size)
    low = min(short, max(size // 2, int(short * smallest)))
    side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = to_pixels(crop, size)
    return colour_jitter(pixels, jitter, rng) if jitter > 0 else pixels
