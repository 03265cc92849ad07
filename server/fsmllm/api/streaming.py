"""Server-sent events: progress of a long certification, then its result (or its error)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

ProgressCallback = Callable[[int, int], None]


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def progress_stream(
    work: Callable[[ProgressCallback], Awaitable[dict[str, Any]]],
    describe_error: Callable[[BaseException], dict[str, Any]],
) -> StreamingResponse:
    """Run ``work(on_progress)`` and stream ``progress`` events ({done, total}) then one ``result`` event.

    ``on_progress`` may be called from any thread. If the client goes away, the work is cancelled (which
    cancels the job's remaining samples on the device worker).
    """
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def on_progress(done: int, total: int) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, (done, total))

    async def events() -> AsyncIterator[str]:
        task = asyncio.ensure_future(work(on_progress))
        try:
            while not task.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    done, total = waiter.result()
                    yield sse("progress", {"done": done, "total": total})
                else:
                    waiter.cancel()
            try:
                yield sse("result", task.result())
            except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
                yield sse("error", describe_error(error))
        finally:
            task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

