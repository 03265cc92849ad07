"""Every failure becomes ``{"error": {"type", "message", "request_id"}}`` with the right status code."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fsmllm.api.schemas import validation_message
from fsmllm.api.streaming import ClientDisconnected
from fsmllm.engine.jobs import JobCancelled
from fsmllm.engine.runtime import PolicyError
from fsmllm.engine.worker import QueueFull, WorkerStopped
from fsmllm.images import ImageError, ImageTooLarge, UnsupportedImage

log = logging.getLogger("fsmllm.api")

#: what a client is told of an unexpected error (a 500, or an error event in a progress stream): the details
#: stay in the server log, under the request id the answer carries
INTERNAL_ERROR = "internal error; the request id is in the server log"


class RequestError(Exception):
    """A request problem found by the HTTP layer itself (bad content type, body too large, auth...)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers


def error_response(request: Request, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = {"error": {"type": kind, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(request, error.status, error.kind, str(error), error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", validation_message(error.errors()))

    @app.exception_handler(ImageError)
    async def _image(request: Request, error: ImageError) -> JSONResponse:
        status = 413 if isinstance(error, ImageTooLarge) else 415 if isinstance(error, UnsupportedImage) else 400
        return error_response(request, status, "invalid_image", str(error))

    @app.exception_handler(PolicyError)
    async def _policy(request: Request, error: PolicyError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", str(error))

    @app.exception_handler(ValueError)
    async def _value(request: Request, error: ValueError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", str(error))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, error: QueueFull) -> JSONResponse:
        retry = str(max(1, round(error.retry_after)))
        return error_response(request, 503, "overloaded", str(error), {"Retry-After": retry})

    @app.exception_handler(WorkerStopped)
    async def _stopped(request: Request, error: WorkerStopped) -> JSONResponse:
        return error_response(request, 503, "unavailable", str(error), {"Retry-After": "5"})

    @app.exception_handler(asyncio.TimeoutError)
    async def _timeout(request: Request, error: asyncio.TimeoutError) -> JSONResponse:
        return error_response(request, 504, "timeout", "the certification did not finish within the server's time limit; ask for fewer samples")

    @app.exception_handler(JobCancelled)
    async def _cancelled(request: Request, error: JobCancelled) -> JSONResponse:
        return error_response(request, 503, "cancelled", f"the job was cancelled: {error}", {"Retry-After": "5"})

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, error: ClientDisconnected) -> JSONResponse:
        # nobody reads it; the status (nginx's "client closed request") reaches the log and the metrics
        return error_response(request, 499, "client_closed", str(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request"
        return error_response(request, error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s id=%s", request.method, request.url.path, getattr(request.state, "request_id", None))
        return error_response(request, 500, "internal_error", INTERNAL_ERROR)
