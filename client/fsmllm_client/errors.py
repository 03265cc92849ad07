"""Exceptions raised by the client. Each carries the server's status code, message and request id."""

from __future__ import annotations


class FsmllmError(Exception):
    """A request failed. ``message`` is the server's own message when it sent one.

    ``status_code`` is the HTTP status (``None`` when the server was not reached), ``error_type`` the server's
    error type (``invalid_request``, ``overloaded``, ...; from the OpenAI routes, the error's ``code``), ``request_id``
    the id to look up in the server log.
    """

    def __init__(
        self, message: str, status_code: int | None = None, request_id: str | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.error_type = error_type

    def __str__(self) -> str:
        status = f"HTTP {self.status_code}: " if self.status_code is not None else ""
        request = f" (request id {self.request_id})" if self.request_id else ""
        return f"{status}{self.message}{request}"


class BadRequest(FsmllmError):
    """The server refused the request (4xx other than auth and rate limits): fix the input."""


class AuthError(FsmllmError):
    """Missing or wrong API key (401) or forbidden (403)."""


class Overloaded(FsmllmError):
    """The server stayed busy (503 or 429), or the gateway found no replica (502 ``upstream_unavailable``), through
    every retry; ``retry_after`` is its last hint in seconds."""

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        request_id: str | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code, request_id, error_type)
        self.retry_after = retry_after


class ServerError(FsmllmError):
    """The server failed (5xx), or answered something that is not the fsmllm API."""


class Unreachable(FsmllmError):
    """No answer: connection refused, DNS failure, timeout, or the connection dropped."""
