"""Token-level certificates end to end: the HTTP API, the Python client, ``fsmllm-client`` (table and plot) and
the OpenAI route, against a real server on loopback (tiny encoder with several tokens, tiny language model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fsmllm.api.settings import Settings
from fsmllm.lm.models import load_model
from fsmllm_client import Client
from fsmllm_client.cli import main

from ..api.live import LiveServer, data_url, live_server, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model="tiny-test", default_n0=20, default_n=200, batch_size=64, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def certify(server: LiveServer, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/certify", json={"image": data_url(png_bytes(1)), "seed": 3, **body}, timeout=60)


def test_token_certificates_report_the_worst_token_and_each_token_on_request(server: LiveServer) -> None:
    tokens = server.runtime.encoder.num_tokens
    assert tokens > 1
    body = certify(server, granularity="token", per_token=True, radius=[0.02, 0.05], target_cos=0.5).json()["certificate"]
    assert body["granularity"] == "token" and len(body["tokens"]) == tokens
    lowers = [token["score_lower"] for token in body["tokens"]]
    assert body["score_lower"] == min(lowers) and body["worst_token"] == lowers.index(min(lowers))
    for i, bound in enumerate(body["radii"]):
        per_token = [token["certified_fcsb"][i] for token in body["tokens"]]
        assert bound["certified_fcsb"] == (None if None in per_token else min(per_token))
    assert certify(server, granularity="token").json()["certificate"]["tokens"] is None  # only on request
    whole = certify(server, radius=[0.02, 0.05]).json()["certificate"]
    assert whole["granularity"] == "global" and whole["worst_token"] is None
    # the global certificate speaks of the flattened feature, where one weak token barely counts
    assert whole["score_lower"] >= body["score_lower"]
    refused = certify(server, per_token=True)
    assert refused.status_code == 422 and "per_token needs granularity 'token'" in refused.json()["error"]["message"]


def test_generate_reads_the_per_token_smoothed_features(server: LiveServer) -> None:
    answers = {}
    for granularity in ("global", "token"):
        response = httpx.post(f"{server.url}/generate", json={"image": data_url(png_bytes(2)), "prompt": "What is this?",
                              "max_tokens": 4, "seed": 5, "granularity": granularity}, timeout=120)
        assert response.status_code == 200, response.text
        answers[granularity] = response.json()
    assert answers["token"]["certificate"]["granularity"] == "token"
    assert answers["token"]["certificate"]["worst_token"] is not None


def test_client_cli_table_json_and_plot_with_both_curves(server: LiveServer, tmp_path: Path, capsys) -> None:
    with Client(server.url) as client:
        result = client.certify(png_bytes(3), granularity="token", per_token=True, seed=4, radius=[0.02])
    assert result.certificate.tokens is not None and result.certificate.worst_token is not None
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(3))
    assert main(["--url", server.url, "certify", str(image), "--granularity", "token", "--per-token", "--seed", "4",
                 "--radius", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "granularity token" in out and out.count("token ") >= server.runtime.encoder.num_tokens
    plot = tmp_path / "fcsb.png"
    assert main(["--url", server.url, "certify", str(image), "--granularity", "token", "--seed", "4", "--plot", str(plot),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["certificate"]["granularity"] == "token"
    assert Image.open(plot).size == (800, 500)


def test_the_openai_route_takes_the_granularity(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                   {"type": "image_url", "image_url": {"url": data_url(png_bytes(4))}}]}],
        "max_tokens": 4, "seed": 6, "certification": {"granularity": "token", "per_token": True},
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    cert = response.json()["certificate"]
    assert cert["granularity"] == "token" and len(cert["tokens"]) == server.runtime.encoder.num_tokens
