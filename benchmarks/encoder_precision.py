"""Raw encoder throughput per dtype, eager and with torch.compile, side by side; and how far batch packing moves a
certificate in each dtype.

* throughput: ``encoder(batch)`` on one noisy batch of ``--batch-size`` copies, every variant (dtype, eager or
  compiled) warmed up once (the compile, for a compiled one), then all called in turn for at least ``--seconds``;
  ratio = samples/s over float32 eager, measured side by side.
* packing: the same certification (seed 0, ``--n0``/``--n``) with encoder batches of each ``--packing`` size; the
  largest difference of the certified score bound p̲ and of the certified FCSB at ``--radius`` from the first
  size's. In float32 the samples are identical and only the encoder's batch-dependent rounding differs
  (docs/method.md, "Reduced precision"). Also the worst per-sample difference D between packings that a
  statement for every packing subtracts: 64 noisy copies encoded in batches of 1 and of each ``--packing`` size,
  the largest ‖f_π(z) − f_1(z)‖ and |⟨f_π(z) − f_1(z), û⟩| (û: the unit mean of the batch-of-1 features).

    python benchmarks/encoder_precision.py --encoder dinov2-s --image-size 112 --compile
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from common import arguments, machine, setup

from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.encoders import VisionEncoder
from fsmllm.encoders.precision import PRECISIONS, compiled, set_precision

Encode = Callable[[torch.Tensor], torch.Tensor]


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def side_by_side(encodes: dict[str, Encode], batch: torch.Tensor, seconds: float) -> dict[str, tuple[float, float]]:
    """Per encoder: (samples/s of ``encode(batch)``, seconds of its first call — the compile, if compiled). After
    one warm-up call each, the calls are interleaved round-robin for at least ``seconds`` in all, so that a
    machine's drifting load hits every one alike; each call is timed on its own (synchronised)."""
    first, busy, calls = {}, dict.fromkeys(encodes, 0.0), dict.fromkeys(encodes, 0)
    with torch.inference_mode():
        for name, encode in encodes.items():
            start = time.perf_counter()
            encode(batch)
            synchronize(batch.device)
            first[name] = time.perf_counter() - start
        began = time.perf_counter()
        while min(calls.values()) < 2 or time.perf_counter() - began < seconds:
            for name, encode in encodes.items():
                start = time.perf_counter()
                encode(batch)
                synchronize(batch.device)
                busy[name] += time.perf_counter() - start
                calls[name] += 1
    return {name: (calls[name] * batch.shape[0] / busy[name], first[name]) for name in encodes}


def throughput(encode: Encode, batch: torch.Tensor, seconds: float) -> float:
    """Samples/s of ``encode(batch)`` over at least ``seconds``, after one warm-up call."""
    return side_by_side({"encoder": encode}, batch, seconds)["encoder"][0]


def noisy_batch(pixels: torch.Tensor, batch_size: int, device: str | torch.device, sigma: float = 0.25) -> torch.Tensor:
    """``batch_size`` copies of ``pixels`` plus N(0, σ²) noise, float32 on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = pixels.to(device)
    return pixels + sigma * torch.randn((batch_size, *pixels.shape), generator=generator, device=device)


def in_precision(encoder: VisionEncoder, precision: str) -> VisionEncoder:
    """A copy of the float32 ``encoder`` in ``precision`` (the original stays float32)."""
    return set_precision(copy.deepcopy(encoder), precision)


def packing_drift(
    encode: Encode, pixels: torch.Tensor, device: str | torch.device, batch_sizes: Sequence[int], n0: int, n: int,
    radius: float = 0.1,
) -> tuple[dict[str, float], torch.Tensor]:
    """Certify ``pixels`` (seed 0, σ = 0.25) once per encoder batch size: the largest differences from the first,
    and the first's smoothed feature F̂."""
    config = SmoothingConfig(0.25, n0=n0, n=n)
    certificates = [
        SmoothedEncoder(encode, batch_size=size, device=device).certify(pixels, config, [radius], seed=0)
        for size in batch_sizes
    ]
    first = certificates[0]
    return per_sample_drift(encode, pixels, device, [1, *batch_sizes]) | {
        "score_lower": first.score_lower,
        "certified_fcsb": first.certified_fcsb[0] or 0.0,
        "max_abs_diff_score_lower": max(abs(c.score_lower - first.score_lower) for c in certificates),
        "max_abs_diff_certified_fcsb": max(abs((c.certified_fcsb[0] or 0.0) - (first.certified_fcsb[0] or 0.0)) for c in certificates),
        "max_abs_diff_feature": max(float((c.smoothed_feature - first.smoothed_feature).abs().max()) for c in certificates),
    }, first.smoothed_feature


