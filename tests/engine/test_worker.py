"""The device worker on its own (engine/worker.py, engine/jobs.py, Runtime.stop): failures stay with their
jobs, stopping drains or cancels as asked, and one encoder batch carries the samples of many jobs.

The worker, its thread and the smoothing runs are the real ones; the encoder is a tiny linear map that can be
told to fail a batch or to hold every batch until the test releases it (no timing anywhere).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from fsmllm.api.serve import policy_from
from fsmllm.api.settings import Settings
from fsmllm.certify import Certificate, InterimCertificate, SmoothingConfig
from fsmllm.engine.jobs import CertifyJob, JobCancelled
from fsmllm.engine.runtime import Runtime
from fsmllm.engine.worker import DeviceWorker, QueueFull, WorkerStopped

from ..api.live import Controlled, wait_until


class Encoder:
    """A fixed linear map of 3x4x4 images to 8 features, recording batch sizes; ``fail_batches`` lists the
    (1-based) batch numbers that raise; while ``release`` is clear, each batch waits for it."""

    def __init__(self, fail_batches: tuple[int, ...] = ()) -> None:
        self.weight = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
        self.sizes: list[int] = []
        self.fail_batches = fail_batches
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.release.wait(120), "the test never released the encoder"
        self.sizes.append(x.shape[0])
        if len(self.sizes) in self.fail_batches:
            raise RuntimeError(f"batch {len(self.sizes)} failed")
        return x.reshape(x.shape[0], -1) @ self.weight


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in its own thread, as the server's is: the worker resolves the jobs' futures on it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def job(loop: asyncio.AbstractEventLoop, n0: int = 8, n: int = 24, seed: int = 0, pixels: torch.Tensor | None = None) -> CertifyJob:
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed)) if pixels is None else pixels
    future = asyncio.run_coroutine_threadsafe(_new_future(), loop).result(10)
    return CertifyJob(pixels=image, config=SmoothingConfig(sigma=0.25, n0=n0, n=n), seed=seed, radii=[0.1],
                      loop=loop, future=future)


async def _new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def outcome(job: CertifyJob, seconds: float = 120) -> Certificate | BaseException:
    """The job's certificate, or the exception it failed with."""

    async def wait() -> Certificate | BaseException:
        try:
            return await asyncio.shield(job.future)
        except Exception as error:  # noqa: BLE001
            return error

    return asyncio.run_coroutine_threadsafe(wait(), job.loop).result(seconds)


def started(encoder: Callable[[torch.Tensor], torch.Tensor], *jobs: CertifyJob, batch_size: int = 64, capacity: int = 8) -> DeviceWorker:
    """A worker with ``jobs`` queued before its thread starts, so that it admits them all at once."""
    worker = DeviceWorker(encoder, batch_size=batch_size, capacity=capacity)
    for queued in jobs:
        worker.submit(queued)
    worker.start()
    return worker


def serves_on(worker: DeviceWorker, loop: asyncio.AbstractEventLoop) -> None:
    """The worker still serves: a job submitted now gets its certificate; then it lets go of every job and stops."""
    later = job(loop, seed=3)
    worker.submit(later)
    assert isinstance(outcome(later), Certificate)
    wait_until(lambda: worker.depth == 0, "the worker to let go of the jobs")
    worker.stop()


def test_one_batch_carries_the_samples_of_many_jobs(loop: asyncio.AbstractEventLoop) -> None:
    encoder = Encoder()
    jobs = [job(loop, n0=8, n=24, seed=i) for i in range(4)]
    worker = started(encoder, *jobs, batch_size=64)
    results = [outcome(j) for j in jobs]
    worker.stop()
    assert all(isinstance(r, Certificate) for r in results)
    # 4 x 8 selection samples in one batch, then 4 x 24 estimation samples in batches of 64
    assert encoder.sizes == [32, 64, 32]
    assert worker.stats.samples == 128 and worker.stats.batches == 3 and worker.stats.batch_slots == 3 * 64
    assert worker.stats.batch_fill == pytest.approx(128 / 192)
    assert worker.depth == 0


