"""The executors' batches (certify/sampling.py :class:`Batcher`, :class:`NoisyCopies`): every run draws its noisy
copies straight into its rows of one input tensor reused from batch to batch, and the copies are those of the
seed's noise stream (blocks of NOISE_BLOCK from torch.randn) bit for bit, whatever the calls and wherever they are
written."""

from __future__ import annotations

import pytest
import torch

from fsmllm.certify import NOISE_BLOCK, Batcher, SampleRun, SmoothingConfig, SmoothingRun
from fsmllm.certify.sampling import NoisyCopies


def stream(pixels: torch.Tensor, sigma: float, seed: int, count: int) -> torch.Tensor:
    """The seed's noisy copies as defined: x + σ δ_i, δ drawn by torch.randn in blocks of NOISE_BLOCK."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-count // NOISE_BLOCK)
    noise = torch.cat([torch.randn((NOISE_BLOCK, *pixels.shape), generator=generator) for _ in range(blocks)])
    return pixels + sigma * noise[:count]


def test_the_copies_are_the_seeds_stream_whatever_the_calls_and_wherever_written() -> None:
    pixels = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1))
    copies = NoisyCopies(pixels, 0.25, seed=4)
    buffer = torch.full((50, 3, 5, 7), float("nan"))
    drawn = [copies.draw(5, buffer[3:]), copies.draw(40), copies.draw(19, buffer[10:29])]
    assert drawn[0].data_ptr() == buffer[3].data_ptr() and drawn[2].data_ptr() == buffer[10].data_ptr()
    assert torch.equal(torch.cat(drawn), stream(pixels, 0.25, 4, 64))
    assert copies.draw(1, buffer[:1, :2]).shape == (1, 3, 5, 7)  # an out that does not fit is left alone
    assert torch.isnan(buffer[0]).all()


def test_every_run_draws_into_one_reused_batch() -> None:
    pixels = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [SampleRun(pixels, 0.5, count=12, seed=1), SampleRun(pixels, 0.5, count=12, seed=2)]
    batcher = Batcher(8)
    seen, storage = [], set()
    while True:
        parts, inputs = batcher.fill(runs)
        if inputs is None:
            break
        storage.add(inputs.data_ptr())
        start = 0
        for run, part in parts:  # each part is its rows of the batch
            assert part.data_ptr() == inputs[start].data_ptr()
            start += part.shape[0]
            run.consume(part.flatten(1))
        seen.append([(runs.index(run), part.shape[0]) for run, part in parts])
    assert seen == [[(0, 8)], [(0, 4), (1, 4)], [(1, 8)]]  # in order, batches filled across runs
    assert len(storage) == 1  # one input tensor for every batch
    for index, seed in enumerate((1, 2)):  # each run got its own seed's stream
        expected = torch.nn.functional.normalize(stream(pixels, 0.5, seed, 12).flatten(1), dim=1)
        assert torch.equal(runs[index].features(), expected)


class OwnTensor:
    """A run that ignores ``out`` and hands back a tensor of its own (of ``dtype``)."""

    def __init__(self, count: int, dtype: torch.dtype = torch.float32) -> None:
        self.inputs = torch.arange(count * 12, dtype=dtype).reshape(count, 3, 2, 2)
        self.issued = 0
        self.consumed: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return self.issued == self.inputs.shape[0]

    def take(self, limit: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        part = self.inputs[self.issued : self.issued + limit]
        self.issued += part.shape[0]
        return part if part.shape[0] else None

    def consume(self, features: torch.Tensor) -> None:
        self.consumed.append(features.clone())


def test_a_run_handing_back_its_own_tensor_is_copied_in_and_another_dtype_is_concatenated() -> None:
    own, wide = OwnTensor(3), OwnTensor(2, torch.float64)
    batcher = Batcher(4)
    parts, inputs = batcher.fill([own])
    assert inputs is not None and torch.equal(inputs, own.inputs) and inputs.data_ptr() != own.inputs.data_ptr()
    mixed = SmoothingRun(torch.rand(3, 2, 2, dtype=torch.float64), SmoothingConfig(sigma=0.25, n0=2, n=2), seed=0)
    parts, inputs = batcher.fill([OwnTensor(1), mixed, wide])
    assert inputs is not None and inputs.dtype == torch.float64 and inputs.shape[0] == 4  # as torch.cat gives
    assert [part.shape[0] for _, part in parts] == [1, 2, 1]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        Batcher(0)