def per_sample_drift(
    encode: Encode, pixels: torch.Tensor, device: str | torch.device, batch_sizes: Sequence[int], count: int = 64
) -> dict[str, float]:
    """The worst per-sample difference between packings (docs/method.md, "Reduced precision"): ``count`` noisy
    copies encoded in batches of each size; the largest ‖f_π(z) − f_ref(z)‖ and |⟨f_π(z) − f_ref(z), û⟩| against
    the first size's unit features f_ref, û their unit mean."""
    batch = noisy_batch(pixels, count, device)

    def units(size: int) -> torch.Tensor:
        with torch.no_grad():
            parts = [encode(batch[start : start + size]) for start in range(0, count, size)]
        return torch.cat([F.normalize(part.reshape(part.shape[0], -1).float(), dim=1) for part in parts]).double()

    reference, *others = (units(size) for size in batch_sizes)
    direction = F.normalize(reference.mean(0), dim=0)
    return {
        "max_per_sample_feature_diff": max(float((other - reference).norm(dim=1).max()) for other in others),
        "max_per_sample_cosine_diff": max(float(((other - reference) @ direction).abs().max()) for other in others),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--seconds", type=float, default=5.0, help="time each throughput figure over at least this")
    parser.add_argument("--packing", type=int, nargs="*", default=[32, 7, 100], help="batch sizes compared (none: skip)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.dtype, compile_too, args.compile = "float32", args.compile, False  # --compile: also measure compiled
    encoder, pixels = setup(args)
    batch = noisy_batch(pixels, args.batch_size, args.device)
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, batch {args.batch_size}")
    print(f"{'dtype':>9} {'compiled':>8} {'samples/s':>10} {'vs f32 eager':>12} {'first call s':>12}"
          f" {'Δp̲ packing':>12} {'ΔFCSB packing':>13} {'1 - cos(F̂,F̂32)':>13} {'D: max|Δc|':>11}")
    models = {precision: in_precision(encoder, precision) for precision in args.dtypes}
    variants = {(precision, False): model for precision, model in models.items()}
    if compile_too:
        variants |= {(precision, True): compiled(model) for precision, model in models.items()}
    speeds = side_by_side(variants, batch, args.seconds)  # type: ignore[arg-type]
    base = speeds.get(("float32", False), (None, None))[0]
    rows, features = [], {}
    for (precision, compile_it), (speed, first) in speeds.items():
        row = {"dtype": precision, "compiled": compile_it, "samples_per_s": speed, "first_call_s": first,
               "vs_float32_eager": speed / base if base else None}
        if args.packing and not compile_it:
            drift, features[precision] = packing_drift(models[precision], pixels, args.device, args.packing, args.n0, args.n)
            row |= drift | {"cos_to_float32_feature": cosine(features[precision], features.get("float32", features[precision]))}
        rows.append(row)
        ratio = f"{row['vs_float32_eager']:.3f}" if row["vs_float32_eager"] else "-"
        drift = (f" {row['max_abs_diff_score_lower']:>12.2e} {row['max_abs_diff_certified_fcsb']:>13.2e}"
                 f" {1 - row['cos_to_float32_feature']:>13.2e} {row['max_per_sample_cosine_diff']:>11.2e}"
                 if "max_abs_diff_score_lower" in row else "")
        print(f"{precision:>9} {str(compile_it):>8} {speed:>10.1f} {ratio:>12} {first:>12.2f}{drift}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": machine(args.device), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
