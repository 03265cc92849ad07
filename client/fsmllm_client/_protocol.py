"""What the sync and async clients share, free of I/O: request building, SSE parsing, errors and retries.

:class:`~fsmllm_client.client.Client` and :class:`~fsmllm_client.client.AsyncClient` only move bytes and
sleep; every decision (what to send, how to read the answer, whether and how long to wait before a retry)
is made here, once.
"""

from __future__ import annotations

import base64
import difflib
import email.utils
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from fsmllm_client.errors import AuthError, BadRequest, FsmllmError, Overloaded, ServerError, Unreachable
from fsmllm_client.models import CertifyResult, ChatCompletion, GenerateResult, Health, ModelList, Readiness

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
#: a certified answer's ``votes`` event: {done, total, phase, answer, agree, estimated, p_lower, radius, stopped_by}
VoteProgressCallback = Callable[[dict[str, Any]], None]
#: an image: a file path, the bytes of an image file, a ``data:image/...;base64,`` URL, or a PIL image
ImageInput = Any

DEFAULT_URL = "http://127.0.0.1:8000"

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)

#: in-band errors of a progress stream (the exception's class name) and the status they would have had
_STREAM_ERROR_STATUS = {"QueueFull": 503, "WorkerStopped": 503, "JobCancelled": 503, "TimeoutError": 504}


class CertificationOptions(TypedDict, total=False):
    """How to certify; unset options take the deployment's defaults (see ``models()``). The names are the
    server's request fields (``progress`` aside, which asks for its progress stream)."""

    radius: float | Sequence[float]
    sigma: float
    alpha: float
    n0: int
    n: int
    bound: str
    seed: int
    stop_at_fcsb: float
    granularity: str
    per_token: bool
    #: put the c_i the bound is computed from into the (signed) certificate, so a verifier recomputes the bound
    record_samples: bool
    progress: ProgressCallback


class CertifyOptions(CertificationOptions, total=False):
    """Keyword options of ``certify``."""

    target_cos: float
    radius_tolerance: float


class GenerateOptions(CertificationOptions, total=False):
    """Keyword options of ``generate``: sampling, plus the certification options (``seed`` seeds both)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: str | Sequence[str]
    #: certify the answer itself: True for the server's defaults, or {n0, n, alpha, radius, inner}
    certify_answer: bool | Mapping[str, Any]
    #: called with each ``votes`` event of the certified answer (asks for the progress stream, as ``progress`` does)
    vote_progress: VoteProgressCallback


def image_data_url(image: ImageInput) -> str:
    """The JSON form of ``image``: a ``data:`` URL (or bare base64 when the format is not recognised).

    ``image`` is a path (``str`` or ``os.PathLike``), the bytes of an image file, an existing data URL, or any
    object with PIL's ``save(file, format=...)`` (encoded as PNG).
    """
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif callable(getattr(image, "save", None)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"image must be a path, bytes, a data URL or a PIL image, not {type(image).__name__}")
    encoded = base64.b64encode(data).decode("ascii")
    mime = next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime};base64,{encoded}" if mime else encoded


def user_message(text: str, image: ImageInput) -> dict[str, Any]:
    """An OpenAI-style user message asking ``text`` about ``image`` (for ``chat``)."""
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image_data_url(image)}}],
    }


@dataclass(frozen=True)
class Reply:
    """An HTTP answer reduced to what the decisions need: status, headers and the decoded JSON."""

    status: int
    headers: Mapping[str, str]
    payload: Any


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what to send, which statuses are answers, and how to turn the answer into ``T``."""

    method: str
    path: str
    model: type[BaseModel]
    body: dict[str, Any] | None = None
    progress: ProgressCallback | None = None
    accept: frozenset[int] = field(default=frozenset({200}))
    votes: VoteProgressCallback | None = None

    @property
    def streamed(self) -> bool:
        """Whether the answer comes as a progress stream (someone listens to its events)."""
        return self.progress is not None or self.votes is not None

    @property
    def idempotent(self) -> bool:
        """GETs may be retried after any transport error; POSTs only when nothing reached the server."""
        return self.method == "GET"

    def result(self, reply: Reply) -> T:
        """The typed result of an accepted reply."""
        try:
            return self.model.model_validate(reply.payload)  # type: ignore[return-value]
        except ValidationError as error:
            raise ServerError(
                f"unexpected answer from {self.path}: {error}", reply.status, reply.headers.get("x-request-id")
            ) from None