def test_a_shared_batch_gives_each_job_the_certificate_it_gets_alone(loop: asyncio.AbstractEventLoop) -> None:
    alone = []
    for i in range(3):
        worker = started(Encoder(), solo := job(loop, seed=i), batch_size=5)
        alone.append(outcome(solo))
        worker.stop()
    together = [job(loop, seed=i) for i in range(3)]
    worker = started(Encoder(), *together, batch_size=64)
    for single, shared in zip(alone, (outcome(j) for j in together)):
        assert isinstance(single, Certificate) and isinstance(shared, Certificate)
        assert shared.score_lower == pytest.approx(single.score_lower, abs=1e-6)
    worker.stop()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = Encoder(fail_batches=(1,))
    first, second = job(loop, n0=10, seed=1), job(loop, n0=10, seed=2)
    worker = started(encoder, first, second, batch_size=10)  # batch 1: the first job's 10 selection samples only
    assert any(thread.name == "fsmllm-device-worker" for thread in threading.enumerate())  # named for py-spy & co
    failed, survived = outcome(first), outcome(second)
    assert isinstance(failed, RuntimeError) and str(failed) == "batch 1 failed"
    logged = [record for record in caplog.records if record.getMessage() == "encoder batch failed"]
    assert len(logged) == 1 and logged[0].exc_info is not None  # with its traceback, for the operator
    assert isinstance(survived, Certificate) and survived.seed == 2
    serves_on(worker, loop)


def test_a_batch_shared_by_two_jobs_fails_both(loop: asyncio.AbstractEventLoop) -> None:
    encoder = Encoder(fail_batches=(1,))
    first, second, third = job(loop, n0=8, seed=1), job(loop, n0=8, seed=2), job(loop, n0=8, seed=3)
    worker = started(encoder, first, second, third, batch_size=16)  # batch 1: the first two jobs' selection samples
    assert [type(outcome(j)) for j in (first, second, third)] == [RuntimeError, RuntimeError, Certificate]
    worker.stop()


def test_a_job_that_fails_on_admission_is_answered_and_the_others_run(loop: asyncio.AbstractEventLoop) -> None:
    broken = job(loop, pixels=torch.rand(2, 3, 4, 4))  # a batch, not one image
    fine = job(loop, seed=5)
    worker = started(Encoder(), broken, fine)
    error = outcome(broken)
    assert isinstance(error, ValueError) and "one image" in str(error)
    assert isinstance(outcome(fine), Certificate)
    wait_until(lambda: worker.depth == 0, "the worker to let go of the jobs")
    worker.stop()


def test_a_job_cancelled_before_admission_never_reaches_the_encoder(loop: asyncio.AbstractEventLoop) -> None:
    encoder = Encoder()
    cancelled, fine = job(loop, seed=1), job(loop, seed=2)
    cancelled.cancel()
    worker = started(encoder, cancelled, fine, batch_size=64)
    never_started = outcome(cancelled)
    assert isinstance(never_started, JobCancelled) and str(never_started) == "cancelled before it started"
    assert isinstance(outcome(fine), Certificate)
    assert sum(encoder.sizes) == 32  # only the other job's samples
    worker.stop()


def test_submit_to_a_stopped_worker_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    worker = started(Encoder())
    worker.stop()
    with pytest.raises(WorkerStopped, match="shutting down"):
        worker.submit(job(loop))
    never_started = DeviceWorker(Encoder())
    never_started.stop()
    with pytest.raises(WorkerStopped):
        never_started.submit(job(loop))


def test_a_full_worker_refuses_with_a_retry_hint(loop: asyncio.AbstractEventLoop) -> None:
    worker = DeviceWorker(Encoder(), capacity=2)
    worker.submit(job(loop, seed=1))
    worker.submit(job(loop, seed=2))
    with pytest.raises(QueueFull) as refused:
        worker.submit(job(loop, seed=3))
    assert refused.value.capacity == 2 and refused.value.retry_after >= 1 and worker.depth == 2
    worker.stop(drain=False)
    with pytest.raises(ValueError, match="at least 1"):
        DeviceWorker(Encoder(), capacity=0)
    with pytest.raises(ValueError, match="at least 1"):
        DeviceWorker(Encoder(), batch_size=0)


