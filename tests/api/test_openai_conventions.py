"""The OpenAI route as OpenAI's own clients expect it (issue 27): the official ``openai`` SDK's parameters and
exception classes, and LangChain's ``ChatOpenAI``, against a real server on loopback with the tiny test model."""

from __future__ import annotations

import io
import math
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from fsmllm.api.schemas.openai import LONE_IMAGE_QUESTION
from fsmllm.api.settings import Settings

from .live import LiveServer, certified_content, data_url, live_server, png_bytes, tiny_model_server

PROMPT = "What is this?"


@pytest.fixture(scope="module")
def server() -> LiveServer:
    with tiny_model_server() as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def messages(seed: int = 1, image: str | None = None) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": {"url": image or data_url(png_bytes(seed))}},
            ],
        }
    ]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def create(client: openai.OpenAI, **options: Any) -> Any:
    options.setdefault("messages", messages())
    options.setdefault("seed", 3)
    return client.chat.completions.create(model="tiny-test", **options)


def test_max_completion_tokens_limits_the_answer_and_wins_over_max_tokens(client: openai.OpenAI) -> None:
    longer = create(client, max_tokens=12)
    assert longer.usage.completion_tokens > 2  # so that a limit of 2 shows
    for options in ({"max_completion_tokens": 2}, {"max_completion_tokens": 2, "max_tokens": 12}):
        short = create(client, **options)
        assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
        assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="limit of 64") as refused:
        create(client, max_completion_tokens=65)
    assert (refused.value.code, refused.value.param) == ("invalid_request", "max_tokens")


@pytest.mark.parametrize(
    ("options", "param", "fragment"),
    [
        ({"logprobs": True}, "logprobs", "logprobs is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "tools is not"),
        ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
        ({"extra_body": {"max_tokenz": 3}}, "max_tokenz", "unknown field 'max_tokenz' (did you mean 'max_tokens'?)"),
        (
            {"extra_body": {"target_cosine": 0.5}},
            "target_cosine",
            "unknown field 'target_cosine' (did you mean 'certification.target_cos'?)",
        ),
        ({"n": 9}, "n", "less than or equal to 8"),
    ],
)
def test_parameters_the_server_does_not_implement_are_refused_by_name(
    client: openai.OpenAI, options: dict[str, Any], param: str, fragment: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, **options)
    assert refused.value.status_code == 400 and refused.value.param == param
    assert refused.value.type == "invalid_request_error" and fragment in refused.value.message
    if param != "n":
        assert refused.value.code == "unsupported_parameter"


def test_what_clients_send_as_their_defaults_is_accepted(client: openai.OpenAI) -> None:
    plain = create(client, max_tokens=6)
    defaults = create(
        client,
        max_tokens=6,
        n=1,
        logprobs=False,
        frequency_penalty=0,
        presence_penalty=0,
        user="u-1",
        store=False,
        stop=None,
        temperature=0,
        top_p=1,
    )
    assert defaults.choices[0].message.content == plain.choices[0].message.content


def test_n_seed_stop_temperature_and_top_p_are_honoured(client: openai.OpenAI) -> None:
    one = create(client, max_tokens=6, temperature=1.0, top_p=0.9)
    again = create(client, max_tokens=6, temperature=1.0, top_p=0.9)
    assert one.choices[0].message.content == again.choices[0].message.content  # the seed reproduces it
    three = create(client, max_tokens=6, temperature=1.0, top_p=0.9, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content  # answer 0 is the single answer
    assert len({choice.message.content for choice in three.choices}) > 1  # sampled with seeds 3, 4, 5
    if all(choice.finish_reason == "length" for choice in three.choices):  # each answer's 6 tokens counted
        assert three.usage.completion_tokens == 18
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is read once
    # one certification for all answers (each completion is its own issue of it)
    assert certified_content(three.model_extra["certificate"]) == certified_content(one.model_extra["certificate"])

    text = create(client, max_tokens=12).choices[0].message.content
    cut = text.index(" ", 2)  # a stop string inside the answer ends it there
    stopped = create(client, max_tokens=12, stop=[text[cut : cut + 3]])
    assert stopped.choices[0].message.content == text[:cut] and stopped.choices[0].finish_reason == "stop"


def test_a_streamed_answer_with_include_usage_ends_with_the_usage_and_the_certificate(client: openai.OpenAI) -> None:
    whole = create(client, max_tokens=6, n=2, temperature=1.0)
    chunks = list(
        create(client, max_tokens=6, n=2, temperature=1.0, stream=True, stream_options={"include_usage": True})
    )
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(2)
    ]
    assert texts == [choice.message.content for choice in whole.choices]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])  # the usage once, as OpenAI sends it (no double count)
    assert certified_content(last.model_extra["certificate"]) == certified_content(whole.model_extra["certificate"])
    plain = list(create(client, max_tokens=6, stream=True))
    assert plain[-1].choices[0].finish_reason and plain[-1].model_extra["certificate"]


