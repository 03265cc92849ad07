"""What the confidence bound costs: score gap and certified FCSB per bound method and n, on the same samples.

One certification per n (same image, σ, seed: the samples of a smaller n are a prefix of a larger n's), with the
default bound; the other bounds are computed from the same projections c_i (``SmoothingRun.projections``), so
the methods are compared side by side on identical samples. Also: the limit that no valid bound can beat when all
samples sit at the mean, S − (1 + S)(1 − α^{1/n}); the paper's own score Ŝ = E[(1 + cos(f(x+δ), f(x)))/2]
(relative to the clean feature) beside ours; and what the betting bound costs per sample next to the encoder.

    python benchmarks/confidence_gap.py --encoder dinov2-s --image-size 112 --n 100 300 1000 10000
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from common import arguments, machine, setup, timed

from fsmllm.certify import BOUND_METHODS, SmoothingConfig, SmoothingRun, fcsb, lower_bound, run_batched

RADII = [0.1, 0.25, 0.5]


def show(value: float) -> str:
    return "abstain" if not np.isfinite(value) or value <= 0 else f"{value:.3f}"


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000, 10_000])
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    encoder, pixels = setup(args)
    pixels = pixels.to(args.device)
    with torch.inference_mode():
        clean = encoder(pixels[None])[0]
    rows = []
    encoder_seconds = 0.0
    for n in args.n:
        config = SmoothingConfig(sigma=args.sigma, n0=args.n0, n=n, alpha=args.alpha)
        run = SmoothingRun(pixels, config, seed=args.seed, reference=clean)
        encoder_seconds += timed(lambda run=run: run_batched([run], encoder, args.batch_size), args.device)
        cert = run.certificate(RADII)
        c = run.projections
        row = {"n": n, "estimate": cert.score_estimate, "mean_c": float(c.mean()), "sd_c": float(c.std()),
               "paper_score": cert.clean_score, "limit_gap": float((1 + c.mean()) * (1 - args.alpha ** (1 / n)))}
        for method in BOUND_METHODS:
            started = time.perf_counter()
            lower = lower_bound(c, args.alpha, method, horizon=n)
            elapsed = time.perf_counter() - started
            if method == config.bound:
                assert abs(lower - cert.score_lower) < 1e-12, "the run's certificate and the recomputed bound differ"
            row[method] = {
                "score_lower": lower,
                "gap": cert.score_estimate - lower,
                "certified_fcsb": [float(fcsb(max(lower, 0.0), args.sigma, r)) if lower > 0 else float("nan") for r in RADII],
                "seconds": elapsed,
            }
        rows.append(row)
    total_samples = sum(args.n) + args.n0 * len(args.n)
    per_sample = encoder_seconds / total_samples
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, sample:chelsea, "
          f"σ={args.sigma}, n0={args.n0}, α={args.alpha}, seed {args.seed}")
    print(f"encoder: {per_sample * 1e3:.2f} ms per sample (whole run, incl. noise and bookkeeping)")
    header = f"{'n':>6} {'bound':>20} {'S_lower':>8} {'gap':>7} " + " ".join(f"{'ε=' + str(r):>7}" for r in RADII)
    for row in rows:
        print(f"\nn = {row['n']}: estimate S {row['estimate']:.4f} (mean c {row['mean_c']:.4f}, sd {row['sd_c']:.4f}); "
              f"paper's Ŝ {row['paper_score']:.4f}; limit gap {row['limit_gap']:.4f}")
        print(header)
        for method in BOUND_METHODS:
            r = row[method]
            print(f"{row['n']:>6} {method:>20} {r['score_lower']:8.4f} {r['gap']:7.4f} "
                  + " ".join(f"{show(v):>7}" for v in r["certified_fcsb"])
                  + f"   bound {r['seconds'] * 1e3:.2f} ms = {r['seconds'] / (row['n'] * per_sample):.1e} of the encoder's time for those samples")
        print(f"{row['n']:>6} {'estimated FCSB':>20} {'':8} {'':7} "
              + " ".join(f"{float(fcsb(row['estimate'], args.sigma, r)):7.3f}" for r in RADII))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": machine(args.device), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
