"""The Monte Carlo options ``certify`` and ``generate`` share (the server's request fields, with its defaults),
and the certification they run."""

from __future__ import annotations

import argparse
import sys

from fsmllm.api.schemas import CertificationParams, SamplesRecord
from fsmllm.certify import (
    BOUND_METHODS,
    DEFAULT_RADII,
    GRANULARITIES,
    Certificate,
    CosineClassifier,
    SmoothedEncoder,
    SmoothingConfig,
    StopRule,
)
from fsmllm.cli.common import ListEncoders, request_default, server_default
from fsmllm.encoders.base import VisionEncoder
from fsmllm.fastest_dtype import DTYPE_CHOICES


def add_smoothing_arguments(parser: argparse.ArgumentParser) -> None:
    """The Monte Carlo and output options shared by ``certify`` and ``generate``: the server's request fields,
    with the server's defaults."""
    parser.add_argument(
        "--sigma", type=float, default=server_default("default_sigma"), help="noise level σ (l2 per pixel value)"
    )
    parser.add_argument("--radius", type=float, nargs="+", default=list(DEFAULT_RADII), help="l2 radii ε to certify")
    parser.add_argument(
        "--n0", type=int, default=server_default("default_n0"), help="selection samples (fix the direction)"
    )
    parser.add_argument(
        "--n", type=int, default=server_default("default_n"), help="estimation samples (bound the score)"
    )
    parser.add_argument(
        "--alpha", type=float, default=server_default("default_alpha"), help="failure probability of the certificate"
    )
    parser.add_argument(
        "--bound",
        choices=BOUND_METHODS,
        default=request_default(CertificationParams, "bound"),
        help="confidence bound on the score (betting: anytime-valid, follows the variance)",
    )
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=request_default(CertificationParams, "granularity"),
        help="global: one certificate for the whole feature; token: every visual token on its own",
    )
    parser.add_argument("--per-token", action="store_true", help="with --granularity token: print every token's values")
    parser.add_argument(
        "--stop-at-fcsb",
        type=float,
        default=None,
        metavar="C",
        help="stop sampling once the certified FCSB is >= C at every radius (or clearly cannot be); --n is the budget "
        "(default: never)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=server_default("batch_size"), help="noisy images per encoder batch"
    )
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    parser.add_argument("--device", default=server_default("device"), help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=server_default("dtype"),
        help="the encoder's precision; the certificate is for the encoder as computed in it (auto: the fastest "
        "this machine runs natively, timed once and cached)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (compiling takes a while)")
    parser.add_argument(
        "--record-samples",
        action="store_true",
        help="put the values the bound is computed from (the c_i) into the JSON certificate, as the server's "
        "record_samples does (here unsigned: the command line issues no certificate)",
    )
    parser.add_argument("--json", action="store_true", help="print the certificate as JSON (the server's shape)")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (sampling and weight loading)"
    )
    parser.add_argument("--list-encoders", action=ListEncoders)


def recorded(args: argparse.Namespace, cert: Certificate) -> SamplesRecord | None:
    """With ``--record-samples``, the certificate's samples record (the server's ``samples`` field)."""
    if not args.record_samples or cert.samples is None:
        return None
    from fsmllm.evidence.issue import samples_record

    return SamplesRecord.model_validate(samples_record(cert.samples))


def smooth(
    args: argparse.Namespace,
    params: CertificationParams,
    encoder: VisionEncoder,
    classifier: CosineClassifier | None = None,
) -> Certificate:
    """Certify ``args.image`` with ``encoder`` under the validated ``params``, with a progress bar on stderr."""
    from tqdm import tqdm

    from fsmllm.images import load_image, to_pixels

    config = SmoothingConfig(args.sigma, args.n0, args.n, args.alpha, args.bound, args.granularity)
    radii = params.radii()
    stop = StopRule.requested(
        config,
        radii,
        params.stop_at_fcsb,
        getattr(params, "target_cos", None),
        getattr(params, "radius_tolerance", None),
    )
    pixels = to_pixels(load_image(args.image, server_default("max_image_pixels")), encoder.image_size)
    smoother = SmoothedEncoder(encoder, batch_size=args.batch_size, device=args.device)
    with tqdm(total=args.n0 + args.n, unit="sample", desc="sampling", disable=args.no_progress, file=sys.stderr) as bar:
        return smoother.certify(
            pixels, config, radii, seed=args.seed, classifier=classifier, stop=stop, progress=bar.update
        )
