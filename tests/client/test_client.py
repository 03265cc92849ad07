"""The Python client and ``fsmllm-client`` against a real uvicorn server on loopback (tiny encoder and model).

Only the retry tests use an ``httpx.MockTransport``: a real server cannot be made to answer a chosen
``Retry-After`` on cue. Queue-full behaviour itself is checked against the real server. The clients' sleeps
between tries are recorded, not timed (the ``sleeps`` fixture).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsmllm_client.client
import httpx
import pytest
from PIL import Image

from fsmllm.api.settings import Settings
from fsmllm_client import AsyncClient, AuthError, BadRequest, CertifyResult, Client, Overloaded, Unreachable, user_message
from fsmllm_client.cli import main
from fsmllm_client.plot import DPI, FIGSIZE

from ..api.live import LiveServer, certified_content, data_url, live_server, open_request, png_bytes, tiny_model_server, wait_until

PROMPT = "What is this?"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as live:
        yield live


@pytest.fixture(scope="module")
def lm_server() -> Iterator[LiveServer]:
    """The tiny test model, as tests/api/test_generate_api.py serves it."""
    with tiny_model_server() as live:
        yield live


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(1))
    return path


def raw(server: LiveServer, path: str, **body: object) -> httpx.Response:
    """The same request without the client."""
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_certify_sync_and_async_equal_the_servers_json(server: LiveServer) -> None:
    expected = raw(server, "/certify", image=data_url(png_bytes(1)), radius=[0.05, 0.1], seed=42, n=300).json()
    with Client(server.url) as client:
        result = client.certify(png_bytes(1), radius=[0.05, 0.1], seed=42, n=300)

    async def certify_async() -> CertifyResult:
        async with AsyncClient(server.url) as client:
            return await client.certify(png_bytes(1), radius=[0.05, 0.1], seed=42, n=300)

    for answer in (result, asyncio.run(certify_async())):
        assert isinstance(answer, CertifyResult)
        got = answer.certificate.model_dump()
        assert certified_content(got) == certified_content(expected["certificate"])  # two issues of one certificate
        assert [r.radius for r in answer.certificate.radii] == [0.05, 0.1]


def test_every_image_form_gives_the_same_certificate(server: LiveServer, image_file: Path) -> None:
    pil = Image.open(io.BytesIO(png_bytes(1)))
    with Client(server.url) as client:
        scores = {
            kind: client.certify(image, seed=7, radius=0.1).certificate.score_lower
            for kind, image in {"path": image_file, "str": str(image_file), "bytes": png_bytes(1), "pil": pil, "url": data_url(png_bytes(1))}.items()
        }
    assert len(set(scores.values())) == 1, scores


def test_target_cosine_returns_the_certified_radius(server: LiveServer) -> None:
    expected = raw(server, "/certify", image=data_url(png_bytes(2)), seed=3, n=2000, target_cos=0.5).json()
    with Client(server.url) as client:
        certificate = client.certify(png_bytes(2), seed=3, n=2000, target_cos=0.5).certificate
    assert certificate.certified_radius is not None and certificate.certified_radius.target_cos == 0.5
    assert certificate.certified_radius.radius == expected["certificate"]["certified_radius"]["radius"]


def test_progress_callback_counts_up_to_the_total(server: LiveServer) -> None:
    seen: list[tuple[int, int]] = []
    with Client(server.url) as client:
        result = client.certify(png_bytes(3), n=500, n0=20, seed=5, progress=lambda done, total: seen.append((done, total)))
    assert result.certificate.n == 500 and len(seen) >= 2
    assert seen[-1] == (520, 520) and all(total == 520 for _, total in seen)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))

    async def stream_async() -> list[tuple[int, int]]:
        updates: list[tuple[int, int]] = []
        async with AsyncClient(server.url) as client:
            await client.certify(png_bytes(3), n=500, n0=20, seed=6, progress=lambda d, t: updates.append((d, t)))
        return updates

    assert asyncio.run(stream_async())[-1] == (520, 520)


def test_errors_carry_the_servers_message_and_request_id(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(BadRequest) as negative:
            client.certify(png_bytes(), radius=[-0.5])
        with pytest.raises(BadRequest) as sigma:
            client.certify(png_bytes(), sigma=0.3)
        with pytest.raises(BadRequest) as corrupt:
            client.certify(b"\x89PNG\r\n\x1a\nnot really")
    assert negative.value.status_code == 422 and "non-negative" in negative.value.message
    assert negative.value.error_type == "invalid_request" and len(negative.value.request_id or "") == 32
    assert "not offered" in sigma.value.message and sigma.value.request_id != negative.value.request_id
    assert corrupt.value.status_code == 400 and corrupt.value.error_type == "invalid_image"
    with Client("http://127.0.0.1:9", max_retries=1, max_retry_sleep=0.01) as nowhere, pytest.raises(Unreachable):
        nowhere.health()
    with Client(server.url) as client, pytest.raises(TypeError, match="did you mean 'radius'"):
        client.certify(png_bytes(), radii=0.1)  # type: ignore[call-arg]  # the option is the server's ``radius``


def test_full_queue_is_overloaded_then_retried_until_admitted(sleeps: list[float]) -> None:
    """A long job holds a one-slot queue until its client hangs up (which cancels it). No timing: the patient
    client is refused until the test ends the long job, and must then be admitted."""
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, queue_capacity=1, max_n=100_000_000, _env_file=None)
    with live_server(settings) as live:
        refusals = live.metrics.requests.labels(route="/certify", status="503")
        long_job = json.dumps({"image": data_url(png_bytes()), "n": 50_000_000}).encode()
        with open_request(live.url, "/certify", long_job):
            wait_until(lambda: live.runtime.worker.depth == 1, "the long job to be admitted")
            with Client(live.url, max_retries=0) as impatient, pytest.raises(Overloaded) as refused:
                impatient.certify(png_bytes())
            assert refused.value.status_code == 503 and "queue is full" in refused.value.message
            assert refused.value.retry_after is not None and refused.value.retry_after >= 1
            assert sleeps == [] and refusals._value.get() == 1

            admitted: list[int] = []
            gate = threading.Event()

            def wait_for_the_test(seconds: float) -> None:
                sleeps.append(seconds)
                gate.wait(60)  # the patient client's first sleep lasts until the test ends the long job
                time.sleep(seconds)

            def patient() -> None:
                with Client(live.url, max_retries=1000, max_retry_sleep=0.05) as client:
                    admitted.append(client.certify(png_bytes(), seed=1).certificate.seed)

            fsmllm_client.client.time.sleep = wait_for_the_test  # type: ignore[attr-defined]  # (the fixture's namespace)
            thread = threading.Thread(target=patient)
            thread.start()
            wait_until(lambda: bool(sleeps), "the patient client to be refused")
            assert sleeps == [0.05] and refusals._value.get() == 2  # the long job still holds the queue
        # the long job's client has hung up: its job is cancelled, and the patient one gets in
        wait_until(lambda: live.runtime.worker.depth == 0, "the long job to be cancelled")
        gate.set()
        thread.join(60)
        assert admitted == [1]
        assert refusals._value.get() >= 2 and len(sleeps) == refusals._value.get() - 1


def test_retry_honours_retry_after_and_caps_the_sleep(sleeps: list[float]) -> None:
    transport, calls = _flaky("1", failures=1)
    with Client("http://fsmllm.test", transport=transport) as client:
        assert client.health().status == "ok"
    assert len(calls) == 2 and sleeps == [1.0]

    sleeps.clear()
    transport, calls = _flaky("120", failures=10)
    with Client("http://fsmllm.test", transport=transport, max_retries=2, max_retry_sleep=0.1) as client:
        with pytest.raises(Overloaded) as refused:
            client.health()
    assert len(calls) == 3 and sleeps == [0.1, 0.1]
    assert refused.value.retry_after == 120 and refused.value.request_id == "r1"

    async def async_health() -> str:
        async with AsyncClient("http://fsmllm.test", transport=_flaky("0", failures=2)[0]) as client:
            return (await client.health()).status

    sleeps.clear()
    assert asyncio.run(async_health()) == "ok" and sleeps == [0.0, 0.0]


def _flaky(retry_after: str, failures: int) -> tuple[httpx.MockTransport, list[int]]:
    """A transport answering 503 + Retry-After ``failures`` times, then the health answer; counts the calls."""
    calls: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(len(calls))
        if len(calls) <= failures:
            body = {"error": {"type": "overloaded", "message": "the certification queue is full", "request_id": "r1"}}
            return httpx.Response(503, json=body, headers={"Retry-After": retry_after})
        return httpx.Response(200, json={"status": "ok"})

    return httpx.MockTransport(handle), calls


def test_api_key(image_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, api_key="s3cret", _env_file=None)
    with live_server(settings) as live:
        with Client(live.url) as anonymous:
            assert anonymous.health().status == "ok" and anonymous.ready().ready  # probes need no key
            with pytest.raises(AuthError) as denied:
                anonymous.models()
        assert denied.value.status_code == 401 and "Bearer" in denied.value.message
        with Client(live.url, api_key="s3cret") as client:
            assert client.models().data[0].encoder == "tiny-cnn"
            assert client.certify(png_bytes(), seed=2).certificate.seed == 2
        assert main(["--url", live.url, "--api-key", "wrong", "certify", str(image_file), "--json"]) == 1
        assert "HTTP 401: missing or wrong API key" in capsys.readouterr().err


def test_generate_and_chat_match_the_server(lm_server: LiveServer) -> None:
    seen: list[tuple[int, int]] = []
    with Client(lm_server.url) as client:  # first, so that the certificate is not served from the cache
        result = client.generate(png_bytes(6), PROMPT, seed=11, max_tokens=8, progress=lambda d, t: seen.append((d, t)))
        chat = client.chat([user_message(PROMPT, png_bytes(6))], model="tiny-test", seed=11, max_tokens=8)
        card = client.models().data[0]
    expected = raw(lm_server, "/generate", image=data_url(png_bytes(6)), prompt=PROMPT, seed=11, max_tokens=8).json()
    assert result.answer == expected["answer"] and result.model == "tiny-test"
    assert result.certificate.radii == chat.certificate.radii
    assert seen and seen[-1][0] == seen[-1][1] == 120
    assert chat.content == expected["answer"] and chat.usage.completion_tokens == expected["completion_tokens"]
    assert card.id == "tiny-test" and card.allowed_sigmas == [0.25, 0.5]


def test_cli_certify_json_text_and_errors(server: LiveServer, image_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", server.url, "certify", str(image_file), "--radius", "0.1", "0.2", "--seed", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    result = CertifyResult.model_validate(json.loads(out))
    assert [r.radius for r in result.certificate.radii] == [0.1, 0.2] and result.certificate.seed == 4
    assert err == ""  # --json: no progress bar

    assert main(["--url", server.url, "certify", str(image_file), "--target-cos", "0.5", "--seed", "4"]) == 0
    out, _ = capsys.readouterr()
    assert "certified FCSB" in out and "certified radius at cosine ≥ 0.5" in out

    assert main(["--url", server.url, "certify", str(image_file), "--radius", "-1"]) == 1
    _, err = capsys.readouterr()
    assert "non-negative" in err and "request id" in err
    assert main(["--url", server.url, "certify", str(image_file.with_name("missing.png"))]) == 1


def test_cli_plot_writes_a_png(server: LiveServer, image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "curve.png"
    assert main(["--url", server.url, "certify", str(image_file), "--radius", "0.1", "--n", "2000", "--seed", "1", "--plot", str(png)]) == 0
    out, _ = capsys.readouterr()
    assert png.stat().st_size > 10_000
    with Image.open(png) as picture:
        assert picture.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    table = [line.split()[0] for line in out.splitlines() if line.strip().startswith("0.")]
    assert table == ["0.1"]  # the dense plotting grid is not printed


def test_cli_plot_without_matplotlib(server: LiveServer, image_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--url", server.url, "certify", str(image_file), "--plot", str(tmp_path / "x.png")]) == 1
    assert "pip install 'fsmllm-client[plot]'" in capsys.readouterr().err


def test_cli_health_and_generate_from_the_environment(lm_server: LiveServer, image_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FSMLLM_URL", lm_server.url)
    assert main(["health"]) == 0
    assert "ready: ready (model tiny-test" in capsys.readouterr().out
    assert main(["generate", str(image_file), PROMPT, "--max-tokens", "6", "--seed", "2", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["model"] == "tiny-test" and body["certificate"]["seed"] == 2
    assert main(["generate", str(image_file), PROMPT, "--max-tokens", "6", "--seed", "2"]) == 0
    assert capsys.readouterr().out.startswith(body["answer"])
