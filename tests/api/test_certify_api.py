"""/certify, health, readiness, metrics and the error cases, against a real server on loopback."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from fsmllm.api.settings import Settings
from fsmllm.certify import SmoothedEncoder, SmoothingConfig, StopRule
from fsmllm.images import to_pixels

from .live import Controlled, LiveServer, data_url, live_server, png_bytes, sse_events, wait_until


@pytest.fixture(scope="module")
def server() -> LiveServer:
    with live_server() as live:
        yield live


def certify(server: LiveServer, **body) -> httpx.Response:
    body.setdefault("image", data_url(png_bytes()))
    return httpx.post(f"{server.url}/certify", json=body, timeout=60)


def reference(server: LiveServer, image: bytes, seed: int, radii: list[float], n0: int = 20, n: int = 100, sigma: float = 0.25):
    """The same certification run directly through the core, sequentially."""
    pixels = to_pixels(Image.open(io.BytesIO(image)), server.runtime.input_size)
    config = SmoothingConfig(sigma, n0=n0, n=n)
    return SmoothedEncoder(server.runtime.encoder, batch_size=7).certify(pixels, config, radii, seed=seed)


def test_health_ready_models(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["encoder"] == "tiny-cnn" and card["allowed_sigmas"] == [0.25, 0.5] and card["input_size"] == 16


def test_certify_returns_a_complete_certificate_equal_to_the_core(server: LiveServer) -> None:
    image = png_bytes(1)
    response = certify(server, image=base64.b64encode(image).decode(), radius=[0.05, 0.1], seed=42, target_cos=0.5)
    assert response.status_code == 200, response.text
    body = response.json()
    cert = body["certificate"]
    assert response.headers["x-request-id"] == body["id"]
    assert {k: cert[k] for k in ("encoder", "booster", "sigma", "n0", "n", "alpha", "seed", "input_size")} == {
        "encoder": "tiny-cnn", "booster": "none", "sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "seed": 42, "input_size": 16,
    }
    assert "l2" in cert["norm"]
    expected = reference(server, image, seed=42, radii=[0.05, 0.1])
    assert cert["score_lower"] == pytest.approx(expected.score_lower, abs=1e-6)
    assert [r["certified_fcsb"] for r in cert["radii"]] == pytest.approx(list(expected.certified_fcsb), abs=1e-6)
    assert cert["certified_radius"]["radius"] == pytest.approx(expected.certified_radius(0.5), abs=1e-6)
    assert body["timings"]["total_ms"] > 0


def test_multipart_upload_equals_json(server: LiveServer) -> None:
    image = png_bytes(2)
    form = httpx.post(
        f"{server.url}/certify",
        files={"image": ("x.png", image, "image/png")},
        data={"radius": ["0.05", "0.1"], "seed": "7", "sigma": "0.5"},
        timeout=60,
    )
    assert form.status_code == 200, form.text
    as_json = certify(server, image=data_url(image), radius=[0.05, 0.1], seed=7, sigma=0.5)
    assert form.json()["certificate"]["radii"] == as_json.json()["certificate"]["radii"]


def test_identical_seeded_requests_are_served_from_the_cache(server: LiveServer) -> None:
    first = certify(server, seed=123).json()["certificate"]
    second = certify(server, seed=123).json()["certificate"]
    assert not first["cached"] and second["cached"]
    assert first["radii"] == second["radii"]
    unseeded = [certify(server).json()["certificate"] for _ in range(2)]
    assert not any(c["cached"] for c in unseeded) and unseeded[0]["seed"] != unseeded[1]["seed"]


def test_concurrent_requests_all_complete_and_match_sequential_results(server: LiveServer) -> None:
    images = [png_bytes(10 + i) for i in range(12)]
    batches_before = server.runtime.worker.stats.batches

    def one(i: int) -> dict:
        response = certify(server, image=data_url(images[i]), seed=1000 + i, n0=20, n=200, radius=[0.1])
        assert response.status_code == 200, response.text
        return response.json()["certificate"]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    batches = server.runtime.worker.stats.batches - batches_before
    assert batches < 12 * (220 // 64 + 2)  # samples of different requests shared encoder batches
    for i, cert in enumerate(results):
        expected = reference(server, images[i], seed=1000 + i, radii=[0.1], n=200)
        assert cert["score_lower"] == pytest.approx(expected.score_lower, abs=1e-6)


def test_progress_stream(server: LiveServer) -> None:
    with httpx.stream("POST", f"{server.url}/certify", json={"image": data_url(png_bytes()), "stream": True, "n": 500, "seed": 3}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    progress = [data for name, data in events if name == "progress"]
    assert progress and (progress[-1]["done"], progress[-1]["total"]) == (520, 520)
    assert all(a["done"] <= b["done"] for a, b in zip(progress, progress[1:]))
    result = events[-1][1]["certificate"]
    assert events[-1][0] == "result" and result["n"] == 500
    # each event after the first checkpoint carries the certificate valid so far (betting: anytime-valid)
    interim = [data["certificate"] for data in progress if "certificate" in data]
    assert interim and interim[-1]["n"] == 500 and interim[-1]["score_lower"] == result["score_lower"]
    assert all(a["n"] <= b["n"] and a["score_lower"] <= b["score_lower"] for a, b in zip(interim, interim[1:]))
    assert [r["certified_fcsb"] for r in interim[-1]["radii"]] == [r["certified_fcsb"] for r in result["radii"]]


def test_early_stopping_spends_fewer_samples_reproducibly_and_frees_the_worker(server: LiveServer) -> None:
    image = png_bytes(4)
    samples_before = server.runtime.worker.stats.samples
    response = certify(server, image=data_url(image), seed=9, n=20_000, radius=[0.05, 0.1], stop_at_fcsb=0.8)
    assert response.status_code == 200, response.text
    cert = response.json()["certificate"]
    assert cert["stopped_by"] == "target_reached" and cert["n_budget"] == 20_000 and cert["n"] < 2_000
    assert all(r["certified_fcsb"] >= 0.8 for r in cert["radii"])
    # the job left the worker at once: no sample beyond the batch in which it stopped was drawn for it
    used = server.runtime.worker.stats.samples - samples_before
    assert used < cert["n0"] + cert["n"] + server.settings.batch_size and server.runtime.worker.depth == 0
    # the same certificate from the core, whatever the batch packing (the stop is checked at fixed counts)
    pixels = to_pixels(Image.open(io.BytesIO(image)), server.runtime.input_size)
    expected = SmoothedEncoder(server.runtime.encoder, batch_size=5).certify(
        pixels, SmoothingConfig(0.25, n0=20, n=20_000), [0.05, 0.1], seed=9, stop=StopRule(fcsb=0.8, radii=(0.05, 0.1))
    )
    assert (cert["n"], cert["score_lower"]) == (expected.n, pytest.approx(expected.score_lower, abs=1e-6))
    unreachable = certify(server, image=data_url(image), seed=9, n=20_000, radius=[1.0], stop_at_fcsb=0.99).json()
    assert unreachable["certificate"]["stopped_by"] == "target_unreachable"
    assert unreachable["certificate"]["n"] < 20_000 and unreachable["certificate"]["abstain"]
    converged = certify(server, image=data_url(image), seed=9, n=20_000, target_cos=0.5, radius_tolerance=0.01).json()
    assert converged["certificate"]["stopped_by"] == "radius_converged" and converged["certificate"]["n"] < 20_000
    assert converged["certificate"]["certified_radius"]["radius"] > 0


def test_metrics_expose_the_worker(server: LiveServer) -> None:
    certify(server)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("fsmllm_requests_total", "fsmllm_request_seconds", "fsmllm_queue_depth", "fsmllm_noise_samples_total", "fsmllm_batch_fill"):
        assert name in text
    assert 'route="/certify",status="200"' in text


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="ICO")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"image": "not base64!!"}, 400, "base64"),
        ({"image": base64.b64encode(b"hello, not an image").decode()}, 415, "not an image"),
        ({"image": base64.b64encode(png_bytes()[:60]).decode()}, 400, "truncated"),
        ({"image": data_url(png_header_only(100_000, 100_000))}, 413, "limit"),
        ({"image": data_url(gif_bytes())}, 415, "unsupported image format"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, 400, "not an image"),
        ({"sigma": 0.3}, 422, "sigma 0.3 is not offered"),
        ({"n": 10**9}, 422, "exceeds this deployment's maximum"),
        ({"radius": -0.1}, 422, "non-negative"),
        ({"radius": []}, 422, "at least one radius"),
        ({"alpha": 2}, 422, "alpha"),
        ({"frobnicate": 1}, 422, "frobnicate"),
        ({"target_cos": 1.5}, 422, "target_cos"),
        ({"stop_at_fcsb": 0.8, "bound": "hoeffding"}, 422, "anytime-valid bound"),
        ({"radius_tolerance": 0.01}, 422, "give target_cos too"),
        ({"stop_at_fcsb": 1.2}, 422, "stop_at_fcsb"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server: LiveServer, body: dict, status: int, fragment: str) -> None:
    response = certify(server, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["request_id"] == response.headers["x-request-id"]
    assert certify(server).status_code == 200


def test_missing_image_wrong_content_type_bad_json_and_oversized_body(server: LiveServer) -> None:
    assert httpx.post(f"{server.url}/certify", json={"n": 100}).status_code == 422
    wrong = httpx.post(f"{server.url}/certify", content=b"x", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and "application/json" in wrong.json()["error"]["message"]
    bad_json = httpx.post(f"{server.url}/certify", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    huge = httpx.post(f"{server.url}/certify", content=b"0" * (server.settings.max_body_bytes + 1), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert httpx.get(f"{server.url}/nope").status_code == 404
    assert certify(server).status_code == 200


def test_queue_full_answers_503_with_retry_after() -> None:
    """Two jobs fill a queue of two (the encoder holds their first batch, so neither can finish): a third request
    is refused with 503 and Retry-After; once the encoder is released, the two admitted ones get their
    certificates. States are waited for, not times."""
    encoder = Controlled()
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, queue_capacity=2, _env_file=None)
    with live_server(settings, encoder=encoder) as live:
        encoder.hold()
        with ThreadPoolExecutor(2) as pool:
            admitted = [pool.submit(certify, live, seed=seed) for seed in (1, 2)]
            wait_until(lambda: live.runtime.worker.depth == 2, "both jobs to be admitted")
            refused = certify(live, seed=3)
            encoder.release.set()
            answers = [future.result() for future in admitted]
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "overloaded" and "queue is full" in refused.json()["error"]["message"]
        assert [a.status_code for a in answers] == [200, 200]
        assert sorted(a.json()["certificate"]["seed"] for a in answers) == [1, 2]
        wait_until(lambda: live.runtime.worker.depth == 0, "the worker to let go of the jobs")
        assert certify(live, seed=3).status_code == 200


def test_client_disconnect_cancels_the_remaining_samples() -> None:
    settings = Settings(model="none", batch_size=8, max_n=10_000_000, _env_file=None)
    with live_server(settings) as live:
        with pytest.raises(httpx.ReadTimeout):
            certify_long = {"image": data_url(png_bytes()), "n": 5_000_000}
            httpx.post(f"{live.url}/certify", json=certify_long, timeout=1.0)
        worker = live.runtime.worker
        wait_until(lambda: worker.depth == 0, "the abandoned job to be cancelled")
        assert worker.stats.samples < 1_000_000  # the job stopped long before its 5 million samples
        assert certify(live).status_code == 200


def test_api_key() -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, api_key="s3cret", _env_file=None)
    with live_server(settings) as live:
        denied = certify(live)
        assert denied.status_code == 401 and "Bearer" in denied.json()["error"]["message"]
        body = {"image": data_url(png_bytes())}
        ok = httpx.post(f"{live.url}/certify", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{live.url}/health").status_code == 200  # probes need no key
