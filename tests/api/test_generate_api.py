"""/generate and the OpenAI-compatible chat route with the tiny test model, against a real server on loopback.

The OpenAI route is driven by the official ``openai`` Python client, unchanged: the certificate rides in an
extra field of the response.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import openai
import pytest
from PIL import Image

from fsmllm.api.schemas import AnswerCertificateOut
from fsmllm.api.settings import Settings
from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.images import to_pixels
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.models import load_model

from .live import LiveServer, certified_content, data_url, live_server, png_bytes, sse_events

PROMPT = "What is this?"


@pytest.fixture(scope="module")
def server() -> LiveServer:
    settings = Settings(model="tiny-test", default_n0=20, default_n=100, batch_size=64, max_tokens_limit=64, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as live:
        yield live


def generate(server: LiveServer, **body) -> httpx.Response:
    body.setdefault("image", data_url(png_bytes()))
    body.setdefault("prompt", PROMPT)
    return httpx.post(f"{server.url}/generate", json=body, timeout=60)


def test_the_answer_is_generated_from_the_certified_smoothed_features(server: LiveServer) -> None:
    image = png_bytes(3)
    response = generate(server, image=data_url(image), seed=5, max_tokens=12, radius=[0.05, 0.1])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-test" and body["finish_reason"] in ("stop", "length")
    assert body["completion_tokens"] >= 1 and body["prompt_tokens"] > 4
    cert = body["certificate"]
    assert cert["seed"] == 5 and [r["radius"] for r in cert["radii"]] == [0.05, 0.1]
    assert body["timings"]["generate_ms"] > 0

    # the same pipeline run by hand: core certificate -> smoothed tokens -> model
    pixels = to_pixels(Image.open(io.BytesIO(image)), 16)
    config = SmoothingConfig(0.25, n0=20, n=100)
    reference = SmoothedEncoder(server.runtime.encoder).certify(pixels, config, [0.05, 0.1], seed=5)
    assert cert["score_lower"] == pytest.approx(reference.score_lower, abs=1e-6)
    tokens = reference.smoothed_feature.reshape(4, 16)
    expected = server.runtime.model.generate(tokens, PROMPT, SamplingParams(max_tokens=12, seed=5))
    assert body["answer"] == expected.text
    assert body["completion_tokens"] == expected.completion_tokens


def test_sampling_is_reproducible_with_a_seed_and_multipart_equals_json(server: LiveServer) -> None:
    image = png_bytes(4)
    first = generate(server, image=data_url(image), seed=9, temperature=1.0, top_p=0.9, max_tokens=10).json()
    again = generate(server, image=data_url(image), seed=9, temperature=1.0, top_p=0.9, max_tokens=10).json()
    assert first["answer"] == again["answer"]
    form = {"prompt": PROMPT, "seed": "9", "temperature": "1.0", "top_p": "0.9", "max_tokens": "10"}
    multipart = httpx.post(f"{server.url}/generate", files={"image": ("x.png", image, "image/png")}, data=form, timeout=60)
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["answer"] == first["answer"]


def test_generate_streams_progress_then_the_result(server: LiveServer) -> None:
    with httpx.stream("POST", f"{server.url}/generate", json={
        "image": data_url(png_bytes()), "prompt": PROMPT, "stream": True, "n": 300, "seed": 1, "max_tokens": 4,
    }, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [name for name, _ in sse_events(response.iter_lines())]
    assert events[0] == "progress" and events[-1] == "result"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_generation_parameters_get_422(server: LiveServer, body: dict, fragment: str) -> None:
    response = generate(server, **body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]["message"]


def test_openai_client_works_unchanged_and_gets_the_certificate(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(6))}},
    ]}]
    completion = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, seed=11)
    answer = completion.choices[0].message.content
    direct = generate(server, image=data_url(png_bytes(6)), seed=11, max_tokens=8).json()
    assert answer == direct["answer"]
    assert completion.usage.completion_tokens == direct["completion_tokens"]
    certificate = completion.model_extra["certificate"]
    assert certificate["seed"] == 11 and certificate["radii"] == direct["certificate"]["radii"]

    chunks = list(client.chat.completions.create(
        model="tiny-test", messages=messages, max_tokens=8, seed=11, stream=True,
    ))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == answer
    last = chunks[-1]
    assert last.choices[0].finish_reason == completion.choices[0].finish_reason
    assert last.model_extra["certificate"]["radii"] == certificate["radii"]

    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exactly one image"):  # OpenAI's 400, not 422
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)


def test_certified_answer_over_json_multipart_and_the_openai_route(server: LiveServer) -> None:
    """certify_answer: the answer certificate equals the runtime's own for the same seed (the votes are the
    runtime's, nothing re-derived in the route), the same from a multipart form, and from the OpenAI route
    (plain and streamed)."""
    image = png_bytes(7)
    body = generate(
        server, image=data_url(image), seed=4, max_tokens=4, n=50, certify_answer={"n0": 8, "n": 64, "alpha": 0.01}
    ).json()
    voted = body["answer_certificate"]
    assert voted["n0"] == 8 and voted["n"] == 64 and voted["bound"] == "clopper-pearson" and voted["seed"] == 4
    assert sum(v["count"] for v in voted["votes"]) <= 64 and voted["agree"] == voted["votes"][0]["count"]
    assert voted["abstain"] == (voted["radius"] is None) and body["timings"]["answer_ms"] > 0
    assert "sigma/sqrt(inner)" in AnswerCertificateOut.model_fields["radius"].description

    config = server.runtime.policy.answer_config(0.25, 8, 64, 0.01)
    reference = asyncio.run(
        server.runtime.certify_answer(Image.open(io.BytesIO(image)), PROMPT, config, SamplingParams(max_tokens=4), 4)
    )
    expected = AnswerCertificateOut.from_certificate(reference).model_dump(exclude_unset=True)  # the core's figures
    assert {key: voted[key] for key in expected} == expected
    assert (voted["encoder"], voted["input_size"]) == ("tiny-cnn", server.runtime.encoder.image_size)
    assert voted["lm_dtype"] == "float32"  # the votes' language model, as computed
    assert voted["feature_certificate_id"] == body["certificate"]["id"] and voted["signature"]

    form = {"prompt": PROMPT, "seed": "4", "max_tokens": "4", "n": "50", "certify_answer": '{"n0": 8, "n": 64, "alpha": 0.01}'}
    multipart = httpx.post(f"{server.url}/generate", files={"image": ("x.png", image, "image/png")}, data=form, timeout=60)
    assert multipart.status_code == 200, multipart.text
    assert certified_content(multipart.json()["answer_certificate"]) == certified_content(voted)

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]}]
    extra = {"certify_answer": {"n0": 8, "n": 64, "alpha": 0.01}, "certification": {"n": 50}}
    completion = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=4, seed=4, extra_body=extra)
    assert certified_content(completion.model_extra["answer_certificate"]) == certified_content(voted)
    chunks = list(client.chat.completions.create(
        model="tiny-test", messages=messages, max_tokens=4, seed=4, extra_body=extra, stream=True
    ))
    assert certified_content(chunks[-1].model_extra["answer_certificate"]) == certified_content(voted)


def test_streamed_generate_carries_the_answer_certificate_in_its_result(server: LiveServer) -> None:
    body = {"image": data_url(png_bytes()), "prompt": PROMPT, "stream": True, "n": 100, "seed": 1, "max_tokens": 3,
            "certify_answer": {"n0": 8, "n": 40}}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as response:
        name, result = list(sse_events(response.iter_lines()))[-1]
    assert name == "result"
    plain = generate(server, **{k: v for k, v in body.items() if k not in ("image", "stream")}).json()
    assert certified_content(result["answer_certificate"]) == certified_content(plain["answer_certificate"])
    assert result["answer"] == plain["answer"]


@pytest.mark.parametrize("answer", [{"n0": 8, "n": 40}, {"n0": 8, "n": 2000, "radius": 0.05}])
def test_streamed_generate_reports_the_votes_as_they_come(server: LiveServer, answer: dict) -> None:
    """A certified answer streams a votes event per chunk: the count rises to where the voting stopped, the
    chosen answer once selected, and (anytime bound only: a target radius) the bound valid so far, whose last
    value is the certificate's; at a fixed n no interim bound is given, since none is valid before the end."""
    body = {"image": data_url(png_bytes()), "prompt": PROMPT, "stream": True, "n": 100, "seed": 1, "max_tokens": 3,
            "certify_answer": answer}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=120) as response:
        events = list(sse_events(response.iter_lines()))
    votes = [data for name, data in events if name == "votes"]
    name, result = events[-1]
    assert name == "result" and [n for n, _ in events].index("votes") < len(events) - 1
    voted = result["answer_certificate"]
    assert [v["done"] for v in votes] == sorted({v["done"] for v in votes}) and votes[-1]["done"] == 8 + voted["n"]
    assert {v["total"] for v in votes} == {8 + answer["n"]}
    assert (votes[0]["done"], votes[0]["estimated"]) == (8, 0)  # one chunk of selection votes: the answer chosen
    last = votes[-1]
    assert last["phase"] == "estimation" and last["stopped_by"] == voted["stopped_by"]
    assert (last["answer"], last["agree"], last["estimated"]) == (voted["answer"], voted["agree"], voted["n"])
    assert all("stopped_by" not in v for v in votes[:-1])
    if "radius" in answer:
        assert last["p_lower"] == voted["p_lower"] and last["radius"] == voted["radius"]
        lowers = [v["p_lower"] for v in votes if "p_lower" in v]
        assert lowers == sorted(lowers)  # the best bound so far never falls
    else:
        assert all("p_lower" not in v and "radius" not in v for v in votes)


