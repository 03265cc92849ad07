"""``fsmllm serve --dtype/--compile`` (env FSMLLM_DTYPE, FSMLLM_COMPILE): the settings reach the served encoder,
bad values are refused with the valid ones named, and a bfloat16 encoder serves certificates that say so."""

from __future__ import annotations

import argparse
import io

import httpx
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from fsmllm.api.metrics import Metrics
from fsmllm.api.serve import build_runtime
from fsmllm.api.settings import Settings, add_arguments, settings_from_args
from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.encoders import load_encoder
from fsmllm.encoders.precision import set_precision
from fsmllm.images import to_pixels
from fsmllm.lm.models import load_model

from .live import data_url, live_server, png_bytes


def test_the_environment_sets_the_encoder_dtype_and_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSMLLM_DTYPE", "bfloat16")
    monkeypatch.setenv("FSMLLM_COMPILE", "true")
    runtime = build_runtime(Settings(model="none", encoder="tiny-cnn", image_size=16, _env_file=None), Metrics())
    assert {p.dtype for p in runtime.encoder.parameters()} == {torch.bfloat16}
    assert runtime.encoder_dtype == "bfloat16"
    assert isinstance(runtime.worker.encode, torch._dynamo.eval_frame.OptimizedModule)  # compiled on first batch
    default = build_runtime(Settings(model="none", encoder="tiny-cnn", image_size=16, dtype="float32", compile=False,
                                     _env_file=None), Metrics())
    assert default.encoder_dtype == "float32" and default.worker.encode is default.encoder


def test_a_bad_dtype_is_refused_naming_the_valid_ones(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("FSMLLM_DTYPE", "float8")
    with pytest.raises(ValidationError, match="'float32', 'bfloat16' or 'float16'"):
        Settings(model="none", _env_file=None)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    monkeypatch.delenv("FSMLLM_DTYPE")
    assert settings_from_args(parser.parse_args(["--dtype", "float16", "--compile"])).model_dump(
        include={"dtype", "compile"}) == {"dtype": "float16", "compile": True}


def test_a_bfloat16_language_model_is_named_in_the_certified_answers() -> None:
    """``--lm-dtype bfloat16`` (or ``auto`` choosing it): the issued answer certificate and the model card
    say in which precision the votes were computed."""
    settings = Settings(model="tiny-test", default_n0=20, default_n=100, batch_size=64, _env_file=None)
    with live_server(settings, model=load_model("tiny-test", lm_dtype="bfloat16")) as server:
        body = {"image": data_url(png_bytes(3)), "prompt": "What?", "seed": 2, "max_tokens": 3, "n": 50,
                "certify_answer": {"n0": 8, "n": 32}}
        response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["answer_certificate"]["lm_dtype"] == "bfloat16"
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["lm_dtype"] == "bfloat16"
    with live_server() as certificates_only:  # no language model: nothing to name
        assert httpx.get(f"{certificates_only.url}/v1/models").json()["data"][0]["lm_dtype"] is None


def test_a_bfloat16_encoder_serves_certificates_that_name_its_precision() -> None:
    encoder = set_precision(load_encoder("tiny-cnn", image_size=16), "bfloat16")
    with live_server(encoder=encoder) as server:
        image = png_bytes(2)
        response = httpx.post(f"{server.url}/certify", json={"image": data_url(image), "seed": 9, "radius": [0.05]},
                              timeout=60)
        assert response.status_code == 200, response.text
        cert = response.json()["certificate"]
        assert cert["encoder_dtype"] == "bfloat16"
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["encoder_dtype"] == "bfloat16"
        pixels = to_pixels(Image.open(io.BytesIO(image)), 16)
        core = SmoothedEncoder(encoder, batch_size=7).certify(pixels, SmoothingConfig(0.25, 20, 100), [0.05], seed=9)
        # the same samples, packed differently: within the bfloat16 packing tolerance of docs/method.md
        assert cert["score_lower"] == pytest.approx(core.score_lower, abs=1e-4)
