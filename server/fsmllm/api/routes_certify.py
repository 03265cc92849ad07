"""POST /certify and POST /generate: translate HTTP into runtime calls and certificates into JSON."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from fsmllm.api.errors import error_event
from fsmllm.api.inputs import image_and_params
from fsmllm.api.schemas import (
    AnswerCertificateOut,
    AnswerCertification,
    CertificateOut,
    CertifyParams,
    CertifyRequest,
    CertifyResponse,
    ErrorResponse,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    Timings,
)
from fsmllm.api.streaming import ProgressCallback, progress_stream, unless_disconnected
from fsmllm.certify import SmoothingConfig
from fsmllm.certify.answers import AnswerCertificate, AnswerConfig
from fsmllm.engine.certifier import CertifyOutcome
from fsmllm.engine.runtime import Runtime
from fsmllm.errors import PolicyError
from fsmllm.lm.base import Generation, SamplingParams

router = APIRouter()
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "corrupt image or body",
        401: "missing or wrong API key",
        413: "body or image too large",
        415: "unsupported content type or image format",
        422: "invalid parameters (sigma not offered, n too large, negative radius, ...)",
        503: "queue full or shutting down (see Retry-After)",
        504: "certification timed out",
    }.items()
}


def _body_schema(model: type) -> dict[str, Any]:
    """OpenAPI: the same fields as JSON (image as base64 / data URL) or as multipart form fields + a file."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    upload = {
        "type": "string",
        "format": "binary",
        "description": "the image file (PNG, JPEG, WebP, GIF, BMP or TIFF): curl -F image=@cat.png",
        "examples": ["cat.png"],
    }
    multipart = {**schema, "properties": {**schema["properties"], "image": upload}}
    multipart.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": multipart}},
        }
    }


def certificate_out(
    runtime: Runtime, outcome: CertifyOutcome, target_cos: float | None = None, per_token: bool = False
) -> CertificateOut:
    """The served certificate of ``outcome`` (see :meth:`CertificateOut.from_certificate`)."""
    return CertificateOut.from_certificate(
        outcome.certificate, runtime.encoder.name, runtime.booster, runtime.input_size, target_cos, per_token, outcome.cached,
        runtime.encoder_dtype,
    )


def answer_config_of(runtime: Runtime, config: SmoothingConfig, options: AnswerCertification | None) -> AnswerConfig | None:
    """The certified answer's parameters a request asked for (at the request's sigma), or None."""
    if options is None:
        return None
    return runtime.policy.answer_config(config.sigma, options.n0, options.n, options.alpha, options.inner, options.radius)


async def answer_and_certificates(
    runtime: Runtime,
    answer: Callable[[], Awaitable[T]],
    image: Image.Image,
    prompt: str,
    answer_config: AnswerConfig | None,
    sampling: SamplingParams,
    seed: int | None,
) -> tuple[T, AnswerCertificate | None, float]:
    """``answer()`` and, when asked, the certified answer (its votes), run side by side: the votes share the
    device worker and the language model with the answer's own work. Either failing cancels the other. Returns
    the answer, the answer certificate (or None) and the seconds the votes took."""
    if answer_config is None:
        return await answer(), None, 0.0
    started = time.perf_counter()

    async def votes() -> tuple[AnswerCertificate, float]:
        certificate = await runtime.certify_answer(image, prompt, answer_config, sampling, seed)
        return certificate, time.perf_counter() - started

    main, voted = asyncio.ensure_future(answer()), asyncio.ensure_future(votes())
    try:
        await asyncio.gather(main, voted)
    except BaseException:  # the first error (or the caller gone): stop the other side, then report it
        main.cancel()
        voted.cancel()
        await asyncio.gather(main, voted, return_exceptions=True)
        raise
    return main.result(), *voted.result()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _limits(request: Request) -> tuple[int, int]:
    settings = request.app.state.settings
    return settings.max_body_bytes, settings.max_image_pixels


