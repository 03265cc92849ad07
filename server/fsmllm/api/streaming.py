"""Long-running work behind HTTP: cancelled when the client goes away; SSE progress then a result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from fsmllm.api.schemas.certificate import InterimCertificateOut
from fsmllm.api.schemas.generate import VotesEvent
from fsmllm.certify import InterimCertificate
from fsmllm.certify.answers import VoteProgress
from fsmllm.engine.jobs import ProgressCallback, VoteProgressCallback

#: a request's work, told where its sample progress and its votes' progress go (None: nowhere)
Work = Callable[[ProgressCallback | None, VoteProgressCallback | None], Awaitable[dict[str, Any]]]
T = TypeVar("T")

#: OpenAPI: with ``stream: true`` a route answers 200 as server-sent events instead of JSON
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the JSON answer, or with stream: true server-sent events (their last event carries it)",
        "content": {"text/event-stream": {"schema": {"description": "one JSON object per event"}}},
    }
}

log = logging.getLogger("fsmllm.api")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its work has been cancelled (answered 499, unread)."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (freeing the job's remaining samples or
    stopping its generation) and raise :class:`ClientDisconnected`.

    Starlette does not cancel a plain route when its client goes away, so the ASGI ``receive`` channel is
    watched for ``http.disconnect`` (the body has already been read, so nothing else can arrive on it).
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # its clean-up (cancelling the job or the generation) runs before the answer
        raise ClientDisconnected("the client disconnected")
    return task.result()


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def in_band_error(
    error: BaseException, describe_error: Callable[[BaseException], dict[str, Any]], request_id: str, stream: str
) -> dict[str, Any]:
    """The body of the error event that ends a stream whose 200 was already sent: ``describe_error(error)`` plus
    the request id, under which the error and its traceback are logged (as a 500 outside a stream is)."""
    log.error("error in a %s id=%s", stream, request_id, exc_info=error)
    return {**describe_error(error), "request_id": request_id}


def progress_stream(
    work: Work, describe_error: Callable[[BaseException], dict[str, Any]], request_id: str
) -> StreamingResponse:
    """Run ``work(on_progress, on_votes)`` and stream ``progress`` and ``votes`` events, then one ``result`` event.

    A ``progress`` event is ``{done, total}`` (samples drawn, the budget) plus, with an anytime-valid bound,
    ``certificate``: the certificate valid so far ({n, score_lower, radii}). A ``votes`` event (a certified
    answer) is :class:`~fsmllm.api.schemas.generate.VotesEvent`: the votes so far, after each chunk. The callbacks may
    be called from any thread; the worker reports a batch's progress before it resolves the job, so every event
    arrives before the result. If the client goes away, the work is cancelled (which cancels the job's
    remaining samples on the device worker and the votes still to come).

    If the work fails once the stream has started (its 200 already sent), the last event is ``error``:
    ``describe_error(error)`` plus ``request_id``, the id of the ``X-Request-ID`` header, which the server log
    names with the error and its traceback (as it does for a 500 outside a stream).
    """
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[str] = asyncio.Queue()

    def emit(event: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, sse(event, data))

    def on_progress(done: int, total: int, interim: InterimCertificate | None) -> None:
        certificate = {} if interim is None else {"certificate": InterimCertificateOut.of(interim).model_dump()}
        emit("progress", {"done": done, "total": total, **certificate})

    def on_votes(votes: VoteProgress) -> None:
        emit("votes", VotesEvent.render(votes))

    async def events() -> AsyncIterator[str]:
        task = asyncio.ensure_future(work(on_progress, on_votes))
        waiter: asyncio.Future[str] | None = None
        try:
            while not task.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            try:
                result = task.result()
            except Exception as error:
                yield sse("error", in_band_error(error, describe_error, request_id, "progress stream"))
                return
            while not updates.empty():  # updates still queued when the work finished
                yield updates.get_nowait()
            yield sse("result", result)
        finally:  # also when the client has gone: stop the work and the wait for its progress
            task.cancel()
            if waiter is not None:
                waiter.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
