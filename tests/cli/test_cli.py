"""``fsmllm certify`` end to end: the installed command on the bundled cat photo with both real encoders.

The certificate numbers are checked against the formulas of method.md, recomputed here with scipy from the
two estimated scores the command reports: the estimated FCSB from S, the direction bound from p̲ and the
certified FCSB from the angle combination, with abstention where they are not positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import norm

from fsmllm.cli import main

from tests.encoders.photos import CAT_CLASSES

RADII = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]


def fsmllm_command() -> list[str]:
    script = Path(sys.executable).parent / "fsmllm"  # the console script the README's install creates
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fsmllm.cli"]


def certify_json(*args: str) -> dict:
    command = [*fsmllm_command(), "certify", "sample:chelsea", "--json", "--no-progress", *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def fcsb(score: float, sigma: float, radius: float) -> float:
    return 2 * norm.cdf(norm.ppf((1 + score) / 2) - radius / sigma) - 1


def check_certificate(summary: dict, *, encoder: str, size: int, sigma: float, n0: int, n: int) -> None:
    assert summary["encoder"] == encoder and summary["booster"] == "none" and summary["input_size"] == size
    assert summary["certified_radius"] is None and summary["cached"] is False  # the server's certificate shape
    assert (summary["sigma"], summary["n0"], summary["n"], summary["alpha"]) == (sigma, n0, n, 0.001)
    assert summary["bound"] == "betting" and summary["stopped_by"] == "budget" and summary["n_budget"] == n
    assert isinstance(summary["seed"], int)
    estimate, lower = summary["score_estimate"], summary["score_lower"]
    assert 0 < lower <= estimate <= 1, (lower, estimate)
    rows = summary["radii"]
    assert [row["radius"] for row in rows] == RADII
    angle = summary["served_angle"]
    assert 0 <= angle < 0.2
    for row in rows:
        radius, certified, served = row["radius"], row["certified_fcsb"], row["served_fcsb"]
        assert row["estimated_fcsb"] == pytest.approx(fcsb(estimate, sigma, radius), abs=1e-6)
        bound = fcsb(lower, sigma, radius)  # the direct bound (method.md step 3)
        if bound > 0:
            assert certified == pytest.approx(bound, abs=1e-6)
            assert certified <= row["estimated_fcsb"]
        else:
            assert certified is None
        moved = math.cos(math.acos(bound) + angle) if bound > 0 and math.acos(bound) + angle < math.pi / 2 else -1.0
        if moved > 0:
            assert served == pytest.approx(moved, abs=1e-6) and served <= certified
        else:
            assert served is None
    assert summary["abstain"] is all(row["certified_fcsb"] is None for row in rows)
    assert rows[0]["certified_fcsb"] == pytest.approx(lower, abs=1e-9)  # at ε = 0 the certificate is the score
    assert rows[0]["estimated_fcsb"] == pytest.approx(estimate, abs=1e-9)
    for key in ("certified_fcsb", "served_fcsb", "estimated_fcsb"):
        values = [row[key] for row in rows]
        # monotone: non-increasing in the radius, and once abstained, abstained at every larger radius
        certified_prefix = [value for value in values if value is not None]
        assert values[: len(certified_prefix)] == certified_prefix, (key, values)
        assert all(a >= b for a, b in zip(certified_prefix, certified_prefix[1:])), (key, values)
    assert rows[0]["certified_fcsb"] is not None  # not vacuous: something is certified


@pytest.fixture(scope="module")
def dinov2_run() -> dict:
    """No --seed: the command draws one and reports it."""
    return certify_json("--encoder", "dinov2-s", "--n0", "20", "--n", "400", "--radius", *map(str, RADII))


@pytest.mark.slow
def test_certify_dinov2(dinov2_run) -> None:
    check_certificate(dinov2_run, encoder="dinov2-s", size=112, sigma=0.25, n0=20, n=400)
    assert [row["certified_fcsb"] for row in dinov2_run["radii"]][-1] is None  # ε = 4σ is beyond reach
    assert "prediction" not in dinov2_run


@pytest.mark.slow
def test_reported_seed_reproduces_the_certificate(dinov2_run) -> None:
    again = certify_json(
        "--encoder", "dinov2-s", "--n0", "20", "--n", "400", "--radius", *map(str, RADII),
        "--seed", str(dinov2_run["seed"]),
    )
    assert again == dinov2_run


@pytest.mark.slow
def test_certify_efficientnet_with_its_classifier() -> None:
    summary = certify_json(
        "--encoder", "efficientnet-lite0", "--classify", "--n0", "20", "--n", "200", "--seed", "3",
        "--radius", *map(str, RADII),
    )
    check_certificate(summary, encoder="efficientnet-lite0", size=224, sigma=0.25, n0=20, n=200)
    prediction = summary["prediction"]
    assert prediction["label"] in CAT_CLASSES, prediction
    from fsmllm.encoders.efficientnet import imagenet_class_names

    names = imagenet_class_names()
    assert names[prediction["label_index"]] == prediction["label"]
    assert prediction["runner_up_index"] != prediction["label_index"]
    assert prediction["alpha"] == 0.0005  # half of α: the other half bounds the score (a joint statement)
    assert -1 <= prediction["top_lower"] <= 1 and -1 <= prediction["runner_up_upper"] <= 1
    if prediction["radius"] is None:
        assert prediction["top_lower"] <= prediction["runner_up_upper"] or prediction["top_lower"] <= 0
    else:
        assert prediction["radius"] > 0 and prediction["top_lower"] > prediction["runner_up_upper"]


def test_table_output_and_errors(capsys) -> None:
    """The human-readable table, in process with a tiny encoder (fast); then the error paths."""
    args = ["certify", "sample:coffee", "--encoder", "tiny-cnn", "--n0", "10", "--n", "50", "--seed", "1"]
    args.append("--no-progress")
    assert main([*args, "--radius", "0.01", "0.02", "--target-cos", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "encoder tiny-cnn  booster none  input 3x32x32 pixels in [0, 1]" in out
    assert "sigma 0.25  n0 10  n 50  alpha 0.001" in out and "seed 1" in out
    assert "certified FCSB" in out and "estimated FCSB" in out and "largest radius with certified FCSB >= 0.5" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("0.0100", "0.0200"))]
    assert len(table) == 2 and all(len(row) == 4 for row in table)
    stopping = ["certify", "sample:coffee", "--encoder", "tiny-cnn", "--n0", "10", "--n", "20000", "--seed", "1"]
    assert main([*stopping, "--no-progress", "--radius", "0.01", "--stop-at-fcsb", "0.8"]) == 0
    out = capsys.readouterr().out
    used = int(out.split("  n ")[1].split()[0])
    assert used < 20000 and "of 20000 (target_reached)" in out
    for bad, message in [
        (["--encoder", "nope"], "unknown encoder 'nope'"),
        (["--sigma", "0"], "sigma must be a positive"),
        (["--booster", "gsb"], "no booster"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *bad])
        assert exit_info.value.code not in (0, None)
        captured = capsys.readouterr()
        assert message in captured.err + str(exit_info.value.code)
    with pytest.raises(SystemExit):
        main(["certify", "no-such-file.png", "--encoder", "tiny-cnn"])
    assert "no image file at no-such-file.png" in capsys.readouterr().err


def test_dtype_and_compile(capsys) -> None:
    """``--compile`` (the real inductor) certifies what the eager encoder does; ``--dtype bfloat16`` certifies the
    encoder as computed in bfloat16: the same samples, a slightly different function."""
    args = ["certify", "sample:coffee", "--encoder", "tiny-cnn", "--n0", "16", "--n", "64", "--seed", "1",
            "--radius", "0.05", "--json", "--no-progress"]

    def run(*extra: str) -> dict:
        assert main([*args, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, half, fast = run("--dtype", "float32"), run("--dtype", "bfloat16"), run("--dtype", "float32", "--compile")
    assert plain["encoder_dtype"] == fast["encoder_dtype"] == "float32" and half["encoder_dtype"] == "bfloat16"
    assert fast["score_lower"] == pytest.approx(plain["score_lower"], abs=1e-6)
    assert half["score_lower"] != plain["score_lower"]
    assert half["score_lower"] == pytest.approx(plain["score_lower"], abs=0.02)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--dtype", "float8"])
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_generate_certify_answer_prints_the_servers_answer_certificate(capsys, tmp_path) -> None:
    """``fsmllm generate --certify-answer --json`` (tiny model) prints the server's answer certificate for the
    same image, prompt, parameters and seed: one shape, the same votes."""
    import httpx

    from fsmllm.api.settings import Settings
    from fsmllm.lm.models import load_model

    from tests.api.live import live_server, png_bytes

    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(5))
    args = ["generate", str(image), "What is this?", "--model", "tiny-test", "--n0", "10", "--n", "40", "--seed", "3",
            "--max-tokens", "4", "--certify-answer", "--answer-n0", "8", "--answer-n", "48", "--json", "--no-progress",
            "--dtype", "float32", "--lm-dtype", "float32"]  # as the server here: the same votes on any machine
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)["answer_certificate"]
    settings = Settings(model="tiny-test", default_n0=10, default_n=40, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as server:
        served = httpx.post(f"{server.url}/generate", files={"image": ("x.png", image.read_bytes(), "image/png")}, data={
            "prompt": "What is this?", "seed": "3", "max_tokens": "4", "certify_answer": '{"n0": 8, "n": 48}',
        }, timeout=60).json()["answer_certificate"]
    numbers = {key: value for key, value in printed.items() if value is not None}  # the CLI issues nothing
    assert numbers == {key: served[key] for key in numbers} and printed["n_budget"] == 48 and printed["statement"]
    assert printed["id"] is None and served["id"] and set(printed) == set(served)
    assert printed["lm_dtype"] == served["lm_dtype"] == "float32"  # both name the votes' precision
