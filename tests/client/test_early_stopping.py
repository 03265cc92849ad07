"""Early stopping and the certificate's new fields end to end: the Python client, ``fsmllm-client`` and the
OpenAI route against a real server on loopback (tiny encoder, tiny language model)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from fsmllm.api.settings import Settings
from fsmllm.lm.models import load_model
from fsmllm_client import Client
from fsmllm_client.cli import main

from ..api.live import LiveServer, data_url, live_server, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model="tiny-test", default_n0=20, default_n=100, batch_size=64, max_n=50_000, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def test_the_client_stops_early_and_reads_every_new_field(server: LiveServer) -> None:
    with Client(server.url) as client:
        seen: list[tuple[int, int]] = []
        result = client.certify(png_bytes(1), radius=[0.05], n=20_000, seed=3, stop_at_fcsb=0.8, progress=lambda d, t: seen.append((d, t)))
    cert = result.certificate
    assert cert.stopped_by == "target_reached" and cert.n_budget == 20_000 and cert.n < 2_000
    assert cert.radii[0].certified_fcsb >= 0.8 and cert.radii[0].served_fcsb <= cert.radii[0].certified_fcsb
    assert cert.served_angle is not None and "served_fcsb" in cert.statement
    assert seen and seen[-1][0] == cert.n0 + cert.n and seen[-1][1] == cert.n0 + 20_000
    # the same request without the client: the same certificate (same seed, same stop rule)
    raw = httpx.post(f"{server.url}/certify", json={"image": data_url(png_bytes(1)), "radius": [0.05], "n": 20_000,
                                                    "seed": 3, "stop_at_fcsb": 0.8}, timeout=60).json()["certificate"]
    assert raw["n"] == cert.n and raw["score_lower"] == cert.score_lower
    with Client(server.url) as client:
        converged = client.certify(png_bytes(1), n=20_000, seed=3, target_cos=0.5, radius_tolerance=0.01).certificate
    assert converged.stopped_by == "radius_converged" and converged.n < 20_000
    assert converged.certified_radius is not None and converged.certified_radius.radius > 0


def test_the_cli_passes_stop_at_fcsb(server: LiveServer, tmp_path, capsys) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(2))
    code = main(["--url", server.url, "certify", str(image), "--radius", "0.05", "--n", "20000", "--seed", "4",
                 "--stop-at-fcsb", "0.8", "--json"])
    assert code == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    assert cert["stopped_by"] == "target_reached" and cert["n"] < 20_000
    assert main(["--url", server.url, "certify", str(image), "--radius", "0.05", "--n", "20000", "--seed", "4",
                 "--stop-at-fcsb", "0.8"]) == 0
    table = capsys.readouterr().out
    assert f"n={cert['n']} of 20000 (target_reached)" in table and "served FCSB" in table


def test_the_openai_route_and_generate_accept_stop_at_fcsb(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                   {"type": "image_url", "image_url": {"url": data_url(png_bytes(3))}}]}],
        "max_tokens": 4, "seed": 5, "certification": {"radius": [0.05], "n": 20_000, "stop_at_fcsb": 0.8},
    }
    chat = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert chat.status_code == 200, chat.text
    cert = chat.json()["certificate"]
    assert cert["stopped_by"] == "target_reached" and cert["n"] < 20_000
    generated = httpx.post(f"{server.url}/generate", json={"image": data_url(png_bytes(3)), "prompt": "What is this?",
                           "max_tokens": 4, "seed": 5, "radius": [0.05], "n": 20_000, "stop_at_fcsb": 0.8}, timeout=120)
    assert generated.status_code == 200, generated.text
    assert generated.json()["certificate"]["n"] == cert["n"]  # same seed, same rule: the same certificate
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=body | {"certification": {"stop_at_fcsb": 0.8, "bound": "hoeffding"}}, timeout=60)
    assert refused.status_code == 400 and "anytime-valid" in refused.json()["error"]["message"]  # OpenAI's 400
