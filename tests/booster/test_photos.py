"""Folders of training photos (fsmllm train-booster --images): nested folders, mixed formats, a corrupt file
skipped with a warning, the evaluation photos refused, one photo at two sizes kept once, random crops and their
colour jitter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmllm.booster.photos import colour_jitter, image_files, random_crop, read_photos
from fsmllm.images import sample_image
from tests.booster.photo_folder import NON_EVALUATION, training_photo_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_photo_folder(tmp_path_factory.mktemp("photos"))


def test_every_image_under_nested_folders_is_found_whatever_its_format(folder: Path) -> None:
    (folder / "more" / "notes.txt").write_text("not an image")
    files = image_files([folder])
    assert len(files) == len(NON_EVALUATION) + 1
    assert {p.suffix for p in files} == {".png", ".jpg", ".webp", ".bmp", ".tiff"}
    assert any(p.parent.name == "deeper" for p in files)
    assert image_files([folder / "more"]) == [p for p in files if "more" in p.parts]


def test_corrupt_files_and_evaluation_photos_are_skipped_with_a_warning(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mixed = training_photo_folder(tmp_path / "mixed")
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    sample_image("chelsea").save(mixed / "more" / "my-cat.webp", lossless=True)  # an evaluation photo, renamed
    with caplog.at_level(logging.WARNING, logger="fsmllm.booster.photos"):
        photos = read_photos([mixed])
    assert "skipping" in caplog.text and "broken.jpg: not a readable image" in caplog.text
    assert "my-cat.webp: it is one of the evaluation photos" in caplog.text
    # the camera photo at two sizes is one photo; everything else is kept
    assert len(photos) == len(NON_EVALUATION)
    assert max(min(p.size) for p in photos) <= 512


def test_the_larger_copy_of_a_photo_is_kept(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    big = Image.fromarray(data.coins()).convert("RGB")  # 384 x 303
    big.resize((192, 152)).save(tmp_path / "a-small.png")
    big.save(tmp_path / "b-big.png")
    (photo,) = read_photos([tmp_path])
    assert photo.size == (384, 303)


def test_no_usable_image_is_an_error_that_says_why(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no training image found: 1 image files under the folders, 0 of them"):
        read_photos([tmp_path])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        image_files([tmp_path / "missing"])


def test_random_crops_are_seeded_squares_of_the_photo(folder: Path) -> None:
    photo = read_photos([folder])[0]
    crops = [random_crop(photo, 32, np.random.default_rng(3)) for _ in range(2)]
    assert crops[0].shape == (3, 32, 32) and torch.equal(crops[0], crops[1])
    other = random_crop(photo, 32, np.random.default_rng(4))
    assert not torch.equal(crops[0], other) and 0 <= float(other.min()) and float(other.max()) <= 1


def test_colour_jitter_scales_brightness_contrast_and_saturation_within_its_strength() -> None:
    flat = torch.full((3, 8, 8), 0.4)  # one grey: contrast and saturation leave it, brightness scales it
    values = {round(float(colour_jitter(flat, 0.3, np.random.default_rng(seed)).mean()), 4) for seed in range(20)}
    assert len(values) > 10 and min(values) >= 0.4 * np.exp(-0.3) - 1e-6 and max(values) <= 0.4 * np.exp(0.3) + 1e-6
    # each factor where it belongs (no clipping at these levels): the three draws are brightness, contrast, saturation
    b, c, s = np.exp(np.random.default_rng(2).uniform(-0.3, 0.3, size=3))
    grey = torch.tensor([0.3, 0.5]).repeat_interleave(32).reshape(1, 8, 8).expand(3, 8, 8)  # two greys, no colour
    out = colour_jitter(grey, 0.3, np.random.default_rng(2))
    assert float(out.mean()) == pytest.approx(b * 0.4, rel=1e-5)
    assert float(out.std()) == pytest.approx(b * c * float(grey.std()), rel=1e-5)
    tinted = grey + torch.tensor([0.05, -0.03, 0.01])[:, None, None]
    out = colour_jitter(tinted, 0.3, np.random.default_rng(2))
    # each pixel's colour about its own grey is scaled by all three factors (brightness, contrast, saturation)
    assert torch.allclose(_chroma(out), float(b * c * s) * _chroma(tinted), atol=1e-6)
    colourful = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(0))
    jittered = colour_jitter(colourful, 1.0, np.random.default_rng(1))
    assert jittered.shape == colourful.shape and 0 <= float(jittered.min()) and float(jittered.max()) <= 1
    assert float((jittered - colourful).abs().max()) > 0.05
    assert torch.equal(jittered, colour_jitter(colourful, 1.0, np.random.default_rng(1)))


def _chroma(pixels: torch.Tensor) -> torch.Tensor:
    """Each pixel's colour about its grey (ITU-R BT.601 luma)."""
    return pixels - (pixels * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)


def test_a_jittered_crop_is_the_same_crop_then_the_jitter_and_without_jitter_nothing_more_is_drawn(
    folder: Path,
) -> None:
    photo = read_photos([folder])[0]
    plain = np.random.default_rng(5)
    first = random_crop(photo, 32, plain)
    varied = random_crop(photo, 32, np.random.default_rng(5), jitter=0.3)
    assert not torch.equal(first, varied)
    # ``plain`` stands where the crop left it: the jitter's draws come next, and none were taken without jitter
    assert torch.equal(varied, colour_jitter(first, 0.3, plain))
