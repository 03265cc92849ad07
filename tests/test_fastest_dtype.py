"""``--dtype auto`` / ``--lm-dtype auto`` (fsmllm.fastest_dtype): the choice from timings (fake ones pick each
precision), the cache per machine and model, the real timing of an encoder, and the chosen precision named in the
served certificate. No assertion here depends on how fast this machine is."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import torch

from fsmllm.api.metrics import Metrics
from fsmllm.api.serve import build_runtime
from fsmllm.api.settings import Settings
from fsmllm.encoders import load_encoder
from fsmllm.encoders.precision import timing_trial
from fsmllm.fastest_dtype import (
    MARGIN,
    NEAR,
    RETIMES,
    TRIALS,
    cache_file,
    cache_key,
    candidates,
    choose,
    decisive,
    fastest,
    machine,
    measure_trials,
    resolve,
)

from .api.live import data_url, live_server, png_bytes


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        ({"float32": 1.0, "bfloat16": 0.25}, "bfloat16"),  # native bfloat16 (AMX): 4x
        ({"float32": 1.0, "bfloat16": 1.0 / MARGIN}, "bfloat16"),  # exactly the margin
        ({"float32": 1.0, "bfloat16": 0.8}, "float32"),  # 1.25x: within what noise or emulation gives, not chosen
        ({"float32": 1.0, "bfloat16": 3.0}, "float32"),  # emulated bfloat16: slower
        ({"float32": 1.0, "bfloat16": 0.4, "float16": 0.3}, "float16"),  # CUDA: the fastest of the fast ones
        ({"float32": 1.0, "bfloat16": 0.3, "float16": 0.9}, "bfloat16"),
        ({"float32": 1.0, "bfloat16": 0.9, "float16": 0.95}, "float32"),
    ],
)
def test_a_fake_timing_picks_each_precision(seconds: dict, chosen: str) -> None:
    assert choose(seconds) == chosen


def test_choose_needs_float32_to_compare_with() -> None:
    with pytest.raises(ValueError, match="must include float32"):
        choose({"bfloat16": 0.1})


def test_candidates_are_float16_only_on_cuda() -> None:
    assert candidates("cpu") == ("float32", "bfloat16")
    assert candidates("cuda:0") == ("float32", "bfloat16", "float16")


def counting(seconds: dict) -> tuple[list, callable]:
    """A fake measurement returning ``seconds``, and the list of the candidates it was asked for, once per call."""
    calls: list = []

    def measure(precisions):
        calls.append(tuple(precisions))
        return {p: seconds[p] for p in precisions}

    return calls, measure


def test_the_choice_is_measured_once_per_machine_and_model_then_read_from_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "fastest-dtype.json"
    calls, measure = counting({"float32": 1.0, "bfloat16": 0.3})
    first = fastest("encoder x", "cpu", measure, path)
    again = fastest("encoder x", "cpu", measure, path)
    assert (first.precision, first.cached, again.precision, again.cached) == ("bfloat16", False, "bfloat16", True)
    assert calls == [("float32", "bfloat16")]  # timed once
    other = fastest("encoder y", "cpu", counting({"float32": 1.0, "bfloat16": 0.9})[1], path)
    assert other.precision == "float32" and not other.cached  # another model is timed on its own
    entries = json.loads(path.read_text())
    assert set(entries) == {cache_key("encoder x", "cpu"), cache_key("encoder y", "cpu")}
    # cached before the trials had a version (what machines hold from earlier releases), and by an earlier version
    stale = [f"encoder x | {machine('cpu')}", f"encoder x | {machine('cpu')} | trials {TRIALS - 1}"]
    path.write_text(json.dumps({key: {"float32": 1.0, "bfloat16": 2.0} for key in stale}))
    assert fastest("encoder x", "cpu", measure, path).precision == "bfloat16" and len(calls) == 2  # timed again
    path.write_text("{not json")  # a damaged cache is timed again, not an error
    assert not fastest("encoder x", "cpu", measure, path).cached and len(calls) == 3


def test_a_named_precision_is_not_timed(tmp_path: Path) -> None:
    def never(precision):
        raise AssertionError("timed")

    assert resolve("bfloat16", "encoder x", "cpu", never, tmp_path / "c.json") == "bfloat16"
    assert not (tmp_path / "c.json").exists()
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve("float8", "encoder x", "cpu", never)


def test_the_real_timing_of_an_encoder_times_copies_and_leaves_it_float32(tmp_path: Path, caplog) -> None:
    encoder = load_encoder("tiny-cnn", image_size=16)
    before = {name: p.clone() for name, p in encoder.state_dict().items()}
    seconds = measure_trials(timing_trial(encoder, 4), "cpu")(candidates("cpu"))
    assert set(seconds) == {"float32", "bfloat16"} and all(0 < s < 60 for s in seconds.values())
    with caplog.at_level(logging.INFO, logger="fsmllm.dtype"):
        chosen = resolve("auto", "encoder tiny-cnn", "cpu", timing_trial(encoder, 4), tmp_path / "c.json")
    assert chosen in ("float32", "bfloat16")
    assert f"dtype auto -> {chosen}" in caplog.text  # the choice is logged with its timings
    assert all(torch.equal(p, before[name]) for name, p in encoder.state_dict().items())  # untouched, float32


def test_the_served_certificate_names_the_chosen_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake timing (cached for this machine, as a start-up timing would be) makes ``serve --dtype auto`` pick
    bfloat16; the server's certificates and its model card say so. A timing below the margin keeps float32."""
    monkeypatch.setenv("FSMLLM_CACHE", str(tmp_path))
    settings = Settings(
        model="none", encoder="tiny-cnn", image_size=16, dtype="auto", default_n0=20, default_n=60, _env_file=None
    )
    key = f"encoder tiny-cnn at 16 px, batch {settings.batch_size}"
    fastest(key, "cpu", counting({"float32": 1.0, "bfloat16": 0.5})[1], cache_file())
    runtime = build_runtime(settings, Metrics())
    assert runtime.encoder_dtype == "bfloat16" and {p.dtype for p in runtime.encoder.parameters()} == {torch.bfloat16}
    with live_server(settings, encoder=runtime.encoder) as server:
        response = httpx.post(f"{server.url}/certify", json={"image": data_url(png_bytes(1)), "seed": 1}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["certificate"]["encoder_dtype"] == "bfloat16"
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["encoder_dtype"] == "bfloat16"
    cache_file().unlink()
    fastest(key, "cpu", counting({"float32": 1.0, "bfloat16": 0.8})[1], cache_file())
    assert build_runtime(settings, Metrics()).encoder_dtype == "float32"


def test_the_language_model_takes_the_chosen_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmllm.lm.base import SamplingParams
    from fsmllm.lm.models import load_model

    monkeypatch.setenv("FSMLLM_CACHE", str(tmp_path))
    fastest("language model of tiny-test", "cpu", counting({"float32": 1.0, "bfloat16": 0.4})[1], cache_file())
    model = load_model("tiny-test", lm_dtype="auto")
    assert model.backend.model.dtype == torch.bfloat16
    answer = model.generate(torch.randn(4, 16), "What is this?", SamplingParams(max_tokens=3, temperature=0.0))
    assert answer.completion_tokens >= 1
    assert load_model("tiny-test").backend.model.dtype == torch.float32  # no lm_dtype: as loaded
    with pytest.raises(ValueError, match="--vllm-dtype"):
        load_model("tiny-test", backend="vllm", lm_dtype="bfloat16")


def test_a_timing_near_the_margin_is_timed_again_and_cached_only_when_decisive(tmp_path: Path, caplog) -> None:
    """A busy machine can make a 4x speed-up look like 1.49x: such a timing is repeated (the best of all rounds
    counts) and, while still near the margin, used for this start but not cached."""
    path = tmp_path / "fastest-dtype.json"
    rounds = iter([{"float32": 1.0, "bfloat16": 1 / 1.49}, {"float32": 1.2, "bfloat16": 0.25}])
    calls: list = []

    def busy_then_idle(precisions):
        calls.append(tuple(precisions))
        return next(rounds)

    settled = fastest("encoder x", "cpu", busy_then_idle, path)
    assert settled.precision == "bfloat16" and settled.seconds == {"float32": 1.0, "bfloat16": 0.25}
    assert len(calls) == 2 and fastest("encoder x", "cpu", busy_then_idle, path).cached  # the settled one is kept
    calls, always_near = counting({"float32": 1.0, "bfloat16": 1 / 1.6})
    with caplog.at_level(logging.WARNING, logger="fsmllm.dtype"):
        near = fastest("encoder y", "cpu", always_near, path)
    assert near.precision == "bfloat16" and len(calls) == 1 + RETIMES and "too close" in caplog.text
    assert cache_key("encoder y", "cpu") not in json.loads(path.read_text())  # not cached: timed at the next start
    assert not fastest("encoder y", "cpu", always_near, path).cached
    entries = json.loads(path.read_text())
    path.write_text(json.dumps({**entries, cache_key("encoder y", "cpu"): {"float32": 1.0, "bfloat16": 0.67}}))
    assert not fastest("encoder y", "cpu", always_near, path).cached  # a near one cached by an older version too


@pytest.mark.parametrize(
    ("speedup", "settled"),
    [(4.0, True), (MARGIN * NEAR, True), (1.6, False), (1.3, False), (MARGIN / NEAR, True), (0.5, True)],
)
def test_decisive_means_clear_of_the_margin_either_way(speedup: float, settled: bool) -> None:
    assert decisive({"float32": 1.0, "bfloat16": 1.0 / speedup}) == settled
    assert decisive({"float32": 1.0})  # nothing to choose between
