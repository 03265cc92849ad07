"""Noise samples per second through the device worker vs the raw batched encoder (target ratio >= 0.9).

Raw: ``encoder(batch)`` on pre-made noisy batches, nothing else. Worker: one certification job of the same
number of samples through :class:`~fsmllm.engine.worker.DeviceWorker` (noise generation, normalisation, running
sums and the certificate included). Both run in this process, side by side, interleaved, best of ``--repeats``.

    python benchmarks/worker_throughput.py --encoder dinov2-s --samples 1024
"""

from __future__ import annotations

import asyncio

import torch
from common import arguments, machine, setup, timed

from fsmllm.certify import SmoothingConfig
from fsmllm.engine.jobs import CertifyJob
from fsmllm.engine.worker import DeviceWorker


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder, pixels = setup(args)
    batches = [
        (pixels + 0.25 * torch.randn(args.batch_size, *pixels.shape)).to(args.device)
        for _ in range(-(-args.samples // args.batch_size))
    ]

    def raw() -> None:
        with torch.inference_mode():
            for batch in batches:
                encoder(batch)

    worker = DeviceWorker(encoder, device=args.device, batch_size=args.batch_size, capacity=4)
    worker.start()
    config = SmoothingConfig(sigma=0.25, n0=args.batch_size, n=len(batches) * args.batch_size - args.batch_size, alpha=0.001)

    async def one_job() -> None:
        loop = asyncio.get_running_loop()
        job = CertifyJob(pixels, config, seed=0, radii=[0.25], loop=loop, future=loop.create_future())
        worker.submit(job)
        await job.future

    raw()  # warm-up
    raw_times, worker_times = [], []
    for _ in range(args.repeats):  # interleaved, so that drifting machine load hits both alike
        raw_times.append(timed(raw, args.device))
        worker_times.append(timed(lambda: asyncio.run(one_job()), args.device))
    raw_s, worker_s = min(raw_times), min(worker_times)
    worker.stop()
    samples = len(batches) * args.batch_size
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, batch {args.batch_size}, {samples} samples")
    print(f"raw encoder: {samples / raw_s:9.1f} samples/s")
    print(f"worker:      {samples / worker_s:9.1f} samples/s")
    print(f"ratio worker/raw = {raw_s / worker_s:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
