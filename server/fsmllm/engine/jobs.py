"""Certification jobs as the device worker sees them: a smoothing run plus its completion and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fsmllm.certify import Certificate, CosineClassifier, SmoothingConfig, SmoothingRun, StopRule

#: ``on_progress(done, total, interim)``: samples done, the budget, and the certificate valid so far (or None)
ProgressCallback = Callable[[int, int, "dict[str, object] | None"], None]


class JobCancelled(Exception):
    """The job was cancelled (client gone, timeout, or shutdown) before all its samples were drawn."""


@dataclass
class CertifyJob:
    """One request's certification. Created on the event loop, advanced only by the device worker thread.

    The worker builds the :class:`SmoothingRun` on its device when it admits the job (so routes never touch
    the device). ``on_progress(done, total, interim)`` is called from the worker thread after each batch that
    touched the job, ``interim`` being the certificate valid so far (anytime bounds only, else None). The result (or the error) is delivered to ``future``, which belongs to ``loop``.
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

    def cancel(self) -> None:
        """Ask the worker to drop this job's remaining samples (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def total_samples(self) -> int:
        return self.config.n0 + self.config.n

    def report_progress(self) -> None:
        if self.on_progress is not None and self.run is not None:
            self.on_progress(self.run.consumed, self.run.total, self.run.interim(self.radii))

    def finish(self, result: Certificate | BaseException) -> None:
        """Resolve the future on its own event loop (called from the worker thread)."""

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
