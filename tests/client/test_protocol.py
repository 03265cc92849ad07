"""The client's decisions, free of I/O (``fsmllm_client._protocol``): what is sent, how answers and progress
streams are read, which errors are raised, and when (and how long after) a call is tried again.

These are the rules both clients share; tests/client/test_failures.py checks that the clients follow them over
real connections.
"""

from __future__ import annotations

import base64
import io
import math
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fsmllm_client import AuthError, BadRequest, FsmllmError, Overloaded, ServerError, Unreachable
from fsmllm_client._protocol import (
    HEALTH,
    MODELS,
    READY,
    Call,
    EventStream,
    Reply,
    Retry,
    RetryPolicy,
    certify_call,
    chat_call,
    error_from,
    generate_call,
    image_data_url,
    read_reply,
    user_message,
)
from fsmllm_client.models import ChatCompletion, CertifyResult, GenerateResult, Health

PNG = b"\x89PNG\r\n\x1a\n" + b"rest of a png"
POST = Call("POST", "/certify", Health, {"image": "x"})


def reply(status: int, payload: object = None, **headers: str) -> Reply:
    return Reply(status, httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()}), payload)


def overloaded_body(message: str = "the certification queue is full") -> dict[str, object]:
    return {"error": {"type": "overloaded", "message": message, "request_id": "r-body"}}


# -- what is sent -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("magic", "mime"),
    [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"BM", "image/bmp"),
        (b"II*\x00", "image/tiff"),
        (b"MM\x00*", "image/tiff"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    ],
)
def test_image_bytes_become_a_data_url_of_their_format(magic: bytes, mime: str) -> None:
    data = magic + b"\x00payload"
    assert image_data_url(data) == f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_unrecognised_bytes_are_sent_as_bare_base64() -> None:
    for data in (b"plain bytes", b"RIFF\x00\x00\x00\x00WAVE", b"RIF"):
        assert image_data_url(data) == base64.b64encode(data).decode()


def test_every_image_form_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(PNG)
    expected = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"
    for form in (path, str(path), PNG, bytearray(PNG), memoryview(PNG), expected):
        assert image_data_url(form) == expected
    picture = Image.new("RGB", (3, 2), "red")
    url = image_data_url(picture)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == (3, 2)
    with pytest.raises(TypeError, match="int"):
        image_data_url(42)
    with pytest.raises(FileNotFoundError):
        image_data_url(str(tmp_path / "missing.png"))


def test_user_message_is_openai_shaped() -> None:
    message = user_message("What is this?", PNG)
    assert message == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": image_data_url(PNG)}},
        ],
    }


def test_certify_call_body() -> None:
    progress = lambda done, total: None  # noqa: E731
    call = certify_call(PNG, {"radius": 0.1, "sigma": 0.5, "n0": 10, "n": 200, "alpha": 0.01, "bound": "hoeffding",
                              "seed": 0, "target_cos": 0.5, "progress": progress})
    assert (call.method, call.path, call.progress) == ("POST", "/certify", progress)
    assert call.body == {"image": image_data_url(PNG), "sigma": 0.5, "n0": 10, "n": 200, "alpha": 0.01,
                         "bound": "hoeffding", "seed": 0, "radius": [0.1], "stream": True, "target_cos": 0.5}
    assert not call.idempotent and call.accept == frozenset({200})
    plain = certify_call(PNG, {"radius": [1, 0.25], "seed": None})
    assert plain.body == {"image": image_data_url(PNG), "radius": [1.0, 0.25]} and plain.progress is None
    assert all(isinstance(r, float) for r in plain.body["radius"])
    assert certify_call(PNG, {"radius": 2}).body["radius"] == [2.0]
    assert certify_call(PNG, {"stop_at_fcsb": 0.8}).body == {"image": image_data_url(PNG), "stop_at_fcsb": 0.8}
    assert certify_call(PNG, {"granularity": "token", "per_token": True}).body == {
        "image": image_data_url(PNG), "granularity": "token", "per_token": True}
    assert certify_call(PNG, {}).model is CertifyResult
    with pytest.raises(TypeError, match="unknown option 'radii' \\(did you mean 'radius'\\?\\)"):
        certify_call(PNG, {"radii": 0.1})
    with pytest.raises(TypeError, match="unknown option 'target_cosine' \\(did you mean 'target_cos'\\?\\)"):
        certify_call(PNG, {"target_cosine": 0.5})
    with pytest.raises(TypeError, match="unknown option"):
        certify_call(PNG, {"prompt": "a generate option"})
    with pytest.raises(TypeError) as unknown:
        certify_call(PNG, {"zeta": 1, "alpha": 0.1, "beta": 2})
    assert str(unknown.value).startswith("unknown option 'beta'; the options are alpha, bound, granularity")


