"""Fuzz every route of the OpenAPI spec with schemathesis against a real server (the tiny test model, so that every
route answers): every documented example is a request the server takes, no input may cause a 5xx, and every
answer (errors and server-sent events included) conforms to the schema and content types it documents."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.live import LiveServer, tiny_model_server

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
CONFORMANCE = "not_a_server_error,response_schema_conformance,content_type_conformance"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with tiny_model_server() as live:
        yield live


def schemathesis(server: LiveServer, cwd: Path, *options: str, must_pass: bool = True) -> str:
    """Run ``schemathesis run`` on the server's schema (seed 1) and return its report; fail the test on a failure
    unless ``must_pass`` is False (the caller then reads the failures)."""
    assert SCHEMATHESIS, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [SCHEMATHESIS, "run", f"{server.url}/openapi.json", "--seed", "1", "--no-color", *options],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )
    assert result.returncode == 0 or not must_pass, result.stdout[-6000:] + result.stderr[-2000:]
    assert httpx.get(f"{server.url}/health").status_code == 200  # and the server still serves
    return result.stdout


def test_every_documented_example_is_a_request_that_succeeds(server: LiveServer, tmp_path: Path) -> None:
    """The examples phase with positive_data_acceptance: the requests schemathesis builds from the schema's
    examples (whole ones and the fields' own, combined) are valid by the schema, and the server answers 2xx."""
    report = schemathesis(
        server, tmp_path, "--phases", "examples", "--checks", CONFORMANCE + ",positive_data_acceptance"
    )
    tested = re.search(r"Tested: (\d+)", report)
    assert tested and int(tested.group(1)) >= 3, report  # /certify, /generate and /v1/chat/completions at least
    assert "✅ Examples" in report and re.search(r"(\d+) generated, \1 passed", report), report


def test_no_generated_request_gets_a_server_error_and_only_bad_image_bytes_are_refused(
    server: LiveServer, tmp_path: Path
) -> None:
    """The coverage phase (boundary values of every field, each alone) and the fuzzing phase (30 random requests
    per route, valid and invalid): no 5xx, every answer as documented, and every request valid by the schema is
    taken, except where its image is not an image. The schema cannot say which bytes make one (it says
    ``^data:`` of a data URL), so those refusals (400 ``invalid_image``) are the only failures allowed."""
    report = schemathesis(
        server,
        tmp_path,
        "--phases",
        "coverage,fuzzing",
        "--max-examples",
        "30",
        "--checks",
        CONFORMANCE + ",positive_data_acceptance",
        must_pass=False,
    )
    assert "Coverage (in" in report and "Fuzzing (in" in report, report  # both phases ran
    failures = (
        report.split("= FAILURES =", 1)[1].split("= WARNINGS =")[0].split("= SUMMARY =")[0]
        if ("= FAILURES =" in report)
        else ""
    )
    kinds = re.findall(r"^- (.+)$", failures, re.MULTILINE)
    answers = re.findall(r"^\s+`(\{.*\})`$", failures, re.MULTILINE)
    assert set(kinds) <= {"ST202 Schema-valid request rejected"}, report
    assert len(answers) == len(kinds) and all('"invalid_image"' in answer for answer in answers), report
