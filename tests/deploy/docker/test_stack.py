"""The compose stack for real: fsmllm replicas behind the nginx TLS gateway, reached over HTTPS on loopback.

Run by ``make test-docker`` (docker/test-docker.sh), which builds the images, starts the stack and tears it down.
The tests run in file order: the ones that stop or kill a replica come last. Every request targets the
gateway's loopback port or the bridge address of a container of this stack; every loop is bounded.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter

import httpx
import pytest

from ...api.live import data_url, sse_events
from .conftest import (
    Stack,
    address,
    database_container,
    direct,
    docker,
    gateway_container,
    health,
    inspect,
    psql,
    replicas,
    retry_rate_limited,
    wait_healthy,
)


@pytest.fixture(scope="module")
def samples_per_s(stack: Stack, photo: bytes) -> float:
    """One replica's certification throughput here and now (noise samples per second), measured on one
    certification: the tests that need work lasting a given time size their requests by it (a shared 2-core
    machine runs anywhere from a few to a few hundred samples a second)."""
    with direct(replicas(stack)[0], stack.api_key, timeout=300) as client:
        answer = client.post("/certify", json={"image": data_url(photo), "n0": 16, "n": 48, "seed": 99})
    assert answer.status_code == 200, answer.text
    rate = 64 / max(answer.json()["timings"]["certify_ms"] / 1000, 1e-3)
    stack.record("samples_per_s_one_replica", round(rate, 1))
    return rate


def samples_for(seconds: float, rate: float, low: int, high: int) -> int:
    return int(min(max(seconds * rate, low), high))


def test_replicas_turn_healthy_and_the_gateway_answers(stack: Stack, gateway: httpx.Client) -> None:
    containers = replicas(stack)
    assert len(containers) == stack.replicas
    for container in containers:
        wait_healthy(container)  # the image's HEALTHCHECK (compose repeats it)
        assert inspect(container, "{{.State.Health.Status}}") == "healthy"
        assert inspect(container, "{{.Config.User}}") == "fsmllm"
        # the image carries none of the build host's pip settings (docker/pip-local/ stays in the build stage)
        assert docker("exec", container, "sh", "-c", "ls -A /tmp/pip-local 2>/dev/null; pip config list") == ""
    ready = gateway.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["model"] == "fsmllm-demo"
    assert ready.headers["x-request-id"]
    assert gateway.get("/health").json() == {"status": "ok"}
    redirect = httpx.get(stack.http_url + "/health", follow_redirects=False)
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")
    missing = gateway.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    # /metrics answers private networks only: the test reaches the gateway from the docker bridge's own address
    assert gateway.get("/metrics").status_code == 200


def test_generate_on_a_bundled_photo_answers_with_its_certificate(stack: Stack, photo: bytes) -> None:
    from fsmllm_client import Client

    transport = httpx.HTTPTransport(verify=stack.ssl_context())
    with Client(stack.url, api_key=stack.api_key, transport=transport, max_retries=20) as client:
        result = client.generate(photo, "What is this?", radius=[0.1, 0.25], n0=8, n=32, seed=7, max_tokens=12)
    assert result.answer.strip() and result.completion_tokens > 0
    certificate = result.certificate
    assert certificate.n == 32 and certificate.seed == 7
    assert [r.radius for r in certificate.radii] == [0.1, 0.25]
    assert all(r.certified_fcsb is None or -1 <= r.certified_fcsb <= 1 for r in certificate.radii)


def test_certify_progress_streams_through_the_gateway_event_by_event(stack: Stack, gateway: httpx.Client, photo: bytes,
                                                                     samples_per_s: float) -> None:
    n = samples_for(8, samples_per_s, 160, 5000)  # about 8 s of work, at least 5 encoder batches
    body = {"image": data_url(photo), "stream": True, "n0": 16, "n": n, "seed": 11, "radius": [0.25]}
    arrivals: list[tuple[str, float, dict]] = []
    started = time.monotonic()

    def send() -> httpx.Response:
        arrivals.clear()
        with gateway.stream("POST", "/certify", json=body) as response:
            if response.status_code == 200:
                assert response.headers["content-type"].startswith("text/event-stream")
                for name, data in sse_events(response.iter_lines()):
                    arrivals.append((name, time.monotonic() - started, data))
            else:
                response.read()
            return response

    assert retry_rate_limited(send).status_code == 200
    progress = [t for name, t, _ in arrivals if name == "progress"]
    name, finished, result = arrivals[-1]
    assert name == "result" and result["certificate"]["n"] == n
    # unbuffered: progress events arrive while the certification runs, not in one piece with the result
    assert len(progress) >= 3
    assert finished - progress[0] > 0.5 and len({round(t, 1) for t in progress}) >= 3
    stack.record("sse_progress_events", len(progress))
    stack.record("sse_first_event_to_result_s", round(finished - progress[0], 2))


def test_the_openai_route_works_with_the_official_client(stack: Stack, photo: bytes) -> None:
    import openai

    http = httpx.Client(verify=stack.ssl_context(), timeout=120)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, http_client=http, max_retries=20)
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(photo)}},
        ]}],
        max_tokens=8,
        extra_body={"certification": {"radius": [0.25], "n0": 8, "n": 32, "seed": 5}},
    )
    assert completion.choices[0].message.content and completion.usage.completion_tokens > 0
    extra = completion.model_extra or {}
    assert extra["certificate"]["n"] == 32 and extra["certificate"]["radii"][0]["radius"] == 0.25
    # a wrong key is the server's 401, passed through the gateway
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", http_client=http, max_retries=0).models.list()
    http.close()


def test_the_api_key_is_required_behind_the_gateway(stack: Stack, photo: bytes) -> None:
    with stack.client(key=False) as anonymous:
        refused = retry_rate_limited(lambda: anonymous.post("/certify", json={"image": data_url(photo)}))
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/ready").status_code == 200  # probes stay open


def test_the_gateway_refuses_bodies_over_its_limit(stack: Stack, gateway: httpx.Client) -> None:
    body = b"0" * (21 * 1024 * 1024)  # over client_max_body_size 20m
    response = retry_rate_limited(lambda: gateway.post("/certify", content=body, headers={"content-type": "application/json"}))
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "too_large" and response.headers["x-request-id"]
    # under /v1/ in OpenAI's shape, which the official client raises as its own 413 class
    chat = retry_rate_limited(lambda: gateway.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))
    assert chat.status_code == 413 and chat.headers["content-type"] == "application/json", chat.text
    error = chat.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "too_large", None)
    assert error["message"] and error["request_id"] == chat.headers["x-request-id"]
    import openai

    http = httpx.Client(verify=stack.ssl_context(), timeout=120)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, http_client=http, max_retries=0)
    image = "data:image/png;base64," + "A" * (21 * 1024 * 1024)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": image}}]}]
    for _ in range(60):  # the production rate limit applies: wait out its 429s (bounded)
        try:
            client.chat.completions.create(model="any", messages=messages)
        except openai.RateLimitError:
            time.sleep(1)
            continue
        except openai.APIStatusError as refused:
            assert refused.status_code == 413 and refused.code == "too_large", refused
            break
    else:
        pytest.fail("the gateway kept answering 429")
    http.close()


def test_the_gateway_rate_limits_work_per_client_address(stack: Stack, gateway: httpx.Client) -> None:
    # /v1/ shares the zone of /certify and /generate: 2 requests/s, burst 10; a cheap route shows it
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: gateway.get("/v1/models"), range(30)))
    counts = Counter(a.status_code for a in answers)
    assert set(counts) <= {200, 429} and counts[429] >= 5 and counts[200] >= 1, counts
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "rate_limited"  # OpenAI's shape
    assert refused.json()["error"]["type"] == "invalid_request_error" and refused.json()["error"]["param"] is None
    stack.record("rate_limit_burst_of_30", dict(counts))
    time.sleep(6)  # the bucket refills (2/s) before the next test


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--ignore-certificate-errors",
            "--virtual-time-budget=20000", "--dump-dom"]


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with a profile of its own."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", url], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_render_offline_in_a_browser(stack: Stack, page: str) -> None:
    """No CDN: the stack has no route to the internet (nor does this host need one); the pages show the routes."""
    replica = address(replicas(stack)[0])
    for url in (f"{stack.url}{page}", f"http://{replica}:8000{page}"):
        dom = rendered(url)
        assert "/certify" in dom and "/v1/chat/completions" in dom, f"{url} rendered no routes: {dom[:500]}"
        if page == "/docs":
            assert "opblock" in dom  # swagger-ui drew its operation blocks
        else:
            assert "redoc-wrap" in dom or "api-content" in dom
        time.sleep(1)  # the documentation zone allows 20/s; keep well inside


def issue(client: httpx.Client, photo: bytes, seed: int) -> dict:
    """A certificate of the photo (a small n), issued by the replica or gateway ``client`` talks to."""
    answer = retry_rate_limited(lambda: client.post("/certify", json={"image": data_url(photo), "n0": 4, "n": 12,
                                                                      "seed": seed}))
    assert answer.status_code == 200, answer.text
    return answer.json()["certificate"]


def fetched(client: httpx.Client, certificate: dict) -> dict | None:
    answer = retry_rate_limited(lambda: client.get(f"/v1/certificates/{certificate['id']}"))
    return answer.json() if answer.status_code == 200 else None


def test_a_certificate_issued_through_one_replica_is_fetched_through_the_other(stack: Stack, photo: bytes) -> None:
    """The replicas share the store (PostgreSQL) and the signing keys (the cache volume): what one issued, the
    other serves, by id and in the list, and its key set verifies it; the gateway finds it whichever replica
    answers; it is a row of the database."""
    from fsmllm_client.verify import Failure, load_key_set, outcome, verify

    if stack.replicas < 2:
        pytest.skip("one replica (REPLICAS=1): no other replica to fetch from")
    first, second = replicas(stack)[:2]
    with direct(first, stack.api_key) as one, direct(second, stack.api_key) as other:
        certificate = issue(one, photo, 31)
        assert fetched(other, certificate) == certificate
        listed = other.get("/v1/certificates", params={"image_sha256": certificate["image"]["sha256"], "limit": 100})
        assert certificate["id"] in [item["id"] for item in listed.json()["data"]]
        keys = other.get("/v1/certificates/keys").json()
    assert outcome(verify(certificate, load_key_set(keys), photo)) == Failure.OK
    with stack.client() as gateway:
        for _ in range(4):  # whichever replica each one reaches
            assert fetched(gateway, certificate) == certificate
    assert psql(stack, f"SELECT count(*) FROM certificates WHERE id = '{certificate['id']}'") == "1"


def test_certificates_outlive_a_crash_of_the_database(stack: Stack, photo: bytes) -> None:
    """The database is killed (SIGKILL) and started again: the committed certificates are there (its WAL), and
    every replica, whose pooled connections died with it, reads and writes again."""
    database = database_container(stack)
    with direct(replicas(stack)[0], stack.api_key) as client:
        certificate = issue(client, photo, 32)
    docker("kill", database)
    started = time.monotonic()
    docker("start", database, check=False)  # (the restart policy may have started it already)
    wait_healthy(database)
    stack.record("database_killed_to_healthy_s", round(time.monotonic() - started, 1))
    for number, container in enumerate(replicas(stack)):
        with direct(container, stack.api_key) as client:
            assert fetched(client, certificate) == certificate
            assert fetched(client, issue(client, photo, 40 + number)) is not None


def test_a_certificate_issued_just_before_a_replica_is_killed_is_still_there(stack: Stack, photo: bytes) -> None:
    """Committed before it was sent: the answer received, the replica killed at once (SIGKILL), the other replica
    serves the certificate; so does the killed one once it is back."""
    if stack.replicas < 2:
        pytest.skip("one replica (REPLICAS=1): no other replica to fetch from")
    victim, survivor = replicas(stack)[:2]
    with direct(victim, stack.api_key) as client:
        certificate = issue(client, photo, 33)
    docker("kill", victim)
    try:
        with direct(survivor, stack.api_key) as client:
            assert fetched(client, certificate) == certificate
    finally:
        docker("start", victim, check=False)  # (the restart policy may have started it already)
        wait_healthy(victim)
    with direct(victim, stack.api_key) as client:
        assert fetched(client, certificate) == certificate


def test_ready_gates_traffic_to_a_starting_replica(stack: Stack) -> None:
    """A replica that is restarting answers nothing (its port opens after the models load), then /ready says ready."""
    container = replicas(stack)[-1]
    docker("restart", "-t", "30", container)
    started = time.monotonic()
    states = Counter()
    ready_after = None
    while time.monotonic() - started < 240:
        try:
            with direct(container, stack.api_key, timeout=5) as client:
                answer = client.get("/ready")
            states[answer.status_code] += 1
            if answer.status_code == 200 and answer.json()["status"] == "ready":
                ready_after = time.monotonic() - started
                break
        except httpx.TransportError:
            states["refused"] += 1
        time.sleep(0.5)
    assert ready_after is not None, states
    assert set(states) <= {"refused", 200, 503}, states  # never an error other than "not yet"
    wait_healthy(container)
    stack.record("replica_restart_to_ready_s", round(ready_after, 1))


def test_docker_stop_drains_an_accepted_certification(stack: Stack, photo: bytes, samples_per_s: float) -> None:
    container = replicas(stack)[0]
    result: dict[str, object] = {}
    n = samples_for(5, samples_per_s, 64, 5000)  # about 5 s of work: well inside the server's 30 s drain

    def certify() -> None:
        with direct(container, stack.api_key, timeout=180) as client:
            try:
                answer = client.post("/certify", json={"image": data_url(photo), "n0": 16, "n": n, "seed": 21})
                result["status"], result["body"] = answer.status_code, answer.json()
            except httpx.HTTPError as error:
                result["error"] = repr(error)

    thread = threading.Thread(target=certify)
    thread.start()
    with direct(container, stack.api_key, timeout=5) as probe:  # wait until the job is accepted (queued or running)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            depth = [line for line in probe.get("/metrics").text.splitlines() if line.startswith("fsmllm_queue_depth ")]
            if depth and float(depth[0].split()[1]) >= 1:
                break
            time.sleep(0.1)
    stopping = time.monotonic()
    docker("stop", "-t", "45", container)  # SIGTERM, then the server drains before it exits
    stopped_after = time.monotonic() - stopping
    thread.join(60)
    try:
        assert result.get("status") == 200, result
        assert result["body"]["certificate"]["n"] == n  # type: ignore[index]
        assert inspect(container, "{{.State.ExitCode}}") == "0"  # a clean exit, not the 45 s kill
        stack.record("graceful_stop_s", round(stopped_after, 1))
    finally:
        docker("start", container)
        wait_healthy(container)


LOAD_REQUESTS = 100
LOAD_CONCURRENCY = 8
REQUEST_TIMEOUT_S = 300  # a request without an answer by then counts as hung


def test_failover_when_a_replica_dies_under_load(stack: Stack, photo: bytes) -> None:
    """SIGKILL one replica during 100 certifications at concurrency 8 through the gateway.

    Every request ends, within its timeout, in a certificate: the gateway's retryable 502
    (``upstream_unavailable``, with Retry-After) that the requests the dead replica had accepted get is waited
    out and sent again, as fsmllm's clients do (same seed, same certificate), and so is a 429 from the
    production rate limit (2/s per address); no 502 reaches a client that retries. Then the replica is back
    (restart policy) and serves again.
    """
    if stack.replicas < 2:
        pytest.skip("one replica (REPLICAS=1): no failover to test")
    victim, survivor = replicas(stack)[-1], replicas(stack)[0]
    restarts_before = int(inspect(victim, "{{.RestartCount}}"))
    image = data_url(photo)
    outcomes: Counter[str] = Counter()
    rate_limited = unavailable = 0
    lock = threading.Lock()
    done = threading.Event()
    finished = 0
    latencies: list[float] = []

    def one(index: int) -> None:
        nonlocal rate_limited, unavailable, finished
        body = {"image": image, "n0": 4, "n": 12, "seed": 1000 + index, "radius": [0.25]}
        started = time.monotonic()
        outcome = "hung"
        with stack.client(timeout=REQUEST_TIMEOUT_S) as client:
            for _ in range(120):  # bounded: 429s and the gateway's 502s are waited out, nothing else is retried
                try:
                    answer = client.post("/certify", json=body)
                except httpx.TimeoutException:
                    outcome = "timeout"
                    break
                except httpx.TransportError as error:
                    outcome = f"transport error {type(error).__name__}"
                    break
                if answer.status_code == 429:
                    with lock:
                        rate_limited += 1
                    time.sleep(float(answer.headers.get("retry-after", "1")))
                    continue
                if answer.status_code == 502 and answer.json().get("error", {}).get("type") == "upstream_unavailable":
                    with lock:
                        unavailable += 1
                    time.sleep(float(answer.headers.get("retry-after", "2")))
                    continue
                if answer.status_code == 200:
                    assert answer.json()["certificate"]["n"] == 12
                    outcome = "200"
                else:
                    kind = answer.json().get("error", {}).get("type", "?")
                    retry_after = answer.headers.get("retry-after")
                    outcome = f"{answer.status_code} {kind}" + (" (Retry-After)" if retry_after else "")
                break
        with lock:
            outcomes[outcome] += 1
            latencies.append(time.monotonic() - started)
            finished += 1
            if finished == 20:
                done.set()

    back: dict[str, float] = {}

    def watch(killed: float) -> None:  # until the restart policy has the replica back and healthy again
        while time.monotonic() - killed < 300:
            if int(inspect(victim, "{{.RestartCount}}")) > restarts_before and health(victim) == "healthy":
                back["s"] = time.monotonic() - killed
                return
            time.sleep(0.5)

    load_started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(LOAD_CONCURRENCY + 1) as pool:
        futures = [pool.submit(one, i) for i in range(LOAD_REQUESTS)]
        assert done.wait(300), "the first 20 requests did not finish"
        os.kill(int(inspect(victim, "{{.State.Pid}}")), signal.SIGKILL)  # the replica's server process dies
        killed = time.monotonic()
        killed_at = killed - load_started
        watcher = pool.submit(watch, killed)
        for future in futures:
            future.result(timeout=900)
        load_s = time.monotonic() - load_started
        watcher.result(timeout=300)

    assert "s" in back, f"{victim} not back and healthy 300 s after it was killed"
    back_after = back["s"]
    assert int(inspect(victim, "{{.RestartCount}}")) == restarts_before + 1
    # serves again: the restarted replica takes requests through the gateway again. Which replica a request
    # reaches follows Docker's DNS answers (cached by the gateway), so 8 requests in a row can all go to the
    # other one: send up to 40, until the restarted replica has served one
    with direct(victim, stack.api_key) as client:
        before = requests_served(client)
    answers: list[httpx.Response] = []
    after = before
    with stack.client() as client, direct(victim, stack.api_key) as metrics:
        while after == before and len(answers) < 40:
            seed = 5000 + len(answers)
            answers.append(retry_rate_limited(lambda: client.post("/certify", json={"image": image, "n0": 4, "n": 12, "seed": seed})))
            after = requests_served(metrics)
    stack.record("failover", {
        "requests": LOAD_REQUESTS, "concurrency": LOAD_CONCURRENCY, "outcomes": dict(outcomes),
        "rate_limited_retries": rate_limited, "upstream_unavailable_retries": unavailable, "killed_after_s": round(killed_at, 1), "load_s": round(load_s, 1),
        "max_latency_s": round(max(latencies), 1), "killed_replica_healthy_again_after_s": round(back_after, 1),
        "after_restart": {"200": sum(a.status_code == 200 for a in answers), "served_by_restarted_replica": after - before},
    })
    assert sum(outcomes.values()) == LOAD_REQUESTS
    assert outcomes == {"200": LOAD_REQUESTS}, outcomes  # every 502 was retried into a certificate
    assert all(a.status_code == 200 for a in answers) and after > before
    assert health(survivor) == "healthy" and gateway_container(stack)


def requests_served(client: httpx.Client) -> float:
    """fsmllm_requests_total of /certify with status 200 on one replica."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("fsmllm_requests_total{") and 'route="/certify"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