def stop_in_background(stop: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=stop)
    thread.start()
    return thread


def refuses_new_jobs(worker: DeviceWorker, loop: asyncio.AbstractEventLoop, accepted: list[CertifyJob], size: int = 4) -> bool:
    """Offer a small job: True once the worker refuses it (jobs it still accepts are kept in ``accepted``)."""
    probe = job(loop, seed=100 + len(accepted), pixels=torch.rand(3, size, size))
    try:
        worker.submit(probe)
    except WorkerStopped:
        return True
    accepted.append(probe)
    return False


def test_stop_with_drain_finishes_every_accepted_job(loop: asyncio.AbstractEventLoop) -> None:
    encoder = Encoder()
    encoder.release.clear()
    running, queued = job(loop, n0=8, n=200, seed=1), job(loop, n0=8, n=200, seed=2)
    worker = started(encoder, running, batch_size=8)
    wait_until(encoder.entered.is_set, "the first batch to reach the encoder")
    worker.submit(queued)  # still waiting in the queue when the stop begins
    stopper = stop_in_background(lambda: worker.stop())  # draining is the default
    accepted: list[CertifyJob] = []
    wait_until(lambda: refuses_new_jobs(worker, loop, accepted), "the worker to stop accepting jobs")
    encoder.release.set()
    stopper.join(120)
    assert not stopper.is_alive()
    for drained in (running, queued, *accepted):
        certificate = outcome(drained)
        assert isinstance(certificate, Certificate), certificate
        assert drained.run is not None and drained.run.done
    assert sum(encoder.sizes) == 208 * (2 + len(accepted))


def test_stop_without_drain_cancels_running_and_queued_jobs(loop: asyncio.AbstractEventLoop) -> None:
    encoder = Encoder()
    encoder.release.clear()
    running, queued = job(loop, n0=8, n=200, seed=1), job(loop, n0=8, n=200, seed=2)
    worker = started(encoder, running, batch_size=8)
    wait_until(encoder.entered.is_set, "the first batch to reach the encoder")
    worker.submit(queued)
    stopper = stop_in_background(lambda: worker.stop(drain=False))
    wait_until(lambda: running.cancelled and queued.cancelled, "the stop to cancel the jobs")
    encoder.release.set()
    stopper.join(120)
    assert not stopper.is_alive()
    assert isinstance(outcome(running), JobCancelled) and isinstance(outcome(queued), JobCancelled)
    assert running.run is not None and not running.run.done
    assert sum(encoder.sizes) < 208  # the running job's remaining samples were dropped
    with pytest.raises(WorkerStopped):
        worker.submit(job(loop))


