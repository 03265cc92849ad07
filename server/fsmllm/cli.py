"""The ``fsmllm`` command line: ``fsmllm certify IMAGE ...`` (more subcommands register below)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub: every weight ships in a package

from fsmllm_client.cli import HelpFormatter  # noqa: E402
from pydantic import BaseModel, ValidationError  # noqa: E402

from fsmllm.api.schemas import (  # noqa: E402
    DEFAULT_RADII,
    AnswerCertificateOut,
    AnswerCertification,
    CertificateOut,
    CertificationParams,
    CertifyParams,
    GenerateParams,
    validation_message,
)
from fsmllm.api.settings import Settings  # noqa: E402
from fsmllm.certify import BOUND_METHODS, GRANULARITIES, Certificate, CosineClassifier, SmoothingConfig  # noqa: E402
from fsmllm.encoders.base import VisionEncoder  # noqa: E402
from fsmllm.encoders.precision import PRECISIONS  # noqa: E402
from fsmllm.images import SAMPLE_IMAGES  # noqa: E402


def _server_default(setting: str) -> Any:
    """The server's built-in default of ``setting`` (not the environment's): the commands share it."""
    return Settings.model_fields[setting].default


def _request_default(model: type[BaseModel], field: str) -> Any:
    """The default a request field gets on the server when a request leaves it out."""
    return model.model_fields[field].default


class ListEncoders(argparse.Action):
    """``--list-encoders``: print the encoder, booster and model names the commands accept, then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
            help="list the encoders, boosters and models, then exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(catalogue())
        parser.exit()


def catalogue() -> str:
    """The names ``--encoder``, ``--booster`` and ``--model`` accept, one a line with what each is."""
    from fsmllm.booster import available_boosters
    from fsmllm.encoders import available_encoders
    from fsmllm.lm.models import MODELS

    lines = ["encoders (--encoder):"]
    lines += [f"  {name:<20} {text}" for name, text in available_encoders().items()]
    lines += ["boosters (--booster):", f"  {'none':<20} no booster (the default)"]
    lines += [f"  {name:<20} shipped booster" for name in available_boosters()]
    lines += [f"  {'/path/to/folder':<20} a booster trained with fsmllm train-booster"]
    lines += ["models (--model):"]
    lines += [f"  {name:<20} {spec.description}" for name, spec in MODELS.items()]
    lines += [f"  {'/path/to/folder':<20} a LLaVA checkpoint on local disk", f"  {'none':<20} fsmllm serve: certificates only"]
    return "\n".join(lines)


def _validated(model: type[BaseModel], args: argparse.Namespace) -> Any:
    """The command's values checked as the server checks a request (the same messages, fields named as flags:
    ``n`` as ``--n``, the certify_answer object's ``n0`` as ``--answer-n0``)."""
    fields = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    if getattr(args, "certify_answer", False):
        fields["certify_answer"] = {name: getattr(args, f"answer_{name}") for name in AnswerCertification.model_fields}
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        errors = [
            {**item, "loc": (f"answer_{item['loc'][1]}", *item["loc"][2:])}
            if item["loc"][:1] == ("certify_answer",) and len(item["loc"]) > 1 else item
            for item in error.errors()
        ]
        raise ValueError(validation_message(errors, flags=True)) from None

if TYPE_CHECKING:
    import torch

    from fsmllm.certify.answers import AnswerCertificate
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.vlm import ProjectedVLM


def _add_certify_parser(subparsers: argparse._SubParsersAction) -> None:
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
        "--target-cos", type=float, default=None, metavar="C",
        help="also print the largest radius whose certified FCSB is >= C (certified_radius; default: none)",
    )
    parser.add_argument(
        "--radius-tolerance", type=float, default=None, metavar="DELTA",
        help="with --target-cos: stop sampling once more samples could not raise the certified radius by more than "
        "DELTA; --n is the budget (default: never)",
    )
    parser.add_argument(
        "--booster", default=_server_default("booster"), help="Gaussian Smoothness Booster: a shipped name, a folder, or none"
    )
    parser.add_argument("--classify", action="store_true", help="also certify the encoder's cosine classifier")
    _add_smoothing_arguments(parser)
    parser.set_defaults(handler=_certify)


