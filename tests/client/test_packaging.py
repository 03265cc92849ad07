"""The client installs and runs on its own: its own pyproject (httpx and pydantic, no torch, no server), the same
package and version as the copy the server ships, and a command line that works without the server's packages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fsmllm_client.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_client_has_its_own_pyproject() -> None:
    client, server = _project(ROOT / "client" / "pyproject.toml"), _project(ROOT / "pyproject.toml")
    assert client["name"] == "fsmllm-client" and client["version"] == server["version"]
    needs = {Requirement(text).name: Requirement(text) for text in client["dependencies"]}
    # joserfc and rfc8785: fsmllm-client verify (the certificate's Ed25519 JWS over RFC 8785 JSON)
    assert set(needs) == {"httpx", "pydantic", "joserfc", "rfc8785"}
    assert client["scripts"] == {"fsmllm-client": "fsmllm_client.cli:main"}
    # the server package keeps shipping the client (make install: pip install -e ".[dev]") with at least its needs
    shipped = {Requirement(text).name: Requirement(text) for text in server["dependencies"]}
    for name, requirement in needs.items():
        assert name in shipped and shipped[name].specifier == requirement.specifier, name
    assert "client" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    assert server["scripts"]["fsmllm-client"] == client["scripts"]["fsmllm-client"]


def test_the_client_runs_without_torch_or_the_server() -> None:
    """Imported with torch, fsmllm and numpy made unimportable and only client/ on the path."""
    script = (
        "import sys\n"
        "for name in ('torch', 'fsmllm', 'numpy', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "import fsmllm_client, fsmllm_client.plot, fsmllm_client.verify\n"
        "from fsmllm_client.cli import main\n"
        "sys.exit(main(['--url', sys.argv[1], 'health']))\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = os.environ | {"PYTHONPATH": str(ROOT / "client")}
    result = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no answer to GET {url}/health" in result.stderr


def test_the_client_cli_names_the_url_it_tried(sleeps: list[float], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed once the block ends
    assert main(["--url", url, "health"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fsmllm-client: error: no answer to GET {url}/health: ConnectError")
    assert "is an fsmllm server listening at that address?" in err and sleeps == [0.5, 1.0, 2.0]
