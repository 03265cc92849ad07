"""Noise samples per second through the device worker vs the raw batched encoder (target ratio >= 0.9).

Raw: ``encoder(batch)`` on pre-made noisy batches, nothing else. Worker: one certification job of the same
number of samples through :class:`~fsmllm.engine.worker.DeviceWorker` (noise generation, normalisation, running
sums and the certificate included). Both run in this process, side by side, interleaved, best of ``--repeats``.

    python benchmarks/worker_throughput.py --encoder dinov2-s --samples 1024
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import torch
from common import arguments, machine, setup, timed

from fsmllm.certify import Certificate, SmoothingConfig, StopRule
from fsmllm.engine.jobs import CertifyJob
from fsmllm.engine.worker import DeviceWorker


def certify_through(
    worker: DeviceWorker, pixels: torch.Tensor, config: SmoothingConfig, seeds: Sequence[int],
    radii: Sequence[float] = (0.25,), stop: StopRule | None = None,
) -> list[Certificate]:
    """One job per seed, all submitted at once to the running ``worker`` (as concurrent requests are); their
    certificates once every one is done."""

    async def jobs() -> list[Certificate]:
        loop = asyncio.get_running_loop()
        submitted = [
            CertifyJob(pixels, config, seed=seed, radii=list(radii), loop=loop, future=loop.create_future(), stop=stop)
            for seed in seeds
        ]
        for job in submitted:
            worker.submit(job)
        return list(await asyncio.gather(*(job.future for job in submitted)))

    return asyncio.run(jobs())


def worker_vs_raw(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, device: str, batch_size: int, samples: int,
    repeats: int,
) -> dict[str, float]:
    """Noise samples/s of ``encode`` on ready-made noisy batches (raw) and of one job of the same samples through
    a :class:`DeviceWorker` (best of ``repeats``, interleaved), and their ratio."""
    on_device = pixels.to(device)
    batches = [
        on_device + 0.25 * torch.randn(batch_size, *pixels.shape, device=device) for _ in range(-(-samples // batch_size))
    ]

    def raw() -> None:
        with torch.inference_mode():
            for batch in batches:
                encode(batch)

    worker = DeviceWorker(encode, device=device, batch_size=batch_size, capacity=4)
    worker.start()
    config = SmoothingConfig(sigma=0.25, n0=batch_size, n=len(batches) * batch_size - batch_size, alpha=0.001)
    try:
        raw()  # warm-up
        raw_times, worker_times = [], []
        for _ in range(repeats):  # interleaved, so that drifting machine load hits both alike
            raw_times.append(timed(raw, device))
            worker_times.append(timed(lambda: certify_through(worker, pixels, config, [0]), device))
    finally:
        worker.stop()
    total = len(batches) * batch_size
    raw_s, worker_s = min(raw_times), min(worker_times)
    return {"samples": total, "raw_samples_per_s": total / raw_s, "worker_samples_per_s": total / worker_s,
            "ratio": raw_s / worker_s}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder, pixels = setup(args)
    result = worker_vs_raw(encoder, pixels, args.device, args.batch_size, args.samples, args.repeats)
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, batch {args.batch_size}, "
          f"{result['samples']} samples")
    print(f"raw encoder: {result['raw_samples_per_s']:9.1f} samples/s")
    print(f"worker:      {result['worker_samples_per_s']:9.1f} samples/s")
    print(f"ratio worker/raw = {result['ratio']:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
