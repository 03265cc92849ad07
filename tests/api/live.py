"""A real uvicorn server on loopback, in a background thread, for the HTTP tests."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fsmllm.api.app import create_app
from fsmllm.api.metrics import Metrics
from fsmllm.api.serve import runtime_of
from fsmllm.api.settings import Settings
from fsmllm.booster import load_booster
from fsmllm.encoders import load_encoder
from fsmllm.encoders.base import VisionEncoder
from fsmllm.engine.runtime import Runtime, VisionLanguageModel


@dataclass
class LiveServer:
    url: str
    runtime: Runtime
    settings: Settings
    metrics: Metrics


@contextmanager
def live_server(
    settings: Settings | None = None,
    model: VisionLanguageModel | None = None,
    encoder_name: str = "tiny-cnn",
    image_size: int = 16,
    booster: str = "none",
    encoder: VisionEncoder | None = None,
) -> Iterator[LiveServer]:
    """Start a server on 127.0.0.1 (a free port), by default with a tiny encoder at 16 px; stop it (gracefully)
    on exit. ``booster``: a booster name or folder put in front of the encoder; ``encoder``: serve this one
    instead (e.g. a :class:`Controlled` encoder)."""
    settings = settings or Settings(model="none", default_n0=20, default_n=100, batch_size=64, _env_file=None)
    scratch = None
    # the store and the keys of this server alone: not the user's cache nor the session's (tests/conftest.py)
    if settings.cert_folder in (None, os.environ.get("FSMLLM_CERT_FOLDER")):
        scratch = tempfile.mkdtemp(prefix="fsmllm-certs-")
        settings = settings.model_copy(update={"cert_folder": scratch})
    metrics = Metrics()
    if encoder is None:
        encoder = load_booster(booster, load_encoder(encoder_name, image_size=image_size))
    runtime = runtime_of(encoder, settings, metrics, model, getattr(model, "name", "none"), booster)
    app = create_app(runtime, settings, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", runtime, settings, metrics)
    finally:
        server.should_exit = True
        thread.join(60)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def tiny_model_server() -> Iterator[LiveServer]:
    """:func:`live_server` with the tiny test language model: /generate and the OpenAI route answer (tiny-cnn at
    16 px, n0 20 and n 100 by default, max_tokens up to 64)."""
    from fsmllm.lm.models import load_model

    settings = Settings(
        model="tiny-test", default_n0=20, default_n=100, batch_size=64, max_tokens_limit=64, _env_file=None
    )
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process that must be told its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: ``fsmllm serve`` certifying only, with the tiny encoder at 16 px
SERVE = [
    sys.executable,
    "-m",
    "fsmllm.cli",
    "serve",
    "--model",
    "none",
    "--encoder",
    "tiny-cnn",
    "--image-size",
    "16",
    "--batch-size",
    "32",
]


def serve_process(port: int, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The real ``fsmllm serve`` (:data:`SERVE` and ``flags``) as a process on 127.0.0.1:``port``, returned once
    /ready answers 200; ``env`` is added to this process's environment."""
    command = [*SERVE, "--port", str(port), *flags]
    # the log goes to a file: a pipe nobody reads would fill up and stall the server's event loop
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            server.wait()
            log.seek(0)
            raise RuntimeError(f"fsmllm serve did not start: {log.read().decode()[-2000:]}")
        time.sleep(0.2)


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of the server's /metrics (0 when the series does not exist yet)."""
    return metric_in(httpx.get(f"{url}/metrics", timeout=10).text, name, **labels)


def metric_in(text: str, name: str, **labels: str) -> float:
    """A sample of a /metrics answer's ``text`` (0 when the series does not exist)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def png_bytes(seed: int = 0, size: tuple[int, int] = (24, 20)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


#: what each issue of a certificate has of its own (docs/certificates.md): two issues of one certification differ
#: only in these
ISSUANCE_FIELDS = frozenset({"id", "issued_at", "signature", "completion_id", "cached", "feature_certificate_id"})


def certified_content(certificate: dict[str, Any]) -> dict[str, Any]:
    """``certificate`` without its issuance fields: equal for every issue of the same certification."""
    return {key: value for key, value in certificate.items() if key not in ISSUANCE_FIELDS}


def resigned(certificate: dict[str, Any], folder: Path, **changes: Any) -> tuple[dict[str, Any], Path]:
    """``certificate`` with ``changes``, signed again by another key (kept in ``folder``); and that key's JWKS file:
    a forgery that passes the signature check, for the checks behind it."""
    from fsmllm.evidence.keys import Keyring
    from fsmllm_client.verify import signing_input

    keyring = Keyring(folder / "other-key")
    changed = {key: value for key, value in certificate.items() if key != "signature"} | changes
    changed["signature"] = keyring.sign(signing_input(changed))
    keys = folder / "other-keys.json"
    keys.write_text(json.dumps(keyring.jwks()))
    return changed, keys


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """The events of a ``text/event-stream`` (e.g. ``response.iter_lines()``) as they arrive: ``(name, data)``,
    ``data`` parsed as JSON. By the SSE rules (html.spec.whatwg.org, "server-sent events"): an event ends at a
    blank line; its name is ``message`` unless an ``event:`` field names it; several ``data:`` fields are joined
    with newlines; one space after the colon is dropped; comments (``:`` first) are ignored; an event the stream
    ends before finishing is dropped (so a stream cut short shows as a missing ``result``)."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


def wait_until(condition: Callable[[], bool], what: str = "the expected state", seconds: float = 60.0) -> None:
    """Wait for a state change of a server (no timing is asserted: the limit only turns a hang into a failure)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def open_request(url: str, path: str, body: bytes, content_type: str = "application/json") -> Iterator[socket.socket]:
    """Send a POST on a raw connection and keep it open without reading the answer; leaving the block hangs up
    (the server sees the client go away: its job is cancelled)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(raw_post(host, path, body, content_type))
        yield connection


def raw_post(host: str, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """An HTTP/1.1 POST of ``body`` as bytes on the wire."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Controlled(VisionEncoder):
    """A real encoder (tiny-cnn by default) with switches for the failure tests: ``fail_next`` makes that many
    batches raise ``fail_with``; while ``release`` is clear every batch waits for it (``entered`` is set once one
    does)."""

    def __init__(self, inner: VisionEncoder | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else load_encoder("tiny-cnn", image_size=16)
        self.name, self.image_size = self.inner.name, self.inner.image_size
        self.num_tokens, self.token_dim = self.inner.num_tokens, self.inner.token_dim
        self.fail_next = 0
        self.fail_with: type[Exception] = RuntimeError
        self.batches = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> None:
        """From now on, batches wait for ``release``; ``entered`` tells when the next one has started."""
        self.entered.clear()
        self.release.clear()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if not self.release.wait(120):
            raise RuntimeError("the test never released the encoder")
        self.batches += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise self.fail_with("injected encoder failure (as a device error would be)")
        return self.inner(pixels)
