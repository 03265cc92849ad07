"""The certifier (engine/certifier.py), the asynchronous face of the worker: its cache (least recently used
out first; only seeded requests) and the queue/compute times it reports. A real worker and smoothing runs."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import torch

from fsmllm.certify import Certificate, SmoothingConfig
from fsmllm.engine.certifier import CertificateCache, Certifier
from fsmllm.engine.worker import DeviceWorker

from .test_worker import Encoder


def stand_in(name: str) -> Certificate:
    """The cache stores and returns certificates without reading them: a named stand-in is one for it."""
    return cast(Certificate, name)


def test_the_cache_drops_the_least_recently_used_certificate() -> None:
    cache = CertificateCache(2)
    cache.put("a", stand_in("A"))
    cache.put("b", stand_in("B"))
    assert cache.get("a") == "A"  # "a" is now the most recently used
    cache.put("c", stand_in("C"))
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    cache.put("a", stand_in("A2"))  # a new certificate under a known key replaces the old one
    cache.put("d", stand_in("D"))  # ... and counts as used: "c" goes
    assert (cache.get("a"), cache.get("c"), cache.get("d")) == ("A2", None, "D")
    disabled = CertificateCache(0)
    disabled.put("a", stand_in("A"))
    assert disabled.get("a") is None


def test_a_seeded_request_is_answered_from_the_cache_and_an_unseeded_one_never() -> None:
    encoder = Encoder()
    worker = DeviceWorker(encoder, batch_size=64, capacity=4)
    worker.start()
    certifier = Certifier(worker, timeout_s=120, cache_size=4)
    pixels = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    config = SmoothingConfig(sigma=0.25, n0=8, n=40)

    async def scenario() -> None:
        before = time.perf_counter()
        first = await certifier.certify(pixels, config, [0.1], seed=3)
        elapsed = time.perf_counter() - before
        assert not first.cached and first.certificate.seed == 3
        # the times it reports are parts of the time the call took: waiting for the worker, then computing
        assert 0 <= first.queue_seconds and 0 < first.compute_seconds and first.queue_seconds + first.compute_seconds <= elapsed
        batches = len(encoder.sizes)
        again = await certifier.certify(pixels, config, [0.1], seed=3)
        assert again.cached and again.certificate is first.certificate
        assert (again.queue_seconds, again.compute_seconds) == (0.0, 0.0) and len(encoder.sizes) == batches
        other = await certifier.certify(pixels, config, [0.2], seed=3)  # another radius: another certificate
        assert not other.cached and len(encoder.sizes) > batches
        fresh = [await certifier.certify(pixels, config, [0.1]) for _ in range(2)]
        assert not any(outcome.cached for outcome in fresh) and fresh[0].certificate.seed != fresh[1].certificate.seed

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
