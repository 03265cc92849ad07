"""Noise samples per second through the device worker vs the raw batched encoder (target ratio >= 0.9), and the
worker's own ceiling.

Raw: ``encoder(batch)`` on pre-made noisy batches, nothing else. Worker: one certification job of the same
number of samples through :class:`~fsmllm.engine.worker.DeviceWorker` (noise generation, normalisation, running
sums and the certificate included). Both run in this process, side by side, interleaved, best of ``--repeats``.

``--zero-cost``: the encoder is a view of its input (a slice of the noisy pixels: no computation), so the worker's
samples/s is its own ceiling, what its per-sample work allows with an infinitely fast encoder. ``--against TREE``
runs the same measurement on the fsmllm of another checkout (e.g. main) in child processes, alternating with this
one, and reports both (the best of ``--repeats`` each) and whether their certificates are identical.

``--dtypes float32 auto``: the same measurement for each precision (``auto``: what ``fsmllm serve --dtype auto``
chooses on this machine, timed afresh), interleaved, best of ``--repeats`` each, and their ratios to the first.

    python benchmarks/worker_throughput.py --encoder dinov2-s --samples 1024
    python benchmarks/worker_throughput.py --encoder dinov2-s --samples 256 --dtypes float32 auto
    python benchmarks/worker_throughput.py --zero-cost --encoder tiny-cnn --samples 8192 --against /work/main
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import arguments, machine, setup, timed

from fsmllm.certify import Certificate, SmoothingConfig, StopRule
from fsmllm.encoders import load_encoder
from fsmllm.encoders.precision import PRECISIONS, set_precision
from fsmllm.engine.jobs import CertifyJob
from fsmllm.engine.worker import DeviceWorker
from fsmllm.images import load_image, to_pixels


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
    repeats: int, jobs: int = 1,
) -> dict[str, float]:
    """Noise samples/s of ``encode`` on ready-made noisy batches (raw) and of ``jobs`` concurrent jobs of the same
    samples in all through a :class:`DeviceWorker` (best of ``repeats``, interleaved), their ratio, and the jobs'
    score_lower (to compare code versions: the same seeds give the same certificates)."""
    on_device = pixels.to(device)
    batches = [
        on_device + 0.25 * torch.randn(batch_size, *pixels.shape, device=device) for _ in range(-(-samples // batch_size))
    ]

    def raw() -> None:
        with torch.inference_mode():
            for batch in batches:
                encode(batch)

    worker = DeviceWorker(encode, device=device, batch_size=batch_size, capacity=max(4, jobs))
    worker.start()
    total = len(batches) * batch_size
    per_job = total // jobs
    config = SmoothingConfig(sigma=0.25, n0=batch_size, n=per_job - batch_size, alpha=0.001)
    certificates: list[Certificate] = []
    try:
        raw()  # warm-up
        certify_through(worker, pixels, config, range(jobs))
        raw_times, worker_times = [], []
        for _ in range(repeats):  # interleaved, so that drifting machine load hits both alike
            raw_times.append(timed(raw, device))
            worker_times.append(timed(lambda: certificates.extend(certify_through(worker, pixels, config, range(jobs))),
                                      device))
    finally:
        worker.stop()
    raw_s, worker_s = min(raw_times), min(worker_times)
    return {"samples": per_job * jobs, "raw_samples_per_s": total / raw_s,
            "worker_samples_per_s": per_job * jobs / worker_s, "ratio": (raw_s / total) / (worker_s / (per_job * jobs)),
            "score_lower": [c.score_lower for c in certificates[-jobs:]]}


def zero_cost(width: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder that computes nothing: the first ``width`` values of each noisy input, a view."""
    return lambda pixels: pixels.flatten(1)[:, :width]


