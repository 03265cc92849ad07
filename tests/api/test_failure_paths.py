"""The server when something fails: the encoder raises, a certification times out, the queue is full, the
worker is stopped under a waiting request. Each against a real server on loopback with a real worker; the
``Controlled`` encoder fails or holds batches on the test's command (no timing)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import httpx
import pytest

from fsmllm.api.errors import INTERNAL_ERROR
from fsmllm.api.settings import Settings

from .live import Controlled, LiveServer, data_url, live_server, open_request, png_bytes, sse_events, wait_until


@pytest.fixture(scope="module")
def controlled() -> Iterator[tuple[LiveServer, Controlled]]:
    encoder = Controlled()
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=64, _env_file=None)
    with live_server(settings, encoder=encoder) as live:
        yield live, encoder


def certify(live: LiveServer, **body: object) -> httpx.Response:
    body.setdefault("image", data_url(png_bytes()))
    return httpx.post(f"{live.url}/certify", json=body, timeout=120)


def statuses(live: LiveServer, status: str) -> float:
    return live.metrics.requests.labels(route="/certify", status=status)._value.get()


def test_an_encoder_failure_is_a_500_with_the_request_id_and_the_server_goes_on(
    controlled: tuple[LiveServer, Controlled], caplog: pytest.LogCaptureFixture
) -> None:
    live, encoder = controlled
    encoder.fail_next = 1
    before = statuses(live, "500")
    with caplog.at_level(logging.ERROR, logger="fsmllm"):
        response = certify(live, seed=1)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "request id" in error["message"]
    # the id that the answer names is the one in the response header and in the server log
    assert error["request_id"] and response.headers.get("x-request-id") == error["request_id"]
    assert any(error["request_id"] in record.getMessage() for record in caplog.records), caplog.text
    assert "injected encoder failure" not in response.text  # internals stay in the log
    assert statuses(live, "500") == before + 1
    again = certify(live, seed=1)
    assert again.status_code == 200 and not again.json()["certificate"]["cached"]
    wait_until(lambda: live.runtime.worker.depth == 0, "the worker to let go of the jobs")


def test_an_encoder_raising_value_error_is_the_servers_fault_not_the_clients(
    controlled: tuple[LiveServer, Controlled],
) -> None:
    """A ValueError from inside the worker (an encoder's bug) is a 500 with the request id, as any other internal
    error, in a plain answer and in a progress stream alike: only request errors are 4xx."""
    live, encoder = controlled
    encoder.fail_with = ValueError
    try:
        encoder.fail_next = 1
        response = certify(live, seed=4)
        encoder.fail_next = 1
        with httpx.stream("POST", f"{live.url}/certify", json={"image": data_url(png_bytes()), "stream": True},
                          timeout=60) as streamed:
            events = list(sse_events(streamed.iter_lines()))
    finally:
        encoder.fail_with = RuntimeError
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "internal_error" and error["message"] == INTERNAL_ERROR and error["request_id"]
    assert "injected encoder failure" not in response.text
    assert events[-1][0] == "error" and events[-1][1]["message"] == INTERNAL_ERROR, events[-1]
    assert certify(live, seed=4).status_code == 200


def test_an_encoder_failure_fails_only_the_jobs_of_that_batch(controlled: tuple[LiveServer, Controlled]) -> None:
    """Two requests; the first batch holds only the first one's selection samples (n0 = batch size): it fails,
    the second request still gets its certificate."""
    live, encoder = controlled
    encoder.hold()
    answers: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", certify(live, n0=64, n=100, seed=2)))
    first.start()
    wait_until(encoder.entered.is_set, "the first batch to reach the encoder")
    second = threading.Thread(target=lambda: answers.setdefault("second", certify(live, n0=20, n=100, seed=3)))
    second.start()
    wait_until(lambda: live.runtime.worker.depth == 2, "both jobs to be queued")
    encoder.fail_next = 1
    encoder.release.set()
    first.join(60)
    second.join(60)
    assert answers["first"].status_code == 500
    assert answers["second"].status_code == 200 and answers["second"].json()["certificate"]["seed"] == 3


def test_an_encoder_failure_inside_a_progress_stream(
    controlled: tuple[LiveServer, Controlled], caplog: pytest.LogCaptureFixture
) -> None:
    """The error comes in-band (the 200 is sent), with the request id of the header; the server log has the
    error under that id, with its traceback; the internals stay out of the answer, as they do in a 500."""
    live, encoder = controlled
    encoder.fail_next = 1
    body = {"image": data_url(png_bytes()), "stream": True}
    with caplog.at_level(logging.ERROR, logger="fsmllm"):
        with httpx.stream("POST", f"{live.url}/certify", json=body, headers={"x-request-id": "stream-fails"},
                          timeout=60) as response:
            assert response.status_code == 200 and response.headers["x-request-id"] == "stream-fails"
            events = list(sse_events(response.iter_lines()))
    name, error = events[-1]
    assert name == "error" and error == {
        "type": "RuntimeError", "message": INTERNAL_ERROR, "request_id": "stream-fails",
    }
    assert "result" not in [name for name, _ in events]
    logged = [record for record in caplog.records if "stream-fails" in record.getMessage()]
    assert any(record.exc_info and "injected encoder failure" in str(record.exc_info[1]) for record in logged), caplog.text
    assert certify(live).status_code == 200


def test_a_certification_past_request_timeout_s_is_a_504_and_its_job_is_dropped() -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, request_timeout_s=0.5,
                        max_n=100_000_000, _env_file=None)
    with live_server(settings) as live:
        response = certify(live, n=50_000_000)  # hours of work on this machine
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["type"] == "timeout" and "time limit" in error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
        wait_until(lambda: live.runtime.worker.depth == 0, "the timed-out job to be dropped")
        # in a progress stream: the error event names the timeout (clients map it to 504), with the request id
        body = {"image": data_url(png_bytes()), "n": 50_000_000, "stream": True}
        with httpx.stream("POST", f"{live.url}/certify", json=body, timeout=120) as streamed:
            name, error = list(sse_events(streamed.iter_lines()))[-1]
        assert name == "error" and error["type"] == "TimeoutError" and error["message"] != INTERNAL_ERROR
        assert error["request_id"] == streamed.headers["x-request-id"]
        wait_until(lambda: live.runtime.worker.depth == 0, "the timed-out job to be dropped")
        assert httpx.get(f"{live.url}/ready").status_code == 200  # (a new job would be under the same 0.5 s limit)


def test_a_full_queue_is_a_503_with_retry_after() -> None:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, queue_capacity=1,
                        max_n=100_000_000, _env_file=None)
    with live_server(settings) as live:
        with open_request(live.url, "/certify", json.dumps({"image": data_url(png_bytes()), "n": 50_000_000}).encode()):
            wait_until(lambda: live.runtime.worker.depth == 1, "the long job to be admitted")
            refused = certify(live)
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "overloaded" and "queue is full" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
        wait_until(lambda: live.runtime.worker.depth == 0, "the abandoned job to be cancelled")
        assert certify(live).status_code == 200


def test_stopping_the_worker_without_drain_cancels_waiting_requests_then_refuses_new_ones() -> None:
    encoder = Controlled()
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=8, max_n=100_000, _env_file=None)
    with live_server(settings, encoder=encoder) as live:
        encoder.hold()
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(certify(live, n=1000)))
        waiting.start()
        wait_until(encoder.entered.is_set, "the job to reach the encoder")
        stopper = threading.Thread(target=live.runtime.worker.stop, kwargs={"drain": False})
        stopper.start()
        wait_until(lambda: certify(live).status_code == 503, "the worker to refuse new jobs")
        encoder.release.set()
        stopper.join(60)
        waiting.join(60)
        assert answers[0].status_code == 503, answers[0].text
        assert answers[0].json()["error"]["type"] == "cancelled" and answers[0].headers["retry-after"] == "5"
        refused = certify(live)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable"
        assert refused.headers["retry-after"] == "5" and "shutting down" in refused.json()["error"]["message"]
        assert encoder.batches < 1020 // 8  # the cancelled job's remaining samples were never drawn


def test_a_failing_vote_inside_an_openai_stream(caplog: pytest.LogCaptureFixture) -> None:
    """The votes of a certified answer fail after the streamed answer has started (the feature certificate came
    from the cache): the stream ends with an in-band error in OpenAI's shape carrying the request id, logged
    under it, and no [DONE], which OpenAI's SDK raises as ``openai.APIError`` with its type and code; the
    server goes on."""
    import openai

    from fsmllm.lm.models import load_model

    encoder = Controlled()
    settings = Settings(model="tiny-test", default_n0=10, default_n=40, batch_size=64, _env_file=None)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes(4))}},
    ]}]
    body = {"messages": messages, "max_tokens": 3, "seed": 5}
    with live_server(settings, model=load_model("tiny-test"), encoder=encoder) as live:
        assert httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).status_code == 200  # cached now
        encoder.fail_next = 1
        streamed = {**body, "stream": True, "certify_answer": {"n0": 4, "n": 8}}
        with caplog.at_level(logging.ERROR, logger="fsmllm"):
            with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=streamed,
                              headers={"x-request-id": "votes-fail"}, timeout=60) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] != "data: [DONE]"
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error == {
            "message": INTERNAL_ERROR, "type": "server_error", "param": None, "code": "internal_error",
            "request_id": "votes-fail",
        }
        assert any("votes-fail" in record.getMessage() and record.exc_info for record in caplog.records), caplog.text
        # the official SDK: the answer's chunks arrive, then the error is raised as its APIError
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        encoder.fail_next = 1
        stream = client.chat.completions.create(
            model="tiny-test", messages=messages, max_tokens=3, seed=5, stream=True,
            extra_body={"certify_answer": {"n0": 4, "n": 8}},
        )
        received = []
        with pytest.raises(openai.APIError) as raised:
            for piece in stream:
                received.append(piece)
        assert received and received[0].choices[0].delta.role == "assistant"
        assert type(raised.value) is openai.APIError  # not a status error: the 200 had been sent
        assert raised.value.message == INTERNAL_ERROR and raised.value.type == "server_error"
        assert raised.value.code == "internal_error" and raised.value.param is None
        assert raised.value.body["request_id"] == stream.response.headers["x-request-id"]
        assert httpx.post(f"{live.url}/v1/chat/completions", json=streamed, timeout=60).status_code == 200
