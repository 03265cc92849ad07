"""The asynchronous face of the device worker: submit a certification, await it, cancel it, cache it."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fsmllm.certify import Certificate, CosineClassifier, SmoothingConfig, StopRule, new_seed
from fsmllm.engine.jobs import CertifyJob, Job, ProgressCallback, SampleJob
from fsmllm.engine.worker import DeviceWorker


@dataclass(frozen=True)
class CertifyOutcome:
    certificate: Certificate
    queue_seconds: float
    compute_seconds: float
    cached: bool


class CertificateCache:
    """LRU of certificates keyed by (image bytes, parameters, seed): identical requests, identical answers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Certificate] = OrderedDict()

    @staticmethod
    def key(
        pixels: torch.Tensor, config: SmoothingConfig, seed: int, radii: Sequence[float], stop: StopRule | None
    ) -> str:
        digest = hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((tuple(pixels.shape), config, seed, tuple(radii), stop)).encode())
        return digest.hexdigest()

    def get(self, key: str) -> Certificate | None:
        certificate = self._items.get(key)
        if certificate is not None:
            self._items.move_to_end(key)
        return certificate

    def put(self, key: str, certificate: Certificate) -> None:
        if self.capacity == 0:
            return
        self._items[key] = certificate
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class Certifier:
    """Turns requests into worker jobs. Times out and cancels jobs whose caller gave up."""

    def __init__(self, worker: DeviceWorker, *, timeout_s: float, cache_size: int) -> None:
        self.worker = worker
        self.timeout_s = timeout_s
        self.cache = CertificateCache(cache_size)

    async def certify(
        self,
        pixels: torch.Tensor,
        config: SmoothingConfig,
        radii: Sequence[float],
        seed: int | None = None,
        classifier: CosineClassifier | None = None,
        on_progress: ProgressCallback | None = None,
        stop: StopRule | None = None,
    ) -> CertifyOutcome:
        """Certify ``pixels``; raises QueueFull / WorkerStopped at once, TimeoutError after ``timeout_s``.

        Only requests that name their seed are cached: a request without one asks for fresh randomness.
        """
        key = None
        if seed is not None and classifier is None:
            key = self.cache.key(pixels, config, seed, radii, stop)
            if (hit := self.cache.get(key)) is not None:
                return CertifyOutcome(hit, 0.0, 0.0, cached=True)
        loop = asyncio.get_running_loop()
        job = CertifyJob(
            pixels=pixels,
            config=config,
            seed=new_seed() if seed is None else seed,
            radii=list(radii),
            loop=loop,
            future=loop.create_future(),
            classifier=classifier,
            stop=stop,
            on_progress=on_progress,
        )
        certificate = await self._run(job)
        done = time.perf_counter()
        started = job.started if job.started is not None else done
        if key is not None:
            self.cache.put(key, certificate)
        return CertifyOutcome(certificate, started - job.submitted, done - started, cached=False)

    async def samples(self, pixels: torch.Tensor, sigma: float, count: int, seed: int, inner: int) -> torch.Tensor:
        """The vote features of ``count`` noisy copies of ``pixels`` (``inner`` per vote), [count, D], computed
        by the worker in shared batches (:class:`~fsmllm.certify.SampleRun`); same errors as :meth:`certify`."""
        loop = asyncio.get_running_loop()
        job = SampleJob(pixels, sigma, count, seed, loop, loop.create_future(), inner=inner)
        return await self._run(job)

    async def _run(self, job: Job) -> Any:
        """Submit ``job`` and await its result; on a timeout or when the caller goes away, free the device."""
        self.worker.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except BaseException:  # timeout, client disconnect (CancelledError), shutdown: free the device
            job.cancel()
            job.future.cancel()  # nobody will read it: the worker's late answer is dropped
            raise
