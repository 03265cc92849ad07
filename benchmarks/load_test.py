"""Load test on loopback: ``--requests`` POST /certify at concurrency ``--concurrency`` against a real server.

Pass criteria: every request answered (zero lost), zero 5xx; 503 (queue full) answers are retried after their
Retry-After and counted. Prints p50 / p99 latency, throughput, and the server's RSS before and after (a leak
shows as growth that does not level off across ``--rounds``).

``--abandon F``: that fraction of the clients hang up after a random 20-500 ms (queued, sampling, or about to
be answered); they are counted apart and must leave nothing behind: the queue ends empty and the RSS flat.

    python benchmarks/load_test.py --encoder tiny-cnn --requests 200 --concurrency 16
    python benchmarks/load_test.py --encoder tiny-cnn --requests 200 --concurrency 16 --abandon 0.5 --rounds 4
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time

import httpx
from common import arguments, encoder_options, machine, setup
from concurrent_requests import free_port, png


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, image: bytes, args) -> tuple[list[float], dict[int, int], int, int]:
    """Latencies of the answered requests, status counts, 503 retries, and how many clients hung up."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    retries = abandoned = 0
    gate = asyncio.Semaphore(args.concurrency)
    chance = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal retries
        async with gate:
            start = time.perf_counter()
            while True:
                files = {"image": ("x.png", image, "image/png")}
                data = {"n0": str(args.n0), "n": str(args.n), "seed": str(i), "radius": "0.25"}
                response = await client.post(f"{url}/certify", files=files, data=data)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 503:
                    break
                retries += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=600) as shared:
        async def maybe_abandoned(i: int) -> None:
            nonlocal abandoned
            if chance.random() >= args.abandon:
                return await one(shared, i)
            # a client that hangs up, on a connection of its own: it closes mid-request
            async with httpx.AsyncClient(timeout=600) as own:
                try:
                    await asyncio.wait_for(one(own, i), timeout=chance.uniform(0.02, 0.5))
                except asyncio.TimeoutError:
                    abandoned += 1

        await asyncio.gather(*(maybe_abandoned(i) for i in range(args.requests)))
    return latencies, statuses, retries, abandoned


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], encoder="tiny-cnn", batch_size=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--n0", type=int, default=32)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--queue-capacity", type=int, default=8, help="small, so that backpressure is exercised")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--abandon", type=float, default=0.0, help="fraction of clients that hang up early")
    args = parser.parse_args()
    encoder, pixels = setup(args)
    image = png(pixels)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fsmllm.cli", "serve", "--model", "none", "--encoder", args.encoder,
               "--port", str(port), "--batch-size", str(args.batch_size), "--device", args.device,
               "--cache-size", "0", "--queue-capacity", str(args.queue_capacity), *encoder_options(args)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    failed = False
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
        print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px; "
              f"{args.requests} requests x {args.n0 + args.n} samples at concurrency {args.concurrency}")
        for round_ in range(1, args.rounds + 1):
            before = rss_mib(server.pid)
            start = time.perf_counter()
            latencies, statuses, retries, abandoned = asyncio.run(load(url, image, args))
            wall = time.perf_counter() - start
            answered = len(latencies)
            server_errors = sum(count for status, count in statuses.items() if status >= 500 and status != 503)
            ok = statuses.get(200, 0)
            cuts = statistics.quantiles(latencies, n=100)
            print(f"round {round_}: answered {answered}/{args.requests - abandoned} (+{abandoned} hung up), 200: {ok}, "
                  f"5xx (not 503): {server_errors}, 503 retried: {retries}; p50 {cuts[49] * 1e3:.0f} ms, "
                  f"p99 {cuts[98] * 1e3:.0f} ms, {answered / wall:.1f} req/s; "
                  f"server RSS {before:.0f} -> {rss_mib(server.pid):.0f} MiB")
            expected = args.requests - abandoned
            failed |= answered != expected or server_errors > 0 or ok != expected
        time.sleep(1)  # the last hang-ups reach the server
        depth = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("fsmllm_queue_depth")]
        print(f"after the load: {depth[0] if depth else 'queue depth metric missing'}")
        failed |= not depth or depth[0] != "fsmllm_queue_depth 0.0"
    finally:
        server.terminate()
        server.wait()
    print("PASS" if not failed else "FAIL")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