def test_the_runtime_drains_its_worker_when_it_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Runtime.stop (the server's shutdown) finishes the certifications it accepted."""
    encoder = Controlled()
    settings = Settings(model="none", default_n0=8, default_n=100, _env_file=None)
    runtime = Runtime(encoder, policy_from(settings), batch_size=8, queue_capacity=4)
    runtime.start()
    assert runtime.ready
    encoder.hold()
    accepted = job(loop, n0=8, n=100, pixels=torch.rand(3, 16, 16))
    runtime.worker.submit(accepted)
    wait_until(encoder.entered.is_set, "the first batch to reach the encoder")
    stopper = stop_in_background(runtime.stop)
    wait_until(lambda: not runtime.ready, "the runtime to start stopping")
    probes: list[CertifyJob] = []
    wait_until(lambda: refuses_new_jobs(runtime.worker, loop, probes, size=16), "the worker to stop accepting jobs")
    encoder.release.set()
    stopper.join(120)
    assert not stopper.is_alive()
    for drained in (accepted, *probes):
        certificate = outcome(drained)
        assert isinstance(certificate, Certificate) and certificate.config.n == 100, certificate


def test_cancelling_a_job_behind_another_leaves_the_worker_serving(loop: asyncio.AbstractEventLoop) -> None:
    """A job cancelled while an earlier one is still active is dropped on its own: jobs are told apart by
    identity (comparing two jobs field by field would compare their pixel tensors and kill the worker thread)."""
    encoder = Encoder()
    encoder.release.clear()
    first, middle, last = (job(loop, n0=8, n=200, seed=i) for i in (1, 2, 3))
    worker = started(encoder, first, middle, last, batch_size=8)
    wait_until(encoder.entered.is_set, "the first batch to reach the encoder")
    middle.cancel()
    encoder.release.set()
    cancelled = outcome(middle)
    assert isinstance(cancelled, JobCancelled) and str(cancelled) == "cancelled"
    assert isinstance(outcome(first), Certificate) and isinstance(outcome(last), Certificate)
    serves_on(worker, loop)


class NoiseFails:
    """A certification whose noisy inputs cannot be drawn after the first batch (as when the device runs out of
    memory): its real run, whose ``take`` raises from then on."""

    def __init__(self, run) -> None:  # noqa: ANN001 - the job's real SmoothingRun
        self.run = run
        self.takes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.run, name)

    def take(self, limit: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
        self.takes += 1
        if self.takes > 1:
            raise RuntimeError("out of memory drawing the noise")
        return self.run.take(limit, out)


class NoiseFailingJob(CertifyJob):
    def make_run(self, device: torch.device):  # noqa: ANN201
        self.run = NoiseFails(super().make_run(device))  # type: ignore[assignment]
        return self.run


def test_a_failure_drawing_the_noise_fails_the_active_jobs_and_the_worker_goes_on(loop: asyncio.AbstractEventLoop) -> None:
    """Drawing the inputs is part of the batch: an error there fails the jobs in progress (with that error), not
    the worker thread; a job submitted afterwards is served."""
    plain = job(loop, seed=1)
    broken = NoiseFailingJob(**{name: getattr(plain, name) for name in ("pixels", "config", "seed", "radii", "loop")},
                             future=job(loop, seed=2).future)
    worker = started(Encoder(), broken, plain, batch_size=8)
    for failed in (outcome(broken), outcome(plain)):
        assert isinstance(failed, RuntimeError) and str(failed) == "out of memory drawing the noise"
    serves_on(worker, loop)


def test_each_batch_reports_a_jobs_progress_with_its_interim_certificate(loop: asyncio.AbstractEventLoop) -> None:
    """on_progress(done, total, interim) after every batch that touched the job; with the (anytime) betting bound,
    interim is the certificate valid so far once a checkpoint has passed, and None before."""
    reports: list[tuple[int, int, object]] = []
    tracked = job(loop, n0=8, n=64)
    tracked.on_progress = lambda done, total, interim: reports.append((done, total, interim))
    worker = started(Encoder(), tracked, batch_size=16)
    assert isinstance(outcome(tracked), Certificate)
    # the 8 selection samples first (a batch never mixes a job's phases), then 16 estimation samples a batch
    assert [(done, total) for done, total, _ in reports] == [(8, 72), (24, 72), (40, 72), (56, 72), (72, 72)]
    assert reports[0][2] is None and reports[1][2] is None  # 0 and 16 estimation samples: no checkpoint yet
    interim = reports[3][2]  # 48 estimation samples: the certificate of the checkpoint at 32
    assert isinstance(interim, InterimCertificate) and interim.n == 32
    worker.stop()


def test_a_worker_needs_room_for_one_sample_and_one_job(loop: asyncio.AbstractEventLoop) -> None:
    for batch_size, capacity in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="^batch_size and capacity must be at least 1$"):
            DeviceWorker(Encoder(), batch_size=batch_size, capacity=capacity)
    smallest = job(loop, n0=2, n=3)
    worker = started(Encoder(), smallest, batch_size=1, capacity=1)  # one sample a batch still certifies
    assert isinstance(outcome(smallest), Certificate)
    worker.stop()
