"""Synchronous and asynchronous clients of the fsmllm HTTP API.

Both delegate every decision to :mod:`fsmllm_client._protocol`; they differ only in how bytes move and how
they sleep between retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx

from fsmllm_client._protocol import (
    DEFAULT_URL,
    HEALTH,
    MODELS,
    READY,
    Call,
    CertifyOptions,
    EventStream,
    GenerateOptions,
    ImageInput,
    Reply,
    Retry,
    RetryPolicy,
    certify_call,
    chat_call,
    generate_call,
    read_reply,
)
from fsmllm_client.models import CertifyResult, ChatCompletion, GenerateResult, Health, ModelList, Readiness

T = TypeVar("T")


class _Settings:
    """Connection settings shared by both clients."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        max_retry_sleep: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = RetryPolicy(max_retries=max_retries, max_sleep=max_retry_sleep)


class Client:
    """Blocking client. Use as a context manager, or call :meth:`close`.

    ``base_url``: the server (``http://host:8000``); ``api_key``: sent as ``Authorization: Bearer``;
    ``timeout``: seconds per request (certifications with large ``n`` take a while); ``max_retries``: retries
    on 429/503 and the gateway's 502 ``upstream_unavailable`` (waiting ``Retry-After``, at most
    ``max_retry_sleep`` seconds) and on connection errors;
    ``transport``: an httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        max_retry_sleep: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, timeout, max_retries, max_retry_sleep)
        s = self._settings
        self._http = httpx.Client(base_url=s.base_url, headers=s.headers, timeout=s.timeout, transport=transport)

    def health(self) -> Health:
        """``GET /health``: the process answers."""
        return self._call(HEALTH)

    def ready(self) -> Readiness:
        """``GET /ready``: ``.ready`` is false while the server is still loading."""
        return self._call(READY)

    def models(self) -> ModelList:
        """``GET /v1/models``: the served model, its encoder, booster, allowed sigmas and defaults."""
        return self._call(MODELS)

    def certify(self, image: ImageInput, **options: Unpack[CertifyOptions]) -> CertifyResult:
        """``POST /certify``: the certificate of ``image`` (see :class:`CertifyOptions`)."""
        return self._call(certify_call(image, options))

    def generate(self, image: ImageInput, prompt: str, **options: Unpack[GenerateOptions]) -> GenerateResult:
        """``POST /generate``: the answer to ``prompt`` about ``image`` and its certificate."""
        return self._call(generate_call(image, prompt, options))

    def chat(self, messages: Iterable[Mapping[str, Any]], **options: Any) -> ChatCompletion:
        """``POST /v1/chat/completions`` (non-streaming); ``options`` are OpenAI fields plus ``certification``."""
        return self._call(chat_call(messages, options))

    def _exchange(self, call: Call[Any]) -> Reply | httpx.TransportError:
        try:
            with self._http.stream(call.method, call.path, json=call.body) as response:
                if not call.streamed or response.status_code != 200:
                    return read_reply(response.status_code, response.headers, response.read())
                events = EventStream(call.progress, response.status_code, response.headers, call.votes)
                return events.read(response.iter_lines())
        except httpx.TransportError as error:
            return error

    def _call(self, call: Call[T]) -> T:
        attempt = 0
        while isinstance(step := self._settings.retry.step(call, attempt, self._exchange(call)), Retry):
            time.sleep(step.seconds)
            attempt += 1
        return step

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client` (same arguments and methods, awaited)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        max_retry_sleep: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, timeout, max_retries, max_retry_sleep)
        s = self._settings
        self._http = httpx.AsyncClient(base_url=s.base_url, headers=s.headers, timeout=s.timeout, transport=transport)

    async def health(self) -> Health:
        """``GET /health``: the process answers."""
        return await self._call(HEALTH)

    async def ready(self) -> Readiness:
        """``GET /ready``: ``.ready`` is false while the server is still loading."""
        return await self._call(READY)

    async def models(self) -> ModelList:
        """``GET /v1/models``: the served model, its encoder, booster, allowed sigmas and defaults."""
        return await self._call(MODELS)

    async def certify(self, image: ImageInput, **options: Unpack[CertifyOptions]) -> CertifyResult:
        """``POST /certify``: the certificate of ``image`` (see :class:`CertifyOptions`)."""
        return await self._call(certify_call(image, options))

    async def generate(self, image: ImageInput, prompt: str, **options: Unpack[GenerateOptions]) -> GenerateResult:
        """``POST /generate``: the answer to ``prompt`` about ``image`` and its certificate."""
        return await self._call(generate_call(image, prompt, options))

    async def chat(self, messages: Iterable[Mapping[str, Any]], **options: Any) -> ChatCompletion:
        """``POST /v1/chat/completions`` (non-streaming); ``options`` are OpenAI fields plus ``certification``."""
        return await self._call(chat_call(messages, options))

    async def _exchange(self, call: Call[Any]) -> Reply | httpx.TransportError:
        try:
            async with self._http.stream(call.method, call.path, json=call.body) as response:
                if not call.streamed or response.status_code != 200:
                    return read_reply(response.status_code, response.headers, await response.aread())
                events = EventStream(call.progress, response.status_code, response.headers, call.votes)
                async for line in response.aiter_lines():
                    events.feed(line)
                return events.reply()
        except httpx.TransportError as error:
            return error

    async def _call(self, call: Call[T]) -> T:
        attempt = 0
        while isinstance(step := self._settings.retry.step(call, attempt, await self._exchange(call)), Retry):
            await asyncio.sleep(step.seconds)
            attempt += 1
        return step

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()
