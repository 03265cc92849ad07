"""Shared set-up of the benchmarks: an encoder by name, a bundled photo at its input size, a timer."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fsmllm.encoders import VisionEncoder, load_encoder  # noqa: E402
from fsmllm.encoders.precision import PRECISIONS, compiled, set_precision  # noqa: E402
from fsmllm.images import load_image, to_pixels  # noqa: E402


def arguments(description: str, encoder: str = "dinov2-s", batch_size: int = 32) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--encoder", default=encoder, help="encoder name (tiny-cnn for a quick run)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--dtype", choices=PRECISIONS, default="float32", help="the encoder's precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    return parser


def encoder_options(args: argparse.Namespace) -> list[str]:
    """The ``--dtype`` / ``--compile`` flags of ``args``, to hand on to a child process or a server."""
    return ["--dtype", args.dtype] + (["--compile"] if args.compile else [])


def setup(args: argparse.Namespace) -> tuple[VisionEncoder, torch.Tensor]:
    """The encoder (eval, on the device, in ``--dtype``, compiled with ``--compile``) and sample:chelsea as its
    input pixels [3, S, S] (CPU)."""
    encoder = set_precision(load_encoder(args.encoder, image_size=args.image_size, device=args.device), args.dtype)
    return compiled(encoder) if args.compile else encoder, to_pixels(load_image("sample:chelsea"), encoder.image_size)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn()`` takes (synchronising CUDA before and after)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start
