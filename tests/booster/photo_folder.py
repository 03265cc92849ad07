"""A folder of training photos for booster tests: scikit-image photos that are not evaluation photos, nested,
in several formats."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from skimage import data

#: bundled scikit-image photos that are not among fsmllm.images.SAMPLE_IMAGES (the evaluation photos)
NON_EVALUATION = ("camera", "coins", "moon", "page", "immunohistochemistry", "brick", "grass", "gravel", "horse", "cell")
FORMATS = ("png", "jpg", "webp", "bmp", "tiff")


def training_photo_folder(root: Path) -> Path:
    """``root`` holding the photos of :data:`NON_EVALUATION`, alternately at the top and in ``more/deeper``, one
    of them also in ``more`` at half size (the same photo twice), in the formats of :data:`FORMATS` by turn."""
    (root / "more" / "deeper").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NON_EVALUATION):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        folder = root if i % 2 == 0 else root / "more" / "deeper"
        image.save(folder / f"{name}.{FORMATS[i % len(FORMATS)]}")
    camera = Image.fromarray(data.camera()).convert("RGB")
    camera.resize((camera.width // 2, camera.height // 2)).save(root / "more" / "camera-small.png")
    return root
