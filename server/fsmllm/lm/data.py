"""Training and evaluation images of the demo VLM, with the answers it is taught.

* Fashion-MNIST (Debian package ``dataset-fashion-mnist``, MIT): 70 000 labelled 28 x 28 grey images of ten
  kinds of clothing, in ``/usr/share/datasets/fashion-mnist/``. They are upscaled to the encoder's input size
  and repeated over the three colour channels by :func:`fsmllm.images.to_pixels`, the certified input space.
* The scikit-image photos bundled with the project (:data:`fsmllm.images.SAMPLE_IMAGES`), each with an answer,
  augmented by random crops and flips (the demo then recognises the sample photos; this is memorisation of six
  pictures, not a generalising skill).

Every answer reads "A photo of {phrase}." (:func:`answer_for`).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from fsmllm.images import sample_image, to_pixels

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_INSTALL = "apt-get install -y dataset-fashion-mnist"

#: Fashion-MNIST's ten classes in label order, as the phrases the answers use.
FASHION_MNIST_PHRASES = (
    "a T-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)

#: Answers for the bundled photos (the keys are :data:`fsmllm.images.SAMPLE_IMAGES`).
SAMPLE_PHOTO_PHRASES = {
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "astronaut": "an astronaut",
    "rocket": "a rocket",
    "motorcycle_left": "a motorcycle",
    "hubble_deep_field": "a field of galaxies",
}

#: The question the demo model is trained to answer.
QUESTION = "What is this?"
#: The demo model's system message, in training and in serving (shorter than SmolLM2's default one).
SYSTEM = "You answer questions about images."

Split = Literal["train", "test"]


def answer_for(phrase: str) -> str:
    """The trained answer for an object phrase: ``"A photo of {phrase}."``."""
    return f"A photo of {phrase}."


def load_fashion_mnist(split: Split, directory: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the Fashion-MNIST ``split`` (60 000 train, 10 000 test)."""
    directory = Path(directory)
    stem = "train" if split == "train" else "t10k"
    images_path = directory / f"{stem}-images-idx3-ubyte.gz"
    labels_path = directory / f"{stem}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {directory}; install it with: {APT_INSTALL}")
    with gzip.open(images_path, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{images_path} is not an IDX image file (magic {magic})")
        images = np.frombuffer(f.read(), dtype=np.uint8).reshape(count, rows, cols)
    with gzip.open(labels_path, "rb") as f:
        magic, count_labels = struct.unpack(">II", f.read(8))
        if magic != 2049 or count_labels != count:
            raise ValueError(f"{labels_path} does not hold {count} IDX labels")
        labels = np.frombuffer(f.read(), dtype=np.uint8).astype(np.int64)
    return images, labels


def grey_to_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """Grey uint8 images [N, h, w] -> RGB pixels [N, 3, size, size] in [0, 1] (bicubic upscaling)."""
    return torch.stack([to_pixels(Image.fromarray(image).convert("RGB"), size) for image in images])


def augmented_photo(image: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random square crop (40-100 % of the shorter side), maybe mirrored, as pixels [3, size, size]."""
    width, height = image.size
    side = int(min(width, height) * rng.uniform(0.4, 1.0))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    crop = image.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_pixels(crop, size)


def sample_photo_set(size: int, per_photo: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``per_photo`` pixels per bundled photo (the first is the whole photo, the rest augmented) and answers."""
    pixels: list[torch.Tensor] = []
    answers: list[str] = []
    for name, phrase in SAMPLE_PHOTO_PHRASES.items():
        image = sample_image(name)
        pixels.append(to_pixels(image, size))
        pixels.extend(augmented_photo(image, size, rng) for _ in range(per_photo - 1))
        answers.extend([answer_for(phrase)] * per_photo)
    return torch.stack(pixels), answers


def fashion_train_set(size: int, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``count`` random Fashion-MNIST *train* images as pixels [count, 3, size, size], with their answers."""
    images, labels = load_fashion_mnist("train")
    chosen = rng.choice(len(images), size=count, replace=False)
    return grey_to_pixels(images[chosen], size), [answer_for(FASHION_MNIST_PHRASES[int(k)]) for k in labels[chosen]]


def training_set(size: int, fashion_images: int, photo_copies: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``fashion_images`` random Fashion-MNIST *train* images and ``photo_copies`` views of each bundled photo,
    as pixels [N, 3, size, size] with their answers (the demo model's training set)."""
    rng = np.random.default_rng(seed)
    fashion, answers = fashion_train_set(size, fashion_images, rng)
    photos, photo_answers = sample_photo_set(size, photo_copies, rng)
    return torch.cat([fashion, photos]), answers + photo_answers
