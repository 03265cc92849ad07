"""The clients when things go wrong: refusals, unreadable answers, broken streams, dropped connections.

Where the real fsmllm server can produce the failure it is used (a timeout inside a progress stream, a full
queue, a refused connection). Answers it never gives (429, an HTTP-date ``Retry-After``, HTML from a gateway, a
stream cut short) come from a scripted ``httpx.MockTransport`` or from a raw socket server on loopback that
reads a request and hangs up. The clients' sleeps between tries are recorded instead of slept (no timing).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from fsmllm.api.settings import Settings
from fsmllm_client import AsyncClient, Client, Overloaded, ServerError, Unreachable

from ..api.live import certified_content, data_url, live_server, open_request, png_bytes, wait_until

OVERLOADED = {"error": {"type": "overloaded", "message": "busy", "request_id": "r1"}}


def scripted(*answers: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> tuple[list[httpx.Request], httpx.MockTransport]:
    """A transport giving ``answers`` in turn (the last one repeats); records the requests."""
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = answers[min(len(requests), len(answers)) - 1]
        if callable(answer):
            return answer(request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)  # a fresh copy

    return requests, httpx.MockTransport(handle)


def test_429_is_retried_after_retry_after(sleeps: list[float]) -> None:
    requests, transport = scripted(httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "2"}),
                                   httpx.Response(200, json={"status": "ok"}))
    with Client("http://fsmllm.test", transport=transport) as client:
        assert client.health().status == "ok"
    assert len(requests) == 2 and sleeps == [2.0]


def test_retry_after_as_an_http_date_is_waited_for(sleeps: list[float]) -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=90), usegmt=True)

    def flaky() -> httpx.MockTransport:
        return scripted(httpx.Response(503, json=OVERLOADED, headers={"Retry-After": later}),
                        httpx.Response(200, json={"status": "ok"}))[1]

    with Client("http://fsmllm.test", transport=flaky(), max_retry_sleep=120) as client:
        assert client.health().status == "ok"

    async def run() -> str:
        async with AsyncClient("http://fsmllm.test", transport=flaky(), max_retry_sleep=120) as client:
            return (await client.health()).status

    assert asyncio.run(run()) == "ok"
    assert len(sleeps) == 2 and all(60 < s <= 90 for s in sleeps), sleeps
    with Client("http://fsmllm.test", transport=flaky(), max_retries=0) as impatient, pytest.raises(Overloaded) as refused:
        impatient.health()
    assert refused.value.retry_after is not None and 60 < refused.value.retry_after <= 90
    with Client("http://fsmllm.test", transport=flaky()) as capped:
        assert capped.health().status == "ok"
    assert sleeps[-1] == 30.0  # the default cap on one sleep


def test_overloaded_for_good_after_max_retries(sleeps: list[float]) -> None:
    requests, transport = scripted(httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "1"}))
    with Client("http://fsmllm.test", transport=transport, max_retries=4) as client, pytest.raises(Overloaded) as refused:
        client.certify(png_bytes())
    assert len(requests) == 5 and sleeps == [1.0] * 4
    assert refused.value.status_code == 429 and refused.value.request_id == "r1"


def test_a_reply_that_is_not_json(sleeps: list[float]) -> None:
    html = httpx.Response(502, text="<html><body>502 Bad Gateway</body></html>", headers={"content-type": "text/html"})
    requests, transport = scripted(html)
    with Client("http://fsmllm.test", transport=transport) as client, pytest.raises(ServerError) as failed:
        client.certify(png_bytes())
    assert failed.value.status_code == 502 and "502 Bad Gateway" in failed.value.message
    assert failed.value.error_type == "invalid_response" and len(requests) == 1 and sleeps == []

    ok_but_html = httpx.Response(200, text="<html>a captive portal</html>")
    with Client("http://fsmllm.test", transport=scripted(ok_but_html)[1]) as client, pytest.raises(ServerError) as odd:
        client.health()
    assert odd.value.status_code == 200 and "unexpected answer from /health" in odd.value.message


def event_stream(*events: str) -> httpx.Response:
    return httpx.Response(200, content="".join(events).encode(), headers={"content-type": "text/event-stream"})


def test_a_stream_that_ends_without_a_result(sleeps: list[float]) -> None:
    cut = 'event: progress\ndata: {"done": 10, "total": 120}\n\n'
    requests, transport = scripted(event_stream(cut))
    seen: list[tuple[int, int]] = []

    def certify_async() -> None:
        async def run() -> None:
            async with AsyncClient("http://fsmllm.test", transport=transport) as client:
                await client.certify(png_bytes(), progress=lambda d, t: seen.append((d, t)))

        asyncio.run(run())

    with Client("http://fsmllm.test", transport=transport) as client:
        for certify in (lambda: client.certify(png_bytes(), progress=lambda d, t: seen.append((d, t))), certify_async):
            with pytest.raises(ServerError, match="ended without a result"):
                certify()
    assert seen == [(10, 120), (10, 120)] and len(requests) == 2 and sleeps == []  # reported, not retried


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_errors_are_retried_max_retries_times(sleeps: list[float]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with Client(url, max_retries=3) as client, pytest.raises(Unreachable, match="ConnectError"):
        client.certify(png_bytes())  # a POST: nothing was sent, so trying again is safe
    assert sleeps == [0.5, 1.0, 2.0]
    sleeps.clear()

    async def run() -> None:
        async with AsyncClient(url, max_retries=2) as client:
            await client.health()

    with pytest.raises(Unreachable):
        asyncio.run(run())
    assert sleeps == [0.5, 1.0]
    sleeps.clear()
    with Client(url, max_retries=0) as client, pytest.raises(Unreachable):
        client.health()
    assert sleeps == []


class HangUp:
    """A loopback HTTP server that reads each request whole, optionally sends ``prefix``, then hangs up."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += connection.recv(65536)
                self.requests.append(head.split(b"\r\n")[0])
                connection.sendall(self.prefix)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def hang_up() -> Iterator[Callable[[bytes], HangUp]]:
    servers: list[HangUp] = []

    def start(prefix: bytes = b"") -> HangUp:
        servers.append(HangUp(prefix))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_post_is_not_sent_again_after_the_server_received_it(hang_up: Callable[[bytes], HangUp], sleeps: list[float]) -> None:
    """The server read the whole request, then the connection broke: the certification may be running, so
    the POST must not be repeated. A GET is."""
    server = hang_up(b"")
    with Client(server.url, max_retries=3) as client:
        with pytest.raises(Unreachable, match=f"POST {server.url}/certify"):
            client.certify(png_bytes())
        assert server.requests == [b"POST /certify HTTP/1.1"] and sleeps == []
        with pytest.raises(Unreachable, match=f"GET {server.url}/health"):
            client.health()
    assert server.requests[1:] == [b"GET /health HTTP/1.1"] * 4 and sleeps == [0.5, 1.0, 2.0]