def test_the_developer_role_is_openais_name_for_system(client: openai.OpenAI) -> None:
    completion = create(client, max_tokens=4, messages=[{"role": "developer", "content": "Be brief."}, *messages()])
    system = create(client, max_tokens=4, messages=[{"role": "system", "content": "Be brief."}, *messages()])
    assert completion.choices[0].message.content == system.choices[0].message.content


def test_an_image_alone_is_asked_what_it_shows_and_a_question_alone_is_refused(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(1))}}
    lone = create(client, max_tokens=6, messages=[{"role": "user", "content": [image]}])
    asked = create(
        client,
        max_tokens=6,
        messages=[{"role": "user", "content": [{"type": "text", "text": LONE_IMAGE_QUESTION}, image]}],
    )
    other = create(
        client,
        max_tokens=6,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe the colours"}, image]}],
    )
    assert lone.choices[0].message.content == asked.choices[0].message.content
    assert other.choices[0].message.content != asked.choices[0].message.content  # the answer hangs on the question
    with pytest.raises(openai.BadRequestError, match="exactly one image"):
        create(client, messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])


def test_models_retrieve(server: LiveServer, client: openai.OpenAI) -> None:
    card = client.models.retrieve("tiny-test")
    assert card.id == "tiny-test" and card.model_extra["allowed_sigmas"] == server.settings.allowed_sigmas
    assert [model.id for model in client.models.list()] == ["tiny-test"]
    with pytest.raises(openai.NotFoundError, match="not served here") as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_errors_take_openais_shape_and_statuses(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not valid base64") as unreadable:
        create(client, messages=messages(image="data:image/png;base64,@@@"))
    assert unreadable.value.code == "invalid_image"
    gif = data_url(b"GIF89a" + b"\0" * 20, "image/gif")
    with pytest.raises(openai.BadRequestError) as unsupported:  # 415 on the native routes
        create(client, messages=messages(image=gif))
    assert unsupported.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as invalid:  # 422 on the native routes
        create(client, extra_body={"certification": {"sigma": 0.3}})
    assert invalid.value.type == "invalid_request_error" and "sigma" in invalid.value.message
    with pytest.raises(openai.BadRequestError) as negative:
        create(client, extra_body={"certification": {"radius": [-1]}})
    assert (negative.value.code, negative.value.param) == ("invalid_value", "certification.radius")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=messages())
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    side = math.isqrt(server.settings.max_image_pixels) + 1
    with pytest.raises(openai.APIStatusError) as large:  # the SDK has no class of its own for 413
        create(client, messages=messages(image=data_url(_png(Image.new("RGB", (side, side))))))
    assert large.value.status_code == 413 and large.value.code == "invalid_image"
    body = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}).json()["error"]
    assert set(body) == {"message", "type", "param", "code", "request_id"} and body["param"] == "messages"
    native = httpx.post(f"{server.url}/generate", json={"prompt": "x", "image": "@@"})
    assert native.status_code == 400 and set(native.json()["error"]) == {"type", "message", "request_id"}
    invalid_native = httpx.post(f"{server.url}/generate", json={"prompt": "x", "image": data_url(png_bytes()), "n": 1})
    assert invalid_native.status_code == 422 and invalid_native.json()["error"]["type"] == "invalid_request"


