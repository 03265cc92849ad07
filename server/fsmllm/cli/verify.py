"""``fsmllm verify CERT.json [--image FILE] [--keys FILE|URL] [--recompute]``: check a signed certificate.

Checks, in order, each with its own exit status (:class:`fsmllm_client.verify.Failure`): the signature (by a key of
the key set: a JWKS file or URL, by default this machine's keys), the image's bytes and the pixels the encoder
read from it, the recorded samples, the bound recomputed from them bit for bit (:mod:`fsmllm.certify.replay`), and
the certified FCSB at every radius recomputed from that bound (from the certified bound when no samples were
recorded). With --recompute (needs --image): the encoder's and booster's weight files here against the certified
SHA-256, then the sampling re-run with the certificate's seed and every statistic compared
(:mod:`fsmllm.evidence.recompute`: bit for bit, or within --tolerance; only on the certificate's device type, whose
generators drew its noise).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fsmllm.certify import Certificate
from fsmllm.certify.answers import answer_radius
from fsmllm.certify.certificate import certified_fcsb, optional_floats
from fsmllm.certify.replay import answer_p_lower, score_lower
from fsmllm.cli.common import HelpFormatter
from fsmllm.evidence import cert_folder
from fsmllm.evidence.binding import pixels_sha256
from fsmllm.evidence.recompute import Setting, check_recompute, check_weights
from fsmllm.images import open_image, to_pixels
from fsmllm_client.verify import Check, Failure, load_key_set, read_document, report, verify


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a signed certificate: signature, image, recorded samples, bound",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("certificate", help="JSON file: a certificate, or a response holding one")
    parser.add_argument(
        "--image", default=None, help="the image it was issued for (checks bytes, pixels; default: none)"
    )
    parser.add_argument(
        "--keys",
        default=None,
        help="JWKS file or URL (.../v1/certificates/keys); default: the keys fsmllm serve signs with on this "
        "machine (FSMLLM_CERT_FOLDER, else <cache>/certificates)",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="also re-run the sampling with the certificate's seed on the weights here (checked by SHA-256) and "
        "compare every statistic; needs --image",
    )
    parser.add_argument(
        "--device", default=None, help="--recompute's torch device (default: the certificate's if here, else cpu)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="--recompute's noisy images per encoder batch")
    parser.add_argument(
        "--encoder",
        default=None,
        help="--recompute's encoder here: a name, or the folder of an hf: vision tower or LLaVA checkpoint (the "
        "certificate names only the folder's last part); default: the certificate's encoder",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="--recompute's largest absolute difference allowed (default 0: bit for bit, as on the certificate's "
        "device type with the same software; another device type draws other noise and is not compared)",
    )
    parser.set_defaults(handler=run)


def replay(certificate: dict[str, Any], values: list[float]) -> list[Check]:
    """The bound from the recorded c_i, then the FCSB at each radius from the bound: both exactly as served (for a
    certified answer, p_lower from its votes and the radius from p_lower: :func:`replay_answer`)."""
    if is_answer(certificate):
        return replay_answer(certificate, values)
    shape = certificate["samples"]["shape"]
    samples = np.asarray(values, dtype=np.float64).reshape(shape)
    tokens = 1 if samples.ndim == 1 else samples.shape[1]
    try:
        lowers = score_lower(
            samples,
            certificate["alpha"] / tokens,
            certificate["bound"],
            certificate["n_budget"],
            certificate["stop"] is not None,
        )
    except ValueError as error:
        return [Check("bound", False, str(error), Failure.SAMPLES)]
    lower = float(lowers.min())
    if lower != certificate["score_lower"]:
        return [
            Check("bound", False, f"recomputed {lower!r}, certified {certificate['score_lower']!r}", Failure.SAMPLES)
        ]
    radii = np.asarray([entry["radius"] for entry in certificate["radii"]], dtype=np.float64)
    recomputed = optional_floats(certified_fcsb(lower, certificate["sigma"], radii))
    served = tuple(entry["certified_fcsb"] for entry in certificate["radii"])
    if recomputed != served:
        return [
            Check("bound", True, f"score_lower {lower!r}"),
            Check("fcsb", False, f"{recomputed} != {served}", Failure.FCSB),
        ]
    return [Check("bound", True, f"score_lower {lower!r}, bit for bit"), Check("fcsb", True, _radii(len(radii)))]


def is_answer(certificate: dict[str, Any]) -> bool:
    """A certified answer's certificate (``p_lower`` and a radius) rather than a feature certificate."""
    return "p_lower" in certificate


