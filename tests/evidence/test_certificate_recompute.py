"""``fsmllm verify --recompute`` (issue 30): certificates issued by a real server on loopback (the tiny-test model,
encoder tiny-cnn) are re-run here with their seed and compared; a certificate altered consistently (its FCSB
recomputed from the altered bound) and re-signed by another key passes every other check and fails this one."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fsmllm.certify.answers import answer_radius
from fsmllm.certify.certificate import certified_fcsb, optional_floats
from fsmllm.cli.main import main as fsmllm_main
from fsmllm_client.verify import Failure
from tests.api.live import png_bytes, resigned, tiny_model_server


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("recompute")
    image = png_bytes(8)
    (folder / "image.png").write_bytes(image)
    encoded = base64.b64encode(image).decode()
    with tiny_model_server() as live:
        (folder / "keys.json").write_text(httpx.get(f"{live.url}/v1/certificates/keys").text)

        def certify(**fields: Any) -> dict[str, Any]:
            response = httpx.post(f"{live.url}/certify", json={"image": encoded, **fields}, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["certificate"]

        generated = httpx.post(
            f"{live.url}/generate", json={"image": encoded, "prompt": "what?", "max_tokens": 2}, timeout=120
        )

        def answer(**certify_answer: Any) -> dict[str, Any]:
            body = {"image": encoded, "prompt": "what?", "max_tokens": 2, "seed": 5, "n": 50, "record_samples": True}
            response = httpx.post(f"{live.url}/generate", json={**body, "certify_answer": certify_answer}, timeout=300)
            assert response.status_code == 200, response.text
            answered = response.json()
            stored = httpx.get(f"{live.url}/v1/certificates/{answered['answer_certificate']['id']}").json()
            return {**answered, "stored": stored}

        yield {
            "folder": folder,
            "recorded": certify(seed=21, record_samples=True),
            "token": certify(
                seed=22, granularity="token", per_token=True, radius=[0.01, 0.02], stop_at_fcsb=0.5, n=400,
                target_cos=0.9,
            ),
            "generated": generated.json()["certificate"],
            "answered": answer(n0=8, n=64, alpha=0.01),  # fixed n: Clopper-Pearson
            "answered_anytime": answer(n0=8, n=96, alpha=0.01, radius=0.01),  # the betting bound, may stop early
        }


def _verify(issued: dict[str, Any], certificate: dict[str, Any], capsys: pytest.CaptureFixture[str], *flags: str,
            keys: Path | None = None) -> tuple[int, list[str]]:
    folder = issued["folder"]
    cert = folder / "cert.json"
    cert.write_text(json.dumps(certificate))
    argv = ["verify", str(cert), "--keys", str(keys or folder / "keys.json"), "--image", str(folder / "image.png")]
    status = fsmllm_main([*argv, *flags])
    return status, capsys.readouterr().out.splitlines()



@pytest.mark.parametrize("kind", ["recorded", "token", "generated"])
def test_an_honest_certificate_recomputes_bit_for_bit(issued, kind, capsys) -> None:
    certificate = issued[kind]
    if kind == "token":  # the stop rule ran, and the per-token values are compared
        assert certificate["stop"] is not None and certificate["tokens"] and certificate["certified_radius"]
    status, lines = _verify(issued, certificate, capsys, "--recompute")
    assert status == Failure.OK, lines
    assert "weights: ok (the encoder and booster have no weight files (seeded))" in lines
    recompute = next(line for line in lines if line.startswith("recompute: "))
    assert recompute.startswith("recompute: ok (on cpu, float32, seed ") and recompute.endswith("bit for bit)")


def test_an_inflated_score_signed_by_another_key_fails_only_the_recomputation(issued, capsys) -> None:
    """The bound raised by 0.05 and the FCSB at every radius recomputed from it, so that the certificate is
    consistent; signed by another key, whose key set the verifier is given: only re-running the sampling shows it."""
    certificate = issued["generated"]
    inflated = min(certificate["score_lower"] + 0.05, 0.999)
    radii = np.asarray([entry["radius"] for entry in certificate["radii"]])
    fcsb = optional_floats(certified_fcsb(inflated, certificate["sigma"], radii))
    radii_out = [dict(entry, certified_fcsb=value) for entry, value in zip(certificate["radii"], fcsb, strict=True)]
    forged, keys = resigned(certificate, issued["folder"], score_lower=inflated, radii=radii_out)
    status, lines = _verify(issued, forged, capsys, keys=keys)
    assert status == Failure.OK, lines  # signature, image, FCSB from the bound, pixels: all consistent
    status, lines = _verify(issued, forged, capsys, "--recompute", keys=keys)
    assert status == Failure.RECOMPUTE, lines
    failed = next(line for line in lines if line.startswith("recompute: "))
    assert f"score_lower: recomputed {certificate['score_lower']!r}, certified {inflated!r}" in failed
    assert lines[-1] == "NOT verified: recompute (exit status 10)"
    # a tolerance wider than the forgery lets it through: the tolerance is what is compared against
    status, lines = _verify(issued, forged, capsys, "--recompute", "--tolerance", "1", keys=keys)
    assert status == Failure.OK and "tolerance 1" in next(line for line in lines if line.startswith("recompute: "))


def test_another_seed_with_the_same_samples_fails_the_recomputation(issued, capsys) -> None:
    """The recorded samples still give the certified bound; the seed claimed does not give those samples."""
    certificate = issued["recorded"]
    forged, keys = resigned(certificate, issued["folder"], seed=certificate["seed"] + 1)
    status, lines = _verify(issued, forged, capsys, "--recompute", keys=keys)
    assert status == Failure.RECOMPUTE, lines
    assert "bound: ok" in "\n".join(lines)  # the samples give the bound: only re-running shows the forgery
    assert lines[-2].startswith(f"recompute: FAILED (on cpu, float32, seed {forged['seed']}: score_estimate: recomputed")
    assert "score_lower: recomputed" in lines[-2] and lines[-2].endswith("more)")


def test_a_certificate_from_another_device_type_is_not_compared_with_other_noise(issued, capsys) -> None:
    """A cuda certificate's noise came from cuda's generator: on a CPU the seed draws other numbers, so the
    recomputation is skipped with the reason rather than failed (or passed with a wide tolerance)."""
    forged, keys = resigned(issued["recorded"], issued["folder"], device="cuda:0")
    for flags in ((), ("--device", "cpu", "--tolerance", "1")):
        status, lines = _verify(issued, forged, capsys, "--recompute", *flags, keys=keys)
        assert status == Failure.OK, lines
        assert lines[-2] == (
            "recompute: skipped (not on cpu: the certificate's noise was drawn by cuda's generator, which draws other "
            "numbers for the same seed; recompute it on a cuda device (--device cuda))"
        )


def test_weights_other_than_the_certified_ones_fail_with_their_own_status(issued, capsys) -> None:
    certificate = issued["recorded"]
    weights = dict(certificate["weights"], encoder=[{"name": "tiny-cnn.safetensors", "sha256": "0" * 64}])
    forged, keys = resigned(certificate, issued["folder"], weights=weights)
    status, lines = _verify(issued, forged, capsys, "--recompute", keys=keys)
    assert status == Failure.WEIGHTS, lines
    assert lines[-2] == "weights: FAILED (encoder: here none, the certificate names [tiny-cnn.safetensors 000000000000…])"
    assert not any(line.startswith("recompute") for line in lines)  # nothing is re-run on other weights


def test_recompute_needs_the_image(issued, capsys) -> None:
    cert = issued["folder"] / "alone.json"
    cert.write_text(json.dumps(issued["recorded"]))
    with pytest.raises(SystemExit) as refused:
        fsmllm_main(["verify", str(cert), "--keys", str(issued["folder"] / "keys.json"), "--recompute"])
    assert refused.value.code == 2
    assert "--recompute needs --image" in capsys.readouterr().err


def test_a_llava_checkpoint_is_bound_by_its_folder_and_recomputed_from_it(tmp_path: Path, capsys) -> None:
    """A server of a LLaVA folder starts (its vision tower's weight files are found by the folder, not by the
    encoder's short name ``hf:llava``) and binds them; ``--recompute`` finds them with ``--encoder FOLDER``."""
    from fsmllm.api.settings import Settings
    from fsmllm.encoders.hf_vision import default_image_size
    from fsmllm.evidence.binding import sha256_file
    from fsmllm.lm.models import load_model
    from tests.lm.tiny_llava import save_tiny_llava
    from tests.api.live import live_server

    folder = tmp_path / "llava"
    save_tiny_llava(folder)
    settings = Settings(model=str(folder), default_n0=20, default_n=100, batch_size=64, _env_file=None)
    image = png_bytes(9)
    (tmp_path / "image.png").write_bytes(image)
    with live_server(settings, load_model(str(folder)), f"hf:{folder}", default_image_size(folder)) as live:
        body = {"image": base64.b64encode(image).decode(), "seed": 4, "record_samples": True}
        certificate = httpx.post(f"{live.url}/certify", json=body, timeout=120).json()["certificate"]
        (tmp_path / "keys.json").write_text(httpx.get(f"{live.url}/v1/certificates/keys").text)
    assert certificate["encoder"] == "hf:llava"
    tower = sorted(path for path in folder.iterdir() if path.suffix == ".safetensors")
    assert certificate["weights"]["encoder"] == [{"name": path.name, "sha256": sha256_file(path)} for path in tower]
    (tmp_path / "cert.json").write_text(json.dumps(certificate))
    argv = ["verify", str(tmp_path / "cert.json"), "--keys", str(tmp_path / "keys.json"), "--image",
            str(tmp_path / "image.png"), "--recompute"]
    assert fsmllm_main(argv) == Failure.WEIGHTS  # "hf:llava" is no folder here
    assert "weights: FAILED (encoder: its weights are not here" in capsys.readouterr().out
    assert fsmllm_main([*argv, "--encoder", str(folder)]) == Failure.OK
    assert "bit for bit)" in capsys.readouterr().out.splitlines()[-2]


@pytest.mark.parametrize("kind", ["answered", "answered_anytime"])
def test_a_certified_answer_is_issued_on_its_own_and_its_votes_recompute_p_lower(issued, kind, capsys) -> None:
    """The answer certificate is bound, signed and stored like the feature certificate issued with it, which it
    names; ``fsmllm verify`` recomputes p_lower from its recorded votes bit for bit, then the radius."""
    answered = issued[kind]
    answer, feature = answered["answer_certificate"], answered["certificate"]
    assert answer["id"] != feature["id"] and answer["feature_certificate_id"] == feature["id"]
    assert answered["stored"] == answer
    assert answer["image"] == feature["image"] and answer["weights"] == feature["weights"]
    assert (answer["encoder"], answer["input_size"]) == (feature["encoder"], feature["input_size"])
    assert answer["samples"]["shape"] == [answer["n"]]
    status, lines = _verify(issued, answer, capsys, "--recompute")
    assert status == Failure.OK, lines
    assert any(line.startswith("bound: ok (p_lower ") and line.endswith("bit for bit)") for line in lines), lines
    assert any(line.startswith("radius: ok") for line in lines) and any(line.startswith("pixels: ok") for line in lines)
    assert any(line.startswith("recompute: skipped (not for a certified answer") for line in lines), lines


def test_a_forged_answer_fails_on_its_votes_or_on_its_radius(issued, capsys) -> None:
    """p_lower raised (radius recomputed from it) and signed by another key: the recorded votes give it away; without
    the votes, a radius that p_lower does not give fails; a field changed after signing fails the signature."""
    answer = issued["answered"]["answer_certificate"]
    raised = min(answer["p_lower"] + 0.05, 0.999)
    radius = answer_radius(raised, answer["sigma"], answer["inner"])
    forged, keys = resigned(answer, issued["folder"], p_lower=raised, radius=radius)
    status, lines = _verify(issued, forged, capsys, keys=keys)
    assert status == Failure.SAMPLES and any(line.startswith("bound: FAILED (recomputed p_lower") for line in lines)
    unrecorded = {key: value for key, value in answer.items() if key != "samples"}
    stretched, keys = resigned(unrecorded, issued["folder"], radius=(answer["radius"] or 0.1) * 2)
    status, lines = _verify(issued, stretched, capsys, keys=keys)
    assert status == Failure.FCSB and any(line.startswith("radius: FAILED (from p_lower") for line in lines), lines
    assert _verify(issued, {**answer, "agree": answer["agree"] + 1}, capsys)[0] == Failure.SIGNATURE