def _options(given: Mapping[str, Any], allowed: Any) -> dict[str, Any]:
    """The options that are set; ``TypeError`` naming the option meant for an unknown one."""
    known = sorted(allowed.__optional_keys__)
    for name in sorted(set(given) - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"unknown option {name!r}{hint}; the options are {', '.join(known)}")
    return {key: value for key, value in given.items() if value is not None}


def _certification_fields(options: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The request fields ``names`` that are set, with ``radius`` as a list and ``stream`` when a progress callback
    is."""
    listeners = ("progress", "vote_progress")
    fields: dict[str, Any] = {key: options[key] for key in names if key in options and key not in listeners}
    if "radius" in fields:
        radius = fields["radius"]
        fields["radius"] = [float(radius)] if isinstance(radius, (int, float)) else [float(r) for r in radius]
    if any(name in options for name in listeners):
        fields["stream"] = True
    return fields


def certify_call(image: ImageInput, options: Mapping[str, Any]) -> Call[CertifyResult]:
    """``POST /certify`` with :class:`CertifyOptions`."""
    chosen = _options(options, CertifyOptions)
    body = {"image": image_data_url(image), **_certification_fields(chosen, CertifyOptions.__optional_keys__)}
    return Call("POST", "/certify", CertifyResult, body, chosen.get("progress"))


def generate_call(image: ImageInput, prompt: str, options: Mapping[str, Any]) -> Call[GenerateResult]:
    """``POST /generate`` with :class:`GenerateOptions`."""
    chosen = _options(options, GenerateOptions)
    fields = _certification_fields(chosen, GenerateOptions.__optional_keys__)
    if "stop" in fields:
        fields["stop"] = [fields["stop"]] if isinstance(fields["stop"], str) else list(fields["stop"])
    answer = fields.pop("certify_answer", None)
    if answer:  # True: the server's defaults
        fields["certify_answer"] = {} if answer is True else dict(answer)
    body = {"image": image_data_url(image), "prompt": prompt, **fields}
    return Call("POST", "/generate", GenerateResult, body, chosen.get("progress"), votes=chosen.get("vote_progress"))


def chat_call(messages: Iterable[Mapping[str, Any]], options: Mapping[str, Any]) -> Call[ChatCompletion]:
    """``POST /v1/chat/completions``; ``options`` are the OpenAI request fields (and ``certification``)."""
    if options.get("stream"):
        raise ValueError("streaming chat is not supported by this client; use the openai package for it")
    body = {"messages": [dict(message) for message in messages], **{k: v for k, v in options.items() if v is not None}}
    return Call("POST", "/v1/chat/completions", ChatCompletion, body)


HEALTH: Call[Health] = Call("GET", "/health", Health)
READY: Call[Readiness] = Call("GET", "/ready", Readiness, accept=frozenset({200, 503}))
MODELS: Call[ModelList] = Call("GET", "/v1/models", ModelList)


def read_reply(status: int, headers: Mapping[str, str], content: bytes) -> Reply:
    """Decode a complete (non-streamed) answer; a body that is not JSON becomes an error payload."""
    try:
        return Reply(status, headers, json.loads(content))
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = content.decode("utf-8", "replace").strip()[:300] or f"empty answer with HTTP {status}"
        return Reply(status, headers, {"error": {"type": "invalid_response", "message": text}})


class EventStream:
    """Reads the server's progress stream line by line: ``progress`` and ``votes`` events feed the call's
    callbacks, then one ``result`` (or ``error``) event becomes the reply."""

    def __init__(
        self,
        progress: ProgressCallback | None,
        status: int,
        headers: Mapping[str, str],
        votes: VoteProgressCallback | None = None,
    ) -> None:
        self._progress, self._votes = progress, votes
        self._status = status
        self._headers = headers
        self._event = "message"
        self._data: list[str] = []
        self._reply: Reply | None = None

    def feed(self, line: str) -> None:
        """One line of the stream (without its newline)."""
        if not line:
            self._dispatch()
        elif line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].lstrip())

    def _dispatch(self) -> None:
        if not self._data:
            return
        event, text = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        try:
            data = json.loads(text)
            if event == "progress":
                done, total = int(data["done"]), int(data["total"])
        except (ValueError, KeyError, TypeError):
            raise ServerError(
                f"unreadable {event} event in the progress stream: {text[:200]}",
                self._status,
                self._headers.get("x-request-id"),
            ) from None
        if event == "progress":
            if self._progress is not None:
                self._progress(done, total)
        elif event == "votes":
            if self._votes is not None:
                self._votes(data)
        elif event == "result":
            self._reply = Reply(self._status, self._headers, data)
        elif event == "error":
            status = _STREAM_ERROR_STATUS.get(data.get("type", ""), 500)
            error = {"type": data.get("type"), "message": data.get("message", "error"), "request_id": None}
            self._reply = Reply(status, self._headers, {"error": error})

    def read(self, lines: Iterable[str]) -> Reply:
        """Feed a whole (blocking) stream and return its outcome."""
        for line in lines:
            self.feed(line)
        return self.reply()

    def reply(self) -> Reply:
        """The stream's outcome, once it has ended."""
        self._dispatch()
        if self._reply is None:
            raise ServerError(
                "the progress stream ended without a result", self._status, self._headers.get("x-request-id")
            )
        return self._reply


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), if present and readable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": no zone information; HTTP dates are in UTC
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())


