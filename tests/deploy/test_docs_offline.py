"""/docs and /redoc work on a host with no network: every script, style and icon they load is served by fsmllm.

A real browser renders them in tests/deploy/docker/test_stack.py (headless Chromium, directly and through the
gateway); here the pages are checked without one: no URL outside the server, and every asset answers.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from fsmllm.api.app import DOCS_ASSETS, create_app
from fsmllm.api.serve import policy_from
from fsmllm.api.settings import Settings
from fsmllm.encoders import load_encoder
from fsmllm.engine.runtime import Runtime


@pytest.fixture(scope="module")
def client() -> TestClient:
    settings = Settings(model="none", api_key="secret", _env_file=None)
    runtime = Runtime(load_encoder("tiny-cnn", image_size=16), policy_from(settings))
    return TestClient(create_app(runtime, settings))  # no lifespan: the worker is not needed for these pages


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(client: TestClient, page: str) -> None:
    html = client.get(page)  # open without the API key, like the schema they render
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""", html.text)
    urls = [a or b for a, b in urls]
    assert urls and not [url for url in urls if re.match(r"(https?:)?//", url)], urls
    assets = [url for url in urls if url.startswith(DOCS_ASSETS)]
    assert any(url.endswith(".js") for url in assets)
    for url in assets:
        answer = client.get(url)
        assert answer.status_code == 200 and len(answer.content) > 1000, url
    assert client.get("/openapi.json").status_code == 200


def test_the_api_key_still_guards_the_routes(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get(DOCS_ASSETS + "../v1/models").status_code in (401, 404)
