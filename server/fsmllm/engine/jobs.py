"""Jobs as the device worker sees them: a run of noisy samples (a certification, or the samples of an answer's
votes) plus its completion and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fsmllm.certify import (
    Certificate,
    CosineClassifier,
    InterimCertificate,
    SampleRun,
    SmoothingConfig,
    SmoothingRun,
    StopRule,
)
from fsmllm.certify.answers import VoteProgress

#: ``on_progress(done, total, interim)``: samples done, the budget, and the certificate valid so far (or None)
ProgressCallback = Callable[[int, int, InterimCertificate | None], None]
#: the votes of a certified answer so far (:meth:`~fsmllm.certify.answers.AnswerVoting.progress`), after each chunk
VoteProgressCallback = Callable[[VoteProgress], None]


class JobCancelled(Exception):
    """The job was cancelled (client gone, timeout, or shutdown) before all its samples were drawn."""


class _CancellableJob:
    """Cancellation and completion shared by the job kinds (their fields ``loop``, ``future``, ``_cancelled``)."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    _cancelled: threading.Event

    def cancel(self) -> None:
        """Ask the worker to drop this job's remaining samples (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def finish(self, result: object) -> None:
        """Resolve the future on its own event loop (called from the worker thread); an exception fails it."""

        def resolve() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


@dataclass(eq=False)  # jobs are told apart by identity (their fields hold tensors)
class CertifyJob(_CancellableJob):
    """One request's certification. Created on the event loop, advanced only by the device worker thread.

    The worker builds the :class:`SmoothingRun` on its device when it admits the job (so routes never touch
    the device). ``on_progress(done, total, interim)`` is called from the worker thread after each batch that
    touched the job, ``interim`` being the certificate valid so far (anytime bounds only, else None). The result
    (or the error) is delivered to ``future``, which belongs to ``loop``.
    """

    pixels: torch.Tensor
    config: SmoothingConfig
    seed: int
    radii: Sequence[float]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Certificate]
    classifier: CosineClassifier | None = None
    stop: StopRule | None = None
    on_progress: ProgressCallback | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    run: SmoothingRun | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def total_samples(self) -> int:
        return self.config.n0 + self.config.n

    def make_run(self, device: torch.device) -> SmoothingRun:
        """The run, built on the worker's device when the job is admitted."""
        self.run = SmoothingRun(self.pixels.to(device), self.config, self.seed, self.classifier, self.stop)
        return self.run

    def report_progress(self) -> None:
        if self.on_progress is not None and self.run is not None:
            self.on_progress(self.run.consumed, self.run.total, self.run.interim(self.radii))

    def outcome(self) -> Certificate:
        """The certificate of the finished run."""
        assert self.run is not None
        return self.run.certificate(self.radii)


@dataclass(eq=False)
class SampleJob(_CancellableJob):
    """The base features of ``count`` noisy copies of one image (``inner`` per vote), for the votes of a certified
    answer: the worker batches their samples with every certification's; the result is [count, D]."""

    pixels: torch.Tensor
    sigma: float
    count: int
    seed: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[torch.Tensor]
    inner: int = 1
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    run: SampleRun | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def make_run(self, device: torch.device) -> SampleRun:
        self.run = SampleRun(self.pixels.to(device), self.sigma, self.count, self.seed, self.inner)
        return self.run

    def report_progress(self) -> None:
        """Sample jobs report no progress of their own (the votes' progress is counted in answers)."""

    def outcome(self) -> torch.Tensor:
        assert self.run is not None
        return self.run.features().cpu()


Job = CertifyJob | SampleJob