def test_a_progress_stream_cut_mid_way_is_not_sent_again(hang_up: Callable[[bytes], HangUp], sleeps: list[float]) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'event: progress\ndata: {"done": 32, "total": 120}\n\n'
    server = hang_up(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
    seen: list[tuple[int, int]] = []
    with Client(server.url, max_retries=3) as client, pytest.raises(Unreachable):
        client.certify(png_bytes(), progress=lambda d, t: seen.append((d, t)))

    async def run() -> None:
        async with AsyncClient(server.url, max_retries=3) as client:
            await client.certify(png_bytes(), progress=lambda d, t: seen.append((d, t)))

    with pytest.raises(Unreachable):
        asyncio.run(run())
    assert seen == [(32, 120)] * 2 and len(server.requests) == 2 and sleeps == []


# -- against the real server ------------------------------------------------------------------------------
def test_a_timeout_inside_the_servers_progress_stream_is_a_504() -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, request_timeout_s=0.5,
                        max_n=100_000_000, _env_file=None)
    seen: list[tuple[int, int]] = []
    with live_server(settings) as live, Client(live.url, max_retries=3) as client:
        with pytest.raises(ServerError) as failed:
            client.certify(png_bytes(), n=50_000_000, progress=lambda d, t: seen.append((d, t)))
        assert failed.value.status_code == 504 and failed.value.error_type == "TimeoutError"
        assert all(total == 50_000_020 and done < total for done, total in seen)
        wait_until(lambda: live.runtime.worker.depth == 0, "the timed-out job to be dropped")
        assert client.ready().ready  # the server goes on (a new certification would be under the same 0.5 s limit)