def test_a_wrong_api_key_is_openais_authentication_error() -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, api_key="s3cret", _env_file=None)
    with live_server(settings) as live:
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key"
        assert openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret").models.retrieve("none").id == "none"


def test_the_certification_object_takes_the_certify_fields(server: LiveServer, client: openai.OpenAI) -> None:
    fields = {"radius": [0.05], "target_cos": 0.5, "radius_tolerance": 0.05, "n": 400, "seed": 9}
    completion = create(client, max_tokens=2, seed=None, extra_body={"certification": fields})
    certified = httpx.post(f"{server.url}/certify", json={"image": data_url(png_bytes(1)), **fields}, timeout=60)
    assert certified.status_code == 200, certified.text
    expected = certified.json()["certificate"]
    got = completion.model_extra["certificate"]
    assert got["certified_radius"] == expected["certified_radius"] and got["certified_radius"] is not None
    assert (got["n"], got["stopped_by"]) == (expected["n"], expected["stopped_by"])
    with pytest.raises(openai.BadRequestError, match="top-level 'stream'") as refused:
        create(client, extra_body={"certification": {"stream": True}})
    assert (refused.value.param, refused.value.code) == ("certification.stream", "unsupported_value")


def langchain_chat(server: LiveServer, **options: Any) -> Any:
    """LangChain's ChatOpenAI on this server (2 tokens, seed 3, no retries) with ``options``."""
    import langchain_openai  # a dev dependency, as openai is

    return langchain_openai.ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model="tiny-test", max_tokens=2, seed=3, max_retries=0, **options
    )


def test_langchain_chat_openai_with_an_image_message(server: LiveServer, client: openai.OpenAI) -> None:
    """LangChain sends max_completion_tokens (its max_tokens), stream_options with stream_usage, and the image as
    an image_url part: the limit applies, the answer is the SDK's, usage is counted once."""
    import langchain_openai  # a dev dependency, as openai is
    from langchain_core.messages import HumanMessage

    chat = langchain_chat(server, stream_usage=True)
    message = HumanMessage(content=messages()[0]["content"])
    answer = chat.invoke([message])
    expected = create(client, max_tokens=2)
    assert answer.content == expected.choices[0].message.content
    assert answer.usage_metadata["output_tokens"] == 2
    streamed = None
    for piece in chat.stream([message]):
        streamed = piece if streamed is None else streamed + piece
    assert streamed.content == answer.content and streamed.usage_metadata["output_tokens"] == 2
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        langchain_openai.ChatOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", model="tiny-test", max_tokens=100, max_retries=0
        ).invoke([message])


def test_the_certificate_reaches_langchain_through_the_response_header(
    server: LiveServer, client: openai.OpenAI
) -> None:
    """LangChain's message keeps only OpenAI's fields; with include_response_headers it keeps the headers, and
    X-Fsmllm-Certificate-Id names the certificate that GET /v1/certificates/{id} serves (docs/certificates.md)."""
    from langchain_core.messages import HumanMessage

    chat = langchain_chat(server, include_response_headers=True)
    answer = chat.invoke([HumanMessage(content=messages()[0]["content"])])
    certificate_id = answer.response_metadata["headers"]["x-fsmllm-certificate-id"]
    served = httpx.get(f"{server.url}/v1/certificates/{certificate_id}")
    assert served.status_code == 200, served.text
    assert served.json()["id"] == certificate_id
    expected = create(client, max_tokens=2)  # the same request through the SDK: the same certificate, issued again
    assert certified_content(served.json()) == certified_content(expected.model_extra["certificate"])
