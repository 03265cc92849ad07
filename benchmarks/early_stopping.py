"""What early stopping saves: estimation samples used by `--stop-at-fcsb C --radius R --n BUDGET` per bundled photo.

Each photo is certified once with the betting bound and the stop rule (sampling ends as soon as the certified FCSB
is >= C at R, or once it clearly cannot get there), and once at the full budget for comparison (same seed, so the
stopped run's samples are a prefix of the full run's). Prints the samples used, why sampling stopped, the
certificate at the stop and at the budget, the time each took, and the median over the photos.

    python benchmarks/early_stopping.py --encoder dinov2-s --image-size 112 --stop-at-fcsb 0.8 --radius 0.1 --n 10000
"""

from __future__ import annotations

import json
import statistics

from common import arguments, machine, setup, timed

from fsmllm.certify import SmoothedEncoder, SmoothingConfig, StopRule
from fsmllm.images import SAMPLE_IMAGES, load_image, to_pixels


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--stop-at-fcsb", type=float, default=0.8)
    parser.add_argument("--radius", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=10_000, help="the budget of estimation samples")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--full", action="store_true", help="also certify each photo at the whole budget")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    encoder = setup(args)[0]
    smoothed = SmoothedEncoder(encoder, batch_size=args.batch_size, device=args.device)
    rule = StopRule(fcsb=args.stop_at_fcsb, radii=(args.radius,))
    config = SmoothingConfig(args.sigma, n0=args.n0, n=args.n, alpha=args.alpha)
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, σ={args.sigma}, "
          f"n0={args.n0}, budget n={args.n}, α={args.alpha}; stop at certified FCSB ≥ {args.stop_at_fcsb} at ε={args.radius}")
    print(f"{'photo':>18} {'n used':>7} {'stopped by':>19} {'certified':>9} {'seconds':>8}"
          + (f" {'at budget':>9} {'seconds':>8}" if args.full else ""))
    rows = []
    for name in SAMPLE_IMAGES:
        pixels = to_pixels(load_image(f"sample:{name}"), encoder.image_size)
        result: dict = {}
        common = dict(config=config, radii=[args.radius], seed=0)
        seconds = timed(lambda: result.__setitem__("stopped", smoothed.certify(pixels, stop=rule, **common)), args.device)
        cert = result["stopped"]
        row = {"photo": name, "n": cert.n, "stopped_by": cert.stopped_by, "certified_fcsb": cert.certified_fcsb[0],
               "seconds": seconds}
        line = f"{name:>18} {cert.n:>7} {cert.stopped_by:>19} {cert.certified_fcsb[0] or 0:>9.4f} {seconds:>8.2f}"
        if args.full:
            full_seconds = timed(lambda: result.__setitem__("full", smoothed.certify(pixels, **common)), args.device)
            row |= {"full_certified_fcsb": result["full"].certified_fcsb[0], "full_seconds": full_seconds}
            line += f" {result['full'].certified_fcsb[0] or 0:>9.4f} {full_seconds:>8.2f}"
        rows.append(row)
        print(line)
    used = [row["n"] for row in rows]
    reached = [row for row in rows if row["stopped_by"] == "target_reached"]
    print(f"median estimation samples used: {statistics.median(used):g} of {args.n} "
          f"({len(reached)}/{len(rows)} reached the target; every one of them certified ≥ {args.stop_at_fcsb}: "
          f"{all((row['certified_fcsb'] or 0) >= args.stop_at_fcsb for row in reached)})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": machine(args.device), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
