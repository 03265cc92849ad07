"""The running compose stack that ``make test-docker`` (docker/test-docker.sh) starts, and helpers to reach it.

These tests need that stack: without ``FSMLLM_STACK_URL`` (set by the script) nothing here is collected, so the
normal suite neither runs nor reports them.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

collect_ignore_glob = [] if os.environ.get("FSMLLM_STACK_URL") else ["test_*.py"]


@dataclass(frozen=True)
class Stack:
    url: str  # the gateway, https on loopback
    http_url: str  # its plain-http port (redirects)
    ca: str  # the test's self-signed certificate
    api_key: str
    project: str
    replicas: int
    figures: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def client(self, *, key: bool = True, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), headers=headers, timeout=timeout)

    def record(self, name: str, value: Any) -> None:
        """Add a figure to build/test-docker/figures.json (read by docs/deploy.md's author)."""
        figures = json.loads(self.figures.read_text()) if self.figures.exists() else {}
        figures[name] = value
        self.figures.write_text(json.dumps(figures, indent=2))


@pytest.fixture(scope="session")
def stack() -> Stack:
    env = os.environ
    return Stack(
        env["FSMLLM_STACK_URL"], env["FSMLLM_STACK_HTTP_URL"], env["FSMLLM_STACK_CA"], env["FSMLLM_STACK_API_KEY"],
        env["FSMLLM_STACK_PROJECT"], int(env["FSMLLM_STACK_REPLICAS"]), Path(env["FSMLLM_STACK_FIGURES"]),
    )


@pytest.fixture()
def gateway(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


@pytest.fixture(scope="session")
def photo() -> bytes:
    """scikit-image's bundled photo of a cat (the README's sample:chelsea), as PNG."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return buffer.getvalue()


# --- docker


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def replicas(stack: Stack) -> list[str]:
    """Container ids of the fsmllm service, running or not, in a stable order."""
    out = docker("ps", "-a", "--filter", f"label=com.docker.compose.project={stack.project}",
                 "--filter", "label=com.docker.compose.service=fsmllm", "--format", "{{.Names}} {{.ID}}")
    return [line.split()[1] for line in sorted(out.splitlines())]


def database_container(stack: Stack) -> str:
    """The PostgreSQL container that holds the replicas' certificate store."""
    return docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}",
                  "--filter", "label=com.docker.compose.service=postgres")


def psql(stack: Stack, sql: str) -> str:
    """The answer of ``sql`` from the store's database, unaligned (``psql -tA`` in its container, as its owner)."""
    return docker("exec", database_container(stack), "sh", "-c", 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tAc "$0"',
                  sql)


def gateway_container(stack: Stack) -> str:
    return docker("ps", "-q", "--filter", f"label=com.docker.compose.project={stack.project}",
                  "--filter", "label=com.docker.compose.service=gateway")


def inspect(container: str, template: str) -> str:
    return docker("inspect", "-f", template, container)


def address(container: str) -> str:
    """The container's address on the compose network (a docker bridge this test created)."""
    return inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def health(container: str) -> str:
    return inspect(container, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")


def wait_healthy(container: str, timeout: float = 240.0) -> float:
    """Seconds until the container's HEALTHCHECK reports healthy."""
    started = time.monotonic()
    while (status := health(container)) != "healthy":
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{container} not healthy after {timeout:.0f} s (health: {status})")
        time.sleep(1)
    return time.monotonic() - started


def direct(container: str, api_key: str, timeout: float = 120.0) -> httpx.Client:
    """A client for one replica on its bridge address (port 8000 is not published)."""
    return httpx.Client(base_url=f"http://{address(container)}:8000", headers={"Authorization": f"Bearer {api_key}"},
                        timeout=timeout)


def retry_rate_limited(send: Any, attempts: int = 60) -> httpx.Response:
    """``send()`` again while the gateway answers 429, waiting its Retry-After (the production rate limits apply)."""
    for _ in range(attempts):
        response = send()
        if response.status_code != 429:
            return response
        time.sleep(float(response.headers.get("retry-after", "1")))
    return response
