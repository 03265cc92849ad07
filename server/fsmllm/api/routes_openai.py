"""OpenAI-compatible routes: POST /v1/chat/completions (with an extra ``certificate`` field), GET /v1/models.

Existing OpenAI clients work unchanged: the image travels as an ``image_url`` content part holding a
``data:image/...;base64,`` URL (remote URLs are not fetched). Certification parameters may be given in the
extra ``certification`` object (``extra_body`` in the openai client); otherwise the deployment's defaults apply.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from fsmllm.images import decode_base64_image, open_image
from fsmllm.api.errors import error_event
from fsmllm.api.routes_certify import ERRORS, answer_and_certificates, answer_config_of, certificate_out
from fsmllm.api.schemas import (
    AnswerCertificateOut,
    CertificationParams,
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from fsmllm.api.streaming import in_band_error, unless_disconnected
from fsmllm.engine.certifier import CertifyOutcome
from fsmllm.engine.runtime import Runtime
from fsmllm.errors import RequestError, UnknownModel
from fsmllm.lm.base import Generation

router = APIRouter(prefix="/v1")


def _question_and_image(chat: ChatCompletionRequest) -> tuple[str, str]:
    """The last user message's text, and the one image of the conversation (as a data URL)."""
    images = [
        part.image_url.url
        for message in chat.messages
        if not isinstance(message.content, str)
        for part in message.content
        if part.type == "image_url"
    ]
    if len(images) != 1:
        raise RequestError(f"send exactly one image (an image_url content part); this conversation has {len(images)}")
    users = [message for message in chat.messages if message.role == "user"]
    if not users:
        raise RequestError("the conversation has no user message")
    content = users[-1].content
    text = content if isinstance(content, str) else " ".join(p.text for p in content if p.type == "text")
    if not text.strip():
        raise RequestError("the last user message has no text: ask a question about the image")
    if not images[0].startswith("data:"):
        raise RequestError("image_url must be a data:image/...;base64, URL; this server does not fetch remote URLs")
    return text.strip(), images[0]


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ERRORS,
    summary="OpenAI-compatible chat completion about one image, with its certificate",
)
async def chat_completions(request: Request, chat: ChatCompletionRequest) -> Any:
    runtime: Runtime = request.app.state.runtime
    settings = request.app.state.settings
    if chat.model is not None and chat.model != runtime.model_name:
        raise UnknownModel(f"model {chat.model!r} is not served here; GET /v1/models lists {runtime.model_name!r}")
    runtime.language_model()
    question, url = _question_and_image(chat)
    image = open_image(decode_base64_image(url), settings.max_image_pixels)
    cert_params = chat.certification or CertificationParams()
    config = runtime.policy.config(
        cert_params.sigma, cert_params.n0, cert_params.n, cert_params.alpha, cert_params.bound, cert_params.granularity
    )
    radii = runtime.policy.radii(cert_params.radii())
    stop = runtime.policy.stop_rule(config, radii, cert_params.stop_at_fcsb)
    seed = chat.seed if chat.seed is not None else cert_params.seed
    sampling = runtime.policy.sampling(chat.max_tokens, chat.temperature, chat.top_p, seed, chat.stop_list())
    answer_config = answer_config_of(runtime, config, chat.certify_answer)
    request_id = f"chatcmpl-{request.state.request_id}"
    created = int(time.time())

    if not chat.stream:
        async def answer() -> tuple[CertifyOutcome, Generation]:
            outcome = await runtime.certify(image, config, radii, seed, stop=stop)
            return outcome, await runtime.generate(outcome.certificate, question, sampling)

        (outcome, generation), voted, _ = await unless_disconnected(
            request,
            answer_and_certificates(runtime, answer, image, question, answer_config, sampling, seed),
        )
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=runtime.model_name,
            choices=[ChatChoice(message=ChatChoiceMessage(content=generation.text), finish_reason=generation.finish_reason)],
            usage=Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
            ),
            certificate=certificate_out(runtime, outcome, per_token=cert_params.per_token),
            answer_certificate=None if voted is None else AnswerCertificateOut.from_certificate(voted),
        )

    outcome = await unless_disconnected(request, runtime.certify(image, config, radii, seed, stop=stop))
    certificate = certificate_out(runtime, outcome, per_token=cert_params.per_token)

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": runtime.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        # the votes of a certified answer run beside the streamed answer; their certificate comes in the last chunk
        votes = None
        if answer_config is not None:
            votes = asyncio.ensure_future(runtime.certify_answer(image, question, answer_config, sampling, seed))
        try:
            yield chunk({"role": "assistant", "content": ""})
            stream = runtime.stream(outcome.certificate, question, sampling)
            async with aclosing(runtime.pieces(stream)) as pieces:  # closed early (client gone): generation cancelled
                async for piece in pieces:
                    yield chunk({"content": piece})
            generation = stream.result()
            usage = Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
            )
            extra: dict[str, Any] = {"usage": usage.model_dump(), "certificate": certificate.model_dump()}
            if votes is not None:
                try:
                    extra["answer_certificate"] = AnswerCertificateOut.from_certificate(await votes).model_dump()
                except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
                    body = in_band_error(error, error_event, request.state.request_id, "chat completion stream")
                    yield f"data: {json.dumps({'error': body})}\n\n"
                    return
            yield chunk({}, generation.finish_reason, **extra)
            yield "data: [DONE]\n\n"
        finally:  # also when the client has gone: stop the votes
            if votes is not None:
                votes.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=ModelList, summary="The served model and its certification settings")
async def models(request: Request) -> ModelList:
    runtime: Runtime = request.app.state.runtime
    policy = runtime.policy
    card = ModelCard(
        id=runtime.model_name,
        encoder=runtime.encoder.name,
        booster=runtime.booster,
        input_size=runtime.input_size,
        encoder_dtype=runtime.encoder_dtype,
        allowed_sigmas=list(policy.allowed_sigmas),
        defaults={"sigma": policy.default_sigma, "n0": policy.default_n0, "n": policy.default_n, "alpha": policy.default_alpha, "max_n": policy.max_n},
    )
    return ModelList(data=[card])