#: the gateway's 502 when no replica's answer reached it (docs/deploy.md): no result was delivered, and the same
#: request gives the same certificate (its seed), so it is retried like a 503, after its ``Retry-After``
UPSTREAM_UNAVAILABLE = "upstream_unavailable"


def error_from(reply: Reply) -> FsmllmError:
    """The exception for a refused request, carrying the server's message, error type and request id; the
    retryable ones (429, 503, the gateway's 502 ``upstream_unavailable``) are :class:`Overloaded`."""
    body = reply.payload.get("error") if isinstance(reply.payload, dict) else None
    body = body if isinstance(body, dict) else {}
    message = str(body.get("message") or f"HTTP {reply.status}")
    request_id = body.get("request_id") or reply.headers.get("x-request-id")
    kind = body.get("code") or body.get("type")  # the OpenAI routes' shape names fsmllm's kind in its code
    if reply.status in (401, 403):
        return AuthError(message, reply.status, request_id, kind)
    if reply.status in (429, 503) or (reply.status == 502 and kind == UPSTREAM_UNAVAILABLE):
        return Overloaded(message, reply.status, request_id, kind, _retry_after(reply.headers))
    if 400 <= reply.status < 500:
        return BadRequest(message, reply.status, request_id, kind)
    return ServerError(message, reply.status, request_id, kind)


#: transport errors raised before the request left the client: even a POST may be sent again after them
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _url_of(error: httpx.TransportError, path: str) -> str:
    """The URL a transport error was trying (``path`` when httpx did not attach the request)."""
    try:
        return str(error.request.url)
    except RuntimeError:
        return path


@dataclass(frozen=True)
class Retry:
    """Try the call again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again: 429/503 and the gateway's 502 ``upstream_unavailable`` (honouring ``Retry-After``,
    capped at ``max_sleep`` seconds), and transport errors of GETs or of connections that never opened. At most
    ``max_retries`` retries per call."""

    max_retries: int = 3
    max_sleep: float = 30.0
    backoff: float = 0.5

    def step(self, call: Call[T], attempt: int, outcome: Reply | httpx.TransportError) -> T | Retry:
        """The result of ``call`` from try number ``attempt`` (0 first), or how long to wait before the next.

        Raises the matching :class:`FsmllmError` when the call failed for good.
        """
        if isinstance(outcome, httpx.TransportError):
            if attempt < self.max_retries and (call.idempotent or isinstance(outcome, _NOT_SENT)):
                return self._wait(None, attempt)
            raise Unreachable(
                f"no answer to {call.method} {_url_of(outcome, call.path)}: {type(outcome).__name__}: {outcome}; "
                "is an fsmllm server listening at that address?"
            ) from outcome
        if outcome.status in call.accept:
            return call.result(outcome)
        error = error_from(outcome)
        if isinstance(error, Overloaded) and attempt < self.max_retries:
            return self._wait(error.retry_after, attempt)
        raise error

    def _wait(self, hint: float | None, attempt: int) -> Retry:
        wanted = hint if hint is not None else self.backoff * 2**attempt
        return Retry(min(self.max_sleep, wanted) if math.isfinite(wanted) else self.max_sleep)