@router.post(
    "/certify",
    response_model=CertifyResponse,
    responses=ERRORS,
    openapi_extra=_body_schema(CertifyRequest),
    summary="Certify how far an l2 perturbation can move the image's smoothed features",
    description="Returns the certified FCSB at each radius (or, with target_cos, the certified radius). "
    "With stream=true the answer is a text/event-stream of progress events then a result event.",
)
async def certify(request: Request) -> Any:
    runtime = _runtime(request)
    image, params = await image_and_params(request, CertifyParams, *_limits(request))
    config = runtime.policy.config(params.sigma, params.n0, params.n, params.alpha, params.bound, params.granularity)
    radii = runtime.policy.radii(params.radii())
    stop = runtime.policy.stop_rule(config, radii, params.stop_at_fcsb, params.target_cos, params.radius_tolerance)
    request_id = request.state.request_id

    async def work(on_progress: ProgressCallback | None) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = await runtime.certify(image, config, radii, params.seed, on_progress, stop)
        timings = Timings(
            queue_ms=outcome.queue_seconds * 1e3,
            certify_ms=outcome.compute_seconds * 1e3,
            total_ms=(time.perf_counter() - started) * 1e3,
        )
        response = CertifyResponse(
            id=request_id, certificate=certificate_out(runtime, outcome, params.target_cos, params.per_token), timings=timings
        )
        return response.model_dump()

    if params.stream:
        return progress_stream(work, error_event, request_id)
    return JSONResponse(await unless_disconnected(request, work(None)))


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERRORS,
    openapi_extra=_body_schema(GenerateRequest),
    summary="Answer a question about an image from its smoothed features, with the certificate",
    description="The image's features are smoothed (Monte Carlo over Gaussian noise), certified, and handed "
    "to the language model. With stream=true: progress events, then a result event.",
)
async def generate(request: Request) -> Any:
    runtime = _runtime(request)
    image, params = await image_and_params(request, GenerateParams, *_limits(request))
    if len(params.prompt) > request.app.state.settings.max_prompt_chars:
        raise PolicyError(f"the prompt has {len(params.prompt)} characters; the limit is {request.app.state.settings.max_prompt_chars}")
    config = runtime.policy.config(params.sigma, params.n0, params.n, params.alpha, params.bound, params.granularity)
    radii = runtime.policy.radii(params.radii())
    stop = runtime.policy.stop_rule(config, radii, params.stop_at_fcsb)
    sampling = runtime.policy.sampling(params.max_tokens, params.temperature, params.top_p, params.seed, params.stop_list())
    answer_config = answer_config_of(runtime, config, params.certify_answer)
    runtime.language_model()
    request_id = request.state.request_id

    async def work(on_progress: ProgressCallback | None) -> dict[str, Any]:
        started = time.perf_counter()

        async def answer() -> tuple[CertifyOutcome, Generation, float]:
            outcome = await runtime.certify(image, config, radii, params.seed, on_progress, stop)
            generation_started = time.perf_counter()
            generation = await runtime.generate(outcome.certificate, params.prompt, sampling)
            return outcome, generation, time.perf_counter() - generation_started

        (outcome, generation, generate_s), voted, answer_s = await answer_and_certificates(
            runtime, answer, image, params.prompt, answer_config, sampling, params.seed
        )
        response = GenerateResponse(
            id=request_id,
            model=runtime.model_name,
            answer=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            certificate=certificate_out(runtime, outcome, per_token=params.per_token),
            answer_certificate=None if voted is None else AnswerCertificateOut.from_certificate(voted),
            timings=Timings(
                queue_ms=outcome.queue_seconds * 1e3,
                certify_ms=outcome.compute_seconds * 1e3,
                generate_ms=generate_s * 1e3,
                answer_ms=answer_s * 1e3,
                total_ms=(time.perf_counter() - started) * 1e3,
            ),
        )
        return response.model_dump()

    if params.stream:
        return progress_stream(work, error_event, request_id)
    return JSONResponse(await unless_disconnected(request, work(None)))


def new_request_id() -> str:
    return uuid.uuid4().hex
