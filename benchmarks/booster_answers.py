"""Answer accuracy from smoothed features with and without boosters (held-out Fashion-MNIST test + photos).

    python benchmarks/booster_answers.py --images 200 --copies 32          # docs/booster-card.md
    python benchmarks/booster_answers.py --sigma 0.25 --booster none /tmp/my-booster
    python benchmarks/booster_answers.py --booster none --granularity global token   # docs/benchmarks.md, tokens
    python benchmarks/booster_answers.py --model fsmllm-demo-clean --booster none gsb-dinov2-s   # the frozen model

``--booster`` takes names or folders; ``{sigma}`` in a name is replaced by σ (default: none and the shipped
gsb-dinov2-s-{sigma}). Prints one line per (booster, σ) to stderr and the whole result as JSON to stdout. The
same images and noise draws are used for every booster and granularity, so differences are paired (McNemar
counts printed against the first combination of each σ). ``--granularity token`` feeds the language model the
per-token smoothed features the server serves under granularity "token".
"""

import argparse
import json
import sys

from fsmllm.booster import load_booster
from fsmllm.encoders import load_encoder
from fsmllm.lm.models import load_model
from fsmllm.lm.training import evaluate_projector

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="fsmllm-demo", help="the model whose answers are scored")
parser.add_argument("--images", type=int, default=200)
parser.add_argument("--copies", type=int, default=32)
parser.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
parser.add_argument("--booster", nargs="+", default=["none", "gsb-dinov2-s-{sigma}"])
parser.add_argument("--granularity", nargs="+", default=["global"], choices=["global", "token"])
args = parser.parse_args()

model = load_model(args.model)
base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
out = {}
for sigma in args.sigma:
    first = None
    for name, granularity in ((b.format(sigma=sigma), g) for b in args.booster for g in args.granularity):
        result = evaluate_projector(
            model, images=args.images, sigma=sigma, copies=args.copies, encoder=load_booster(name, base, sigma=sigma), granularity=granularity
        )
        out[f"{name}@{sigma}" + ("" if granularity == "global" else f"/{granularity}")] = result
        photos = sum(p["smoothed_right"] for p in result["photos"].values())
        line = f"{name} ({granularity}) σ={sigma}: clean {result['accuracy_clean']:.3f} smoothed {result['accuracy_smoothed']:.3f} photos {photos}/6"
        if first is None:
            first = result
        else:  # paired comparison with the first booster listed: images it gets right that the first gets wrong, and back
            gained = sum(b and not a for a, b in zip(first["hits_smoothed"], result["hits_smoothed"]))
            lost = sum(a and not b for a, b in zip(first["hits_smoothed"], result["hits_smoothed"]))
            line += f" (vs first: +{gained} / -{lost} images)"
        print(line, file=sys.stderr, flush=True)
print(json.dumps(out, indent=2))
