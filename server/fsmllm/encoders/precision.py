"""The precision and compilation of the encoder on the certified path: ``--dtype`` and ``--compile``.

:func:`set_precision` casts an encoder's weights to float32 (the default), bfloat16 or float16. Its input stays
float32 up to the mean/std normalisation: the smoothing code draws the noise δ in float32 on the encoder's
device, adds it to the float32 pixels, and only the normalised ``x + δ`` is cast to the encoder's dtype inside
``forward`` (:class:`~fsmllm.encoders._common.PixelNormalize`). So the Gaussian of the certificate is exactly the
stated N(0, σ² I) (a 16-bit δ would be a coarse discrete distribution, not that Gaussian), and the base function
being certified is f_p(z) = f computed in precision p at the rounded input — a deterministic function of z like
any other, to which the lemma applies as it does to f (docs/method.md, "Reduced precision").

:func:`compiled` wraps the encoder in ``torch.compile`` with a dynamic batch dimension, so the device worker's
varying batch sizes (a job's selection samples, partial batches at the end of jobs) reuse one compiled graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal, get_args

import torch

from fsmllm.encoders._common import PixelNormalize
from fsmllm.encoders.base import VisionEncoder

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype named ``precision``; ValueError naming the valid ones otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown encoder dtype {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return getattr(torch, precision)


def set_precision(encoder: VisionEncoder, precision: str) -> VisionEncoder:
    """Cast ``encoder``'s weights to ``precision`` in place and return it.

    Every :class:`PixelNormalize` inside keeps its mean and std in float32 and hands the model its output cast to
    ``precision``; the tokens come out in ``precision`` and the smoothing code normalises them in float32.
    """
    dtype = torch_dtype(precision)
    encoder.to(dtype)
    for module in encoder.modules():
        if isinstance(module, PixelNormalize):
            module.float()
            module.output_dtype = dtype
    return encoder


def precision_name(dtype: torch.dtype) -> Precision:
    """The precision named by ``dtype`` (float32 for a dtype that is none of them)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in PRECISIONS else "float32"


def precision_of(encoder: torch.nn.Module) -> Precision:
    """The precision ``encoder`` computes in: that of its (first) :class:`PixelNormalize`'s output, else of its
    first floating-point parameter (float32 for an encoder with neither)."""
    normalize = next((m for m in encoder.modules() if isinstance(m, PixelNormalize)), None)
    if normalize is not None:
        dtype = normalize.output_dtype
    else:
        dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), torch.float32)
    return precision_name(dtype)


def timing_trial(encoder: VisionEncoder, batch_size: int) -> Callable[[Precision], Callable[[], object]]:
    """For ``--dtype auto`` (:mod:`fsmllm.fastest_dtype`): a function of the precision giving one run of a copy of
    ``encoder`` in it on a batch of ``batch_size`` noisy images (``encoder`` itself is not touched)."""
    parameter = next(encoder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    side = encoder.image_size
    noise = torch.randn(batch_size, 3, side, side, generator=torch.Generator().manual_seed(0))
    pixels = (0.5 + 0.25 * noise).to(device)

    def trial(precision: Precision) -> Callable[[], object]:
        model = set_precision(copy.deepcopy(encoder), precision)

        def run() -> object:
            with torch.inference_mode():
                return model(pixels)

        return run

    return trial


def compiled(encoder: VisionEncoder, backend: str = "inductor") -> VisionEncoder:
    """``torch.compile(encoder)`` with dynamic shapes (one graph for every batch size).

    The result forwards attribute reads (``image_size``, ``num_tokens``, ...) to ``encoder``, so it stands in for
    it wherever an encoder is called; the first call compiles (seconds to a minute). ``backend="eager"`` traces
    without generating code (a quick check of the path, as the smoke benchmark does).
    """
    return torch.compile(encoder, dynamic=True, backend=backend)  # type: ignore[return-value]
