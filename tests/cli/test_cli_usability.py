"""Both command lines as a newcomer meets them: help for every flag with its default, the server's defaults and
field names, ``--list-encoders``, ``fsmllm sample``, the server's messages for bad input (no traceback), and
``fsmllm certify --json`` printing the server's certificate."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fsmllm.api.schemas import DEFAULT_RADII, AnswerCertification, CertificateOut, CertifyRequest, GenerateParams, GenerateRequest
from fsmllm.api.settings import Settings
from fsmllm.cli import build_parser, main
from fsmllm.images import sample_image
from fsmllm.cli.common import HelpFormatter
from fsmllm_client.cli import HelpFormatter as ClientHelpFormatter
from fsmllm_client.cli import build_parser as build_client_parser

from tests.api.live import LiveServer, live_server, png_bytes

TINY = ["--encoder", "tiny-cnn", "--image-size", "16", "--no-progress"]


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


@pytest.mark.parametrize(
    ("root", "formatter_class"), [(build_parser, HelpFormatter), (build_client_parser, ClientHelpFormatter)],
    ids=["fsmllm", "fsmllm-client"],
)
def test_every_flag_has_help_and_its_default_in_help(root, formatter_class) -> None:
    problems = []
    commands = list(_parsers(root(), root().prog))
    assert len(commands) >= 4
    for name, parser in commands:
        assert parser.formatter_class is formatter_class, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            text = formatter._get_help_string(action) or ""
            if not text.strip():
                problems.append(f"{name} {flag}: no help")
            elif action.option_strings and action.nargs != 0 and "default" not in text:
                problems.append(f"{name} {flag}: the help does not say its default")
    assert not problems, "\n".join(problems)


def test_the_commands_take_the_servers_defaults() -> None:
    certify = build_parser().parse_args(["certify", "cat.png"])
    generate = build_parser().parse_args(["generate", "cat.png", "What is this?"])
    for args in (certify, generate):
        assert args.sigma == Settings.model_fields["default_sigma"].default
        assert (args.n0, args.n) == (Settings.model_fields["default_n0"].default, Settings.model_fields["default_n"].default)
        assert args.alpha == Settings.model_fields["default_alpha"].default
        assert args.radius == list(DEFAULT_RADII) == CertifyRequest(image="x").radii()
        assert (args.bound, args.granularity) == ("betting", "global")
        assert args.batch_size == Settings.model_fields["batch_size"].default
    defaults = GenerateParams(prompt="x")
    assert (generate.max_tokens, generate.temperature, generate.top_p) == (defaults.max_tokens, defaults.temperature, defaults.top_p)
    assert generate.max_tokens == 64 and generate.model == Settings.model_fields["model"].default


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_one_name_per_field_across_the_api_the_client_and_both_clis() -> None:
    """Every certification field of the server is a flag of the same name in both CLIs and an option of the
    client (image, stream and the client's progress listeners aside)."""
    from fsmllm_client import CertifyOptions, GenerateOptions

    commands = {name: parser for name, parser in _parsers(build_parser(), "fsmllm")}
    client_commands = {name: parser for name, parser in _parsers(build_client_parser(), "fsmllm-client")}
    for request, options, command in (
        (CertifyRequest, CertifyOptions, "certify"),
        (GenerateRequest, GenerateOptions, "generate"),
    ):
        fields = set(request.model_fields) - {"image", "stream", "prompt"}
        assert fields == set(options.__optional_keys__) - {"progress", "vote_progress"}, command
        for parser in (commands[f"fsmllm {command}"], client_commands[f"fsmllm-client {command}"]):
            missing = {name for name in fields if f"--{name.replace('_', '-')}" not in _flags(parser)}
            # fsmllm generate runs its model in process: stop strings are a server feature
            assert missing <= ({"stop"} if parser.prog == "fsmllm generate" else set()), (parser.prog, missing)
    # the certify_answer object's fields are --answer-FIELD in both
    for parser in (commands["fsmllm generate"], client_commands["fsmllm-client generate"]):
        assert {f"--answer-{name.replace('_', '-')}" for name in AnswerCertification.model_fields} <= _flags(parser)


def test_list_encoders_names_encoders_boosters_and_models(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--list-encoders"], ["certify", "--list-encoders"], ["serve", "--list-encoders"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None)
        out = capsys.readouterr().out
        for name in ("dinov2-s", "efficientnet-lite0", "gsb-dinov2-s-0.25", "fsmllm-demo", "tiny-test"):
            assert name in out, (argv, name)


def test_sample_writes_a_bundled_photo(tmp_path: Path) -> None:
    target = tmp_path / "coffee.png"
    assert main(["sample", "coffee", "--out", str(target)]) == 0
    with Image.open(target) as written:
        assert written.format == "PNG" and written.tobytes() == sample_image("coffee").tobytes()
    command = [sys.executable, "-m", "fsmllm.cli", "sample", "chelsea"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    piped = subprocess.run(command, capture_output=True, env=env, timeout=120, check=True)  # stdout is a pipe
    with Image.open(io.BytesIO(piped.stdout)) as photo:
        assert photo.size == sample_image("chelsea").size


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as live:  # tiny-cnn at 16 px, n0 20, n 100
        yield live


def _server_message(server: LiveServer, data: bytes, **fields: str) -> str:
    response = httpx.post(f"{server.url}/certify", files={"image": ("file.png", data)}, data=fields, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]["message"]


def test_bad_input_gets_the_servers_message_without_a_traceback(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_an_image = tmp_path / "notimage.png"
    not_an_image.write_text("hello\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(size=(64, 64))[:300])
    for path in (not_an_image, truncated):
        with pytest.raises(SystemExit) as refused:
            main(["certify", str(path), *TINY])
        assert refused.value.code == 2
        assert capsys.readouterr().err == f"fsmllm certify: error: {_server_message(server, path.read_bytes())}\n"
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    for flag, field, value in (("--n", "n", "1"), ("--alpha", "alpha", "2"), ("--radius", "radius", "-1")):
        with pytest.raises(SystemExit):
            main(["certify", str(good), *TINY, flag, value])
        server_says = _server_message(server, good.read_bytes(), **{field: value})
        assert server_says.startswith(f"{field}: ")
        assert capsys.readouterr().err == f"fsmllm certify: error: {flag}: {server_says.removeprefix(f'{field}: ')}\n"
    with pytest.raises(SystemExit):
        main(["certify", str(tmp_path / "missing.png"), *TINY])
    assert f"no image file at {tmp_path / 'missing.png'}" in capsys.readouterr().err
    # and as the installed command: a message, an exit status, no traceback
    command = [sys.executable, "-m", "fsmllm.cli", "certify", str(not_an_image), *TINY]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not an image" in result.stderr


def test_certify_json_prints_the_servers_certificate(server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same keys, the same nulls, the same numbers for the same image, parameters and seed."""
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(3))
    radii = ["0.01", "0.05", "5"]
    response = httpx.post(
        f"{server.url}/certify",
        files={"image": ("image.png", image.read_bytes())},
        data={"radius": radii, "seed": "5", "n0": "20", "n": "100", "target_cos": "0.5"},
        timeout=60,
    )
    served = response.json()["certificate"]
    assert main(["certify", str(image), *TINY, "--radius", *radii, "--seed", "5", "--n0", "20", "--n", "100",
                 "--target-cos", "0.5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(served) == list(CertificateOut.model_fields)
    assert printed["radii"][-1]["certified_fcsb"] is None and printed["tokens"] is None  # null, never []
    issued = {"id", "issued_at", "model", "completion_id", "image", "weights", "software", "device", "samples", "signature"}
    served = {key: value for key, value in served.items() if key not in issued}  # the command line issues none
    printed = {key: value for key, value in printed.items() if key not in issued}
    assert printed == served  # the server's cached flag is false on a first request, as on the command line


def test_abstain_means_the_same_in_the_json_and_both_tables(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With n = 2 nothing is certified at any requested radius: the server's abstain, the ``fsmllm`` table and
    the ``fsmllm-client`` table all say so; with n = 100 something is, and none of them does."""
    from fsmllm_client.cli import main as client_main

    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(4))
    note = "nothing certified at any requested radius"
    for n, abstains in (("2", True), ("100", False)):
        common = [str(image), "--radius", "0", "0.01", "--n0", "20", "--n", n, "--seed", "1"]
        assert client_main(["--url", server.url, "certify", *common, "--json"]) == 0
        certificate = json.loads(capsys.readouterr().out)["certificate"]
        assert certificate["abstain"] is abstains
        assert all(row["certified_fcsb"] is None for row in certificate["radii"]) is abstains
        assert client_main(["--url", server.url, "certify", *common, "--no-progress"]) == 0
        assert (f"ABSTAIN: {note}" in capsys.readouterr().out) is abstains
        assert main(["certify", *common, *TINY]) == 0
        table = capsys.readouterr().out
        assert (f"-> ABSTAIN ({note})" in table) is abstains
        assert (table.count("    none  ") >= 2) is abstains  # the uncertified cells of both radii


@pytest.mark.slow
def test_no_progress_hides_the_weight_loading_bars(tmp_path: Path) -> None:
    """``fsmllm generate --no-progress`` with the demo model: nothing on stderr, no transformers bar."""
    command = [sys.executable, "-m", "fsmllm.cli", "generate", "sample:coffee", "What is this?", "--n0", "2", "--n", "2",
               "--max-tokens", "2", "--seed", "0"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Loading weights" in shown.stderr  # the bar this switch must hide is there without it
    quiet = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0 and "%|" not in quiet.stderr and "Loading weights" not in quiet.stderr, quiet.stderr
