"""The real ``fsmllm serve`` process: graceful shutdown finishes accepted work; a restarted server serves again."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import httpx

from tests.api.live import data_url, free_port, png_bytes, serve_process, sse_events, wait_until


def _start(port: int) -> subprocess.Popen[bytes]:
    return serve_process(port, "--max-n", "1000000")


def _refuses_connections(url: str) -> bool:
    """True once a new request goes unserved: the listener is closed (connection refused), or, in the moment
    between the signal and the listener's closing, the connection is accepted and closed without an answer."""
    try:
        httpx.get(f"{url}/health", timeout=5)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return True
    return False


def test_sigterm_finishes_accepted_requests_then_a_restart_serves_again() -> None:
    """SIGTERM while a certification runs: the server stops taking connections, yet the running request gets
    its whole certificate. The order of events is checked, not their timing: the refusal of a new connection
    must be seen before the certificate arrives (otherwise nothing was drained and the test says so)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(port)
    events: list[str] = []
    results: list[dict] = []
    # long enough to outlast the signal's handling many times over, short enough for the 30 s graceful budget on
    # a loaded machine (empirical Bernstein: no interim certificate to compute per batch)
    body = {"image": data_url(png_bytes()), "n0": 100, "n": 4_000, "seed": 3, "stream": True, "bound": "empirical-bernstein"}

    def read_stream() -> None:
        with httpx.stream("POST", f"{url}/certify", json=body, timeout=120) as response:
            for name, data in sse_events(response.iter_lines()):
                events.append(name)
                if name == "result":
                    results.append(data)

    client = threading.Thread(target=read_stream)
    try:
        client.start()
        wait_until(lambda: "progress" in events, "the certification to be under way")
        server.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(url), "the server to stop accepting connections")
        assert "result" not in events, "the certification finished before the shutdown began: nothing was drained"
        client.join(120)
        # uvicorn shuts down gracefully, then re-raises the signal it captured: exit status -SIGTERM
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
    assert events[-1] == "result" and "error" not in events, events[-3:]
    first = results[0]["certificate"]
    assert first["n"] == 4_000 and not first["cached"]

    server = _start(port)
    try:
        again = httpx.post(f"{url}/certify", json={**body, "stream": False}, timeout=120)
        assert again.status_code == 200
        assert again.json()["certificate"]["radii"] == first["radii"]  # same seed, fresh process, same certificate
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (0, -signal.SIGTERM)


def test_sigkill_mid_request_fails_the_client_at_once_and_a_restart_starts_clean() -> None:
    """A crash (SIGKILL: no graceful shutdown) while a certification runs: the waiting client gets a transport
    error at once, not a hang until its timeout, and a restarted server starts with an empty queue and serves."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(port)
    outcome: list[httpx.Response | httpx.HTTPError] = []
    body = {"image": data_url(png_bytes()), "n0": 100, "n": 900_000, "seed": 3}

    def call() -> None:
        try:
            outcome.append(httpx.post(f"{url}/certify", json=body, timeout=300))
        except httpx.HTTPError as error:
            outcome.append(error)

    client = threading.Thread(target=call)
    try:
        client.start()
        deadline = time.monotonic() + 30
        while "fsmllm_queue_depth 1.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the long request never reached the worker"
            time.sleep(0.05)
        server.kill()
        assert server.wait(30) == -signal.SIGKILL
        client.join(30)
        assert not client.is_alive(), "the client still waits for a server that is gone"
    finally:
        if server.poll() is None:
            server.kill()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError)
    assert not isinstance(outcome[0], httpx.TimeoutException)

    server = _start(port)
    try:
        assert "fsmllm_queue_depth 0.0" in httpx.get(f"{url}/metrics").text  # nothing survives the crash
        again = httpx.post(f"{url}/certify", json={**body, "n": 2000}, timeout=120)
        assert again.status_code == 200 and again.json()["certificate"]["n"] == 2000
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (0, -signal.SIGTERM)
