"""Every failure becomes ``{"error": {"type", "message", "request_id"}}`` with the right status code.

:data:`ERROR_TABLE` is the one mapping from an exception to its status and kind, used by plain answers
(:func:`install_error_handlers`) and by streams whose 200 was already sent (:func:`error_event`). The request
errors are :mod:`fsmllm.errors`' hierarchy; anything not in the table is a 500 whose message only names the
request id, under which the server log keeps the error and its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fsmllm.api.schemas import ErrorResponse, validation_message
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
    UnknownModel: (404, "not_found"),
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
    request: Request, status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = {"error": {"type": kind, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(error: BaseException) -> dict[str, Any]:
    """A stream's error event: the exception's class name (clients map it to the status it would have had
    outside a stream) and, for an error in :data:`ERROR_TABLE`, its message; for any other only where to look."""
    told = status_and_kind(error) is not None
    return {"type": type(error).__name__, "message": (str(error) or type(error).__name__) if told else INTERNAL_ERROR}


def install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, error: Exception) -> JSONResponse:
        status, kind = status_and_kind(error) or (500, "internal_error")
        return error_response(request, status, kind, _message(error), _headers(error))

    for exception in ERROR_TABLE:
        app.add_exception_handler(exception, known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", validation_message(error.errors()))

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
