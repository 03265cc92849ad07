"""Replicas sharing a host: certification throughput of ``--processes`` server-like processes certifying at once,
each with torch's default threads (one per core of the host) against each with its share of the cores (what
``FSMLLM_THREADS`` or a container CPU limit gives it, fsmllm/threads.py), side by side in one run.

Each child process loads the encoder, certifies once to warm up, waits for a common start time, then certifies
``--certificates`` times (n0 32, n 96, σ 0.25) and prints its samples/s; the figure is the sum over the processes.

    python benchmarks/replica_threads.py --encoder dinov2-s --dtype bfloat16 --processes 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from common import arguments, setup

from fsmllm.certify import SmoothingConfig, SmoothingRun, run_batched

CONFIG = SmoothingConfig(sigma=0.25, n0=32, n=96, alpha=0.001)


def child(args_json: str) -> None:
    """One process: its threads, warm-up, the common start, then ``certificates`` certifications."""
    options = json.loads(args_json)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    parser = arguments("child")
    encoder, pixels = setup(parser.parse_args(options["argv"]))

    def certify(seed: int) -> None:
        run_batched([SmoothingRun(pixels, CONFIG, seed=seed)], encoder, options["batch_size"])

    certify(0)
    time.sleep(max(0.0, options["start"] - time.time()))
    started = time.perf_counter()
    for seed in range(options["certificates"]):
        certify(seed)
    print(options["certificates"] * (CONFIG.n0 + CONFIG.n) / (time.perf_counter() - started), flush=True)


def together(processes: int, threads: int | None, argv: list[str], batch_size: int, certificates: int) -> float:
    """Summed samples/s of ``processes`` children certifying at once."""
    start = time.time() + 30  # every child has loaded its encoder by then
    options = {"threads": threads, "argv": argv, "batch_size": batch_size, "certificates": certificates, "start": start}
    children = [
        subprocess.Popen([sys.executable, __file__, "--child", json.dumps(options)], stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    rates = [float(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    return sum(rates)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--certificates", type=int, default=6, help="certifications per process (n0 + n = 128)")
    args = parser.parse_args()
    argv = ["--encoder", args.encoder, "--device", args.device, "--batch-size", str(args.batch_size),
            "--dtype", args.dtype] + (["--image-size", str(args.image_size)] if args.image_size else [])
    cores = os.cpu_count() or 1
    share = max(1, cores // args.processes)
    default = together(args.processes, None, argv, args.batch_size, args.certificates)
    shared = together(args.processes, share, argv, args.batch_size, args.certificates)
    print(f"{args.processes} processes on {cores} cores, {args.encoder} ({args.dtype}), batch {args.batch_size}:")
    print(f"  torch's default threads ({torch.get_num_threads()} each): {default:8.1f} samples/s in all")
    print(f"  {share} thread(s) each (FSMLLM_THREADS):       {shared:8.1f} samples/s in all")
    print(f"  ratio = {shared / default:.2f}")


if __name__ == "__main__":
    main()
