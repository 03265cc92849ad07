"""Clients that go away: their work stops (certification samples and language-model tokens), nothing is left
running or referenced, and the server keeps serving. A real server on loopback with the tiny test model, whose
random weights decode the full ``max_tokens`` (seconds at 512 tokens) unless stopped."""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from fsmllm.api.settings import Settings
from fsmllm.engine.jobs import CertifyJob
from fsmllm.lm.models import load_model

from .live import LiveServer, data_url, live_server, metric, png_bytes, sse_events

MAX_TOKENS = 512


@pytest.fixture(scope="module")
def server() -> LiveServer:
    settings = Settings(
        model="tiny-test", default_n0=20, default_n=100, batch_size=8, max_tokens_limit=MAX_TOKENS, max_n=10_000_000,
        _env_file=None,
    )
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def open_request(server: LiveServer, path: str, body: dict) -> socket.socket:
    """Send a JSON POST on a raw socket and return it unread: closing it is the client going away."""
    url = urlsplit(server.url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def chat_body(stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(1))}},
        ]}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "certification": {"n0": 20, "n": 100, "seed": 1},
    }


def test_a_streaming_client_that_leaves_stops_its_generation(server: LiveServer) -> None:
    cancelled = metric(server.url, "fsmllm_generations_total", outcome="cancelled")
    tokens = metric(server.url, "fsmllm_generated_tokens_total")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body(True), timeout=60) as response:
        assert response.status_code == 200
        for _, chunk in sse_events(response.iter_lines()):
            if chunk["choices"][0]["delta"].get("content"):
                break  # past the role chunk, at the first content chunk
    # the connection is closed: the generation stops at its next token instead of decoding all 512
    wait_for(lambda: metric(server.url, "fsmllm_generations_total", outcome="cancelled") == cancelled + 1,
             "the generation is cancelled")
    assert metric(server.url, "fsmllm_generations_running") == 0
    assert metric(server.url, "fsmllm_generated_tokens_total") - tokens < MAX_TOKENS / 2

    whole = httpx.post(f"{server.url}/v1/chat/completions", json={**chat_body(False), "max_tokens": 8}, timeout=60)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 8  # the LM serves on


def test_a_client_that_leaves_during_generation_stops_it(server: LiveServer) -> None:
    cancelled = metric(server.url, "fsmllm_generations_total", outcome="cancelled")
    tokens = metric(server.url, "fsmllm_generated_tokens_total")
    body = {"image": data_url(png_bytes(2)), "prompt": "What is this?", "max_tokens": MAX_TOKENS, "seed": 2}
    sock = open_request(server, "/generate", body)
    try:
        wait_for(lambda: metric(server.url, "fsmllm_generations_running") == 1, "the generation starts")
    finally:
        sock.close()
    wait_for(lambda: metric(server.url, "fsmllm_generations_total", outcome="cancelled") == cancelled + 1,
             "the generation is cancelled")
    assert metric(server.url, "fsmllm_generations_running") == 0
    assert metric(server.url, "fsmllm_generated_tokens_total") - tokens < MAX_TOKENS / 2

    answer = httpx.post(f"{server.url}/generate", json={**body, "max_tokens": 8}, timeout=60)
    assert answer.status_code == 200 and answer.json()["completion_tokens"] == 8


def test_many_clients_that_leave_leave_nothing_behind(server: LiveServer) -> None:
    """Disconnects at every stage (queued or sampling, plain or progress stream, certify or generate): afterwards
    the worker is empty, no generation runs, and no certification job is still referenced anywhere."""
    worker = server.runtime.worker
    samples = worker.stats.samples
    long = {"image": data_url(png_bytes(3)), "n0": 100, "n": 5_000_000}
    sockets = [
        open_request(server, "/certify", long),
        open_request(server, "/certify", {**long, "stream": True}),
        open_request(server, "/generate", {**long, "prompt": "What is this?"}),
        open_request(server, "/generate", {**long, "prompt": "What is this?", "stream": True}),
        open_request(server, "/v1/chat/completions", {**chat_body(True), "certification": {"n": 5_000_000}}),
    ]
    try:
        wait_for(lambda: worker.depth == len(sockets), "every job is admitted")
    finally:
        for sock in sockets:
            sock.close()
    wait_for(lambda: worker.depth == 0, "the worker drops every abandoned job")
    assert worker.stats.samples - samples < 1_000_000  # none ran its 5 million samples
    assert metric(server.url, "fsmllm_generations_running") == 0
    assert metric(server.url, "fsmllm_queue_depth") == 0

    def jobs_alive() -> int:
        gc.collect()
        return sum(type(o) is CertifyJob for o in gc.get_objects())

    wait_for(lambda: jobs_alive() == 0, "no certification job is referenced any more")
    again = httpx.post(f"{server.url}/certify", json={"image": data_url(png_bytes(3))}, timeout=60)
    assert again.status_code == 200 and again.json()["certificate"]["n"] == 100
