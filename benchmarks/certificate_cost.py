"""What certificates as evidence cost (issue 30): signing and storing, side by side, and the recorded samples' size.

* Time: a real server in this process (uvicorn on loopback; ``--model none``, the dinov2-s encoder, the server's
  default n0 and n) answers default ``POST /certify`` requests (one image, a fresh seed each) in pairs, in
  alternating order (wall time and this process's CPU time: the machine is shared, so the CPU time is the
  steadier figure): one with the issuer as served (bind: pixel SHA-256; sign: Ed25519 JWS over RFC 8785; commit to
  SQLite, WAL) and one with a pass-through issuer that returns the certificate unchanged. It prints the median
  request time of each, their ratio, and the issuer's own time per certificate (measured around the real issuer's
  ``issue``) against the whole request's.
* Size: the certificate's JSON (as served, compact) at ``--size-n`` (10 000) estimation samples with
  ``record_samples`` and without, from a second server (``--size-encoder``, tiny-cnn by default: for a global
  certificate the record is [n, 1] whatever the encoder, so the size does not depend on it).

    nice -n 10 python benchmarks/certificate_cost.py              # dinov2-s, n0 100, n 1000, 3 pairs
    python benchmarks/certificate_cost.py --encoder tiny-cnn --image-size 16 --pairs 5   # a quick run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from common import machine
from fastapi import FastAPI

from fsmllm.api.app import create_app
from fsmllm.api.metrics import Metrics
from fsmllm.api.serve import build_runtime
from fsmllm.api.settings import Settings
from fsmllm.evidence import Issuance
from fsmllm.images import load_image

IMAGE = "sample:chelsea"


class PassThrough:
    """An issuer that issues nothing: the certificate goes out as computed (no binding, signature or store)."""

    async def issue(self, issuance: Issuance) -> dict[str, Any]:
        return issuance.certificate


class Timed:
    """The real issuer, with the seconds each ``issue`` took (bind, sign, commit)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds: list[float] = []

    async def issue(self, issuance: Issuance) -> dict[str, Any]:
        started = time.perf_counter()
        document = await self.inner.issue(issuance)
        self.seconds.append(time.perf_counter() - started)
        return dict(document)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """The server of ``settings`` on a free loopback port (in a thread of this process), and its app."""
    app = create_app(build_runtime(settings, Metrics()), settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(120)


def png() -> bytes:
    import io

    buffer = io.BytesIO()
    load_image(IMAGE).save(buffer, format="PNG")
    return buffer.getvalue()


def certify(url: str, image: bytes, **fields: Any) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds of one POST /certify (multipart, as curl -F sends it), the CPU seconds this process (server
    and client) spent on it, and its JSON."""
    data = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fields.items()}
    started, cpu = time.perf_counter(), time.process_time()
    response = httpx.post(f"{url}/certify", files={"image": ("image.png", image)}, data=data, timeout=7200)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    response.raise_for_status()
    return seconds, cpu, response.json()


def settings_of(args: argparse.Namespace, encoder: str, image_size: int | None, folder: str) -> Settings:
    return Settings(
        model="none",
        encoder=encoder,
        image_size=image_size,
        dtype=args.dtype,
        device=args.device,
        cert_folder=folder,
        max_n=max(args.size_n + 1000, 100_000),
        _env_file=None,
    )


def time_issuing(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    image = png()
    with serving(settings_of(args, args.encoder, args.image_size, folder)) as (url, app):
        timed, plain = Timed(app.state.issuer), PassThrough()
        app.state.issuer = timed
        certify(url, image, seed=1)  # warm-up: first batch, first commit
        timed.seconds.clear()
        requests: dict[str, list[float]] = {"issued": [], "pass-through": []}
        cpu: dict[str, list[float]] = {"issued": [], "pass-through": []}
        seed = 100
        for pair in range(args.pairs):
            order = ("issued", "pass-through") if pair % 2 == 0 else ("pass-through", "issued")
            for mode in order:
                app.state.issuer = timed if mode == "issued" else plain
                seed += 1
                seconds, spent, body = certify(url, image, seed=seed)
                assert bool(body["certificate"].get("signature")) == (mode == "issued")
                requests[mode].append(seconds)
                cpu[mode].append(spent)
                print(f"  pair {pair + 1} {mode:>12}: {seconds:.3f} s, {spent:.3f} CPU s", flush=True)
        defaults = body["certificate"]
        app.state.issuer = timed.inner  # the app closes its store on shutdown
    issued, passed = statistics.median(requests["issued"]), statistics.median(requests["pass-through"])
    issuing = statistics.median(timed.seconds)
    return {
        "n0": defaults["n0"],
        "n": defaults["n_budget"],
        "encoder": defaults["encoder"],
        "dtype": defaults["encoder_dtype"],
        "issued_s": issued,
        "pass_through_s": passed,
        "ratio": issued / passed,
        "issuer_s": issuing,
        "issuer_max_s": max(timed.seconds),
        "issuer_share": issuing / issued,
        "pairs": args.pairs,
        "issued_cpu_s": statistics.median(cpu["issued"]),
        "pass_through_cpu_s": statistics.median(cpu["pass-through"]),
        "pair_ratios": [a / b for a, b in zip(requests["issued"], requests["pass-through"], strict=True)],
        "spread": (min(min(times) for times in requests.values()), max(max(times) for times in requests.values())),
    }


def sizes(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    image = png()
    settings = settings_of(args, args.size_encoder, args.size_image_size, folder)
    with serving(settings) as (url, _):
        fields = {"seed": 7, "n": args.size_n, "radius": 0.25}
        *_, plain = certify(url, image, **fields)
        *_, recorded = certify(url, image, **fields, record_samples=True)
    without = len(json.dumps(plain["certificate"], separators=(",", ":")).encode())
    with_samples = len(json.dumps(recorded["certificate"], separators=(",", ":")).encode())
    record = recorded["certificate"]["samples"]
    return {
        "n": args.size_n,
        "encoder": args.size_encoder,
        "without": without,
        "with": with_samples,
        "added": with_samples - without,
        "record_data": len(record["data"]),
        "encoding": record["encoding"],
        "shape": record["shape"],
        "float64_data": 4 * ((8 * args.size_n + 2) // 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="dinov2-s", help="the timed server's encoder")
    parser.add_argument("--image-size", type=int, default=None, help="its input size (default: the encoder's)")
    parser.add_argument("--dtype", default="float32", help="the encoder's precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of requests (issued, pass-through)")
    parser.add_argument("--size-encoder", default="tiny-cnn", help="the encoder of the size measurement")
    parser.add_argument("--size-image-size", type=int, default=16)
    parser.add_argument("--size-n", type=int, default=10_000, help="estimation samples of the size measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsmllm-cost-") as folder:
        print(f"machine: {machine(args.device)}", flush=True)
        cost = time_issuing(args, f"{folder}/time")
        size = sizes(args, f"{folder}/size")
    print(f"\n/certify defaults (n0 {cost['n0']}, n {cost['n']}), {cost['encoder']} {cost['dtype']} on {args.device}, "
          f"{cost['pairs']} pairs, medians:")
    print(f"  signed and stored      {cost['issued_s']:.3f} s")
    print(f"  pass-through issuer    {cost['pass_through_s']:.3f} s")
    print(f"  ratio                  {cost['ratio']:.4f}  ({100 * (cost['ratio'] - 1):+.2f} %)")
    cpu_ratio = cost["issued_cpu_s"] / cost["pass_through_cpu_s"]
    print(f"  CPU seconds (process)  {cost['issued_cpu_s']:.3f} signed and stored, {cost['pass_through_cpu_s']:.3f} "
          f"pass-through: ratio {cpu_ratio:.4f} ({100 * (cpu_ratio - 1):+.2f} %)")
    print(f"  ratio of each pair     {', '.join(f'{ratio:.3f}' for ratio in cost['pair_ratios'])}; requests took "
          f"{cost['spread'][0]:.2f} to {cost['spread'][1]:.2f} s (the machine's noise)")
    print(f"  issuer's own time      {1e3 * cost['issuer_s']:.2f} ms per certificate (max {1e3 * cost['issuer_max_s']:.2f}"
          f" ms) = {100 * cost['issuer_share']:.3f} % of the request")
    print(f"\ncertificate size at n = {size['n']} ({size['encoder']}, global, compact JSON):")
    print(f"  without record_samples {size['without']:,} bytes")
    print(f"  with record_samples    {size['with']:,} bytes ({size['encoding']}, shape {size['shape']})")
    print(f"  added                  {size['added']:,} bytes ({size['added'] / 1000:.1f} KB); ratio "
          f"{size['with'] / size['without']:.1f}x; float64 would add about {size['float64_data']:,} bytes of base64")


if __name__ == "__main__":
    main()
