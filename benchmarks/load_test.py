"""Load test on loopback: ``--requests`` POST /certify at concurrency ``--concurrency`` against a real server.

Pass criteria: every request answered (zero lost), zero 5xx; 503 (queue full) answers are retried after their
Retry-After and counted. Prints p50 / p99 latency, throughput, and the server's RSS before and after (a leak
shows as growth that does not level off across ``--rounds``).

    python benchmarks/load_test.py --encoder tiny-cnn --requests 200 --concurrency 16
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx
from common import arguments, machine, setup
from concurrent_requests import free_port, png


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, image: bytes, args) -> tuple[list[float], dict[int, int], int]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    retries = 0
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
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

        await asyncio.gather(*(one(i) for i in range(args.requests)))
    return latencies, statuses, retries


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], encoder="tiny-cnn", batch_size=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--n0", type=int, default=32)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--queue-capacity", type=int, default=8, help="small, so that backpressure is exercised")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    encoder, pixels = setup(args)
    image = png(pixels)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fsmllm.cli", "serve", "--model", "none", "--encoder", args.encoder,
               "--port", str(port), "--batch-size", str(args.batch_size), "--device", args.device,
               "--cache-size", "0", "--queue-capacity", str(args.queue_capacity)]
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
            latencies, statuses, retries = asyncio.run(load(url, image, args))
            wall = time.perf_counter() - start
            answered = len(latencies)
            server_errors = sum(count for status, count in statuses.items() if status >= 500 and status != 503)
            ok = statuses.get(200, 0)
            cuts = statistics.quantiles(latencies, n=100)
            print(f"round {round_}: answered {answered}/{args.requests}, 200: {ok}, 5xx (not 503): {server_errors}, "
                  f"503 retried: {retries}; p50 {cuts[49] * 1e3:.0f} ms, p99 {cuts[98] * 1e3:.0f} ms, "
                  f"{answered / wall:.1f} req/s; server RSS {before:.0f} -> {rss_mib(server.pid):.0f} MiB")
            failed |= answered != args.requests or server_errors > 0 or ok != args.requests
        depth = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("fsmllm_queue_depth")]
        print(f"after the load: {depth[0] if depth else 'queue depth metric missing'}")
    finally:
        server.terminate()
        server.wait()
    print("PASS" if not failed else "FAIL")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
