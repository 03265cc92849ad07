"""Every failure becomes ``{"error": {"type", "message", "request_id"}}`` with the right status code; on the
OpenAI routes (``/v1/``) the same error is written in OpenAI's shape and statuses, so that OpenAI's clients raise
their own exception classes: ``{"error": {"message", "type", "param", "code", "request_id"}}``, ``type``
``invalid_request_error`` (4xx) or ``server_error`` (5xx), ``code`` the kind below, ``param`` the field at fault,
and 400 where the native routes answer 422 or 415 (:func:`openai_status`).

:data:`ERROR_TABLE` is the one mapping from an exception to its status and kind, used by plain answers
(:func:`install_error_handlers`) and by streams whose 200 was already sent (:func:`error_event`; in a chat
completion stream, OpenAI's shape: :func:`openai_error_event`). The request errors are :mod:`fsmllm.errors`'
hierarchy; anything not in the table is a 500 whose message only names the request id, under which the server
log keeps the error and its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fsmllm.api.schemas import ErrorResponse, OpenAIErrorResponse, validation_message
from fsmllm.api.streaming import ClientDisconnected
from fsmllm.engine.jobs import JobCancelled
from fsmllm.engine.worker import QueueFull, WorkerStopped
from fsmllm.errors import (
    BodyTooLarge,
    CertificateNotFound,
    ImageError,
    ImageTooLarge,
    MalformedBody,
    RequestError,
    UnknownModel,
    UnsupportedImage,
    UnsupportedMediaType,
)

log = logging.getLogger("fsmllm.api")

#: what a client is told of an unexpected error (a 500, or an error event in a progress stream): the details
#: stay in the server log, under the request id the answer carries
INTERNAL_ERROR = "internal error; the request id is in the server log"

#: exception -> (HTTP status, error kind); an exception takes the entry of its nearest class in the table
ERROR_TABLE: dict[type[Exception], tuple[int, str]] = {
    RequestError: (422, "invalid_request"),
    UnknownModel: (404, "model_not_found"),
    CertificateNotFound: (404, "not_found"),
    MalformedBody: (400, "invalid_request"),
    BodyTooLarge: (413, "too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    ImageError: (400, "invalid_image"),
    UnsupportedImage: (415, "invalid_image"),
    ImageTooLarge: (413, "invalid_image"),
    QueueFull: (503, "overloaded"),
    WorkerStopped: (503, "unavailable"),
    JobCancelled: (503, "cancelled"),
    TimeoutError: (504, "timeout"),
    ClientDisconnected: (499, "client_closed"),  # nobody reads it; the status reaches the log and the metrics
}

#: the routes whose errors are written in OpenAI's shape and statuses
OPENAI_PREFIX = "/v1/"

#: the error answers of the POST routes, for the OpenAPI schema
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

#: the error answers of the OpenAI routes (OpenAI's shape and statuses), for the OpenAPI schema
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorResponse, "description": description}
    for status, description in {
        400: "invalid or unsupported parameter, corrupt or unsupported image, body not JSON (param names the field, "
        "code the kind: unsupported_parameter, invalid_value, invalid_image, ...)",
        401: "missing or wrong API key",
        404: "model not served here",
        413: "body or image too large",
        503: "queue full or shutting down (see Retry-After)",
        504: "certification timed out",
    }.items()
}


def openai_status(status: int) -> int:
    """OpenAI's status for a native one: OpenAI answers every invalid request, and unreadable images, with 400."""
    return 400 if status in (415, 422) else status


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for a status: the client's fault below 500, the server's from 500 on."""
    return "invalid_request_error" if status < 500 else "server_error"


def _validation_code(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The OpenAI ``code`` and ``param`` of a validation failure: from its first error's pydantic type and place
    (an unknown or unsupported field names itself in the error's context, relative to that place)."""
    if not errors:
        return "invalid_value", None
    first = errors[0]
    kind = str(first.get("type", ""))
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    named = (first.get("ctx") or {}).get("param")  # an unknown field, inside the object at ``where``
    param = ".".join([*where, named] if named else where)
    code = {
        "unknown_field": "unsupported_parameter",
        "unsupported_parameter": "unsupported_parameter",
        "unsupported_value": "unsupported_value",
        "missing": "missing_required_parameter",
        "json_invalid": "invalid_json",
    }.get(kind, "invalid_value")
    return code, param or None