def test_generate_call_body() -> None:
    call = generate_call(PNG, "What?", {"max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 3,
                                        "radius": [0.1]})
    assert (call.method, call.path) == ("POST", "/generate")
    assert call.body == {"image": image_data_url(PNG), "prompt": "What?", "max_tokens": 8, "temperature": 0.5,
                         "top_p": 0.9, "stop": ["\n"], "seed": 3, "radius": [0.1]}
    assert call.model is GenerateResult and call.progress is None
    assert generate_call(PNG, "Q", {"stop": ("a", "b")}).body["stop"] == ["a", "b"]
    assert generate_call(PNG, "Q", {"stop": "END"}).body["stop"] == ["END"]  # one stop string, not three letters
    progress = lambda done, total: None  # noqa: E731
    streamed = generate_call(PNG, "Q", {"progress": progress})
    assert streamed.progress is progress and streamed.body["stream"] is True
    assert generate_call(PNG, "Q", {}).body == {"image": image_data_url(PNG), "prompt": "Q"}
    with pytest.raises(TypeError, match="unknown option 'target_cos'"):
        generate_call(PNG, "Q", {"target_cos": 0.5})  # a certify option only


def test_chat_call_body() -> None:
    messages = [user_message("Hi", PNG)]
    call = chat_call(messages, {"model": "m", "max_tokens": 4, "seed": None, "certification": {"radius": [0.1]}})
    assert (call.method, call.path) == ("POST", "/v1/chat/completions")
    assert call.body == {"messages": messages, "model": "m", "max_tokens": 4, "certification": {"radius": [0.1]}}
    assert call.model is ChatCompletion and call.progress is None
    assert chat_call(messages, {"stream": False}).body["stream"] is False
    with pytest.raises(ValueError, match="^streaming chat is not supported by this client"):
        chat_call(messages, {"stream": True})


def test_the_get_calls() -> None:
    assert [(c.method, c.path, c.idempotent) for c in (HEALTH, READY, MODELS)] == [
        ("GET", "/health", True), ("GET", "/ready", True), ("GET", "/v1/models", True)]
    assert READY.accept == frozenset({200, 503}) and HEALTH.accept == MODELS.accept == frozenset({200})


# -- how answers are read ---------------------------------------------------------------------------------
def test_read_reply_decodes_json_and_wraps_anything_else() -> None:
    assert read_reply(200, {}, b'{"status": "ok"}').payload == {"status": "ok"}
    html = read_reply(502, {}, b"  <html>Bad Gateway</html>\n" + b"x" * 1000)
    error = html.payload["error"]
    assert error["type"] == "invalid_response" and error["message"].startswith("<html>Bad Gateway</html>")
    assert len(error["message"]) == 300 and html.status == 502
    assert read_reply(502, {}, b"").payload["error"]["message"] == "empty answer with HTTP 502"
    assert read_reply(500, {}, b"\xff\xfe").payload["error"]["type"] == "invalid_response"


def test_an_accepted_reply_that_is_not_the_api_is_a_server_error() -> None:
    assert HEALTH.result(reply(200, {"status": "ok"})) == Health(status="ok")
    with pytest.raises(ServerError, match="unexpected answer from /health") as error:
        HEALTH.result(reply(200, {"error": {"type": "invalid_response", "message": "<html>"}}, x_request_id="r9"))
    assert error.value.status_code == 200 and error.value.request_id == "r9"


