"""Answer accuracy from smoothed features with and without the shipped boosters (held-out Fashion-MNIST test + photos).

    python benchmarks/booster_answers.py IMAGES COPIES     # docs/booster-card.md: 40 32
"""
import json, sys
from fsmllm.booster import load_booster
from fsmllm.encoders import load_encoder
from fsmllm.lm.models import load_model
from fsmllm.lm.training import evaluate_projector

model = load_model("fsmllm-demo")
base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
out = {}
for sigma in (0.25, 0.5):
    for name in ("none", f"gsb-dinov2-s-{sigma}"):
        encoder = load_booster(name, base)
        result = evaluate_projector(model, images=int(sys.argv[1]), sigma=sigma, copies=int(sys.argv[2]), encoder=encoder)
        out[f"{name}@{sigma}"] = result
        print(name, sigma, result["accuracy_clean"], result["accuracy_smoothed"], file=sys.stderr, flush=True)
print(json.dumps(out, indent=2))
