"""fsmllm-client: certify images and ask questions about them on a running fsmllm server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsmllm_client._protocol import DEFAULT_URL
from fsmllm_client.client import Client
from fsmllm_client.errors import FsmllmError
from fsmllm_client.models import AnswerCertificate, Certificate
from fsmllm_client.plot import PlotUnavailable, plot_certificate, radius_grid, require_matplotlib
from fsmllm_client.verify import Failure, load_key_set, read_document, report, verify

#: the server's default radii (when a request names none) and its default max_radii per request
SERVER_DEFAULT_RADII = (0.1, 0.25, 0.5)
SERVER_MAX_RADII = 32
#: radii of the dense grid that --plot asks for in addition to the requested ones
PLOT_POINTS = 21


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every flag's default: argparse's ``(default: X)``, unless the help already says it or
    there is none to show (``None``: the help says what happens instead; a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_certification_arguments(parser: argparse.ArgumentParser) -> None:
    """The certification fields of the server's requests, as flags; unset ones take the server's defaults."""
    parser.add_argument("--radius", type=float, nargs="+", help="l2 radii ε (default: the server's, 0.1 0.25 0.5)")
    parser.add_argument(
        "--sigma", type=float, help="noise level σ, one of the server's allowed sigmas (default: the server's)"
    )
    parser.add_argument("--n0", type=int, help="selection samples (default: the server's)")
    parser.add_argument("--n", type=int, help="estimation samples (default: the server's)")
    parser.add_argument("--alpha", type=float, help="failure probability of the certificate (default: the server's)")
    parser.add_argument(
        "--bound",
        choices=("betting", "empirical-bernstein", "hoeffding"),
        help="confidence bound on the score (default: betting, the only one that can stop early)",
    )
    parser.add_argument(
        "--granularity",
        choices=("global", "token"),
        help="global: one certificate for the whole feature; token: every visual token on its own (default: global)",
    )
    parser.add_argument("--per-token", action="store_true", help="with --granularity token: every token's values")
    parser.add_argument(
        "--stop-at-fcsb",
        type=float,
        metavar="C",
        help="stop sampling once the certified FCSB is >= C at every radius (--n is then the budget; default: never)",
    )
    parser.add_argument(
        "--seed", type=int, help="noise seed; the same seed reproduces the certificate (default: random)"
    )
    parser.add_argument(
        "--record-samples",
        action="store_true",
        help="put the values the bound is computed from (the c_i) into the signed certificate, so that "
        "fsmllm verify recomputes the bound from them",
    )
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer (no progress bar)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fsmllm-client``."""
    parser = argparse.ArgumentParser(prog="fsmllm-client", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--url", default=os.environ.get("FSMLLM_URL", DEFAULT_URL), help="server URL (env FSMLLM_URL)")
    parser.add_argument(
        "--api-key", default=os.environ.get("FSMLLM_API_KEY"), help="bearer token (env FSMLLM_API_KEY; default: none)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("health", help="liveness and readiness of the server", formatter_class=HelpFormatter)

    certify = commands.add_parser(
        "certify", help="the certificate of an image: certified FCSB at each radius", formatter_class=HelpFormatter
    )
    certify.add_argument("image", help="image file (PNG, JPEG, WebP, GIF, BMP, TIFF)")
    _add_certification_arguments(certify)
    certify.add_argument(
        "--target-cos",
        type=float,
        metavar="C",
        help="also find the largest radius certified at cosine C (default: none)",
    )
    certify.add_argument(
        "--radius-tolerance",
        type=float,
        metavar="DELTA",
        help="with --target-cos: stop sampling once the certified radius is within DELTA of its best (default: never)",
    )
    certify.add_argument(
        "--plot", metavar="PNG", help="draw certified and estimated FCSB against radius (default: no plot)"
    )

    generate = commands.add_parser(
        "generate", help="answer a question about an image, with the certificate", formatter_class=HelpFormatter
    )
    generate.add_argument("image", help="image file")
    generate.add_argument("prompt", help="the question, e.g. 'What is this?'")
    generate.add_argument("--max-tokens", type=int, help="largest number of new tokens (default: the server's, 64)")
    generate.add_argument("--temperature", type=float, help="0 = greedy (default: the server's, 0)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: the server's, 1)")
    generate.add_argument("--stop", nargs="+", help="stop strings (default: none)")
    answer = generate.add_argument_group(
        "certified answer", "the fields of the request's certify_answer object, as --answer-FIELD (method.md)"
    )
    answer.add_argument("--certify-answer", action="store_true", help="also certify the answer itself (votes)")
    answer.add_argument("--answer-n0", type=int, help="selection votes (default: the server's, 32)")
    answer.add_argument(
        "--answer-n", type=int, help="estimation votes, a budget with --answer-radius (default: the server's, 256)"
    )
    answer.add_argument("--answer-alpha", type=float, help="failure probability (default: the server's, 0.001)")
    answer.add_argument(
        "--answer-radius",
        type=float,
        help="stop voting once the answer is certified to this l2 radius (default: never)",
    )
    answer.add_argument("--answer-inner", type=int, help="noisy copies per vote (default: the server's, 1)")
    generate.add_argument(
        "--plot", metavar="PNG", help="draw the certificate and the certified answer's radius (default: no plot)"
    )
    _add_certification_arguments(generate)

    check = commands.add_parser(
        "verify",
        help="check a signed certificate offline: signature, image, recorded samples (no torch)",
        description="Check a certificate (a JSON file: the certificate, or a response holding one): its signature "
        "against the server's key set, the image's SHA-256 (--image), and that its recorded samples are the signed "
        "ones. The exit status names the first failed check: "
        + ", ".join(f"{failure.value} {failure.name.lower()}" for failure in Failure if failure <= Failure.FCSB)
        + ". Recomputing the bound and the pixels, and re-running the sampling, need the server package: "
        "fsmllm verify [--recompute].",
        formatter_class=HelpFormatter,
    )
    check.add_argument("certificate", help="JSON file: a certificate, or a response holding one")
    check.add_argument("--image", default=None, help="the image it was issued for (checks its bytes; default: none)")
    check.add_argument(
        "--keys",
        default=None,
        help="JWKS file or URL; default: the server's, GET <--url>/v1/certificates/keys",
    )
    return parser


@contextmanager
def _progress_bar(
    enabled: bool, unit: str = "sample", desc: str = "noise samples"
) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a tqdm bar on stderr (``None`` when disabled or tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield None
        return
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for progress_bar in bars:
            progress_bar.close()


#: what the table says when ``abstain`` is true: its one meaning (docs/method.md, step 4)
ABSTAIN_NOTE = "nothing certified at any requested radius"


def _number(value: float | None) -> str:
    """A bound in a table cell; ``none``: nothing certified there (the JSON's null)."""
    return "none" if value is None else f"{value:.4f}"


def _print_certificate(certificate: Certificate, shown: Sequence[float] | None) -> None:
    c = certificate
    if c.id is not None:
        recorded = f", samples {c.samples.get('shape')} recorded" if c.samples else ""
        print(f"certificate {c.id} (issued {c.issued_at}, signed{recorded})")
    print(f"encoder {c.encoder}, booster {c.booster}, input {c.input_size} px")
    budget = f" of {c.n_budget} ({c.stopped_by})" if c.n_budget is not None and c.n_budget != c.n else ""
    print(
        f"σ={c.sigma:g}  n0={c.n0}  n={c.n}{budget}  α={c.alpha:g} ({c.bound})  seed={c.seed}"
        + ("  (cached)" if c.cached else "")
    )
    print(f"robustness score S: estimate {c.score_estimate:.4f}, lower bound {c.score_lower:.4f}")
    if c.abstain:
        print(f"ABSTAIN: {ABSTAIN_NOTE}")
    print(f"{'radius ε':>10}  {'certified FCSB':>15}  {'served FCSB':>12}  {'estimated FCSB':>15}")
    for bound in c.radii:
        if shown is None or any(abs(bound.radius - r) < 1e-9 for r in shown):
            print(
                f"{bound.radius:>10.4g}  {_number(bound.certified_fcsb):>15}  {_number(bound.served_fcsb):>12}"
                f"  {bound.estimated_fcsb:>15.4f}"
            )
    if c.worst_token is not None:
        print(
            f"granularity token: every token certified on its own; the numbers are token {c.worst_token}'s (the worst)"
        )
    if c.tokens:
        for token in c.tokens:
            values = "  ".join(_number(v) for v in token.certified_fcsb)
            print(f"token {token.token:>4}: score lower bound {token.score_lower:.4f}  certified FCSB {values}")
    if c.certified_radius is not None:
        radius = c.certified_radius.radius
        print(
            f"certified radius at cosine ≥ {c.certified_radius.target_cos:g}: "
            + ("none" if radius is None else f"{radius:.4g}")
        )


def _certification_options(args: argparse.Namespace) -> dict[str, Any]:
    """The certification flags as the client's keyword options (the server's field names)."""
    names = ("radius", "sigma", "n0", "n", "alpha", "bound", "seed", "stop_at_fcsb", "granularity")
    return {name: getattr(args, name) for name in names} | {
        "per_token": args.per_token or None,
        "record_samples": args.record_samples or None,
    }


def _certify(client: Client, args: argparse.Namespace) -> int:
    requested = args.radius
    radii = requested
    if args.plot:
        require_matplotlib()
        sigma = args.sigma if args.sigma is not None else client.models().data[0].defaults["sigma"]
        requested = requested or list(SERVER_DEFAULT_RADII)
        grid = radius_grid(sigma, min(PLOT_POINTS, SERVER_MAX_RADII - len(requested)))
        radii = sorted(set(requested) | set(grid))
    options: dict[str, Any] = _certification_options(args) | {
        "radius": radii,
        "target_cos": args.target_cos,
        "radius_tolerance": args.radius_tolerance,
    }
    with _progress_bar(not (args.json or args.no_progress)) as progress:
        options["progress"] = progress  # None: no stream
        result = client.certify(args.image, **options)
    if args.plot:
        compare = None
        if result.certificate.granularity == "token":  # the global curve beside it, from the same noise (seed)
            same_noise = {key: value for key, value in options.items() if key not in ("progress", "per_token")}
            same_noise |= {"granularity": "global", "seed": result.certificate.seed}
            compare = client.certify(args.image, **same_noise).certificate
        plot_certificate(result.certificate, args.plot, requested, compare=compare)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_certificate(result.certificate, requested)
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _generate(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = _certification_options(args) | {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stop": args.stop,
    }
    answer = {name: getattr(args, f"answer_{name}") for name in ("n0", "n", "alpha", "radius", "inner")}
    if args.certify_answer or any(value is not None for value in answer.values()):
        options["certify_answer"] = {key: value for key, value in answer.items() if value is not None}
    if args.plot:
        require_matplotlib()
    bars = not (args.json or args.no_progress)
    with _progress_bar(bars) as progress, _progress_bar(bars and "certify_answer" in options, "vote", "votes") as votes:
        options["progress"] = progress  # None: no stream
        if votes is not None:
            options["vote_progress"] = lambda event: votes(event["done"], event["total"])
        result = client.generate(args.image, args.prompt, **options)
    if args.plot:
        plot_certificate(result.certificate, args.plot, args.radius or (), answer=result.answer_certificate)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.answer)
        print(f"({result.model}, {result.completion_tokens} tokens, finish: {result.finish_reason})\n")
        _print_certificate(result.certificate, None)
        if result.answer_certificate is not None:
            _print_answer(result.answer_certificate)
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _print_answer(voted: AnswerCertificate) -> None:
    radius = "abstain (p_lower <= 1/2: not certified)" if voted.radius is None else f"{voted.radius:.4f} (l2)"
    votes = ", ".join(f"{vote.answer!r} x{vote.count}" for vote in voted.votes)
    print(f"\ncertified answer: {voted.answer!r}\n  radius:   {radius}")
    print(
        f"  p_lower:  {voted.p_lower:.4f} ({voted.bound}, alpha {voted.alpha:g}, {voted.agree}/{voted.n} votes agree)"
    )
    print(f"  votes:    {votes}")


def _health(client: Client) -> int:
    print(f"health: {client.health().status}")
    readiness = client.ready()
    details = f" (model {readiness.model}, encoder {readiness.encoder})" if readiness.ready else ""
    print(f"ready: {readiness.status}{details}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = args.keys if args.keys is not None else f"{args.url.rstrip('/')}/v1/certificates/keys"
    image = None if args.image is None else Path(args.image).read_bytes()
    return report(verify(read_document(args.certificate), load_key_set(keys), image))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fsmllm-client``; the exit code is 1 with the server's message on stderr when a request fails
    (``verify``: the failed check's status, 2 when its inputs cannot be read)."""
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        try:
            return _verify(args)
        except (ValueError, OSError) as error:
            print(f"fsmllm-client verify: error: {error}", file=sys.stderr)
            return 2
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            if args.command == "certify":
                return _certify(client, args)
            if args.command == "generate":
                return _generate(client, args)
            return _health(client)
    except (FsmllmError, PlotUnavailable, OSError) as error:
        print(f"fsmllm-client: error: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