def feed(stream: EventStream, text: str) -> None:
    for line in text.split("\n"):
        stream.feed(line)


def test_event_stream_reports_progress_then_the_result() -> None:
    seen: list[tuple[int, int]] = []
    stream = EventStream(lambda done, total: seen.append((done, total)), 200, httpx.Headers({"x-request-id": "r"}))
    feed(stream, 'event: progress\ndata: {"done": 32, "total": 64}\n\n: a comment\n\n'
                 'event: progress\ndata: {"done": 64, "total": 64}\n\nevent: result\ndata: {"status":\ndata: "ok"}\n')
    assert seen == [(32, 64), (64, 64)]
    result = stream.reply()  # the last event had no blank line after it: the end of the stream dispatches it
    assert result.status == 200 and result.payload == {"status": "ok"}
    assert HEALTH.result(result).status == "ok"


def test_votes_events_feed_their_own_callback() -> None:
    seen: list[object] = []
    stream = EventStream(None, 200, httpx.Headers(), votes=seen.append)
    feed(stream, 'event: progress\ndata: {"done": 32, "total": 64}\n\nevent: votes\ndata: {"done": 8, "total": 40, '
                 '"phase": "estimation", "answer": "a cat"}\n\nevent: result\ndata: {"status": "ok"}\n\n')
    assert seen == [{"done": 8, "total": 40, "phase": "estimation", "answer": "a cat"}]
    assert stream.reply().payload == {"status": "ok"}
    call = generate_call(b"\x89PNG\r\n\x1a\n", "What is this?", {"certify_answer": True, "vote_progress": seen.append})
    assert call.body is not None and call.body["stream"] is True and "vote_progress" not in call.body
    assert call.streamed and call.votes is not None and call.progress is None
    assert not generate_call(b"\x89PNG\r\n\x1a\n", "What is this?", {}).streamed


def test_event_stream_fields_without_the_optional_space() -> None:
    seen: list[tuple[int, int]] = []
    stream = EventStream(lambda done, total: seen.append((done, total)), 200, httpx.Headers())
    stream.read(["event:progress", 'data:{"done": 1, "total": 2}', "", "event:result", 'data:{"status": "ok"}', ""])
    assert seen == [(1, 2)] and stream.reply().payload == {"status": "ok"}


def test_a_result_event_that_is_not_the_api_names_the_request() -> None:
    stream = EventStream(lambda done, total: None, 200, httpx.Headers({"x-request-id": "r-res"}))
    outcome = stream.read(["event: result", 'data: {"unexpected": true}', ""])
    with pytest.raises(ServerError, match="unexpected answer") as error:
        HEALTH.result(outcome)
    assert error.value.request_id == "r-res"


def test_event_stream_without_an_event_name_is_ignored() -> None:
    stream = EventStream(lambda done, total: pytest.fail("not a progress event"), 200, httpx.Headers())
    feed(stream, 'data: {"done": 1, "total": 2}\n\nevent: result\ndata: {"status": "ok"}\n\n')
    assert stream.reply().payload == {"status": "ok"}


@pytest.mark.parametrize(
    ("kind", "status", "error_class"),
    [("QueueFull", 503, Overloaded), ("WorkerStopped", 503, Overloaded), ("JobCancelled", 503, Overloaded),
     ("TimeoutError", 504, ServerError), ("RuntimeError", 500, ServerError), ("", 500, ServerError)],
)
def test_an_error_inside_the_stream_becomes_the_matching_error(kind: str, status: int, error_class: type) -> None:
    stream = EventStream(lambda done, total: None, 200, httpx.Headers({"x-request-id": "r-stream"}))
    feed(stream, f'event: progress\ndata: {{"done": 1, "total": 9}}\n\nevent: error\ndata: {{"type": "{kind}", "message": "it broke"}}\n\n')
    outcome = stream.reply()
    assert outcome.status == status
    error = error_from(outcome)
    assert type(error) is error_class and error.message == "it broke" and error.status_code == status
    assert error.error_type == kind and error.request_id == "r-stream"