def _add_smoothing_arguments(parser: argparse.ArgumentParser) -> None:
    """The Monte Carlo and output options shared by ``certify`` and ``generate``: the server's request fields,
    with the server's defaults."""
    parser.add_argument(
        "--sigma", type=float, default=_server_default("default_sigma"), help="noise level σ (l2 per pixel value)"
    )
    parser.add_argument("--radius", type=float, nargs="+", default=list(DEFAULT_RADII), help="l2 radii ε to certify")
    parser.add_argument(
        "--n0", type=int, default=_server_default("default_n0"), help="selection samples (fix the direction)"
    )
    parser.add_argument("--n", type=int, default=_server_default("default_n"), help="estimation samples (bound the score)")
    parser.add_argument(
        "--alpha", type=float, default=_server_default("default_alpha"), help="failure probability of the certificate"
    )
    parser.add_argument(
        "--bound",
        choices=BOUND_METHODS,
        default=_request_default(CertificationParams, "bound"),
        help="confidence bound on the score (betting: anytime-valid, follows the variance)",
    )
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=_request_default(CertificationParams, "granularity"),
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
        "--batch-size", type=int, default=_server_default("batch_size"), help="noisy images per encoder batch"
    )
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    parser.add_argument("--device", default=_server_default("device"), help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=PRECISIONS, default=_server_default("dtype"),
                        help="the encoder's precision; the certificate is for the encoder as computed in it")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (compiling takes a while)")
    parser.add_argument("--json", action="store_true", help="print the certificate as JSON (the server's shape)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (sampling and weight loading)")
    parser.add_argument("--list-encoders", action=ListEncoders)


def _smooth(
    args: argparse.Namespace, params: CertificationParams, encoder: VisionEncoder, classifier: CosineClassifier | None = None
) -> Certificate:
    """Certify ``args.image`` with ``encoder`` under the validated ``params``, with a progress bar on stderr."""
    from tqdm import tqdm

    from fsmllm.certify import SmoothedEncoder
    from fsmllm.engine.runtime import Policy
    from fsmllm.images import load_image, to_pixels

    config = SmoothingConfig(args.sigma, args.n0, args.n, args.alpha, args.bound, args.granularity)
    radii = params.radii()
    stop = Policy.stop_rule(config, radii, params.stop_at_fcsb, getattr(params, "target_cos", None), getattr(params, "radius_tolerance", None))
    pixels = to_pixels(load_image(args.image, _server_default("max_image_pixels")), encoder.image_size)
    smoother = SmoothedEncoder(encoder, args.sigma, batch_size=args.batch_size, device=args.device)
    with tqdm(
        total=args.n0 + args.n, unit="sample", desc="sampling", disable=args.no_progress, file=sys.stderr
    ) as bar:
        return smoother.certify(
            pixels,
            n0=config.n0,
            n=config.n,
            alpha=config.alpha,
            radii=radii,
            seed=args.seed,
            bound=config.bound,
            classifier=classifier,
            granularity=config.granularity,
            stop=stop,
            progress=bar.update,
        )


def _boosted_encoder(args: argparse.Namespace, name: str, image_size: int | None) -> VisionEncoder:
    """The encoder ``name`` in precision ``args.dtype`` behind ``args.booster`` (``"none"``: the encoder itself; a
    booster stays float32) on ``args.device``, compiled (once, for every use) with ``args.compile``."""
    from fsmllm.booster import load_booster
    from fsmllm.encoders import load_encoder
    from fsmllm.encoders.precision import compiled, set_precision

    encoder = set_precision(load_encoder(name, image_size=image_size, device=args.device), args.dtype)
    boosted = load_booster(args.booster, encoder)
    return compiled(boosted) if args.compile else boosted


def _certify(args: argparse.Namespace) -> int:
    from fsmllm.encoders import load_classifier

    params = _validated(CertifyParams, args)
    encoder = _boosted_encoder(args, args.encoder, args.image_size)
    classifier = load_classifier(args.encoder) if args.classify else None
    cert = _smooth(args, params, encoder, classifier)
    out = CertificateOut.from_certificate(
        cert, encoder.name, args.booster, encoder.image_size, args.target_cos, args.per_token, encoder_dtype=args.dtype
    )
    if args.json:
        summary = out.model_dump()
        if cert.prediction is not None:  # --classify: the prediction's own certificate beside the feature's
            summary["prediction"] = cert.to_dict()["prediction"]
        print(json.dumps(summary, indent=2))
    else:
        print(_format_table(cert, out, args.per_token))
    return 0


