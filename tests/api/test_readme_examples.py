"""The README's examples run as written: its curl, ``fsmllm sample``, ``fsmllm-client`` and Python examples are read
from README.md and run against a live server (tiny encoder and language model; the two largest sample counts
scaled down tenfold to keep the test fast), on the photo the README says how to get."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .live import LiveServer, tiny_model_server

README = Path(__file__).resolve().parents[2] / "README.md"
#: the README's larger sample counts and the smaller ones this test asks for instead
SCALED = {"n=20000": "n=2000", "n=10000": "n=1000", "--n 2000": "--n 200"}


def fenced(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section headed ``section``."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", text[start : end if end > 0 else None], re.DOTALL)


def commands(block: str) -> list[str]:
    """The shell commands of a block: one a line, or a ``{ ...; } > file`` group spanning lines."""
    found: list[str] = []
    group: list[str] = []
    for line in block.splitlines():
        if group or line.startswith("{ "):
            group.append(line)
            if re.search(r"\} > \S+$", line):
                found.append("\n".join(group))
                group = []
        elif line.strip() and not line.lstrip().startswith("#"):
            found.append(line)
    assert not group, "an unterminated { ... } group"
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with tiny_model_server() as live:
        yield live


def run(command: str, server: LiveServer, cwd: Path) -> subprocess.CompletedProcess[str]:
    host = server.url.removeprefix("http://")
    for large, small in SCALED.items():
        command = command.replace(large, small)
    command = command.replace("http://127.0.0.1:8000", server.url).replace("localhost:8000", host)
    command = re.sub(r"^fsmllm-client ", f"{sys.executable} -m fsmllm_client.cli ", command)
    command = re.sub(r"^fsmllm ", f"{sys.executable} -m fsmllm.cli ", command)
    command = command.replace("curl -sS", "curl -w '\\n%{http_code}' -sS", 1)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FSMLLM_URL": server.url, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_server_examples(server: LiveServer, tmp_path: Path) -> None:
    (block,) = fenced("What the server answers", "bash")
    steps = commands(block)
    assert steps[0] == "fsmllm sample chelsea > cat.png    # a bundled photo (a cat) as a file; any PNG, JPEG, WebP, GIF, BMP or TIFF works"
    curls = 0
    for step in steps:
        result = run(step, server, tmp_path)
        assert result.returncode == 0, (step, result.stderr[-2000:])
        if not step.startswith("curl"):
            continue
        curls += 1
        body, _, status = result.stdout.rpartition("\n")
        assert status == "200", (step, body[-2000:])
        if "stream=true" in step:
            assert "event: progress" in body and "event: result" in body
        elif "/metrics" not in step:
            answer = json.loads(body)
            assert "error" not in answer
            if "/certify" in step or "/generate" in step or "/chat/" in step:
                assert answer["certificate"]["encoder"] == "tiny-cnn", step
            if "target_cos" in step:
                assert answer["certificate"]["certified_radius"]["target_cos"] == 0.5
            if "certify_answer" in step:
                assert answer["answer_certificate"]["n_budget"] == 100, step
    assert curls == 12
    assert (tmp_path / "body.json").stat().st_size > (tmp_path / "cat.png").stat().st_size  # the whole photo went


def test_the_client_examples(server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("fsmllm sample chelsea > cat.png", server, tmp_path).returncode == 0
    (shell,) = fenced("Client", "bash")
    steps = commands(shell)
    assert len(steps) == 3
    for step in steps:
        result = run(step, server, tmp_path)
        assert result.returncode == 0, (step, result.stderr[-2000:])
    assert (tmp_path / "fcsb.png").stat().st_size > 0
    assert json.loads(result.stdout)["certificate"]["encoder"] == "tiny-cnn"  # generate --json: the server's answer
    (python,) = fenced("Client", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(python.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})


def test_the_certificate_example(server: LiveServer, tmp_path: Path) -> None:
    """Certify, fetch by id, verify: the README's three commands run, and the output it shows has the lines (each
    check's name and outcome) that the commands print."""
    assert run("fsmllm sample chelsea > cat.png", server, tmp_path).returncode == 0
    (block,) = fenced("Certificates as evidence", "console")
    steps = [line.removeprefix("$ ") for line in block.splitlines() if line.startswith("$ ")]
    shown = [line for line in block.splitlines() if line and not line.startswith("$ ")]
    assert len(steps) == 3 and steps[0].startswith("fsmllm-client certify") and "--record-samples" in steps[0]
    certified = run(steps[0], server, tmp_path)
    assert certified.returncode == 0, certified.stderr[-2000:]
    (issued,) = re.findall(r"certificate (cert-[0-9a-f]{32}) ", certified.stdout)
    fetch = re.sub(r"cert-[0-9a-f]+…?", issued, steps[1])  # the id this server issued
    assert run(fetch, server, tmp_path).returncode == 0
    body, _, status = (tmp_path / "cert.json").read_text().rpartition("\n")  # run() has curl add the status
    assert status == "200" and json.loads(body)["id"] == issued
    (tmp_path / "cert.json").write_text(body)
    verify = steps[2] + f" --keys {server.url}/v1/certificates/keys"  # the README's server keeps its keys locally
    verified = run(verify, server, tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
    printed = verified.stdout.splitlines()
    assert printed[-1] == "verified" and printed[-2].startswith("recompute: ok (") and "bit for bit" in printed[-2]
    outcomes = [line.split(" (")[0] for line in printed]
    assert outcomes == [line.split(" (")[0] for line in shown[-len(printed):]]
    assert certified.stdout.splitlines()[0].split(" (")[0] == shown[0].split(" (")[0].replace(shown[0].split()[1], issued)
