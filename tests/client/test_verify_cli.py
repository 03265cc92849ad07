"""``fsmllm-client verify`` and ``--record-samples`` (issue 30) against a real server on loopback (tiny encoder and
model): the client's verifier gives the same exit statuses and messages as ``fsmllm verify`` for the checks both
run, and the flags record the same samples as the server's ``record_samples``."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fsmllm.cli.main import main as fsmllm_main
from fsmllm_client.cli import main as client_main
from fsmllm_client.verify import Failure

from ..api.live import LiveServer, png_bytes, resigned, tiny_model_server

TINY = ["--encoder", "tiny-cnn", "--image-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    folder = tmp_path_factory.mktemp("verify")
    (folder / "image.png").write_bytes(png_bytes(5))
    (folder / "other.png").write_bytes(png_bytes(6))
    with tiny_model_server() as live:
        (folder / "keys.json").write_text(httpx.get(f"{live.url}/v1/certificates/keys").text)
        yield live, folder


def _client_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert client_main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def response(served: tuple[LiveServer, Path]) -> dict[str, Any]:
    """A /certify response with recorded samples, asked through the client library."""
    from fsmllm_client import Client

    live, folder = served
    with Client(live.url) as client:
        return client.certify(folder / "image.png", seed=5, record_samples=True).model_dump()



def _both(capsys: pytest.CaptureFixture[str], url: str, argv: list[str]) -> tuple[int, list[str], int, list[str]]:
    """(status, lines) of ``fsmllm-client verify ARGV`` and of ``fsmllm verify ARGV``."""
    client = client_main(["--url", url, "verify", *argv])
    client_lines = capsys.readouterr().out.splitlines()
    server = fsmllm_main(["verify", *argv])
    return client, client_lines, server, capsys.readouterr().out.splitlines()


def test_the_client_records_samples_and_its_verifier_checks_them(
    served: tuple[LiveServer, Path], response: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, folder = served
    certificate = response["certificate"]
    assert certificate["samples"]["shape"] == [100, 1] and certificate["signature"]
    cert = tmp_path / "response.json"
    cert.write_text(json.dumps(response))
    # the default key set is the server's (--url); the image's bytes are checked
    assert client_main(["--url", live.url, "verify", str(cert), "--image", str(folder / "image.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("signature: ok (Ed25519, key ")
    assert out[1].startswith("image: ok (SHA-256 ") and out[2] == "samples: ok (100 values, shape [100, 1])"
    assert out[3].startswith("bound: skipped") and out[-1] == "verified"
    # the command line asks for them too; without the flag there are none
    printed = _client_json(capsys, "--url", live.url, "certify", str(folder / "image.png"), "--seed", "5", "--json",
                           "--record-samples")
    assert printed["certificate"]["samples"] == certificate["samples"]
    plain = _client_json(capsys, "--url", live.url, "certify", str(folder / "image.png"), "--seed", "5", "--json")
    assert plain["certificate"]["samples"] is None and plain["certificate"]["signature"]
    # the table names the certificate
    assert client_main(["--url", live.url, "certify", str(folder / "image.png"), "--seed", "5", "--no-progress"]) == 0
    assert "samples" not in (table := capsys.readouterr().out) and "certificate cert-" in table


def test_both_verifiers_give_the_same_status_and_message(
    served: tuple[LiveServer, Path], response: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, folder = served
    certificate = response["certificate"]
    keys = str(folder / "keys.json")
    tampered = copy.deepcopy(certificate) | {"score_lower": certificate["score_lower"] + 0.01}
    unsigned = {key: value for key, value in certificate.items() if key != "signature"}
    data = certificate["samples"]["data"]
    samples = dict(certificate["samples"], data=("B" if data[0] == "A" else "A") + data[1:])
    other_samples, other_keys = resigned(certificate, tmp_path, samples=samples)
    cases = [
        (certificate, ["--keys", keys], Failure.OK),
        (tampered, ["--keys", keys], Failure.SIGNATURE),
        (certificate, ["--keys", keys, "--image", str(folder / "other.png")], Failure.IMAGE),
        (certificate, ["--keys", str(other_keys)], Failure.UNKNOWN_KEY),
        (unsigned, ["--keys", keys], Failure.MALFORMED),
        ([1, 2], ["--keys", keys], Failure.MALFORMED),
        (other_samples, ["--keys", str(other_keys)], Failure.SAMPLES),
    ]
    for number, (document, flags, expected) in enumerate(cases):
        cert = tmp_path / f"cert-{number}.json"
        cert.write_text(json.dumps(document))
        client, client_lines, server, server_lines = _both(capsys, live.url, [str(cert), *flags])
        assert client == server == expected, (number, client_lines, server_lines)
        shared = [line for line in client_lines if not line.startswith("bound: skipped")]
        assert shared[:-1] == server_lines[: len(shared) - 1], number  # the same checks, the same words
        assert client_lines[-1] == server_lines[-1] == (
            "verified" if expected == Failure.OK else f"NOT verified: {expected.name.lower()} (exit status {expected})"
        )
    assert "bound: ok" in "\n".join(_both(capsys, live.url, [str(tmp_path / "cert-0.json"), "--keys", keys])[3])


def test_unreadable_inputs_are_usage_errors_in_both(
    served: tuple[LiveServer, Path], response: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, folder = served
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(response))
    for argv, message in (
        ([str(not_json), "--keys", str(folder / "keys.json")], f"{not_json} is not JSON"),
        ([str(tmp_path / "missing.json"), "--keys", str(folder / "keys.json")], "No such file"),
        ([str(cert), "--keys", str(not_json)], "the key set"),
        ([str(cert), "--keys", f"{live.url}/v1/nothing"], "no key set at"),
    ):
        assert client_main(["--url", live.url, "verify", *argv]) == 2
        assert capsys.readouterr().err.startswith("fsmllm-client verify: error: ")
        with pytest.raises(SystemExit) as refused:
            fsmllm_main(["verify", *argv])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("fsmllm verify: error: ") and message in err, err


def test_fsmllm_certify_and_generate_record_the_servers_samples(
    served: tuple[LiveServer, Path], response: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The command lines run the model in process: the same seed gives the same c_i as the server's."""
    live, folder = served
    image = str(folder / "image.png")
    local = ["--seed", "5", "--n0", "20", "--n", "100", "--record-samples", "--json"]
    assert fsmllm_main(["certify", image, *TINY, *local]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == response["certificate"]["samples"] and printed["signature"] is None
    served_answer = _client_json(
        capsys, "--url", live.url, "generate", image, "what?", "--seed", "5", "--max-tokens", "2", "--record-samples",
        "--json",
    )
    assert served_answer["certificate"]["samples"]["shape"] == [100, 1]
    assert fsmllm_main(["generate", image, "what?", "--model", "tiny-test", "--max-tokens", "2", "--no-progress",
                        *local]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["certificate"]["samples"] == served_answer["certificate"]["samples"]
    assert fsmllm_main(["certify", image, *TINY, "--seed", "5", "--n0", "20", "--n", "100", "--record-samples"]) == 0
    assert "samples recorded: shape [100, 1] (printed with --json)" in capsys.readouterr().out
