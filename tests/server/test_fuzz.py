"""Fuzz every route of the OpenAPI spec with schemathesis against a real server: no input may cause a 5xx, and
every answer (errors and server-sent events included) conforms to the schema and content types it documents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from fsmllm.api.settings import Settings
from tests.server.live import live_server

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    assert SCHEMATHESIS, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    settings = Settings(model="none", default_n0=20, default_n=100, max_n=2000, batch_size=64, _env_file=None)
    with live_server(settings) as live:
        result = subprocess.run(
            [SCHEMATHESIS, "run", f"{live.url}/openapi.json", "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
             "--max-examples", "30", "--phases", "examples,coverage,fuzzing", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "passed" in result.stdout
        assert httpx.get(f"{live.url}/health").status_code == 200  # and the server still serves