def replay_answer(certificate: dict[str, Any], values: list[float]) -> list[Check]:
    """A certified answer's p_lower from its recorded votes (±1), bit for bit, then its radius from p_lower."""
    try:
        lower = answer_p_lower(
            np.asarray(values, dtype=np.float64),
            certificate["alpha"],
            certificate["n_budget"],
            certificate["target_radius"] is not None,
        )
    except ValueError as error:
        return [Check("bound", False, str(error), Failure.SAMPLES)]
    agree = sum(value > 0 for value in values)
    if (lower, agree, len(values)) != (certificate["p_lower"], certificate["agree"], certificate["n"]):
        found = f"p_lower {lower!r} from {agree} of {len(values)} votes"
        certified = f"{certificate['p_lower']!r} from {certificate['agree']} of {certificate['n']}"
        return [Check("bound", False, f"recomputed {found}, certified {certified}", Failure.SAMPLES)]
    return [
        Check("bound", True, f"p_lower {lower!r} from {agree} of {len(values)} votes, bit for bit"),
        radius_from_bound(certificate),
    ]


def radius_from_bound(certificate: dict[str, Any]) -> Check:
    """A certified answer's radius from its certified ``p_lower``: σ/√inner · Φ⁻¹(p_lower), none at p_lower ≤ ½."""
    radius = answer_radius(certificate["p_lower"], certificate["sigma"], certificate["inner"])
    if radius != certificate["radius"]:
        return Check("radius", False, f"from p_lower: {radius!r} != {certificate['radius']!r}", Failure.FCSB)
    return Check("radius", True, "abstains, as p_lower ≤ 1/2" if radius is None else f"{radius!r}, from p_lower")


def fcsb_from_bound(certificate: dict[str, Any]) -> Check:
    """The certified FCSB at every radius from the certified ``score_lower`` (no samples recorded)."""
    radii = np.asarray([entry["radius"] for entry in certificate["radii"]], dtype=np.float64)
    recomputed = optional_floats(certified_fcsb(certificate["score_lower"], certificate["sigma"], radii))
    served = tuple(entry["certified_fcsb"] for entry in certificate["radii"])
    if recomputed != served:
        return Check("fcsb", False, f"from score_lower: {recomputed} != {served}", Failure.FCSB)
    return Check("fcsb", True, f"{_radii(len(radii))}, from the certified score_lower")


def _radii(count: int) -> str:
    return f"{count} radius" if count == 1 else f"{count} radii"


def run(args: argparse.Namespace) -> int:
    document = read_document(args.certificate)
    keys = load_key_set(_local_jwks() if args.keys is None else args.keys)
    if args.recompute and args.image is None:
        raise ValueError("--recompute needs --image: the sampling is re-run on the image's pixels")
    image = None if args.image is None else Path(args.image).read_bytes()
    setting = Setting(args.device, args.batch_size, args.tolerance, args.encoder)

    def further(certificate: dict[str, Any]) -> list[Check]:
        from_bound = radius_from_bound if is_answer(certificate) else fcsb_from_bound
        checks = [] if certificate.get("samples") is not None else [from_bound(certificate)]
        if image is None or checks and not checks[-1].passed:
            return checks
        pixels = to_pixels(open_image(image, math.inf), certificate["input_size"])  # type: ignore[arg-type]
        actual, expected = pixels_sha256(pixels), certificate["image"]["pixels_sha256"]
        if actual != expected:
            return [
                *checks,
                Check("pixels", False, f"SHA-256 {actual} is not the certified {expected}", Failure.PIXELS),
            ]
        checks.append(Check("pixels", True, f"SHA-256 {actual}"))
        if args.recompute and is_answer(certificate):
            checks.append(Check("recompute", None, "not for a certified answer (its votes need the language model)"))
        elif args.recompute:
            checks.append(check_weights(certificate, setting))
            if checks[-1].passed:
                checks.append(check_recompute(certificate, pixels, setting, served))
        return checks

    return report(verify(document, keys, image, replay, further))


def served(recomputed: Certificate, certificate: dict[str, Any]) -> dict[str, Any]:
    """The recomputed certificate as the server serves it, presented as ``certificate`` (the one it recomputes) is:
    its encoder, booster and input size, its target cosine, its per-token values."""
    from fsmllm.api.schemas import CertificateOut

    target = (certificate.get("certified_radius") or {}).get("target_cos")
    return CertificateOut.from_certificate(
        recomputed,
        certificate["encoder"],
        certificate["booster"],
        certificate["input_size"],
        target,
        certificate.get("tokens") is not None,
        encoder_dtype=certificate.get("encoder_dtype", "float32"),
    ).model_dump()


def _local_jwks() -> dict[str, Any]:
    """The public keys that signed on this machine: the key folder ``fsmllm serve`` uses here (its
    ``FSMLLM_CERT_FOLDER``, else ``<cache>/certificates``)."""
    from fsmllm.api.settings import Settings

    folder = cert_folder(Settings().cert_folder) / "signing-keys" / "public"
    return {"keys": [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))]}