def test_an_error_event_without_a_message() -> None:
    stream = EventStream(lambda done, total: None, 200, httpx.Headers())
    stream.read(["event: error", 'data: {"type": "QueueFull"}', ""])
    assert error_from(stream.reply()).message == "error"


def test_a_stream_that_ends_without_a_result_is_a_server_error() -> None:
    seen: list[tuple[int, int]] = []
    stream = EventStream(lambda done, total: seen.append((done, total)), 200, httpx.Headers({"x-request-id": "r7"}))
    with pytest.raises(ServerError) as error:
        stream.read(['event: progress', 'data: {"done": 5, "total": 10}', ''])
    assert error.value.message == "the progress stream ended without a result"
    assert seen == [(5, 10)] and error.value.status_code == 200 and error.value.request_id == "r7"


@pytest.mark.parametrize("data", ["not json", '{"done": "many"}', '{"total": 3}', "[1, 2]"])
def test_a_garbled_progress_event_is_a_server_error(data: str) -> None:
    stream = EventStream(lambda done, total: None, 200, httpx.Headers({"x-request-id": "r8"}))
    with pytest.raises(ServerError, match="progress stream") as error:
        stream.read(["event: progress", f"data: {data}", ""])
    assert error.value.request_id == "r8" and error.value.message.endswith(data) and error.value.status_code == 200


def test_a_garbled_event_is_quoted_up_to_200_characters() -> None:
    stream = EventStream(lambda done, total: None, 200, httpx.Headers())
    with pytest.raises(ServerError) as error:
        stream.read(["event: result", "data: " + "x" * 199 + "yz", ""])
    assert error.value.message.endswith("x" * 199 + "y")


# -- which error ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "error_class"),
    [(400, BadRequest), (401, AuthError), (403, AuthError), (404, BadRequest), (413, BadRequest), (422, BadRequest),
     (429, Overloaded), (499, BadRequest), (500, ServerError), (502, ServerError), (503, Overloaded), (504, ServerError)],
)
def test_error_classes_by_status(status: int, error_class: type) -> None:
    error = error_from(reply(status, {"error": {"type": "t", "message": "m", "request_id": "r"}}))
    assert type(error) is error_class
    assert (error.message, error.status_code, error.request_id, error.error_type) == ("m", status, "r", "t")
    assert str(error) == f"HTTP {status}: m (request id r)"


def test_an_error_in_the_openai_routes_shape_keeps_fsmllms_kind() -> None:
    body = {"message": "m", "type": "invalid_request_error", "param": "logprobs", "code": "unsupported_parameter",
            "request_id": "r"}
    error = error_from(reply(400, {"error": body}))
    assert type(error) is BadRequest and (error.message, error.error_type, error.request_id) == (
        "m", "unsupported_parameter", "r")


def test_error_without_the_servers_envelope() -> None:
    error = error_from(reply(502, ["not", "a", "dict"], x_request_id="from-header"))
    assert (error.message, error.request_id, error.error_type) == ("HTTP 502", "from-header", None)
    error = error_from(reply(400, {"error": "a string"}))
    assert (error.message, error.request_id, str(error)) == ("HTTP 400", None, "HTTP 400: HTTP 400")
    assert error_from(reply(400, {"error": {"message": ""}})).message == "HTTP 400"
    assert str(FsmllmError("no server")) == "no server"


def retry_after(value: str) -> float | None:
    error = error_from(reply(503, overloaded_body(), retry_after=value))
    assert isinstance(error, Overloaded)
    return error.retry_after


def test_retry_after_in_seconds() -> None:
    assert retry_after("7") == 7.0
    assert retry_after("2.5") == 2.5
    assert retry_after("-3") == 0.0
    assert retry_after("soon") is None
    assert error_from(reply(503, overloaded_body())).retry_after is None  # type: ignore[attr-defined]


