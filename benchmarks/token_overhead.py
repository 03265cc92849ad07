"""What token-level certificates cost beyond the encoder: the certification's own time per sample, global vs token.

The encoder is replaced by a lookup of precomputed features of DINOv2-S's shape (17 tokens × 384, noisy copies of
one feature), so what is timed is only the smoothing run itself: normalising, projecting, the kept c_i and the
betting bound at every checkpoint (T bounds per checkpoint for token granularity). Compare with the encoder's
own time per sample (DINOv2-S at 112 px: about 36 ms on one core here, benchmarks/confidence_gap.py).

    python benchmarks/token_overhead.py --n 10000
"""

from __future__ import annotations

import argparse
import time

import torch

from fsmllm.certify import SmoothingConfig, SmoothingRun, StopRule, run_batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=17)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(args.tokens, args.width, generator=generator)
    table = base + 0.15 * torch.randn(4096, args.tokens, args.width, generator=generator)
    calls = [0]

    def encode(x: torch.Tensor) -> torch.Tensor:  # a feature per noisy input, cycling through the table
        start = calls[0]
        calls[0] += x.shape[0]
        return table[torch.arange(start, start + x.shape[0]) % len(table)]

    pixels = torch.rand(3, 8, 8, generator=generator)
    print(f"features {args.tokens} x {args.width}, n0 100, n {args.n}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")
    for granularity in ("global", "token"):
        for stop in (None, StopRule(fcsb=0.999, radii=(0.1,))):
            config = SmoothingConfig(sigma=0.25, n0=100, n=args.n, granularity=granularity)
            run = SmoothingRun(pixels, config, seed=0, stop=stop)
            started = time.perf_counter()
            run_batched([run], encode, args.batch_size)
            cert = run.certificate([0.1])
            seconds = time.perf_counter() - started
            per_sample = seconds / (config.n0 + cert.n) * 1e3
            print(f"{granularity:>6} {'stop rule' if stop else 'budget':>9}: {per_sample:.3f} ms per sample "
                  f"({cert.n} estimation samples, score bound {cert.score_lower:.4f}, {cert.stopped_by})")


if __name__ == "__main__":
    main()