#: what the table says when ``abstain`` is true: its one meaning (docs/method.md, step 4)
ABSTAIN_NOTE = "nothing certified at any requested radius"


def _number(value: float | None) -> str:
    """A bound in a table cell; ``none``: nothing certified there (the JSON's null)."""
    return "none" if value is None else f"{value:.4f}"


def _format_table(cert: Certificate, out: CertificateOut, per_token: bool = False) -> str:
    cfg = cert.config
    lines = [
        f"encoder {out.encoder}  booster {out.booster}  input 3x{out.input_size}x{out.input_size} pixels in [0, 1]",
        f"sigma {cfg.sigma}  n0 {cfg.n0}  n {cert.n}"
        + ("" if cert.stopped_by == "budget" else f" of {cfg.n} ({cert.stopped_by})")
        + f"  alpha {cfg.alpha}  bound {cfg.bound}  seed {cert.seed}",
        f"score S: estimate {cert.score_estimate:.4f}, certified lower bound {cert.score_lower:.4f}"
        + (f"  -> ABSTAIN ({ABSTAIN_NOTE})" if out.abstain else ""),
        "",
        f"{'radius':>8}  {'certified FCSB':>14}  {'served FCSB':>12}  {'estimated FCSB':>14}",
    ]
    for radius, certified, served, estimated in zip(
        cert.radii, cert.certified_fcsb, cert.served_fcsb, cert.estimated_fcsb
    ):
        lines.append(f"{radius:>8.4f}  {_number(certified):>14}  {_number(served):>12}  {estimated:>14.4f}")
    lines.append("")
    lines.append(
        f"certified FCSB: with probability >= {1 - cfg.alpha:g}, cos(F(x), F(x')) >= this for every ||x'-x||_2 <= radius"
        " (F: the smoothed encoder)"
    )
    lines.append("served FCSB: the same for the features handed to the language model (the mean of the samples)")
    lines.append("estimated FCSB: the paper's formula at the estimated score (an estimate, not a certificate)")
    if out.certified_radius is not None:
        target = out.certified_radius
        lines.append(f"largest radius with certified FCSB >= {target.target_cos}: {_number(target.radius)}")
    if cert.worst_token is not None:
        lines.append(f"granularity token: every token certified on its own; the numbers above are token {cert.worst_token}'s (the worst)")
    if per_token and cert.tokens is not None:
        lines.append(f"{'token':>6}  {'score lower':>11}  " + "  ".join(f"{'ε=' + format(r, 'g'):>8}" for r in cert.radii))
        for t, (lower, row) in enumerate(zip(cert.tokens.score_lower, cert.token_certified_fcsb())):
            lines.append(f"{t:>6}  {lower:>11.4f}  " + "  ".join(f"{_number(v):>8}" for v in row))
    if cert.prediction is not None:
        p = cert.prediction
        verdict = "abstain" if p.radius is None else f"certified up to radius {p.radius:.4f}"
        lines.append(f"prediction: {p.label} ({verdict}; runner-up bound {p.runner_up_upper:.4f})")
    return "\n".join(lines)


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the certified inference server. Every option can also be set as an environment "
        "variable FSMLLM_<OPTION> (e.g. FSMLLM_PORT=9000); flags win over the environment.",
        formatter_class=HelpFormatter,
    )
    from fsmllm.api.settings import add_arguments

    add_arguments(parser)
    parser.add_argument("--list-encoders", action=ListEncoders)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from fsmllm.api.serve import serve
    from fsmllm.api.settings import settings_from_args

    serve(settings_from_args(args))
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="attacks and certified curves on held-out images (needs Fashion-MNIST)",
        description="White-box PGD against the encoder without FS, with FS and with FS + booster, and certified "
        "FCSB curves; writes results.json, report.md and curves.png into --out. The held-out images are "
        "Fashion-MNIST test images (apt-get install dataset-fashion-mnist) and the bundled photos.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--encoder", default="dinov2-s", help="encoder to evaluate (see --list-encoders)")
    parser.add_argument("--booster", nargs="*", default=[], help="boosters to compare; {sigma} is replaced by σ")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5], help="noise levels σ to evaluate")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="estimation samples of the certified curves")
    parser.add_argument("--n0", type=int, default=_server_default("default_n0"), help="selection samples")
    parser.add_argument(
        "--alpha", type=float, default=_server_default("default_alpha"), help="failure probability of each certificate"
    )
    parser.add_argument("--radius", type=float, nargs="+", default=list(DEFAULT_RADII), help="l2 radii ε of the curves")
    parser.add_argument("--images", type=int, default=16, help="held-out Fashion-MNIST test images (+ bundled photos)")
    parser.add_argument("--photos", type=int, default=None, help="bundled photos added to the images (default: all 6)")
    parser.add_argument("--attack-images", type=int, default=8, help="images attacked with PGD")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps per attack")
    parser.add_argument(
        "--attack-samples", type=int, default=8, help="noise samples per PGD step against the smoothed encoder"
    )
    parser.add_argument(
        "--model", default=None, help="also compare generated answers (e.g. fsmllm-demo; default: no answers)"
    )
    parser.add_argument(
        "--attack-goals", nargs="+", choices=["feature", "answer", "token"], default=None,
        help="untargeted feature distortion, targeted wrong answer, and/or the worst token's cosine (token, vs the "
        "token-level certificate) (default: feature and answer with --model, else feature)",
    )
    parser.add_argument(
        "--granularity", nargs="+", choices=GRANULARITIES, default=["global"],
        help="certified curves for the whole feature and/or the worst token (settings named '... (token)'); both "
        "come from the same noisy samples, encoded once",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice, the noise and the attacks")
    parser.add_argument("--out", default="eval-out", help="output folder")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep what OUT/results.json already holds (a run with the same settings that stopped early) and compute the rest",
    )
    parser.add_argument("--list-encoders", action=ListEncoders)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from fsmllm.evaluate import AttackSettings, run

    run(
        args.encoder, args.booster, args.sigma, args.n, args.radius, args.images, args.attack_images,
        AttackSettings(steps=args.attack_steps, samples=args.attack_samples), args.n0, args.alpha, args.model,
        args.out, seed=args.seed, progress=lambda line: print(line, file=sys.stderr), goals=args.attack_goals,
        photos=args.photos, resume=args.resume, granularities=args.granularity,
    )
    print(open(f"{args.out}/report.md").read())
    return 0


