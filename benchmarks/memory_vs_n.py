"""Peak memory of one certification against n (must be flat: the estimator keeps running sums only).

Each n runs in a fresh subprocess; the figure is the growth of the peak resident set (``ru_maxrss``) over the
certification, on CPU, or ``torch.cuda.max_memory_allocated`` on CUDA. Ratio = peak growth at the largest n over
the smallest.

    python benchmarks/memory_vs_n.py --encoder tiny-vit --n 1000 100000 400000
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from common import arguments, encoder_options, machine


def child(args) -> None:
    import torch
    from common import setup

    from fsmllm.certify import SmoothedEncoder, SmoothingConfig

    encoder, pixels = setup(args)
    smoothed = SmoothedEncoder(encoder, batch_size=args.batch_size, device=args.device)
    smoothed.certify(pixels, SmoothingConfig(0.25, n0=args.batch_size, n=args.batch_size), [0.25], seed=0)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    smoothed.certify(pixels, SmoothingConfig(0.25, n0=100, n=args.child), [0.25], seed=1)
    if args.device.startswith("cuda"):
        growth = torch.cuda.max_memory_allocated() / 2**20
    else:
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"n": args.child, "peak_growth_mib": growth}))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], encoder="tiny-vit", batch_size=256)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 100_000, 400_000])
    parser.add_argument("--child", type=int, help=argparse_hidden)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    results = []
    for n in args.n:
        command = [sys.executable, __file__, "--encoder", args.encoder, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--child", str(n), *encoder_options(args)]
        if args.image_size:
            command += ["--image-size", str(args.image_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(f"device: {machine(args.device)}; encoder {args.encoder}, batch {args.batch_size}")
    for row in results:
        print(f"n = {row['n']:>8}: peak growth {row['peak_growth_mib']:8.1f} MiB")
    low, high = results[0]["peak_growth_mib"], results[-1]["peak_growth_mib"]
    print(f"peak growth at n={results[-1]['n']} minus at n={results[0]['n']}: {high - low:+.1f} MiB (flat: about 0)")


argparse_hidden = "internal: run one measurement with this n"

if __name__ == "__main__":
    main()