def test_a_full_queue_inside_the_servers_progress_stream_is_overloaded(sleeps: list[float]) -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, queue_capacity=1,
                        max_n=100_000_000, _env_file=None)
    with live_server(settings) as live:
        with open_request(live.url, "/certify", json.dumps({"image": data_url(png_bytes()), "n": 50_000_000}).encode()):
            wait_until(lambda: live.runtime.worker.depth == 1, "the long job to be admitted")
            with Client(live.url, max_retries=2) as client, pytest.raises(Overloaded) as refused:
                client.certify(png_bytes(), progress=lambda d, t: None)
            assert refused.value.error_type == "QueueFull" and "queue is full" in refused.value.message
            assert len(sleeps) == 2  # retried, then given up
        wait_until(lambda: live.runtime.worker.depth == 0, "the cancelled job to leave")  # the hog hung up



class FlakyGateway:
    """A loopback HTTP gateway in front of a live server: the first ``failures`` requests get the gateway's 502
    ``upstream_unavailable`` with ``Retry-After: 2`` (docker/nginx.conf, ``@unavailable``), the next ones are
    forwarded to the server and its answer relayed."""

    def __init__(self, upstream: str, failures: int) -> None:
        import http.server

        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                gateway.requests.append((self.path, body))
                if len(gateway.requests) <= failures:
                    answer = json.dumps({"error": {"type": "upstream_unavailable", "request_id": "g1",
                                                   "message": "no fsmllm replica answered this request; retry it"}})
                    status, headers, content = 502, {"Retry-After": "2"}, answer.encode()
                else:
                    reply = httpx.post(upstream + self.path, content=body, timeout=60,
                                       headers={"content-type": self.headers["content-type"]})
                    status, headers, content = reply.status_code, {}, reply.content
                self.send_response(status)
                for name, value in {**headers, "content-type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: object) -> None:
                pass

        self.requests: list[tuple[str, bytes]] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_gateways_upstream_unavailable_is_retried_after_its_retry_after(sleeps: list[float]) -> None:
    """A replica died under the gateway: 502 ``upstream_unavailable`` twice, then the request reaches a live
    server. Both clients send the same POST again after ``Retry-After`` and get the certificate the server gives
    that request directly (same seed); with no retries left the 502 is ``Overloaded`` with the gateway's hint."""
    with live_server() as live:
        # each issue of the certificate has its own id, time and signature (docs/certificates.md)
        def certificate(result: object) -> dict:
            return certified_content(result.certificate.model_dump())  # type: ignore[attr-defined]

        direct = certificate(Client(live.url).certify(png_bytes(), n=100, seed=3))
        gateway = FlakyGateway(live.url, failures=2)
        try:
            with Client(gateway.url) as client:
                assert certificate(client.certify(png_bytes(), n=100, seed=3)) == direct

            async def run() -> object:
                async with AsyncClient(gateway.url) as client:
                    return await client.certify(png_bytes(), n=100, seed=3)

            gateway.requests.clear()
            assert certificate(asyncio.run(run())) == direct
            assert sleeps == [2.0, 2.0, 2.0, 2.0] and len(gateway.requests) == 3
            assert gateway.requests[0] == gateway.requests[1] == gateway.requests[2]  # the same request each time
            gateway.requests.clear()
            with Client(gateway.url, max_retries=1) as impatient, pytest.raises(Overloaded) as refused:
                impatient.certify(png_bytes(), n=100, seed=3)
            assert (refused.value.status_code, refused.value.error_type, refused.value.retry_after) == (502, "upstream_unavailable", 2.0)
            assert refused.value.request_id == "g1" and len(gateway.requests) == 2
        finally:
            gateway.close()