def _add_training_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    config_cls: type,
    train: str,
    out: str,
    help: str,
    description: str,
    resumable: bool = False,
) -> None:
    """A training subcommand whose flags are the fields of the dataclass ``config_cls`` (``--steps`` ...)."""
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    for field, value in vars(config_cls()).items():
        flag = f"--{field.replace('_', '-')}"
        text = config_cls.FLAG_HELP[field]
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        elif isinstance(value, tuple):  # one or more values: --sigmas 0.25 0.5
            parser.add_argument(flag, nargs="+", type=type(value[0]) if value else str, default=value, help=text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=text)
    parser.add_argument("--out", default=None, help=f"output folder (default {out})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (training and weight loading)")
    if resumable:
        parser.add_argument(
            "--stop-at", type=int, default=None, help="stop after this step, keeping the checkpoint (default: run all steps)"
        )

    def handler(args: argparse.Namespace) -> int:
        module, function = train.rsplit(".", 1)
        config = config_cls(**{k: getattr(args, k) for k in vars(config_cls())})
        options = {"stop_at": args.stop_at} if resumable else {}
        folder = args.out if args.out is not None else out.format(**vars(config))
        if args.no_progress:
            _quiet_weight_loading()
        summary = getattr(importlib.import_module(module), function)(
            config, folder, progress=not args.no_progress, **options
        )
        print(json.dumps(summary, indent=2))
        return 0

    parser.set_defaults(handler=handler)