def against(tree: Path, argv: list[str], repeats: int) -> None:
    """This measurement, one repeat per child process, alternately on ``tree``'s fsmllm and on this checkout's;
    prints the best of ``repeats`` of each and whether their certificates agree."""
    here = Path(__file__).resolve().parent
    trees = {"other": tree.resolve(), "this": here.parent}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeats):
        for name, root in trees.items():
            env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root / "server"), str(here)])}
            out = subprocess.run([sys.executable, __file__, *argv, "--repeats", "1", "--json"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.splitlines()[-1]))
    best = {name: max(results, key=lambda r: r["worker_samples_per_s"]) for name, results in runs.items()}
    for name, root in trees.items():
        result = best[name]
        print(f"{name:5} {root}: worker {result['worker_samples_per_s']:9.1f} samples/s, raw "
              f"{result['raw_samples_per_s']:9.1f}, ratio {result['ratio']:.3f}")
    speedup = best["this"]["worker_samples_per_s"] / best["other"]["worker_samples_per_s"]
    same = best["this"]["score_lower"] == best["other"]["score_lower"]
    print(f"worker this/other = {speedup:.2f}x; the same certificates (score_lower of every job): {same}")


def per_dtype(args: argparse.Namespace) -> None:
    """worker_vs_raw for each of ``args.dtypes`` (``auto`` resolved as the server does, timed afresh), one repeat
    at a time round-robin; the best of each and its ratio to the first precision's."""
    from fsmllm.fastest_dtype import encoder_precision  # here: --against runs this file on older checkouts too

    with tempfile.TemporaryDirectory() as folder:
        os.environ["FSMLLM_CACHE"] = folder  # a fresh timing, not this machine's cached one
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        base = load_encoder(args.encoder, image_size=args.image_size, device=args.device)
        names = {d: encoder_precision(base, d, args.device, args.batch_size) for d in args.dtypes}
    encoders = {d: set_precision(copy.deepcopy(base), p) for d, p in names.items()}
    pixels = to_pixels(load_image("sample:chelsea"), base.image_size)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for d, encoder in encoders.items():
            result = worker_vs_raw(encoder, pixels, args.device, args.batch_size, args.samples, 1)
            if d not in best or result["worker_samples_per_s"] > best[d]["worker_samples_per_s"]:
                best[d] = result
    first = best[args.dtypes[0]]
    print(f"device: {machine(args.device)}; encoder {base.name} @ {base.image_size}px, batch {args.batch_size}, "
          f"{first['samples']} samples, best of {args.repeats} interleaved")
    for d, result in best.items():
        print(f"{d:>8} ({names[d]:>8}): raw {result['raw_samples_per_s']:8.1f} samples/s "
              f"({result['raw_samples_per_s'] / first['raw_samples_per_s']:.2f}x), worker "
              f"{result['worker_samples_per_s']:8.1f} ({result['worker_samples_per_s'] / first['worker_samples_per_s']:.2f}x)"
              f", worker/raw {result['ratio']:.3f}")


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="concurrent certification jobs sharing the samples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--zero-cost", action="store_true", help="an encoder that computes nothing: the ceiling")
    parser.add_argument("--against", type=Path, default=None, help="another checkout to compare with, side by side")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--dtypes", nargs="+", choices=("auto", *PRECISIONS), default=None,
                        help="compare these precisions (auto: the server's choice), side by side")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dtypes is not None:
        per_dtype(args)
        return
    if args.against is not None:
        argv = [a for a in sys.argv[1:] if a not in ("--against", str(args.against), "--repeats", str(args.repeats))]
        against(args.against, argv, args.repeats)
        return
    encoder, pixels = setup(args)
    encode = zero_cost() if args.zero_cost else encoder
    result = worker_vs_raw(encode, pixels, args.device, args.batch_size, args.samples, args.repeats, args.jobs)
    if args.json:
        print(json.dumps(result))
        return
    name = "zero-cost encoder" if args.zero_cost else f"encoder {encoder.name} ({args.dtype})"
    print(f"device: {machine(args.device)}; {name} @ {encoder.image_size}px, batch {args.batch_size}, "
          f"{result['samples']} samples in {args.jobs} job(s)")
    print(f"raw encoder: {result['raw_samples_per_s']:9.1f} samples/s")
    print(f"worker:      {result['worker_samples_per_s']:9.1f} samples/s")
    print(f"ratio worker/raw = {result['ratio']:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
