"""The real ``fsmllm serve`` process: graceful shutdown finishes accepted work; a restarted server serves again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.server.live import data_url, png_bytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "fsmllm.cli", "serve", "--model", "none", "--encoder", "tiny-cnn",
               "--image-size", "16", "--port", str(port), "--batch-size", "32", "--max-n", "1000000"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError(f"fsmllm serve did not start: {server.communicate()[0].decode()[-2000:]}")
        time.sleep(0.2)


def test_sigterm_finishes_accepted_requests_then_a_restart_serves_again() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(port)
    answers: list[httpx.Response] = []
    body = {"image": data_url(png_bytes()), "n0": 100, "n": 20_000, "seed": 3}
    client = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/certify", json=body, timeout=120)))
    try:
        client.start()
        deadline = time.monotonic() + 30
        while "fsmllm_queue_depth 1.0" not in httpx.get(f"{url}/metrics").text:  # the job is admitted
            assert time.monotonic() < deadline, "the long request never reached the worker"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        client.join(120)
        # uvicorn shuts down gracefully, then re-raises the signal it captured: exit status -SIGTERM
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    first = answers[0].json()["certificate"]
    assert first["n"] == 20_000 and not first["cached"]

    server = _start(port)
    try:
        again = httpx.post(f"{url}/certify", json=body, timeout=120)
        assert again.status_code == 200
        assert again.json()["certificate"]["radii"] == first["radii"]  # same seed, fresh process, same certificate
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (0, -signal.SIGTERM)
