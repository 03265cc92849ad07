"""bfloat16 against float32, paired on the same images and the same noise: certificates and answers.

* certificates: DINOv2-S at 112 px, every bundled photo and ``--fmnist`` Fashion-MNIST test images, one
  certification each (σ, n0, n, seed fixed; the float32 noise is the same whatever the encoder's precision) in
  float32 and in bfloat16: p̲ and the certified FCSB at each radius, their paired differences (mean, sd, the paired
  t-test's p-value), and 1 − cos between the two served features F̂.
* answers (``--answers N``): the demo model's answer accuracy from smoothed features on N Fashion-MNIST test images
  (benchmarks/booster_answers.py's measure, the same images and noise draws) with the encoder in float32 and in
  bfloat16, and with both encoder and language model in bfloat16; images gained / lost against float32 (McNemar).
* certified answers (``--certified K``): ``certify_answer`` (n0 32, ``--answer-n`` votes, σ, no booster) of the
  demo model on K Fashion-MNIST test images, with encoder and language model in float32 and in what ``auto``
  chooses on this machine (timed afresh, as ``fsmllm serve`` does), one image at a time alternating, the same seeds
  and so the same noise: seconds per certified answer, the answers, p̲ and radii side by side.

    python benchmarks/precision_pairs.py --fmnist 6 --n 1000 --answers 100
    python benchmarks/precision_pairs.py --images 0 --answers 60      # the answers only
    python benchmarks/precision_pairs.py --images 0 --certified 4     # certified answers only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch
from scipy.stats import binomtest, ttest_rel

from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.encoders import load_encoder
from fsmllm.encoders.precision import precision_of, set_precision
from fsmllm.images import SAMPLE_IMAGES, load_image, to_pixels
from fsmllm.lm.data import grey_to_pixels, load_fashion_mnist
from fsmllm.lm.training import evaluate_projector

PRECISIONS = ("float32", "bfloat16")


def images(size: int, fmnist: int) -> dict[str, torch.Tensor]:
    out = {name: to_pixels(load_image(f"sample:{name}"), size) for name in SAMPLE_IMAGES}
    test, _ = load_fashion_mnist("test")
    chosen = np.random.default_rng(0).choice(len(test), size=fmnist, replace=False)
    for index, pixels in zip(chosen, grey_to_pixels(test[chosen], size)):
        out[f"fmnist-{index}"] = pixels
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    diff = np.asarray(b) - np.asarray(a)
    return {"mean_diff": float(diff.mean()), "sd_diff": float(diff.std(ddof=1)),
            "max_abs_diff": float(np.abs(diff).max()), "p_value": float(ttest_rel(b, a).pvalue)}


def certificates(args: argparse.Namespace) -> dict[str, object]:
    base = load_encoder("dinov2-s", image_size=112)
    encoders = {p: set_precision(copy.deepcopy(base), p) for p in PRECISIONS}
    rows: dict[str, dict[str, object]] = {}
    for name, pixels in list(images(base.image_size, args.fmnist).items())[: args.images]:
        config = SmoothingConfig(args.sigma, n0=args.n0, n=args.n)
        certs = {p: SmoothedEncoder(e, batch_size=32).certify(pixels, config, args.radii, seed=args.seed)
                 for p, e in encoders.items()}
        a, b = certs["float32"], certs["bfloat16"]
        rows[name] = {p: {"score_lower": c.score_lower, "certified_fcsb": list(c.certified_fcsb)}
                      for p, c in certs.items()}
        rows[name]["one_minus_cos_served"] = 1 - float(torch.nn.functional.cosine_similarity(
            a.smoothed_feature.double(), b.smoothed_feature.double(), dim=0))
        print(f"{name:>18}: p̲ float32 {a.score_lower:.5f} bfloat16 {b.score_lower:.5f} "
              f"(Δ {b.score_lower - a.score_lower:+.2e}); FCSB@{args.radii[0]} {a.certified_fcsb[0]} / "
              f"{b.certified_fcsb[0]}; 1 − cos(F̂) {rows[name]['one_minus_cos_served']:.1e}", file=sys.stderr,
              flush=True)
    summary: dict[str, object] = {"score_lower": paired(
        [r["float32"]["score_lower"] for r in rows.values()], [r["bfloat16"]["score_lower"] for r in rows.values()])}
    for i, radius in enumerate(args.radii):
        both = [r for r in rows.values() if None not in (r["float32"]["certified_fcsb"][i],
                                                           r["bfloat16"]["certified_fcsb"][i])]
        if len(both) > 1:
            summary[f"certified_fcsb@{radius}"] = paired([r["float32"]["certified_fcsb"][i] for r in both],
                                                         [r["bfloat16"]["certified_fcsb"][i] for r in both])
    print(f"paired (bfloat16 − float32) over {len(rows)} images: {json.dumps(summary)}", file=sys.stderr)
    return {"images": rows, "paired": summary}


def answers(args: argparse.Namespace) -> dict[str, object]:
    from fsmllm.lm.models import load_model

    base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
    combos = {"float32": ("float32", "float32"), "encoder bfloat16": ("bfloat16", "float32"),
              "encoder and LM bfloat16": ("bfloat16", "bfloat16")}
    out: dict[str, object] = {}
    first = None
    for label, (encoder_dtype, lm_dtype) in combos.items():
        model = load_model("fsmllm-demo", lm_dtype=lm_dtype)
        encoder = set_precision(copy.deepcopy(base), encoder_dtype)
        result = evaluate_projector(model, images=args.answers, sigma=args.sigma, copies=args.copies, encoder=encoder)
        hits = result["hits_smoothed"]
        row: dict[str, object] = {"accuracy_smoothed": result["accuracy_smoothed"], "accuracy_clean": result["accuracy_clean"]}
        if first is None:
            first = hits
        else:
            gained = sum(b and not a for a, b in zip(first, hits))
            lost = sum(a and not b for a, b in zip(first, hits))
            row |= {"gained": gained, "lost": lost,
                    "mcnemar_p": binomtest(gained, gained + lost).pvalue if gained + lost else 1.0}
        out[label] = row
        print(f"{label}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


def certified(args: argparse.Namespace) -> dict[str, object]:
    import os
    import tempfile
    import time

    from fsmllm.certify.answers import AnswerConfig, certify_answer
    from fsmllm.fastest_dtype import encoder_precision
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.data import QUESTION
    from fsmllm.lm.models import load_model

    base = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["FSMLLM_CACHE"] = folder  # a fresh timing, not this machine's cached one
        chosen = {"float32": ("float32", "float32"), "auto": (encoder_precision(base, "auto", "cpu", 32), "auto")}
        setups = {label: (set_precision(copy.deepcopy(base), enc), load_model("fsmllm-demo", lm_dtype=lm))
                  for label, (enc, lm) in chosen.items()}
    test, _ = load_fashion_mnist("test")
    picked = np.random.default_rng(1).choice(len(test), size=args.certified, replace=False)
    config = AnswerConfig(args.sigma, n0=32, n=args.answer_n, alpha=0.001)
    greedy = SamplingParams(max_tokens=12)
    rows: dict[str, dict[str, object]] = {}
    for index, pixels in zip(picked, grey_to_pixels(test[picked], base.image_size)):
        row: dict[str, object] = {}
        for label, (encoder, model) in setups.items():
            def answer(features: torch.Tensor, model=model) -> list[str]:
                tokens = features.reshape(features.shape[0], base.num_tokens, base.token_dim)
                return [g.text for g in model.generate_batch(tokens, QUESTION, greedy)]

            started = time.perf_counter()
            cert = certify_answer(pixels, encoder, answer, config, seed=args.seed + int(index), batch_size=32)
            row[label] = {"seconds": time.perf_counter() - started, "answer": cert.answer, "p_lower": cert.p_lower,
                          "radius": cert.radius, "agree": cert.agree, "n": cert.n,
                          "encoder_dtype": precision_of(encoder),
                          "lm_dtype": model.precision}
        rows[f"fmnist-{index}"] = row
        print(f"fmnist-{index}: {json.dumps(row)}", file=sys.stderr, flush=True)
    seconds = {label: [row[label]["seconds"] for row in rows.values()] for label in setups}  # type: ignore[index]
    resolved = {label: [precision_of(encoder), model.precision] for label, (encoder, model) in setups.items()}
    return {"images": rows, "chosen": resolved,
            "seconds_mean": {label: float(np.mean(s)) for label, s in seconds.items()},
            "auto_over_float32_time": float(np.mean(seconds["auto"]) / np.mean(seconds["float32"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmnist", type=int, default=6, help="Fashion-MNIST test images besides the photos")
    parser.add_argument("--images", type=int, default=None, help="certify only the first N images (0: none)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--answers", type=int, default=0, help="Fashion-MNIST images for the answer accuracy (0: none)")
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--certified", type=int, default=0, help="Fashion-MNIST images for certified answers (0: none)")
    parser.add_argument("--answer-n", type=int, default=100, help="estimation votes of each certified answer")
    args = parser.parse_args()
    out: dict[str, object] = {"certificates": certificates(args)} if args.images != 0 else {}
    if args.answers:
        out["answers"] = answers(args)
    if args.certified:
        out["certified_answers"] = certified(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
