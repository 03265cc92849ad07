"""OpenAI-compatible routes: POST /v1/chat/completions (with an extra ``certificate`` field), GET /v1/models.

Existing OpenAI clients work unchanged: the image travels as an ``image_url`` content part holding a
``data:image/...;base64,`` URL (remote URLs are not fetched). Certification parameters may be given in the
extra ``certification`` object (``extra_body`` in the openai client); otherwise the deployment's defaults apply.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from fsmllm.api.errors import OPENAI_ERRORS, openai_error_event
from fsmllm.api.issuing import Issuing
from fsmllm.api.schemas import (
    AnswerCertificateOut,
    CertificateOut,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from fsmllm.api.streaming import STREAMED, in_band_error, unless_disconnected
from fsmllm.certify.answers import AnswerCertificate
from fsmllm.engine import serving
from fsmllm.engine.runtime import Runtime
from fsmllm.errors import UnknownModel
from fsmllm.evidence import CERTIFICATE_HEADER
from fsmllm.images import decode_base64_image, open_image

router = APIRouter(prefix="/v1")


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**OPENAI_ERRORS, **STREAMED},
    summary="OpenAI-compatible chat completion about one image, with its certificate",
)
async def chat_completions(request: Request, response: Response, chat: ChatCompletionRequest) -> Any:
    runtime: Runtime = request.app.state.runtime
    if chat.model is not None:
        _refuse_unless_served(runtime, chat.model, param="model")
    runtime.language_model()  # CertificatesOnly (422) before any work
    question, url = chat.question_and_image()
    image_bytes = decode_base64_image(url)
    image = open_image(image_bytes, request.app.state.settings.max_image_pixels)
    task = chat.to_answer(runtime.policy, question)
    completion_id, created = f"chatcmpl-{request.state.request_id}", int(time.time())
    record_samples = chat.certification is not None and chat.certification.record_samples
    issuing = Issuing(request, image, hashlib.sha256(image_bytes).hexdigest(), record_samples, completion_id)
    if not chat.stream:
        answered = await unless_disconnected(request, serving.answer(runtime, image, task))
        completion = ChatCompletionResponse.of(completion_id, created, answered, chat.certificate(answered.certified))
        signed, voted = await issuing.both(
            completion.certificate.model_dump(), answered.certified, answered.answer_certificate
        )
        completion.certificate = CertificateOut.model_validate(signed)
        completion.answer_certificate = None if voted is None else AnswerCertificateOut.model_validate(voted)
        response.headers[CERTIFICATE_HEADER] = signed["id"]
        return completion
    answer = await unless_disconnected(request, serving.open_answer_stream(runtime, image, task))
    signed = await issuing.certificate(chat.certificate(answer.certified).model_dump(), answer.certified)

    async def issue_votes(voted: AnswerCertificate) -> dict[str, Any]:
        return await issuing.answer(voted, answer.certified, signed["id"])

    return StreamingResponse(
        _chunks(answer, completion_id, created, chat, signed, issue_votes, request.state.request_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", CERTIFICATE_HEADER: signed["id"]},
    )


async def _chunks(
    answer: serving.AnswerStream,
    completion_id: str,
    created: int,
    chat: ChatCompletionRequest,
    certificate: dict[str, Any],
    issue_votes: Callable[[AnswerCertificate], Awaitable[dict[str, Any]]],
    request_id: str,
) -> AsyncIterator[str]:
    """The OpenAI chat.completion.chunk events of a streamed answer: for each choice its role, its pieces and its
    finish reason; the usage (in the last choice's chunk, or with ``stream_options.include_usage`` in one more
    chunk without choices, as OpenAI sends it) and fsmllm's certificates (the signed ``certificate``) ride in the
    last chunk. An error in the votes ends the stream in-band, without [DONE]: one ``data:`` line holding OpenAI's
    error object (``{"error": {"message", "type", "param", "code", "request_id"}}``), which OpenAI's SDK raises."""
    model = answer.certified.provenance.model

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def delta(index: int, content: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": index, "delta": content, "finish_reason": finish_reason}]

    answer.start_votes()  # the votes of a certified answer run beside the streamed answer
    try:
        for index in range(answer.choices):
            yield chunk(delta(index, {"role": "assistant", "content": ""}))
            async with aclosing(answer.pieces(index)) as pieces:  # closed early (client gone): generation cancelled
                async for piece in pieces:
                    yield chunk(delta(index, {"content": piece}))
            if index < answer.choices - 1:
                yield chunk(delta(index, {}, answer.generation(index).finish_reason))
        extra: dict[str, Any] = {"certificate": certificate}
        try:
            voted = await answer.answer_certificate()
            if voted is not None:
                extra["answer_certificate"] = await issue_votes(voted)
        except Exception as error:
            body = in_band_error(error, openai_error_event, request_id, "chat completion stream")
            yield f"data: {json.dumps({'error': body})}\n\n"
            return
        usage = Usage.of(answer.generations).model_dump()
        last = delta(answer.choices - 1, {}, answer.generations[-1].finish_reason)
        if chat.include_usage:
            yield chunk(last, usage=None)
            yield chunk([], usage=usage, **extra)
        else:
            yield chunk(last, usage=usage, **extra)
        yield "data: [DONE]\n\n"
    finally:  # also when the client has gone: stop the votes
        answer.close()


def document_served_model(openapi: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The API schema with the chat request's ``model`` as this deployment takes it: the served model's id, the one
    value accepted (its example too, so that the documented example is a request that works)."""
    model = openapi["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
    model["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
    model["examples"] = [model_name]
    return openapi


def _refuse_unless_served(runtime: Runtime, model_id: str, param: str | None = None) -> None:
    """Raise :class:`UnknownModel` (404, naming the served model) unless ``model_id`` is the one served here."""
    if model_id != runtime.model_name:
        raise UnknownModel(
            f"model {model_id!r} is not served here; GET /v1/models lists {runtime.model_name!r}", param=param
        )


def _card(runtime: Runtime) -> ModelCard:
    """The served model's card: its encoder, booster, input size, allowed sigmas and certification defaults."""
    policy = runtime.policy
    return ModelCard(
        id=runtime.model_name,
        encoder=runtime.encoder.name,
        booster=runtime.booster,
        input_size=runtime.input_size,
        encoder_dtype=runtime.encoder_dtype,
        lm_dtype=runtime.lm_dtype,
        allowed_sigmas=list(policy.allowed_sigmas),
        defaults={
            "sigma": policy.default_sigma,
            "n0": policy.default_n0,
            "n": policy.default_n,
            "alpha": policy.default_alpha,
            "max_n": policy.max_n,
        },
    )


@router.get("/models", response_model=ModelList, summary="The served model and its certification settings")
async def models(request: Request) -> ModelList:
    return ModelList(data=[_card(request.app.state.runtime)])


@router.get(
    "/models/{model_id}",
    response_model=ModelCard,
    responses={404: OPENAI_ERRORS[404]},
    summary="One model's card: the served model's, or 404",
)
async def model(request: Request, model_id: str) -> ModelCard:
    runtime: Runtime = request.app.state.runtime
    _refuse_unless_served(runtime, model_id)
    return _card(runtime)
