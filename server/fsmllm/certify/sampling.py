"""Noise and executors: the seeded noisy copies of an image (:class:`NoisyCopies`), the kept samples of a
certified answer's votes (:class:`SampleRun`), and the executors that pack the samples of many runs into encoder
batches (:class:`Batcher`; :func:`run_batched`, the reference; :func:`run_shared`, one pass for runs of the same
samples)."""

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
    noise would not be the stated Gaussian (a reduced-precision encoder casts ``x + σ δ`` itself).

    Each block is drawn into one reused buffer and the copies are written where the caller asks (``out``: an
    executor's batch), so drawing allocates nothing and copies nothing per sample."""

    def __init__(self, pixels: torch.Tensor, sigma: float, seed: int) -> None:
        if pixels.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"pixels must be float32 (or float64), got {pixels.dtype}: the noise is drawn in the pixels' dtype, "
                "and 16-bit noise is not the stated Gaussian; a reduced-precision encoder casts its own input"
            )
        self.pixels = pixels
        self.sigma = sigma
        self._generator = torch.Generator(device=pixels.device).manual_seed(seed)
        self._block = pixels.new_empty((NOISE_BLOCK, *pixels.shape))
        self._used = NOISE_BLOCK  # rows of the block already handed out

    def fits(self, out: torch.Tensor, count: int) -> bool:
        """Whether ``out`` can take ``count`` copies: [≥ count, C, H, W], contiguous, the pixels' dtype and device."""
        return (
            out.shape[0] >= count
            and out.shape[1:] == self.pixels.shape
            and out.dtype == self.pixels.dtype
            and out.device == self.pixels.device
            and out.is_contiguous()
        )

    def draw(self, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The next ``count`` noisy copies [count, C, H, W], written into ``out[:count]`` when it :meth:`fits`
        (else into a new tensor)."""
        if out is not None and self.fits(out, count):
            copies = out[:count]
        else:
            copies = self.pixels.new_empty((count, *self.pixels.shape))
        done = 0
        while done < count:
            if self._used == NOISE_BLOCK:
                self._block.normal_(generator=self._generator)  # the same numbers as torch.randn of the block
                self._used = 0
            step = min(count - done, NOISE_BLOCK - self._used)
            rows = copies[done : done + step]
            torch.mul(self._block[self._used : self._used + step], self.sigma, out=rows)
            rows.add_(self.pixels)  # x + σ δ, rounded as (σ δ) then the sum
            self._used += step
            done += step
        return copies


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

    def take(self, limit: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        count = min(limit, self.total - self.issued)
        if count <= 0:
            return None
        self.issued += count
        return self._noise.draw(count, out)

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
    """What an executor drives: a run hands out noisy inputs (``take``, written into ``out`` where it fits) and
    takes back their features (``consume``) in order until ``done``; ``interim`` is the certificate valid so far,
    if any."""

    @property
    def done(self) -> bool: ...

    def take(self, limit: int, out: torch.Tensor | None = None) -> torch.Tensor | None: ...

    def consume(self, features: torch.Tensor) -> None: ...


Batch = list[tuple[Run, torch.Tensor]]


class Batcher:
    """Packs the noisy samples of many runs into encoder batches of ≤ ``batch_size``, in one input tensor reused
    from batch to batch: each run draws its copies straight into its rows (:class:`NoisyCopies`), so a batch costs
    no allocation and no concatenation. A run that hands back a tensor of its own is copied into its rows; runs of
    another image shape or dtype than the batch's first are concatenated instead, as before."""

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self._buffer: torch.Tensor | None = None

    def fill(self, runs: Sequence[Run]) -> tuple[Batch, torch.Tensor | None]:
        """Take noisy inputs from ``runs`` in order until ``batch_size`` samples are gathered (or none is left):
        the parts (each run with its inputs) and the batch (None when no run had a sample to issue)."""
        parts: Batch = []
        filled = 0
        packed = True  # every part lies in the buffer, in order
        for run in runs:
            if filled == self.batch_size:
                break
            rows = None if self._buffer is None else self._buffer[filled:]
            if run.done or (inputs := run.take(self.batch_size - filled, rows)) is None:
                continue
            if rows is None or inputs.data_ptr() != rows.data_ptr():  # not drawn into the buffer
                if filled == 0 and not self._holds(inputs):
                    self._buffer = inputs.new_empty((self.batch_size, *inputs.shape[1:]))
                if self._holds(inputs):
                    assert self._buffer is not None
                    inputs = self._buffer[filled : filled + inputs.shape[0]].copy_(inputs)
                else:
                    packed = False
            parts.append((run, inputs))
            filled += inputs.shape[0]
        if not parts:
            return parts, None
        if packed:
            assert self._buffer is not None
            return parts, self._buffer[:filled]
        return parts, torch.cat([inputs for _, inputs in parts])

    def _holds(self, inputs: torch.Tensor) -> bool:
        buffer = self._buffer
        return (
            buffer is not None
            and buffer.shape[1:] == inputs.shape[1:]
            and buffer.dtype == inputs.dtype
            and buffer.device == inputs.device
        )


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
    batcher = Batcher(batch_size)
    while True:
        parts, inputs = batcher.fill(runs)
        if inputs is None:
            break
        with torch.inference_mode():
            features = encode(inputs)
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
