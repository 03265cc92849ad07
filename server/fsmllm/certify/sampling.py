"""Noise and executors: the seeded noisy copies of an image (:class:`NoisyCopies`), the kept samples of a
certified answer's votes (:class:`SampleRun`), and the executors that pack the samples of many runs into encoder
batches (:func:`run_batched`, the reference; :func:`run_shared`, one pass for runs of the same samples)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from fsmllm.certify.config import (
    NOISE_BLOCK,
    Encode,
)


class NoisyCopies:
    """The noisy copies ``x + σ δ_i``, δ_i ~ N(0, I), of one image [C, H, W] from a seeded generator on the image's
    device. The noise is drawn in blocks of NOISE_BLOCK, so the i-th copy depends only on the seed and i, never
    on how many copies each call asks for. The noise is drawn in the image's dtype, float32 (or float64): 16-bit
    noise would not be the stated Gaussian (a reduced-precision encoder casts ``x + σ δ`` itself)."""

    def __init__(self, pixels: torch.Tensor, sigma: float, seed: int) -> None:
        if pixels.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"pixels must be float32 (or float64), got {pixels.dtype}: the noise is drawn in the pixels' dtype, "
                "and 16-bit noise is not the stated Gaussian; a reduced-precision encoder casts its own input"
            )
        self.pixels = pixels
        self.sigma = sigma
        self._generator = torch.Generator(device=pixels.device).manual_seed(seed)
        self._noise = pixels.new_empty((0, *pixels.shape))

    def draw(self, count: int) -> torch.Tensor:
        """The next ``count`` noisy copies [count, C, H, W]."""
        while self._noise.shape[0] < count:
            block = torch.randn(
                (NOISE_BLOCK, *self.pixels.shape),
                generator=self._generator,
                device=self.pixels.device,
                dtype=self.pixels.dtype,
            )
            self._noise = torch.cat([self._noise, block])
        noise, self._noise = self._noise[:count], self._noise[count:]
        return self.pixels + self.sigma * noise


class SampleRun:
    """The base features of ``count`` noisy copies of one image, kept (for the votes of a certified answer,
    method.md "Certified answers"): the same ``take``/``consume`` protocol as :class:`SmoothingRun`, so the
    device worker batches these samples with every other request's.

    Each of the ``count`` results is the mean of ``inner`` flattened unit features f̃(x + δ) — what the served
    path hands the language model from that many samples (one: f̃(x + δ) itself) — in float32 [count, D].
    """

    def __init__(self, pixels: torch.Tensor, sigma: float, count: int, seed: int, inner: int = 1) -> None:
        if pixels.ndim != 3:
            raise ValueError(f"pixels must be one image [C, H, W], got shape {tuple(pixels.shape)}")
        if count < 1 or inner < 1:
            raise ValueError(f"count and inner must be at least 1, got {count} and {inner}")
        self.count = count
        self.inner = inner
        self.issued = 0
        self.consumed = 0
        self._noise = NoisyCopies(pixels, sigma, seed)
        self._features: list[torch.Tensor] = []

    @property
    def total(self) -> int:
        return self.count * self.inner

    @property
    def done(self) -> bool:
        return self.consumed == self.total

    def take(self, limit: int) -> torch.Tensor | None:
        count = min(limit, self.total - self.issued)
        if count <= 0:
            return None
        self.issued += count
        return self._noise.draw(count)

    def consume(self, features: torch.Tensor) -> None:
        if features.shape[0] > self.issued - self.consumed:
            raise RuntimeError(f"{features.shape[0]} features for {self.issued - self.consumed} outstanding samples")
        self._features.append(F.normalize(features.reshape(features.shape[0], -1).float(), dim=1))
        self.consumed += features.shape[0]

    def interim(self, radii: Sequence[float]) -> None:
        """No certificate exists before the votes are counted."""
        return None

    def features(self) -> torch.Tensor:
        """The ``count`` vote features [count, D] (each the mean of ``inner`` unit features); the run must be done."""
        if not self.done:
            raise RuntimeError(f"run not finished: {self.consumed} of {self.total} samples consumed")
        return torch.cat(self._features).reshape(self.count, self.inner, -1).mean(1)


class Run(Protocol):
    """What an executor drives: a run hands out noisy inputs (``take``) and takes back their features
    (``consume``) in order until ``done``; ``interim`` is the certificate valid so far, if any."""

    @property
    def done(self) -> bool: ...

    def take(self, limit: int) -> torch.Tensor | None: ...

    def consume(self, features: torch.Tensor) -> None: ...


Batch = list[tuple[Run, torch.Tensor]]


def fill_batch(runs: Sequence[Run], batch_size: int) -> Batch:
    """Take noisy inputs from ``runs`` in order until ``batch_size`` samples are gathered (or none is left)."""
    parts: Batch = []
    room = batch_size
    for run in runs:
        if room == 0:
            break
        if not run.done and (inputs := run.take(room)) is not None:
            parts.append((run, inputs))
            room -= inputs.shape[0]
    return parts


def deliver(parts: Batch, features: torch.Tensor) -> None:
    """Hand each run the slice of ``features`` that belongs to the inputs it contributed to the batch."""
    start = 0
    for run, inputs in parts:
        run.consume(features[start : start + inputs.shape[0]])
        start += inputs.shape[0]


def run_batched(
    runs: Sequence[Run],
    encode: Encode,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Drive ``runs`` to completion, packing the noisy samples of all of them into batches of ≤ batch_size.

    This is the reference executor (the server's device worker does the same across requests). ``progress``
    is called with the number of samples finished after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    while parts := fill_batch(runs, batch_size):
        with torch.inference_mode():
            features = encode(torch.cat([inputs for _, inputs in parts]))
        deliver(parts, features)
        if progress is not None:
            progress(features.shape[0])


def run_shared(
    runs: Sequence[Run],
    encode: Encode,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Drive ``runs`` that draw the same noisy copies (the same image, σ, seed, n0 and n; e.g. one run per
    granularity) with one encoder pass per batch: every run takes the same inputs and consumes the same features,
    so each certificate is exactly the one :func:`run_batched` would give it alone, at the encoder cost of one.

    Raises ValueError when the runs' inputs differ (they would not be the same samples).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    while active := [run for run in runs if not run.done]:
        inputs, *others = [run.take(batch_size) for run in active]  # an active run always has a sample to issue
        if inputs is None or any(other is None or not torch.equal(other, inputs) for other in others):
            raise ValueError("runs that share encoder passes must draw the same noisy copies (image, σ, seed, n0, n)")
        with torch.inference_mode():
            features = encode(inputs)
        for run in active:
            run.consume(features)
        if progress is not None:
            progress(features.shape[0])