def test_retry_after_as_an_http_date() -> None:
    now = datetime.now(timezone.utc)
    later = retry_after(format_datetime(now + timedelta(seconds=120), usegmt=True))
    assert later is not None and 100 < later <= 121
    assert retry_after(format_datetime(now - timedelta(hours=1), usegmt=True)) == 0.0
    # RFC 5322 "-0000" (no zone information) is read as UTC, as HTTP dates always are
    naive = (now + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S -0000")
    seconds = retry_after(naive)
    assert seconds is not None and 40 < seconds <= 61
    assert retry_after("Mon, 99 Foo 2026 99:99:99 GMT") is None


# -- when to try again ------------------------------------------------------------------------------------
def test_transport_errors_of_gets_are_retried_with_exponential_backoff() -> None:
    policy = RetryPolicy(max_retries=3, max_sleep=30, backoff=0.5)
    for error in (httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.RemoteProtocolError("closed"),
                  httpx.ReadTimeout("slow")):
        assert [policy.step(HEALTH, attempt, error) for attempt in range(3)] == [Retry(0.5), Retry(1.0), Retry(2.0)]
        with pytest.raises(Unreachable, match="GET /health") as failed:
            policy.step(HEALTH, 3, error)
        assert failed.value.status_code is None and failed.value.__cause__ is error
    assert RetryPolicy(max_retries=9, max_sleep=1.5, backoff=0.5).step(HEALTH, 5, httpx.ConnectError("x")) == Retry(1.5)


def test_a_post_is_retried_only_when_it_never_reached_the_server() -> None:
    policy = RetryPolicy(max_retries=3)
    assert policy.step(POST, 0, httpx.ConnectError("refused")) == Retry(0.5)
    assert policy.step(POST, 2, httpx.ConnectTimeout("no answer to the handshake")) == Retry(2.0)
    assert policy.step(POST, 1, httpx.PoolTimeout("no free connection")) == Retry(1.0)
    with pytest.raises(Unreachable):
        policy.step(POST, 3, httpx.ConnectError("refused"))
    # the request may have been received and its work started: sending it again would repeat it
    for error in (httpx.ReadError("reset"), httpx.RemoteProtocolError("closed"), httpx.ReadTimeout("slow"),
                  httpx.WriteError("broken pipe"), httpx.WriteTimeout("slow")):
        with pytest.raises(Unreachable, match="POST /certify"):
            policy.step(POST, 0, error)


def test_overloaded_answers_are_retried_after_the_servers_hint_capped() -> None:
    policy = RetryPolicy(max_retries=2, max_sleep=10, backoff=0.25)
    for status in (429, 503):
        assert policy.step(POST, 0, reply(status, overloaded_body(), retry_after="3")) == Retry(3.0)
        assert policy.step(POST, 1, reply(status, overloaded_body(), retry_after="300")) == Retry(10.0)
        assert policy.step(POST, 1, reply(status, overloaded_body())) == Retry(0.5)  # no hint: back off
        assert policy.step(POST, 0, reply(status, overloaded_body(), retry_after="inf")) == Retry(10.0)
        with pytest.raises(Overloaded) as refused:
            policy.step(POST, 2, reply(status, overloaded_body(), retry_after="3"))
        assert refused.value.status_code == status and refused.value.retry_after == 3.0
        assert refused.value.message == "the certification queue is full"


def test_other_answers_are_final() -> None:
    policy = RetryPolicy(max_retries=5)
    assert policy.step(HEALTH, 0, reply(200, {"status": "ok"})) == Health(status="ok")
    assert policy.step(READY, 0, reply(503, {"status": "starting"})).status == "starting"
    for status, error_class in ((400, BadRequest), (401, AuthError), (500, ServerError), (504, ServerError)):
        with pytest.raises(error_class):
            policy.step(POST, 0, reply(status, {"error": {"message": "no"}}))
    assert policy.step(HEALTH, 0, reply(503, {"status": "starting"}, retry_after="1")) == Retry(1.0)
    assert math.isclose(RetryPolicy().max_sleep, 30.0) and RetryPolicy().max_retries == 3
