"""``fsmllm certify IMAGE``: the certificate of one image, as a table or as the server's JSON."""

from __future__ import annotations

import argparse
import json

from fsmllm.api.schemas import CertificateOut, CertifyParams, PredictionOut
from fsmllm.cli.common import HelpFormatter, boosted_encoder, server_default, validated
from fsmllm.cli.smoothing import add_smoothing_arguments, recorded, smooth
from fsmllm.cli.tables import certificate_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certify",
        help="certify how far an l2 perturbation can move an image's smoothed features",
        description=(
            "Estimate the smoothed encoder at IMAGE by Monte Carlo and print the certified feature cosine "
            "similarity bound (FCSB) at each radius. Radii and sigma are l2 norms over the encoder's input "
            "pixels in [0, 1] (3 x S x S values after resizing to the encoder's input size S). The options are "
            "the fields of the server's POST /certify, with the same defaults; --json prints its certificate."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", help="an image file, or sample:NAME for a bundled photo (sample:chelsea is a cat)")
    parser.add_argument("--encoder", default="dinov2-s", help="encoder name (see --list-encoders) or hf:/path")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size S (default: the encoder's)")
    parser.add_argument(
        "--target-cos",
        type=float,
        default=None,
        metavar="C",
        help="also print the largest radius whose certified FCSB is >= C (certified_radius; default: none)",
    )
    parser.add_argument(
        "--radius-tolerance",
        type=float,
        default=None,
        metavar="DELTA",
        help="with --target-cos: stop sampling once more samples could not raise the certified radius by more than "
        "DELTA; --n is the budget (default: never)",
    )
    parser.add_argument(
        "--booster",
        default=server_default("booster"),
        help="Gaussian Smoothness Booster: a shipped name, a folder, or none",
    )
    parser.add_argument("--classify", action="store_true", help="also certify the encoder's cosine classifier")
    add_smoothing_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fsmllm.encoders import load_classifier

    params = validated(CertifyParams, args)
    encoder = boosted_encoder(args, args.encoder, args.image_size)
    classifier = load_classifier(args.encoder) if args.classify else None
    cert = smooth(args, params, encoder, classifier)
    out = CertificateOut.from_certificate(
        cert, encoder.name, args.booster, encoder.image_size, args.target_cos, args.per_token, encoder_dtype=args.dtype
    )
    out.samples = recorded(args, cert)
    if args.json:
        summary = out.model_dump()
        if cert.prediction is not None:  # --classify: the prediction's own certificate beside the feature's
            summary["prediction"] = PredictionOut.of(cert.prediction).model_dump()
        print(json.dumps(summary, indent=2))
    else:
        print(certificate_table(cert, out, args.per_token))
        if out.samples is not None:
            print(f"samples recorded: shape {out.samples.shape} (printed with --json)")
    return 0
