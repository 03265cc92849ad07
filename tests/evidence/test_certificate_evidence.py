"""Signed, bound, stored certificates (issue 30): a real server on loopback, the real store, `fsmllm verify`."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import KeySet, OKPKey

from fsmllm.cli.main import main as fsmllm_main
from fsmllm_client.verify import Failure, load_key_set, outcome, verify
from tests.api.live import png_bytes, tiny_model_server


@pytest.fixture(scope="module")
def issued():
    with tiny_model_server() as live:
        image = png_bytes(3)
        body = {"image": base64.b64encode(image).decode(), "record_samples": True, "seed": 11}
        certificate = httpx.post(f"{live.url}/certify", json=body, timeout=120).json()["certificate"]
        keys = httpx.get(f"{live.url}/v1/certificates/keys").json()
        chat = httpx.post(
            f"{live.url}/v1/chat/completions",
            json={
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + body["image"]}},
                        ],
                    }
                ],
                "max_tokens": 4,
            },
            timeout=120,
        )
        stored = httpx.get(f"{live.url}/v1/certificates/{certificate['id']}").json()
        by_completion = httpx.get(f"{live.url}/v1/certificates/{chat.json()['id']}").json()
        listed = httpx.get(
            f"{live.url}/v1/certificates", params={"image_sha256": certificate["image"]["sha256"]}
        ).json()
        missing = httpx.get(f"{live.url}/v1/certificates/cert-nope")
        at = certificate["issued_at"]
        ranges = {
            name: httpx.get(f"{live.url}/v1/certificates", params={"since": since, "until": until})
            for name, (since, until) in {
                "around": (at, "2999-01-01T00:00:00Z"),
                "empty": (at, at),
                "inverted": ("2999-01-01T00:00:00Z", at),
            }.items()
        }
        yield {
            "image": image,
            "certificate": certificate,
            "keys": keys,
            "chat": chat,
            "stored": stored,
            "by_completion": by_completion,
            "listed": listed,
            "missing": missing,
            "ranges": ranges,
        }


def test_a_certificate_verifies_and_is_stored(issued):
    checks = verify(issued["certificate"], load_key_set(issued["keys"]), issued["image"])
    assert outcome(checks) == Failure.OK, [c.line() for c in checks]
    assert issued["stored"] == issued["certificate"]
    assert issued["missing"].status_code == 404
    assert [c["id"] for c in issued["listed"]["data"]] and issued["certificate"]["id"] in [
        c["id"] for c in issued["listed"]["data"]
    ]


def test_the_list_takes_a_time_range_since_inclusive_until_exclusive(issued):
    ranges, cert_id = issued["ranges"], issued["certificate"]["id"]
    assert cert_id in [c["id"] for c in ranges["around"].json()["data"]]
    assert ranges["empty"].status_code == 200 and ranges["empty"].json()["data"] == []  # since == until: nothing
    assert ranges["inverted"].status_code == 400 and "swap them" in ranges["inverted"].json()["error"]["message"]


def test_the_chat_completion_names_its_certificate(issued):
    chat = issued["chat"]
    assert chat.status_code == 200
    header = chat.headers["x-fsmllm-certificate-id"]
    assert header == chat.json()["certificate"]["id"] == issued["by_completion"]["id"]
    assert issued["by_completion"]["completion_id"] == chat.json()["id"]
    assert outcome(verify(chat.json(), load_key_set(issued["keys"]), issued["image"])) == Failure.OK


@pytest.mark.parametrize(
    ("path", "value"),
    [(("score_lower",), 0.5), (("seed",), 12), (("sigma",), 0.5), (("image", "pixels_sha256"), "0" * 64), (("n",), 99)],
)
def test_tampering_with_a_field_breaks_the_signature(issued, path, value):
    tampered = copy.deepcopy(issued["certificate"])
    target = tampered
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert outcome(verify(tampered, load_key_set(issued["keys"]))) == Failure.SIGNATURE


def test_another_image_and_another_key_fail_with_their_own_status(issued):
    keys = load_key_set(issued["keys"])
    assert outcome(verify(issued["certificate"], keys, png_bytes(4))) == Failure.IMAGE
    other = KeySet([OKPKey.generate_key("Ed25519")])
    assert outcome(verify(issued["certificate"], other)) == Failure.UNKNOWN_KEY
    broken = dict(issued["certificate"], signature=issued["certificate"]["signature"][:-4] + "AAAA")
    assert outcome(verify(broken, keys)) == Failure.SIGNATURE


def test_fsmllm_verify_recomputes_the_bound_bit_for_bit(issued, tmp_path: Path, capsys):
    keys, image = tmp_path / "keys.json", tmp_path / "image.png"
    keys.write_text(json.dumps(issued["keys"]))
    image.write_bytes(issued["image"])
    cert = tmp_path / "cert.json"
    cert.write_text(json.dumps(issued["certificate"]))
    assert fsmllm_main(["verify", str(cert), "--keys", str(keys), "--image", str(image)]) == 0
    out = capsys.readouterr().out
    assert "bound: ok" in out and "fcsb: ok" in out and "pixels: ok" in out
    assert (
        fsmllm_main(["verify", str(cert), "--keys", str(keys), "--image", str(tmp_path / "cert.json")]) == Failure.IMAGE
    )
    capsys.readouterr()


def test_samples_that_do_not_give_the_bound_fail(issued, tmp_path: Path):
    """The replay itself, against a certificate whose signature is skipped: one sample changed moves the bound."""
    from fsmllm.cli.verify import replay
    from fsmllm_client.verify import decode_samples

    certificate = issued["certificate"]
    _, values = decode_samples(certificate["samples"])
    assert all(check.passed for check in replay(certificate, values))
    values[0] = -1.0
    assert replay(certificate, values)[0].failure == Failure.SAMPLES


def test_a_generated_key_is_kept_across_starts(tmp_path: Path):
    """The key generated on the first start signs again on the next (its private half was written)."""
    from fsmllm.evidence.keys import Keyring
    from fsmllm_client.verify import check_signature, signing_input

    first = Keyring(tmp_path / "signing-keys")
    again = Keyring(tmp_path / "signing-keys")
    assert again.kid == first.kid and len(again.jwks()["keys"]) == 1
    certificate = {"score_lower": 0.5}
    certificate["signature"] = again.sign(signing_input(certificate))
    assert check_signature(certificate, load_key_set(first.jwks())).passed
    # a key file written without its private half (as before this was fixed) is passed over: a new key signs
    (stale,) = (tmp_path / "signing-keys").glob("*.jwk.json")
    stale.write_text(json.dumps(first.key.as_dict()))
    renewed = Keyring(tmp_path / "signing-keys")
    assert renewed.kid != first.kid and {key["kid"] for key in renewed.jwks()["keys"]} == {first.kid, renewed.kid}


def test_samples_are_recorded_in_float32_only_when_that_is_exact(issued):
    """The c_i are float32 values widened: 4 bytes each hold them bit for bit; anything else stays float64."""
    import numpy as np

    from fsmllm.evidence.issue import samples_record
    from fsmllm_client.verify import decode_samples

    assert issued["certificate"]["samples"]["encoding"] == "float32-le-base64"
    c_i = np.random.default_rng(0).uniform(-1, 1, size=(1000, 2)).astype(np.float32).astype(np.float64)
    record = samples_record(c_i)
    assert record["encoding"] == "float32-le-base64" and len(base64.b64decode(record["data"])) == 4 * c_i.size
    assert np.asarray(decode_samples(record)[1]).reshape(c_i.shape).tobytes() == c_i.tobytes()  # bit for bit
    wider = c_i.copy()
    wider[3, 1] = 0.1  # not a float32
    record = samples_record(wider)
    assert record["encoding"] == "float64-le-base64" and len(base64.b64decode(record["data"])) == 8 * c_i.size
    assert np.asarray(decode_samples(record)[1]).reshape(c_i.shape).tobytes() == wider.tobytes()
