"""What the smoothed feature still says about the image (issue "Certify a feature that still carries the image"):
per σ and booster, the clean agreement ⟨F(x), f(x)⟩ of each held-out photo (f the *base* encoder's clean feature)
and the cosines between different photos' smoothed features, from ``--copies`` noisy copies (the same noise for
every booster, so the numbers are paired).

    python benchmarks/booster_meaning.py                                   # docs/booster-card.md
    python benchmarks/booster_meaning.py --booster none gsb-dinov2-s wavelet nl-means

``--booster`` takes names or folders (``{sigma}`` is replaced by σ), or a classical denoiser as the purifier
(``wavelet``, ``nl-means``: scikit-image's, at the known σ). Prints a table to stderr and JSON to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
import torch

from common import load_encoder, load_image, to_pixels  # sets HF_HUB_OFFLINE
from fsmllm.attacks import smoothed_feature
from fsmllm.booster import load_booster
from fsmllm.certify.meaning import clean_agreement, reference_cosines

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea")
TARGETS = ("astronaut", "coffee", "rocket")  # the "worst photo" is over these


class ClassicalPurifier(torch.nn.Module):
    """A scikit-image denoiser at the known σ in front of the encoder (a baseline purifier, not trained)."""

    def __init__(self, encoder: torch.nn.Module, method: str, sigma: float) -> None:
        super().__init__()
        self.encoder, self.method, self.sigma = encoder, method, sigma

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from skimage.restoration import denoise_nl_means, denoise_wavelet

        out = []
        for image in pixels.permute(0, 2, 3, 1).double().numpy():
            if self.method == "wavelet":
                clean = denoise_wavelet(image, sigma=self.sigma, channel_axis=-1, rescale_sigma=True)
            else:
                clean = denoise_nl_means(image, h=0.8 * self.sigma, sigma=self.sigma, channel_axis=-1, fast_mode=True)
            out.append(torch.from_numpy(np.ascontiguousarray(clean)).float())
        return self.encoder(torch.stack(out).permute(0, 3, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--booster", nargs="+", default=["none", "gsb-dinov2-s"])
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
    pixels = {name: to_pixels(load_image(f"sample:{name}"), 112) for name in PHOTOS}
    with torch.no_grad():
        clean = {name: base(x[None])[0] for name, x in pixels.items()}
    out = {}
    for sigma, booster in itertools.product(args.sigma, args.booster):
        name = booster.format(sigma=sigma)
        if name in ("wavelet", "nl-means"):
            encoder = ClassicalPurifier(base, name, sigma)
        else:
            encoder = load_booster(name, base, sigma=sigma)
        with torch.no_grad():
            smoothed = {p: smoothed_feature(encoder, x, sigma, args.copies, args.seed, args.copies) for p, x in pixels.items()}
        agreement = {p: clean_agreement(smoothed[p], clean[p]) for p in PHOTOS}
        pairs = {f"{a}/{b}": float(reference_cosines(smoothed[a], smoothed[b][None])[0])
                 for a, b in itertools.combinations(PHOTOS, 2)}
        row = {
            "agreement": agreement, "worst_agreement": min(agreement[p] for p in TARGETS),
            "pair_cosines": pairs, "mean_pair_cosine": float(np.mean(list(pairs.values()))),
            "scores": {p: float(smoothed[p].norm()) for p in PHOTOS},
        }
        out[f"{name}@{sigma}"] = row
        print(f"σ {sigma:<5} {name:<24} worst agreement {row['worst_agreement']:.3f}  mean pair cosine "
              f"{row['mean_pair_cosine']:.3f}  agreement " + " ".join(f"{p} {v:.3f}" for p, v in agreement.items()),
              file=sys.stderr, flush=True)
    json.dump({"copies": args.copies, "seed": args.seed, "results": out}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
