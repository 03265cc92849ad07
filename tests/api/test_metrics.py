"""GET /metrics as Prometheus and its dashboards expect it (issue 27): bounded ``route`` labels, the standard
process and Python metrics, HEAD, OpenMetrics, and a clean ``promtool check metrics``."""

from __future__ import annotations

import random
import re
import shutil
import string
import subprocess

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from fsmllm.api.metrics import UNMATCHED

from .live import LiveServer, live_server

#: metric names as Prometheus defines them (prometheus.io/docs/concepts/data_model)
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@pytest.fixture(scope="module")
def server() -> LiveServer:
    with live_server() as live:
        yield live


def route_labels(server: LiveServer) -> set[str]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        if family.name in ("fsmllm_requests", "fsmllm_request_seconds")
        for sample in family.samples
        if "route" in sample.labels
    }


def test_unknown_paths_make_no_new_label_values(server: LiveServer) -> None:
    httpx.get(f"{server.url}/health")
    httpx.get(f"{server.url}/v1/models/nothing-here")  # a route's template, not its path
    httpx.get(f"{server.url}/no/such/route")
    httpx.get(f"{server.url}/metrics")  # counted once answered: the next scrape shows it
    before = route_labels(server)
    assert {"/health", "/v1/models/{model_id}", UNMATCHED} <= before and "/v1/models/nothing-here" not in before
    rng = random.Random(27)
    for _ in range(50):
        path = "/" + "/".join(
            "".join(rng.choices(string.ascii_letters + string.digits + "-._~", k=rng.randint(1, 12)))
            for _ in range(rng.randint(1, 4))
        )
        prefix = rng.choice(["", "/v1", "/static", "/docs"])
        response = httpx.request(rng.choice(["GET", "POST", "DELETE"]), f"{server.url}{prefix}{path}")
        assert response.status_code in (404, 405), (prefix + path, response.status_code)
    assert route_labels(server) == before


def test_the_standard_process_and_python_metrics_are_there(server: LiveServer) -> None:
    names = {family.name for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_start_time_seconds"} <= names
    assert {"python_info", "python_gc_collections"} <= names


def test_head_and_openmetrics(server: LiveServer) -> None:
    head = httpx.head(f"{server.url}/metrics")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"].startswith("text/plain")
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    open_metrics = httpx.get(f"{server.url}/metrics", headers={"accept": accept})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(open_metrics.text)}  # strict parser
    assert families["fsmllm_requests"].type == "counter" and "process_cpu_seconds" in families


def test_promtool_finds_nothing_to_lint(server: LiveServer) -> None:
    """``promtool check metrics`` when installed (Debian: apt-get install prometheus); else the same rules it
    applies, checked with prometheus_client's parser: every family has help text and a known type, names are
    valid, a counter's samples end in _total (or _created), and the text parses back to the same samples."""
    httpx.post(f"{server.url}/certify", json={})  # a few requests, so that the labelled families have samples
    text = httpx.get(f"{server.url}/metrics").text
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.documentation.strip(), f"{family.name}: no help text"
        assert family.type in ("counter", "gauge", "histogram", "summary", "info"), family.name
        for sample in family.samples:
            assert METRIC_NAME.match(sample.name), sample.name
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
    fsmllm = [s for f in families if f.name.startswith("fsmllm_") for s in f.samples]
    lines = [line for line in text.splitlines() if line.startswith("fsmllm_")]
    assert len(fsmllm) == len(lines)  # every sample line parsed, none dropped
