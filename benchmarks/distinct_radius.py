"""The distinct radius (method.md, "What a certificate means") of held-out photos, with and without a booster:
each photo is certified (n0, n, α as the server's defaults) and compared with the smoothed features of the other
photos (the reference set, ``--copies`` noisy copies each).

    python benchmarks/distinct_radius.py --sigma 0.25 --booster none gsb-dinov2-s     # docs/booster-card.md

Prints a line per (σ, booster, photo) to stderr and JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from common import load_encoder, load_image, to_pixels  # sets HF_HUB_OFFLINE
from fsmllm.attacks import smoothed_feature
from fsmllm.booster import load_booster
from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.certify.meaning import distinct_radius, reference_cosines

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.25])
    parser.add_argument("--booster", nargs="+", default=["none", "gsb-dinov2-s"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--radius", type=float, default=0.1, help="radius of the certified FCSB reported beside")
    args = parser.parse_args()
    base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
    pixels = {name: to_pixels(load_image(f"sample:{name}"), 112) for name in PHOTOS}
    out = {}
    for sigma in args.sigma:
        for name in (b.format(sigma=sigma) for b in args.booster):
            encoder = load_booster(name, base, sigma=sigma)
            with torch.no_grad():
                smoothed = {p: smoothed_feature(encoder, x, sigma, args.copies, 1, args.copies) for p, x in pixels.items()}
            rows = {}
            for photo, x in pixels.items():
                cert = SmoothedEncoder(encoder, batch_size=50).certify(
                    x, SmoothingConfig(sigma, n0=100, n=args.n), [args.radius], seed=0
                )
                others = torch.stack([smoothed[p] for p in PHOTOS if p != photo])
                highest = float(reference_cosines(smoothed[photo], others).max())
                radius = distinct_radius(cert.score_lower, sigma, highest)
                rows[photo] = {"score_lower": cert.score_lower, "certified_fcsb": cert.certified_fcsb[0],
                               "highest_reference_cosine": highest, "distinct_radius": radius}
                print(f"σ {sigma} {name:<14} {photo:<10} S̲ {cert.score_lower:.4f}  FCSB@{args.radius} "
                      f"{cert.certified_fcsb[0]}  max ref cos {highest:.3f}  distinct radius {radius:.3f}",
                      file=sys.stderr, flush=True)
            median = statistics.median(r["distinct_radius"] for r in rows.values())
            print(f"σ {sigma} {name}: median distinct radius {median:.3f}", file=sys.stderr, flush=True)
            out[f"{name}@{sigma}"] = {"photos": rows, "median_distinct_radius": median}
    json.dump({"n": args.n, "copies": args.copies, "results": out}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
