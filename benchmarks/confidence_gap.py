"""What the confidence bound costs: certified vs estimated FCSB at n = 1000 and n = 100000 (same image, same σ).

The estimated FCSB plugs the Monte Carlo score into the formula (the paper's headline number); the certified
FCSB holds with probability >= 1 - α. The gap shrinks as n grows; the ratio certified(n_small) /
certified(n_large) says how much of the certificate a small n gives away.

    python benchmarks/confidence_gap.py --encoder dinov2-s --n 1000 10000
"""

from __future__ import annotations

from common import arguments, machine, setup, timed

from fsmllm.certify import SmoothedEncoder

RADII = [0.1, 0.25, 0.5]


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs=2, default=[1000, 100_000])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    args = parser.parse_args()
    encoder, pixels = setup(args)
    smoothed = SmoothedEncoder(encoder, args.sigma, batch_size=args.batch_size, device=args.device)
    certificates = {}
    for n in args.n:
        seconds = timed(
            lambda n=n: certificates.__setitem__(
                n, smoothed.certify(pixels, n0=100, n=n, alpha=args.alpha, radii=RADII, seed=0)
            ),
            args.device,
        )
        print(f"n = {n}: {seconds:.1f} s")
    print(f"device: {machine(args.device)}; encoder {encoder.name} @ {encoder.image_size}px, σ={args.sigma}, α={args.alpha}")
    small, large = (certificates[n] for n in args.n)
    print(f"score: estimate {large.score_estimate:.4f}; lower bound n={args.n[0]}: {small.score_lower:.4f}, n={args.n[1]}: {large.score_lower:.4f}")
    print("radius  estimated  certified(n=%d)  certified(n=%d)  ratio" % tuple(args.n))
    for i, radius in enumerate(RADII):
        a, b = small.certified_fcsb[i], large.certified_fcsb[i]
        ratio = f"{a / b:.3f}" if a is not None and b else "-"
        show = lambda v: "abstain" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{radius:6.2f}  {large.estimated_fcsb[i]:9.4f}  {show(a):>15}  {show(b):>15}  {ratio}")


if __name__ == "__main__":
    main()