def test_certified_answer_defaults_and_early_stop(server: LiveServer) -> None:
    body = generate(server, seed=2, max_tokens=3, n=50, certify_answer=True).json()
    assert (body["answer_certificate"]["n0"], body["answer_certificate"]["n_budget"]) == (32, 256)
    stopped = generate(server, seed=2, max_tokens=3, n=50, certify_answer={"n": 2000, "radius": 0.05}).json()
    voted = stopped["answer_certificate"]
    assert voted["bound"] == "betting" and voted["target_radius"] == 0.05
    assert voted["stopped_by"] in ("target_reached", "target_unreachable") and voted["n"] < 2000
    assert generate(server, max_tokens=3, n=50).json()["answer_certificate"] is None


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        ({"n": 1}, "certify_answer.n"),
        ({"radius": -0.1}, "certify_answer.radius"),
        ({"inner": 40}, "certify_answer.inner"),
        ({"votes": 3}, "votes"),
        ("{not json", "not valid JSON"),
        ({"n": 10**7, "inner": 16}, "exceeds this deployment's maximum"),
    ],
)
def test_bad_answer_options_get_422(server: LiveServer, answer: object, fragment: str) -> None:
    response = generate(server, n=50, certify_answer=answer)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]["message"]


def test_certificate_only_deployments_refuse_generation_clearly() -> None:
    with live_server() as live:  # model "none"
        response = httpx.post(f"{live.url}/generate", json={"image": data_url(png_bytes()), "prompt": PROMPT}, timeout=30)
        assert response.status_code == 422
        assert "/certify" in response.json()["error"]["message"]
