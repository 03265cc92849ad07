"""The certificate cache serves only identical requests: every parameter that changes the certificate (σ, n0,
n, α, the bound, the radii, the image, the seed) is part of its key. A cache keyed on less would answer, say, a
σ = 0.5 request with the σ = 0.25 certificate: wrong and claiming a guarantee it does not have."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fsmllm.api.settings import Settings

from .live import LiveServer, data_url, live_server, png_bytes

BASE = {"seed": 11, "sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "bound": "empirical-bernstein", "radius": [0.1]}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=64, _env_file=None)
    with live_server(settings) as live:
        yield live


def certify(server: LiveServer, image: bytes = b"", **changes: object) -> dict:
    body = {"image": data_url(image or png_bytes(5)), **BASE, **changes}
    response = httpx.post(f"{server.url}/certify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["certificate"]


@pytest.mark.parametrize(
    "change",
    [{"sigma": 0.5}, {"n0": 21}, {"n": 101}, {"alpha": 0.01}, {"bound": "hoeffding"}, {"radius": [0.1, 0.2]},
     {"seed": 12}],
    ids=lambda change: next(iter(change)),
)
def test_a_request_that_differs_in_one_parameter_is_not_served_from_the_cache(server: LiveServer, change: dict) -> None:
    first = certify(server)
    assert certify(server)["cached"]  # the identical request is served from the cache...
    other = certify(server, **change)
    assert not other["cached"]  # ...a different one is computed, and says what it was computed with
    name, value = next(iter(change.items()))
    if name == "radius":
        assert [r["radius"] for r in other["radii"]] == value
    else:
        assert other[name] == value
    assert other != {**first, "cached": other["cached"]}
    assert certify(server, **change)["cached"]  # and is cached in its turn


def test_another_image_is_not_served_from_the_cache(server: LiveServer) -> None:
    certify(server, png_bytes(6))
    assert certify(server, png_bytes(6))["cached"]
    assert not certify(server, png_bytes(7))["cached"]


def test_requests_without_a_seed_are_never_cached(server: LiveServer) -> None:
    body = {"image": data_url(png_bytes(5)), "n": 100}
    answers = [httpx.post(f"{server.url}/certify", json=body, timeout=60).json()["certificate"] for _ in range(2)]
    assert not any(a["cached"] for a in answers) and answers[0]["seed"] != answers[1]["seed"]
