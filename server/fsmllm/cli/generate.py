"""``fsmllm generate IMAGE PROMPT``: an answer from the smoothed features, with the certificate and, on request,
the certified answer."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from fsmllm.api.schemas import AnswerCertificateOut, AnswerCertification, CertificateOut, GenerateParams
from fsmllm.cli.common import (
    HelpFormatter,
    boosted_encoder,
    quiet_weight_loading,
    request_default,
    server_default,
    validated,
)
from fsmllm.cli.smoothing import add_smoothing_arguments, recorded, smooth
from fsmllm.cli.tables import answer_summary, certificate_table
from fsmllm.encoders.base import VisionEncoder
from fsmllm.fastest_dtype import DTYPE_CHOICES

if TYPE_CHECKING:
    import torch

    from fsmllm.certify.answers import AnswerCertificate
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.vlm import ProjectedVLM


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a question about an image from its smoothed features, with the certificate",
        description="Smooth and certify the model's encoder at IMAGE, then answer PROMPT from the smoothed features. "
        "The options are the fields of the server's POST /generate, with the same defaults.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", help="an image file, or sample:NAME for a bundled photo")
    parser.add_argument("prompt", help="the question, e.g. 'What is this?'")
    parser.add_argument("--model", default=server_default("model"), help="named model, or a LLaVA checkpoint folder")
    parser.add_argument(
        "--lm-dtype",
        choices=DTYPE_CHOICES,
        default=server_default("lm_dtype"),
        help="the language model's precision (auto: the fastest this machine runs natively, timed once and cached)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=request_default(GenerateParams, "max_tokens"),
        help="largest number of new tokens",
    )
    parser.add_argument(
        "--temperature", type=float, default=request_default(GenerateParams, "temperature"), help="0 = greedy decoding"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=request_default(GenerateParams, "top_p"),
        help="nucleus sampling: keep the smallest set of tokens whose probabilities add up to this",
    )
    parser.add_argument(
        "--booster", default=server_default("booster"), help="Gaussian Smoothness Booster name or folder, or none"
    )
    answer = parser.add_argument_group(
        "certified answer",
        "CERTIFY on the answer itself: greedy answers from noisy copies vote (method.md); the "
        "fields of the server's certify_answer object as --answer-FIELD, with its defaults",
    )
    answer.add_argument("--certify-answer", action="store_true", help="also certify the answer (n0 + n generations)")
    answer.add_argument(
        "--answer-n0", type=int, default=request_default(AnswerCertification, "n0"), help="selection votes"
    )
    answer.add_argument(
        "--answer-n",
        type=int,
        default=request_default(AnswerCertification, "n"),
        help="estimation votes, a budget with --answer-radius",
    )
    answer.add_argument(
        "--answer-alpha", type=float, default=request_default(AnswerCertification, "alpha"), help="failure probability"
    )
    answer.add_argument(
        "--answer-radius",
        type=float,
        default=None,
        help="target radius: stop voting once certified to it (betting bound; default: vote the whole budget)",
    )
    answer.add_argument(
        "--answer-inner",
        type=int,
        default=request_default(AnswerCertification, "inner"),
        help="noisy copies per vote (radius / sqrt(inner))",
    )
    add_smoothing_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.models import load_model, model_spec

    params = validated(GenerateParams, args)
    spec = model_spec(args.model)
    sampling = SamplingParams(params.max_tokens, params.temperature, params.top_p, args.seed)
    if args.no_progress:
        quiet_weight_loading()
    encoder = boosted_encoder(args, spec.encoder, spec.image_size)
    model = load_model(args.model, device=args.device, lm_dtype=args.lm_dtype)
    cert = smooth(args, params, encoder)
    answer = model.generate(cert.smoothed_feature.reshape(encoder.num_tokens, encoder.token_dim), args.prompt, sampling)
    voted = _certify_answer(args, encoder, model, sampling) if args.certify_answer else None
    out = CertificateOut.from_certificate(
        cert, spec.encoder, args.booster, encoder.image_size, per_token=args.per_token, encoder_dtype=args.dtype
    )
    out.samples = recorded(args, cert)
    if args.json:
        answer_certificate = (
            None
            if voted is None
            else AnswerCertificateOut.from_certificate(voted, lm_dtype=model.precision).model_dump()
        )
        print(
            json.dumps(
                {
                    "model": spec.name,
                    "answer": answer.text,
                    "finish_reason": answer.finish_reason,
                    "certificate": out.model_dump(),
                    "answer_certificate": answer_certificate,
                },
                indent=2,
            )
        )
    else:
        print(f"answer: {answer.text}\n")
        print(certificate_table(cert, out, args.per_token))
        if out.samples is not None:
            print(f"samples recorded: shape {out.samples.shape} (printed with --json)")
        if voted is not None:
            print(f"\n{answer_summary(voted)}")
    return 0


def _certify_answer(
    args: argparse.Namespace, encoder: VisionEncoder, model: ProjectedVLM, sampling: SamplingParams
) -> AnswerCertificate:
    """The certified answer (method.md, "Certified answers") with the --answer-* options, at --sigma."""
    from fsmllm.certify import new_seed
    from fsmllm.certify.answers import AnswerConfig, certify_answer
    from fsmllm.images import load_image, to_pixels

    config = AnswerConfig(
        args.sigma, args.answer_n0, args.answer_n, args.answer_alpha, args.answer_inner, args.answer_radius
    )
    greedy = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, seed=None)
    shape = (-1, encoder.num_tokens, encoder.token_dim)

    def answer(features: torch.Tensor) -> list[str]:
        return [g.text for g in model.generate_batch(features.reshape(shape), args.prompt, greedy)]

    pixels = to_pixels(load_image(args.image, server_default("max_image_pixels")), encoder.image_size).to(args.device)
    seed = new_seed() if args.seed is None else args.seed
    return certify_answer(pixels, encoder, answer, config, seed, args.batch_size)
