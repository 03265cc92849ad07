"""8 concurrent POST /certify through a real server vs the same work as one batched run vs a sequential loop.

* server: ``fsmllm serve --model none`` in a subprocess on loopback; ``--requests`` concurrent /certify
  requests (each n0 + n samples, distinct seeds), wall time until the last answer.
* one batch: the same ``--requests`` smoothing runs packed together in this process
  (:func:`fsmllm.certify.run_batched`), no HTTP: the ideal the worker's continuous batching aims at
  (target ratio >= 0.9).
* sequential: each request certified on its own, one after the other, as a server without a shared worker
  would; once with the same batch size and once one sample per encoder call (the naive loop; target >= 3x).

    python benchmarks/concurrent_requests.py --encoder dinov2-s --n0 32 --n 224
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import torch
from common import arguments, encoder_options, machine, setup, timed
from PIL import Image

from fsmllm.certify import SmoothingConfig, SmoothingRun, run_batched


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(pixels) -> bytes:  # the encoder-sized image: the server's resize is then the identity
    array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


async def concurrent(url: str, image: bytes, args) -> None:
    async with httpx.AsyncClient(timeout=3600) as client:
        async def one(seed: int) -> None:
            files = {"image": ("x.png", image, "image/png")}
            data = {"n0": str(args.n0), "n": str(args.n), "seed": str(seed), "radius": "0.25"}
            response = await client.post(f"{url}/certify", files=files, data=data)
            response.raise_for_status()

        await asyncio.gather(*(one(seed) for seed in range(args.requests)))


def batched_vs_loop(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, config: SmoothingConfig, requests: int,
    batch_size: int, device: str,
) -> tuple[float, float]:
    """Seconds to certify ``requests`` runs (seeds 0, 1, ...) packed into shared batches, and one after the other
    each in its own batches of the same size."""
    runs = lambda: [SmoothingRun(pixels.to(device), config, seed) for seed in range(requests)]  # noqa: E731
    one_batch_s = timed(lambda: run_batched(runs(), encode, batch_size), device)
    sequential_s = timed(lambda: [run_batched([run], encode, batch_size) for run in runs()], device)
    return one_batch_s, sequential_s


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--n0", type=int, default=32)
    parser.add_argument("--n", type=int, default=224)
    parser.add_argument("--skip-naive", action="store_true", help="skip the one-sample-per-call loop")
    args = parser.parse_args()
    encoder, pixels = setup(args)
    image = png(pixels)
    config = SmoothingConfig(sigma=0.25, n0=args.n0, n=args.n, alpha=0.001)
    runs = lambda: [SmoothingRun(pixels.to(args.device), config, seed) for seed in range(args.requests)]  # noqa: E731

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fsmllm.cli", "serve", "--model", "none", "--encoder", args.encoder,
               "--port", str(port), "--batch-size", str(args.batch_size), "--device", args.device,
               "--cache-size", "0", "--default-n0", str(args.n0), "--default-n", str(args.n),
               "--max-n", str(args.n0 + args.n), *encoder_options(args)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        asyncio.run(concurrent(url, image, args))  # warm-up
        server_s = timed(lambda: asyncio.run(concurrent(url, image, args)), args.device)
    finally:
        server.terminate()
        server.wait()

    one_batch_s, sequential_s = batched_vs_loop(encoder, pixels, config, args.requests, args.batch_size, args.device)
    samples = args.requests * (args.n0 + args.n)
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, batch {args.batch_size}")
    print(f"{args.requests} requests x {args.n0 + args.n} samples = {samples} samples")
    print(f"server, concurrent:        {server_s:8.2f} s  {samples / server_s:9.1f} samples/s")
    print(f"one batched run:           {one_batch_s:8.2f} s  {samples / one_batch_s:9.1f} samples/s")
    print(f"sequential, batch {args.batch_size:<4}:    {sequential_s:8.2f} s  {samples / sequential_s:9.1f} samples/s")
    print(f"ratio server / one batch          = {one_batch_s / server_s:.3f}  (target >= 0.9)")
    print(f"speed-up server vs sequential (batched) = {sequential_s / server_s:.2f}x")
    if not args.skip_naive:
        naive_s = timed(lambda: [run_batched([run], encoder, 1) for run in runs()], args.device)
        print(f"sequential, 1 per call:    {naive_s:8.2f} s  {samples / naive_s:9.1f} samples/s")
        print(f"speed-up server vs sequential (1 sample per call) = {naive_s / server_s:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
