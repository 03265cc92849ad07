"""Certified answers from the Python client and ``fsmllm-client`` (table, JSON and plot), against a real server
on loopback with the tiny test model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fsmllm.api.settings import Settings
from fsmllm.lm.models import load_model
from fsmllm_client import AnswerCertificate, Client
from fsmllm_client.cli import main

from ..api.live import LiveServer, certified_content, data_url, live_server, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model="tiny-test", default_n0=20, default_n=60, batch_size=64, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def test_client_sends_certify_answer_and_types_the_result(server: LiveServer) -> None:
    with Client(server.url) as client:
        result = client.generate(png_bytes(2), "What?", seed=8, max_tokens=3, certify_answer={"n0": 8, "n": 64})
        plain = client.generate(png_bytes(2), "What?", seed=8, max_tokens=3)
    raw = httpx.post(f"{server.url}/generate", json={
        "image": data_url(png_bytes(2)), "prompt": "What?", "seed": 8, "max_tokens": 3, "certify_answer": {"n0": 8, "n": 64},
    }, timeout=60).json()
    assert isinstance(result.answer_certificate, AnswerCertificate)
    assert certified_content(result.answer_certificate.model_dump()) == certified_content(raw["answer_certificate"])
    assert result.answer_certificate.id and result.answer_certificate.feature_certificate_id == result.certificate.id
    assert plain.answer_certificate is None


def test_client_hears_the_votes_and_the_cli_draws_their_bar(server: LiveServer, tmp_path: Path, capsys) -> None:
    heard: list[dict] = []
    with Client(server.url) as client:
        result = client.generate(png_bytes(2), "What?", seed=8, max_tokens=3, certify_answer={"n0": 8, "n": 64},
                                 vote_progress=heard.append)
    voted = result.answer_certificate
    assert heard and heard[-1]["done"] == 8 + voted.n and heard[-1]["stopped_by"] == voted.stopped_by
    assert heard[-1]["answer"] == voted.answer
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(2))
    args = ["--url", server.url, "generate", str(image), "What?", "--seed", "8", "--max-tokens", "3", "--answer-n", "64"]
    assert main(args) == 0
    assert "votes" in capsys.readouterr().err  # the votes' bar beside the noise samples' one


def test_client_cli_prints_json_table_and_plots_the_answer_radius(server: LiveServer, tmp_path: Path, capsys) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(2))
    args = ["--url", server.url, "generate", str(image), "What?", "--seed", "8", "--max-tokens", "3", "--answer-n", "64"]
    assert main([*args, "--json"]) == 0
    voted = json.loads(capsys.readouterr().out)["answer_certificate"]
    assert voted["n_budget"] == 64 and voted["n0"] == 32
    plot = tmp_path / "plot.png"
    assert main([*args, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert f"certified answer: {voted['answer']!r}" in table
    assert f"{voted['agree']}/{voted['n']} votes agree" in table
    assert Image.open(plot).size[0] > 100
