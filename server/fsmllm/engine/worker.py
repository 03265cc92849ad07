"""The device worker: the one thread that owns the encoder's device and batches noise across requests.

Requests put jobs (:class:`~fsmllm.engine.jobs.CertifyJob`, and :class:`~fsmllm.engine.jobs.SampleJob` for the
votes of certified answers) on a bounded queue. The worker keeps every admitted job's run
(:class:`~fsmllm.certify.SmoothingRun` or :class:`~fsmllm.certify.SampleRun`) and fills each encoder batch with
noisy samples from as
many jobs as it takes (continuous batching of Monte Carlo samples, :class:`~fsmllm.certify.Batcher`), so the
batch size is set by memory, not by request boundaries. Each job's noise comes from its own seeded generator,
so a job's certificate is the same whether it shared batches or ran alone. Each job draws its noise on the device
straight into its rows of one reused input tensor, a block of samples per call: nothing is done per sample in
Python, and nothing is allocated or concatenated per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fsmllm.certify import Batcher, Encode, deliver
from fsmllm.engine.jobs import Job, JobCancelled

log = logging.getLogger("fsmllm.engine")


class QueueFull(Exception):
    """Admission refused: the worker already holds ``capacity`` jobs. Retry after ``retry_after`` seconds."""

    def __init__(self, capacity: int, retry_after: float) -> None:
        super().__init__(f"the certification queue is full ({capacity} jobs); retry in {retry_after:.0f} s")
        self.capacity = capacity
        self.retry_after = retry_after


class WorkerStopped(Exception):
    """The worker is shutting down and accepts no new jobs."""


@dataclass
class WorkerStats:
    """Cumulative counters, read by the metrics endpoint and the benchmarks."""

    samples: int = 0
    batches: int = 0
    batch_slots: int = 0
    busy_seconds: float = 0.0

    @property
    def batch_fill(self) -> float:
        return self.samples / self.batch_slots if self.batch_slots else 0.0


class DeviceWorker:
    """Owns ``encode`` (a frozen encoder, possibly behind a booster) on ``device``.

    ``capacity`` bounds queued plus running jobs (backpressure instead of unbounded memory);
    ``batch_size`` is the number of noisy images per encoder call; ``on_batch(samples, batch_size, seconds)``
    is called after each batch (metrics).
    """

    def __init__(
        self,
        encode: Encode,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        capacity: int = 64,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if batch_size < 1 or capacity < 1:
            raise ValueError("batch_size and capacity must be at least 1")
        self.encode = encode
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.capacity = capacity
        self._batcher = Batcher(batch_size)
        self.stats = WorkerStats()
        self._on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="fsmllm-device-worker", daemon=True)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._recent_job_seconds = 1.0

    # -- the request side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs queued or running."""
        with self._condition:
            return len(self._pending) + len(self._active)

    def submit(self, job: Job) -> None:
        """Admit a job or raise :class:`QueueFull` / :class:`WorkerStopped` at once (never blocks)."""
        with self._condition:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            depth = len(self._pending) + len(self._active)
            if depth >= self.capacity:
                raise QueueFull(self.capacity, retry_after=max(1.0, self._recent_job_seconds))
            self._pending.append(job)
            self._condition.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting jobs; finish the accepted ones (``drain``) or cancel them; join the thread."""
        with self._condition:
            self._stopping = True
            if not drain:
                for job in [*self._pending, *self._active]:
                    job.cancel()
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the device side ----------------------------------------------------------------------------
    def _serve(self) -> None:
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._loop()
        else:
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._active and not self._stopping:
                    self._condition.wait()
                if self._stopping and not self._pending and not self._active:
                    return
            self._admit_pending()
            self._drop_cancelled()
            if self._active:
                self._step()

    def _admit_pending(self) -> None:
        """Move the queued jobs to the active ones (a method, so no local of the loop keeps a finished job)."""
        with self._condition:
            admitted = list(self._pending)
            self._pending.clear()
        for job in admitted:
            self._admit(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            job.finish(JobCancelled("cancelled before it started"))
            return
        try:
            job.make_run(self.device)
        except Exception as error:
            job.finish(error)
            return
        job.started = time.perf_counter()
        with self._condition:
            self._active.append(job)

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._active if job.cancelled]:
            job.finish(JobCancelled("cancelled"))
            self._remove(job)

    def _remove(self, job: Job) -> None:
        with self._condition:
            self._active.remove(job)

    def _step(self) -> None:
        """One encoder batch over the active jobs, then hand out finished certificates. If drawing the noisy
        inputs fails (the device out of memory, say), every active job fails, as the batch's own jobs do when
        the encoder fails; the worker goes on either way."""
        jobs = list(self._active)
        try:
            parts, inputs = self._batcher.fill([job.run for job in jobs])  # type: ignore[misc]
            touched = {id(run) for run, _ in parts}
            jobs = [job for job in jobs if id(job.run) in touched]
            if inputs is None:
                return
            started = time.perf_counter()
            with torch.inference_mode():
                features = self.encode(inputs)
            deliver(parts, features)
        except Exception as error:
            log.exception("encoder batch failed")
            for job in jobs:
                job.finish(error)
                self._remove(job)
            return
        count = int(features.shape[0])
        elapsed = time.perf_counter() - started
        self.stats.samples += count
        self.stats.batches += 1
        self.stats.batch_slots += self.batch_size
        self.stats.busy_seconds += elapsed
        if self._on_batch is not None:
            self._on_batch(count, self.batch_size, elapsed)
        for job in jobs:
            job.report_progress()
            assert job.run is not None
            if job.run.done:  # out of the active jobs first: whoever reads the answer finds the room freed
                self._remove(job)
                try:
                    job.finish(job.outcome())
                except Exception as error:
                    job.finish(error)
                assert job.started is not None
                self._recent_job_seconds = 0.8 * self._recent_job_seconds + 0.2 * (time.perf_counter() - job.started)