def _add_training_parsers(subparsers: argparse._SubParsersAction) -> None:
    from fsmllm.booster.training import BoosterTrainConfig
    from fsmllm.lm.training import TrainConfig

    _add_training_parser(
        subparsers, "train-projector", TrainConfig, "fsmllm.lm.training.train_projector",
        "server/fsmllm/models/fsmllm-demo",
        help="train the demo model's projector (encoder and LM frozen; needs Fashion-MNIST)",
        description="Train the projector of fsmllm-demo on Fashion-MNIST (apt-get install dataset-fashion-mnist) "
        "and the bundled photos, from clean and smoothed (σ) DINOv2 features; writes projector.json, "
        "projector.safetensors and training.json.",
    )
    _add_training_parser(
        subparsers, "train-booster", BoosterTrainConfig, "fsmllm.booster.training.train_booster",
        "boosters/gsb-{encoder}",
        help="train a noise-conditioned Gaussian Smoothness Booster on folders of photos (encoder frozen)",
        description="Train a purifier + token mapper, conditioned on the noise level, in front of / behind the "
        "frozen encoder, so that its features under noise stay the clean ones (and apart from other images'): "
        "first --pixel-steps denoising steps of the purifier alone, then --steps through the encoder. Writes "
        "booster.json, booster.safetensors and training.json (checkpoints every --checkpoint-every steps, resumed "
        "on restart; --stop-at splits a run). Ship it under server/fsmllm/models/boosters/NAME to use it as "
        "--booster NAME (docs/booster-card.md has the recipes, a GPU one included).",
        resumable=True,
    )


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a question about an image from its smoothed features, with the certificate",
        description="Smooth and certify the model's encoder at IMAGE, then answer PROMPT from the smoothed features. "
        "The options are the fields of the server's POST /generate, with the same defaults.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", help="an image file, or sample:NAME for a bundled photo")
    parser.add_argument("prompt", help="the question, e.g. 'What is this?'")
    parser.add_argument("--model", default=_server_default("model"), help="named model, or a LLaVA checkpoint folder")
    parser.add_argument(
        "--max-tokens", type=int, default=_request_default(GenerateParams, "max_tokens"), help="largest number of new tokens"
    )
    parser.add_argument(
        "--temperature", type=float, default=_request_default(GenerateParams, "temperature"), help="0 = greedy decoding"
    )
    parser.add_argument(
        "--top-p", type=float, default=_request_default(GenerateParams, "top_p"),
        help="nucleus sampling: keep the smallest set of tokens whose probabilities add up to this",
    )
    parser.add_argument(
        "--booster", default=_server_default("booster"), help="Gaussian Smoothness Booster name or folder, or none"
    )
    answer = parser.add_argument_group(
        "certified answer", "CERTIFY on the answer itself: greedy answers from noisy copies vote (method.md); the "
        "fields of the server's certify_answer object as --answer-FIELD, with its defaults",
    )
    answer.add_argument("--certify-answer", action="store_true", help="also certify the answer (n0 + n generations)")
    answer.add_argument("--answer-n0", type=int, default=_request_default(AnswerCertification, "n0"), help="selection votes")
    answer.add_argument(
        "--answer-n", type=int, default=_request_default(AnswerCertification, "n"),
        help="estimation votes, a budget with --answer-radius",
    )
    answer.add_argument(
        "--answer-alpha", type=float, default=_request_default(AnswerCertification, "alpha"), help="failure probability"
    )
    answer.add_argument(
        "--answer-radius", type=float, default=None,
        help="target radius: stop voting once certified to it (betting bound; default: vote the whole budget)",
    )
    answer.add_argument(
        "--answer-inner", type=int, default=_request_default(AnswerCertification, "inner"),
        help="noisy copies per vote (radius / sqrt(inner))",
    )
    _add_smoothing_arguments(parser)
    parser.set_defaults(handler=_generate)


