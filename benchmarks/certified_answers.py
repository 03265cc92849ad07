"""Certified accuracy of answers against radius (method.md, "Certified answers") on held-out Fashion-MNIST test images.

    python benchmarks/certified_answers.py --images 10 --n 100 1000 --sigma 0.25 0.5      # docs/benchmarks.md

For each σ and booster, every image's votes are drawn once for the largest n (the reference executor,
``certify_answer``'s chunks and seeds); the certificate at a smaller n is computed from the first n estimation
votes, which are exactly the votes a run with that n draws (same chunk seeds), so the figures at every n are
those of separate runs. An image counts as certified at radius r when its certified answer names the right
item (the evaluation's rule: "A photo of a sneaker." names "a sneaker") and its radius is ≥ r. Prints one table
(certified accuracy at each radius, abstention rate, time per certified answer split into encoder and
generation) and writes the whole result as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from common import machine
from fsmllm.api.schemas import AnswerCertificateOut
from fsmllm.booster import load_booster
from fsmllm.certify.answers import AnswerConfig, AnswerVoting, chunk_seed, vote_chunks
from fsmllm.certify.sampling import SampleRun, run_batched
from fsmllm.encoders import load_encoder
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.data import FASHION_MNIST_PHRASES, QUESTION, grey_to_pixels, load_fashion_mnist
from fsmllm.lm.models import load_model
from fsmllm.lm.training import names

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--images", type=int, default=10, help="held-out Fashion-MNIST test images")
parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="estimation votes (all from one draw)")
parser.add_argument("--n0", type=int, default=32, help="selection votes")
parser.add_argument("--alpha", type=float, default=0.001)
parser.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
parser.add_argument("--booster", nargs="+", default=["none", "gsb-dinov2-s-{sigma}"])
parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
parser.add_argument("--inner", type=int, nargs="+", default=[1], help="noisy copies per vote (radius / sqrt(inner))")
parser.add_argument(
    "--radius", type=float, default=None, help="target radius: stop voting once certified (the anytime vote bound)"
)
parser.add_argument("--max-tokens", type=int, default=12)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"], help="the LM backend (vllm: .venv-vllm)")
parser.add_argument("--out", default=None, help="write the JSON here")
args = parser.parse_args()

options = None
if args.backend == "vllm":  # the small CPU engine settings of docs/models.md ("vLLM on a CPU")
    from fsmllm.lm.vllm_backend import VllmOptions

    options = VllmOptions(dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20, enforce_eager=True)
model = load_model("fsmllm-demo", backend=args.backend, vllm_options=options)
base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
images, labels = load_fashion_mnist("test")
chosen = np.random.default_rng(args.seed).choice(len(images), size=args.images, replace=False)
pixels = grey_to_pixels(images[chosen], base.image_size)
phrases = [FASHION_MNIST_PHRASES[int(k)] for k in labels[chosen]]
greedy = SamplingParams(max_tokens=args.max_tokens)
budget = max(args.n)
result: dict[str, object] = {"machine": machine("cpu"), "args": vars(args), "runs": {}}
print(f"{args.backend} backend on {result['machine']}")
print(f"{'booster':<22} {'σ':>5} {'n':>5} {'k':>2}  " + " ".join(f"r≥{r:<5g}" for r in args.radii) + "  abstain  s/answer (enc+gen)")
for sigma, inner in itertools.product(args.sigma, args.inner):
    for booster in dict.fromkeys(b.format(sigma=sigma) for b in args.booster):
        encoder = load_booster(booster, base, sigma=sigma)
        votes: list[list[str]] = []
        encode_s = generate_s = 0.0
        for index, image in enumerate(pixels):
            answers: list[str] = []
            for chunk, count in enumerate(vote_chunks(args.n0, budget)):
                started = time.perf_counter()
                run = SampleRun(image, sigma, count, chunk_seed(args.seed + index, chunk), inner)
                run_batched([run], encoder, args.batch_size)
                tokens = run.features().reshape(count, base.num_tokens, base.token_dim)
                encode_s += time.perf_counter() - started
                started = time.perf_counter()
                answers += [g.text for g in model.generate_batch(tokens, QUESTION, greedy)]
                generate_s += time.perf_counter() - started
            votes.append(answers)
        for n in sorted(args.n):
            certificates = []
            for index, answers in enumerate(votes):
                voting = AnswerVoting(AnswerConfig(sigma, args.n0, n, args.alpha, inner, args.radius), args.seed + index)
                voting.add(answers[: args.n0 + n])
                certificates.append(voting.certificate())
            right = [names(c.answer, phrase) for c, phrase in zip(certificates, phrases)]
            radii = [c.radius if c.radius is not None else -1.0 for c in certificates]
            accuracy = [float(np.mean([ok and radius >= r for ok, radius in zip(right, radii)])) for r in args.radii]
            abstain = float(np.mean([c.abstain for c in certificates]))
            # time per certified answer at this n: the budget's time scaled to the votes this n uses
            share = (args.n0 + n) / (args.n0 + budget) / len(pixels)
            seconds = ((encode_s + generate_s) * share, encode_s * share, generate_s * share)
            answers = [AnswerCertificateOut.from_certificate(c).model_dump(exclude={"statement"}) for c in certificates]
            result["runs"][f"{booster}@{sigma}/n={n}/inner={inner}"] = {  # type: ignore[index]
                "booster": booster, "sigma": sigma, "n": n, "inner": inner, "radii": args.radii, "certified_accuracy": accuracy,
                "abstain": abstain, "seconds_per_answer": seconds[0], "encoder_seconds": seconds[1],
                "generation_seconds": seconds[2], "answers": answers, "phrases": phrases,
            }
            print(
                f"{booster:<22} {sigma:>5g} {n:>5} {inner:>2}  " + " ".join(f"{a:<7.2f}" for a in accuracy)
                + f"  {abstain:>7.2f}  {seconds[0]:.1f} ({seconds[1]:.1f}+{seconds[2]:.1f})",
                flush=True,
            )
if args.out:
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
