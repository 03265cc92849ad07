"""Nothing lost, nothing twice: the certificate store under load (issue 30).

200 clients certify at once against a real server on loopback (tiny encoder, small n), each with an image of its
own, so that a stored certificate names its client by the image's SHA-256.

* 30 % of them hang up before reading the answer, spread over the load (each after a given number of the others
  were answered). A certificate is committed before its response is sent, so: every certificate a client
  received is in the store, exactly as received; every answer the server sent (fsmllm_requests 200) has its
  certificate stored, hung-up clients' included; a hang-up the server noticed first (499) cancels the work, or,
  noticed while the certificate was being committed, leaves it stored: at most one per client, never two.
* The server process is killed (SIGKILL, no shutdown) after 50 answers: every certificate a client received is
  still in the SQLite store (WAL) after a restart, served by GET /v1/certificates/{id}, and the file is sound.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.live import (
    data_url,
    free_port,
    metric,
    metric_in,
    png_bytes,
    raw_post,
    serve_process,
    wait_until,
)

CLIENTS = 200
HANG_UPS = 60  # 30 %
KILL_AFTER = 50  # answers received before the server is killed
N0, N = 4, 12  # 16 samples a request: the load is about the store, not the sampling


def body(client: int) -> dict[str, Any]:
    return {"image": data_url(png_bytes(client)), "n0": N0, "n": N, "seed": client}


def image_sha256(client: int) -> str:
    return hashlib.sha256(png_bytes(client)).hexdigest()


@dataclass
class Load:
    """What the clients saw: the certificates received (by client), the clients that hung up or failed; and the
    server's progress (its fsmllm_noise_samples_total, as last read)."""

    received: dict[int, dict[str, Any]] = field(default_factory=dict)
    hung_up: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    samples: float = 0.0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until(self, condition: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(condition)

    async def note(
        self, client: int | None = None, certificate: dict[str, Any] | None = None, samples: float | None = None
    ) -> None:
        async with self.changed:
            if client is not None and certificate is not None:
                self.received[client] = certificate
            if samples is not None:
                self.samples = samples
            self.changed.notify_all()


async def answered_client(http: httpx.AsyncClient, url: str, client: int, load: Load) -> None:
    try:
        response = await http.post(f"{url}/certify", json=body(client))
    except httpx.TransportError as error:
        load.failed[client] = repr(error)
        return
    if response.status_code != 200:
        load.failed[client] = f"{response.status_code} {response.text[:200]}"
        return
    await load.note(client, response.json()["certificate"])


async def hanging_up_client(url: str, client: int, leave: Callable[[], bool], load: Load) -> None:
    """Send the request whole, then close the connection without reading, once ``leave()`` holds."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw_post(host, "/certify", json.dumps(body(client)).encode()))
    await writer.drain()
    await load.until(leave)
    writer.close()
    await writer.wait_closed()
    load.hung_up.append(client)


async def watch_progress(http: httpx.AsyncClient, url: str, load: Load) -> None:
    """Read the server's sample count over and over (until cancelled, or the server is gone)."""
    while True:
        try:
            text = (await http.get(f"{url}/metrics")).text
        except httpx.TransportError:
            return
        await load.note(samples=metric_in(text, "fsmllm_noise_samples_total"))
        await asyncio.sleep(0.05)


def leaving_when(load: Load, hang_ups: int) -> dict[int, Callable[[], bool]]:
    """The clients that hang up (clients 0, 3, 6, 10, 13, 16, 20, ...: ``hang_ups`` of them) and when, in turn: at
    once (the request queued or sampling), at a share of the load's samples (0 to 60 %), or after some others were
    answered (1, 4, 7, ...: the answers' time, when certificates are being committed and sent)."""
    leaving = [client for client in range(CLIENTS) if client % 10 in (0, 3, 6)][:hang_ups]
    total = CLIENTS * (N0 + N)
    when: list[Callable[[int], Callable[[], bool]]] = [
        lambda rank: lambda: True,
        lambda rank: lambda: load.samples >= 0.6 * rank / hang_ups * total,
        lambda rank: lambda: len(load.received) >= rank,
    ]
    return {client: when[rank % 3](rank) for rank, client in enumerate(leaving)}


async def run_load(url: str, hang_ups: int, kill: Callable[[], None] | None = None) -> Load:
    """Every client at once, ``hang_ups`` of them hanging up (:func:`leaving_when`); ``kill`` is called once
    :data:`KILL_AFTER` clients were answered."""
    load = Load()
    leaving = leaving_when(load, hang_ups)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # one connection per client
    async with httpx.AsyncClient(limits=limits, timeout=300) as http:
        clients = [
            hanging_up_client(url, client, leaving[client], load)
            if client in leaving
            else answered_client(http, url, client, load)
            for client in range(CLIENTS)
        ]
        if kill is not None:

            async def kill_mid_load() -> None:
                await load.until(lambda: len(load.received) >= KILL_AFTER)
                kill()

            clients.append(kill_mid_load())
        watcher = asyncio.create_task(watch_progress(http, url, load))
        try:
            await asyncio.wait_for(asyncio.gather(*clients), timeout=600)
        finally:
            watcher.cancel()
    return load


def stored(database: Path) -> list[tuple[str, str, str]]:
    """(id, image SHA-256, document) of every row of the SQLite store, read directly."""
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return connection.execute("SELECT id, image_sha256, document FROM certificates").fetchall()


def assert_received_are_stored_once(rows: list[tuple[str, str, str]], load: Load) -> Counter[str]:
    """Every received certificate is stored exactly as received; no id and no client's image is stored twice.
    Returns how many certificates each image has in the store."""
    ids = Counter(row[0] for row in rows)
    per_image = Counter(row[1] for row in rows)
    assert max(ids.values(), default=1) == 1 and max(per_image.values(), default=1) == 1, (ids, per_image)
    assert set(per_image) <= {image_sha256(client) for client in range(CLIENTS)}
    documents = {row[0]: json.loads(row[2]) for row in rows}
    for client, certificate in load.received.items():
        assert documents.get(certificate["id"]) == certificate, f"client {client}: its certificate is not stored"
        assert certificate["image"]["sha256"] == image_sha256(client)
    return per_image


@contextmanager
def served(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``fsmllm serve`` (tiny encoder) as a process of its own, its SQLite store in ``folder``; stopped after."""
    server = serve_process(port, "--queue-capacity", str(CLIENTS), "--cert-folder", str(folder))
    try:
        yield server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


@pytest.mark.slow
def test_clients_hanging_up_under_load_lose_no_certificate_and_store_none_twice(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with served(port, tmp_path):
        load = asyncio.run(run_load(url, HANG_UPS))
        ended = {
            status: lambda s=status: metric(url, "fsmllm_requests_total", route="/certify", status=s)
            for status in ("200", "499")
        }
        # every request has ended on the server: answered (200), or cancelled when its client left (499)
        wait_until(lambda: ended["200"]() + ended["499"]() == CLIENTS, "every request to end on the server")
        sent, noticed = ended["200"](), ended["499"]()
    rows = stored(tmp_path / "certificates.sqlite3")
    assert load.failed == {} and len(load.received) == CLIENTS - HANG_UPS and len(load.hung_up) == HANG_UPS
    per_image = assert_received_are_stored_once(rows, load)
    # the answers sent to clients that had gone (sent, never read) have their certificates stored too
    assert sum(per_image[image_sha256(client)] for client in load.hung_up) >= sent - len(load.received)
    assert noticed >= 1, "no client hung up before its answer was ready: the test tested nothing"


@pytest.mark.slow
def test_a_server_killed_mid_load_keeps_every_certificate_it_answered_with(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with served(port, tmp_path) as server:
        load = asyncio.run(run_load(url, 0, kill=server.kill))
        assert server.wait(30) == -signal.SIGKILL
    assert len(load.received) >= KILL_AFTER
    assert load.failed, "every request was answered before the kill: nothing was cut mid-load"
    assert len(load.received) + len(load.failed) == CLIENTS
    # as the kill left it: the write-ahead log not checkpointed into the database file
    assert (tmp_path / "certificates.sqlite3-wal").exists()
    assert_received_are_stored_once(stored(tmp_path / "certificates.sqlite3"), load)
    with served(port, tmp_path), httpx.Client(base_url=url, timeout=60) as http:  # restarted, it serves them all
        for certificate in load.received.values():
            assert http.get(f"/v1/certificates/{certificate['id']}").json() == certificate