def _quiet_weight_loading() -> None:
    """No progress bars from the libraries that load weights (transformers, huggingface_hub). Their switches,
    not tqdm's environment variable: that would leak into every process started from this one."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _generate(args: argparse.Namespace) -> int:
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.models import load_model, model_spec

    params = _validated(GenerateParams, args)
    spec = model_spec(args.model)
    sampling = SamplingParams(params.max_tokens, params.temperature, params.top_p, args.seed)
    if args.no_progress:
        _quiet_weight_loading()
    encoder = _boosted_encoder(args, spec.encoder, spec.image_size)
    model = load_model(args.model, device=args.device)
    cert = _smooth(args, params, encoder)
    answer = model.generate(cert.smoothed_feature.reshape(encoder.num_tokens, encoder.token_dim), args.prompt, sampling)
    voted = _certify_answer(args, encoder, model, sampling) if args.certify_answer else None
    out = CertificateOut.from_certificate(
        cert, spec.encoder, args.booster, encoder.image_size, per_token=args.per_token, encoder_dtype=args.dtype
    )
    if args.json:
        print(json.dumps({"model": spec.name, "answer": answer.text, "finish_reason": answer.finish_reason,
                          "certificate": out.model_dump(),
                          "answer_certificate": None if voted is None else AnswerCertificateOut.from_certificate(voted).model_dump()}, indent=2))
    else:
        print(f"answer: {answer.text}\n")
        print(_format_table(cert, out, args.per_token))
        if voted is not None:
            print(f"\n{_format_answer(voted)}")
    return 0


def _add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="write a bundled photo as a PNG file (fsmllm sample chelsea > cat.png)",
        description="Write one of the photos bundled with scikit-image as a PNG, to stdout or to --out, to try the "
        "server with: fsmllm sample chelsea > cat.png (chelsea is a cat, coffee a cup of espresso).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("name", choices=SAMPLE_IMAGES, help="the photo")
    parser.add_argument("--out", default=None, help="PNG file to write (default: stdout, which must not be a terminal)")
    parser.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace) -> int:
    import io

    from fsmllm.images import sample_image

    if args.out is None and sys.stdout.isatty():
        raise ValueError(f"a PNG is binary: redirect it (fsmllm sample {args.name} > {args.name}.png) or use --out FILE")
    buffer = io.BytesIO()
    sample_image(args.name).save(buffer, format="PNG")
    if args.out is None:
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
    else:
        with open(args.out, "wb") as file:
            file.write(buffer.getvalue())
    return 0


def _certify_answer(args: argparse.Namespace, encoder: VisionEncoder, model: ProjectedVLM, sampling: SamplingParams) -> AnswerCertificate:
    """The certified answer (method.md, "Certified answers") with the --answer-* options, at --sigma."""
    from fsmllm.certify import new_seed
    from fsmllm.certify.answers import AnswerConfig, certify_answer
    from fsmllm.images import load_image, to_pixels

    config = AnswerConfig(args.sigma, args.answer_n0, args.answer_n, args.answer_alpha, args.answer_inner, args.answer_radius)
    greedy = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, seed=None)
    shape = (-1, encoder.num_tokens, encoder.token_dim)

    def answer(features: torch.Tensor) -> list[str]:
        return [g.text for g in model.generate_batch(features.reshape(shape), args.prompt, greedy)]

    pixels = to_pixels(load_image(args.image, _server_default("max_image_pixels")), encoder.image_size).to(args.device)
    seed = new_seed() if args.seed is None else args.seed
    return certify_answer(pixels, encoder, answer, config, seed, args.batch_size)


def _format_answer(voted: AnswerCertificate) -> str:
    cfg = voted.config
    radius = "abstain (p_lower <= 1/2)" if voted.radius is None else f"{voted.radius:.4f} (l2)"
    votes = ", ".join(f"{text!r} x{count}" for text, _, count in voted.votes)
    return (
        f"certified answer: {voted.answer!r}\n"
        f"  radius:   {radius}\n"
        f"  p_lower:  {voted.p_lower:.4f} ({cfg.bound}, alpha {cfg.alpha:g}, {voted.agree}/{voted.n} votes agree,"
        f" n0 {cfg.n0}, stopped by {voted.stopped_by}, seed {voted.seed})\n"
        f"  votes:    {votes}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsmllm", description="Certified multimodal inference (Feature-space Smoothing)", formatter_class=HelpFormatter
    )
    parser.add_argument("--list-encoders", action=ListEncoders)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_certify_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_training_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # user errors (bad values, unreadable or missing files): no traceback
        parser.exit(2, f"fsmllm {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