def status_and_kind(error: BaseException) -> tuple[int, str] | None:
    """The table's entry for ``error`` (its nearest class in :data:`ERROR_TABLE`), or None: an internal error."""
    return next((ERROR_TABLE[cls] for cls in type(error).__mro__ if cls in ERROR_TABLE), None)


def _message(error: BaseException) -> str:
    """What a plain answer says of a known ``error``."""
    if isinstance(error, TimeoutError):
        return "the certification did not finish within the server's time limit; ask for fewer samples"
    if isinstance(error, JobCancelled):
        return f"the job was cancelled: {error}"
    return str(error)


def _headers(error: BaseException) -> dict[str, str] | None:
    """``Retry-After`` for the 503s: the queue's estimate when it is full, else five seconds."""
    if isinstance(error, QueueFull):
        return {"Retry-After": str(max(1, round(error.retry_after)))}
    if isinstance(error, (WorkerStopped, JobCancelled)):
        return {"Retry-After": "5"}
    return None


def error_response(
    request: Request,
    status: int,
    kind: str,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """The error answer: fsmllm's shape, or on the OpenAI routes OpenAI's (``code``: the OpenAI code where it is
    finer than ``kind``, ``param``: the field at fault)."""
    request_id = getattr(request.state, "request_id", None)
    if not request.url.path.startswith(OPENAI_PREFIX):
        body = {"error": {"type": kind, "message": message, "request_id": request_id}}
        return JSONResponse(body, status_code=status, headers=headers)
    status = openai_status(status)
    error = {
        "message": message,
        "type": openai_type(status),
        "param": param,
        "code": code or kind,
        "request_id": request_id,
    }
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def error_event(error: BaseException) -> dict[str, Any]:
    """A stream's error event: the exception's class name (clients map it to the status it would have had
    outside a stream) and, for an error in :data:`ERROR_TABLE`, its message; for any other only where to look."""
    told = status_and_kind(error) is not None
    return {"type": type(error).__name__, "message": (str(error) or type(error).__name__) if told else INTERNAL_ERROR}


def openai_error_event(error: BaseException) -> dict[str, Any]:
    """A chat completion stream's in-band error (its 200 already sent), in OpenAI's error shape as the plain
    answer would have had it: ``message``, ``type`` (``server_error`` for what would have been a 5xx, else
    ``invalid_request_error``), ``param`` and ``code`` (the kind; ``internal_error`` for an error outside
    :data:`ERROR_TABLE`, whose message only says where to look). OpenAI's SDK raises it as ``openai.APIError``."""
    known = status_and_kind(error)
    status, kind = known or (500, "internal_error")
    return {
        "message": _message(error) if known else INTERNAL_ERROR,
        "type": openai_type(openai_status(status)),
        "param": getattr(error, "param", None),
        "code": kind,
    }


def install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, error: Exception) -> JSONResponse:
        status, kind = status_and_kind(error) or (500, "internal_error")
        return error_response(request, status, kind, _message(error), _headers(error), getattr(error, "param", None))

    for exception in ERROR_TABLE:
        app.add_exception_handler(exception, known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        code, param = _validation_code(error.errors())
        return error_response(request, 422, "invalid_request", validation_message(error.errors()), None, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request"
        return error_response(request, error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception(
            "unhandled error in %s %s id=%s",
            request.method,
            request.url.path,
            getattr(request.state, "request_id", None),
        )
        return error_response(request, 500, "internal_error", INTERNAL_ERROR)
