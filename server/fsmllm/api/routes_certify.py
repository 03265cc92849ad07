"""POST /certify and POST /generate: parse the request, make one call to :mod:`fsmllm.engine.serving`, render."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fsmllm.api.errors import ERRORS, error_event
from fsmllm.api.inputs import image_and_params
from fsmllm.api.issuing import Issuing
from fsmllm.api.schemas import (
    EXAMPLE_IMAGE,
    CertifyParams,
    CertifyRequest,
    CertifyResponse,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
)
from fsmllm.api.streaming import STREAMED, Work, progress_stream, unless_disconnected
from fsmllm.engine import serving
from fsmllm.engine.jobs import ProgressCallback, VoteProgressCallback
from fsmllm.engine.runtime import Runtime

router = APIRouter()


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI: the same fields as JSON (image as base64 / data URL) or as multipart form fields + a file."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    upload = {
        "anyOf": [{"type": "string", "format": "binary"}, {"type": "string", "minLength": 1}],
        "description": "the image file (PNG, JPEG, WebP, GIF, BMP or TIFF): curl -F image=@cat.png; or, as a text "
        "field, its base64 or data:image/...;base64, URL",
        "examples": [EXAMPLE_IMAGE],
    }
    fields = {name: _form_field(field) for name, field in schema["properties"].items()}
    multipart = {**schema, "properties": {**fields, "image": upload}}
    multipart.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": multipart}},
        }
    }


def _form_field(field: dict[str, Any]) -> dict[str, Any]:
    """A JSON field's schema as a multipart form field: a form field cannot be null (left out, it takes its
    default), so its null alternative, null default and null examples go."""
    choices = [choice for choice in field.get("anyOf", ()) if choice != {"type": "null"}]
    if "anyOf" not in field or len(choices) == len(field["anyOf"]):
        return field
    form = {key: value for key, value in field.items() if key != "anyOf"}
    form.update(choices[0] if len(choices) == 1 else {"anyOf": choices})
    if form.get("default", 0) is None:
        del form["default"]
    if "examples" in form:
        form["examples"] = [example for example in form["examples"] if example is not None]
        if not form["examples"]:
            del form["examples"]
    return form


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _limits(request: Request) -> tuple[int, int]:
    settings = request.app.state.settings
    return settings.max_body_bytes, settings.max_image_pixels


@router.post(
    "/certify",
    response_model=CertifyResponse,
    responses={**ERRORS, **STREAMED},
    openapi_extra=_body_schema(CertifyRequest),
    summary="Certify how far an l2 perturbation can move the image's smoothed features",
    description="Returns the certified FCSB at each radius (or, with target_cos, the certified radius). "
    "With stream=true the answer is a text/event-stream of progress events then a result event.",
)
async def certify(request: Request) -> Any:
    runtime = _runtime(request)
    image, params, image_sha256 = await image_and_params(request, CertifyParams, *_limits(request))
    task = params.to_task(runtime.policy)
    request_id = request.state.request_id
    issuing = Issuing(request, image, image_sha256, params.record_samples)

    async def work(on_progress: ProgressCallback | None, _: VoteProgressCallback | None) -> dict[str, Any]:
        certified = await serving.certify(runtime, image, task, on_progress)
        response = CertifyResponse.of(request_id, certified, params.target_cos, params.per_token).model_dump()
        response["certificate"] = await issuing.certificate(response["certificate"], certified)
        return response

    return await respond(request, params.stream, work)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, **STREAMED},
    openapi_extra=_body_schema(GenerateRequest),
    summary="Answer a question about an image from its smoothed features, with the certificate",
    description="The image's features are smoothed (Monte Carlo over Gaussian noise), certified, and handed "
    "to the language model. With stream=true: progress events (and, with certify_answer, votes events), then "
    "a result event.",
)
async def generate(request: Request) -> Any:
    runtime = _runtime(request)
    image, params, image_sha256 = await image_and_params(request, GenerateParams, *_limits(request))
    task = params.to_answer(runtime.policy, request.app.state.settings.max_prompt_chars)
    runtime.language_model()  # CertificatesOnly (422) before any work
    request_id = request.state.request_id
    issuing = Issuing(request, image, image_sha256, params.record_samples)

    async def work(on_progress: ProgressCallback | None, on_votes: VoteProgressCallback | None) -> dict[str, Any]:
        answered = await serving.answer(runtime, image, task, on_progress, on_votes)
        response = GenerateResponse.of(request_id, answered, params.per_token).model_dump()
        response["certificate"], response["answer_certificate"] = await issuing.both(
            response["certificate"], answered.certified, answered.answer_certificate
        )
        return response

    return await respond(request, params.stream, work)


async def respond(request: Request, stream: bool, work: Work) -> Response:
    """``work``'s result as JSON, or with ``stream`` as progress (and votes) events then a result event."""
    if stream:
        return progress_stream(work, error_event, request.state.request_id)
    return JSONResponse(await unless_disconnected(request, work(None, None)))


def new_request_id() -> str:
    return uuid.uuid4().hex
