"""Checking a signed fsmllm certificate offline: its signature, the image it was issued for, its recorded samples.

A certificate (the ``certificate`` object of a response, or a stored one) carries ``signature``: a JWS (RFC 7515)
in compact serialization with a detached payload (RFC 7515, appendix F), algorithm Ed25519 (RFC 9864; the key an
OKP JWK, RFC 8037) and the key's RFC 7638 thumbprint as ``kid``. The payload is the certificate without its
``signature`` field in the canonical JSON of RFC 8785, in which integers beyond ±(2^53 − 1) (seeds go up to
2^63) are written as their decimal text, as RFC 8785 (section 3.2.2.3) advises for numbers a double cannot hold.
The public keys are served as a JWKS (RFC 7517) at ``GET /v1/certificates/keys``.

``record_samples`` certificates carry ``samples``: the c_i (or an answer's ±1 votes) as little-endian floats,
base64, with their shape and SHA-256: ``float32-le-base64`` when every value is a float32 (the c_i are computed in
float32 and widened, so this is exact: 4 bytes a value), else ``float64-le-base64``; the bound is recomputed from
them where the maths is installed (:mod:`fsmllm.certify.replay`, with the server package: ``fsmllm verify``).

Everything here needs only joserfc (with cryptography), rfc8785 and httpx (a key set's URL): no torch, no numpy.
``fsmllm-client verify`` runs these checks; ``fsmllm verify`` runs them too, and adds the ones that need the server
package (the bound from the samples, the pixels, ``--recompute``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import httpx
import rfc8785
from joserfc import jws
from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

#: the JWS algorithm of every certificate (RFC 9864: EdDSA over Ed25519)
ALGORITHM = "Ed25519"
#: the largest integer an IEEE double holds exactly; beyond it RFC 8785 has no number form
SAFE_INTEGER = 2**53 - 1


class Failure(IntEnum):
    """The exit status of ``verify``, one per failed check (the first failure decides it)."""

    OK = 0
    MALFORMED = 3  # not a certificate, or one without a signature
    UNKNOWN_KEY = 4  # signed by a key the key set does not hold (another server, or a key not published)
    SIGNATURE = 5  # the signature does not match: a field was changed after signing, or the signature itself
    IMAGE = 6  # the image given is not the one certified (SHA-256 of its bytes)
    PIXELS = 7  # the pixels the encoder read from that image differ (SHA-256 after resize and crop)
    SAMPLES = 8  # the recorded samples are not the signed ones, or the bound recomputed from them differs
    FCSB = 9  # the FCSB or the radius recomputed from the bound differs
    RECOMPUTE = 10  # re-running the sampling gave other numbers (beyond the documented tolerance)
    WEIGHTS = 11  # the weights here are not the ones the certificate names


@dataclass(frozen=True)
class Check:
    """One check's outcome: its name, whether it passed (None: skipped, with the reason), and what it found."""

    name: str
    passed: bool | None
    detail: str
    failure: Failure = Failure.OK

    def line(self) -> str:
        status = "ok" if self.passed else ("skipped" if self.passed is None else "FAILED")
        return f"{self.name}: {status} ({self.detail})"


def signable(value: Any) -> Any:
    """``value`` as it is signed: integers beyond the doubles' exact range as decimal text, recursively."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > SAFE_INTEGER:
        return str(value)
    if isinstance(value, dict):
        return {key: signable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [signable(item) for item in value]
    return value


def signing_input(certificate: dict[str, Any]) -> bytes:
    """The bytes the signature covers: the certificate without ``signature``, canonical (RFC 8785)."""
    return rfc8785.dumps(signable({key: value for key, value in certificate.items() if key != "signature"}))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: the encodings of a ``samples`` record: its values as little-endian IEEE floats of this many bytes, base64
SAMPLE_ENCODINGS = {"float32-le-base64": ("f", 4), "float64-le-base64": ("d", 8)}


def encode_samples(data: bytes, shape: tuple[int, ...], encoding: str = "float64-le-base64") -> dict[str, Any]:
    """The ``samples`` record of recorded values: ``data`` (their little-endian bytes in ``encoding``), base64,
    with the shape and the bytes' SHA-256."""
    if encoding not in SAMPLE_ENCODINGS:
        raise ValueError(f"unknown samples encoding {encoding!r}")
    return {
        "encoding": encoding,
        "shape": list(shape),
        "sha256": sha256_hex(data),
        "data": base64.b64encode(data).decode("ascii"),
    }


def decode_samples(record: dict[str, Any]) -> tuple[bytes, list[float]]:
    """(the raw bytes, the values in row-major order, as Python floats: a float32 value widens exactly) of a
    ``samples`` record; ``ValueError`` when it is not one."""
    encoding = record.get("encoding")
    if encoding not in SAMPLE_ENCODINGS:
        raise ValueError(f"unknown samples encoding {encoding!r}")
    code, size = SAMPLE_ENCODINGS[encoding]
    data = base64.b64decode(record.get("data", ""), validate=True)
    count = 1
    for length in record.get("shape", []):
        count *= int(length)
    if len(data) != size * count:
        raise ValueError(f"{len(data)} bytes for shape {record.get('shape')} ({size} bytes a value)")
    values = array(code)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return data, list(values)


def load_key_set(source: str | dict[str, Any]) -> KeySet:
    """A JWKS from a dict, a JSON file, JSON text, or a URL (``.../v1/certificates/keys``, fetched);
    ``ValueError`` (or ``OSError``) saying why when there is none there."""
    if isinstance(source, dict):
        data: Any = source
    elif source.startswith(("http://", "https://")):
        try:
            response = httpx.get(source, timeout=30)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            raise ValueError(f"no key set at {source}: {error}") from None
    else:
        text = source if source.lstrip().startswith("{") else Path(source).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"the key set {source} is not JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source if isinstance(source, str) else 'the key set'} is not a JWKS (no 'keys' list)")
    try:
        return KeySet.import_key_set(data)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"unreadable key set: {error}") from None


def read_document(path: str) -> Any:
    """The JSON of a certificate file (``ValueError`` when it is not JSON; ``OSError`` when unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None


def certificate_of(document: dict[str, Any]) -> dict[str, Any]:
    """The certificate in a response or a stored record (its ``certificate`` object) or the certificate itself."""
    if not isinstance(document, dict):
        return {}
    if "signature" not in document and isinstance(document.get("certificate"), dict):
        return document["certificate"]
    return document


def check_signature(certificate: dict[str, Any], keys: KeySet) -> Check:
    """The JWS over the canonical certificate, by a key of ``keys`` (its kid)."""
    token = certificate.get("signature")
    if not isinstance(token, str) or token.count(".") != 2:
        return Check(
            "signature", False, "the certificate has no signature (a JWS with a detached payload)", Failure.MALFORMED
        )
    try:
        payload = signing_input(certificate)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as error:
        return Check("signature", False, f"the certificate cannot be canonicalised: {error}", Failure.MALFORMED)
    try:
        jws.deserialize_compact(token, keys, algorithms=[ALGORITHM], payload=payload)
    except InvalidKeyIdError:
        kid = _header(token).get("kid")
        return Check("signature", False, f"signed by key {kid!r}, which the key set does not hold", Failure.UNKNOWN_KEY)
    except BadSignatureError:
        return Check("signature", False, "the signature does not match the certificate: altered", Failure.SIGNATURE)
    except (JoseError, ValueError) as error:
        return Check("signature", False, f"unreadable signature: {error}", Failure.SIGNATURE)
    return Check("signature", True, f"{ALGORITHM}, key {_header(token).get('kid')}")


def _header(token: str) -> dict[str, Any]:
    try:
        header = token.split(".")[0]
        return dict(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))))
    except (ValueError, json.JSONDecodeError):
        return {}


def check_image(certificate: dict[str, Any], image: bytes) -> Check:
    """The image's bytes against the certified SHA-256."""
    expected = (certificate.get("image") or {}).get("sha256")
    actual = sha256_hex(image)
    if actual != expected:
        return Check("image", False, f"SHA-256 {actual} is not the certified {expected}", Failure.IMAGE)
    return Check("image", True, f"SHA-256 {actual}")


def check_samples_record(certificate: dict[str, Any]) -> tuple[Check, list[float] | None]:
    """The recorded samples decode, and are the ones whose SHA-256 was signed; skipped without a record."""
    record = certificate.get("samples")
    if record is None:
        return Check("samples", None, "not recorded (ask with record_samples: true)"), None
    try:
        data, values = decode_samples(record)
    except (ValueError, TypeError) as error:
        return Check("samples", False, f"unreadable: {error}", Failure.SAMPLES), None
    if sha256_hex(data) != record.get("sha256"):
        return Check("samples", False, "their SHA-256 is not the recorded one", Failure.SAMPLES), None
    return Check("samples", True, f"{len(values)} values, shape {record.get('shape')}"), values


#: a further check of the recorded values (the bound recomputed), given the certificate and the values
Replay = Callable[[dict[str, Any], list[float]], list[Check]]


def verify(
    document: dict[str, Any],
    keys: KeySet,
    image: bytes | None = None,
    replay: Replay | None = None,
    extra: Callable[[dict[str, Any]], list[Check]] | None = None,
) -> list[Check]:
    """Every check of ``document`` in order: signature, image (when given), samples, then ``replay`` on the
    samples (the bound and FCSB recomputed) and ``extra`` (the pixels, a re-run); the first failure stops."""
    certificate = certificate_of(document)
    checks = [check_signature(certificate, keys)]
    if image is not None and checks[-1].passed:
        checks.append(check_image(certificate, image))
    if checks[-1].passed:
        check, values = check_samples_record(certificate)
        checks.append(check)
        if values is not None and replay is not None:
            checks.extend(replay(certificate, values))
        elif values is not None:
            checks.append(Check("bound", None, "recomputing it needs the server package's maths: fsmllm verify"))
    if extra is not None and all(check.passed is not False for check in checks):
        checks.extend(extra(certificate))
    return checks


def outcome(checks: list[Check]) -> Failure:
    """The exit status: the first failed check's, or OK."""
    return next((check.failure for check in checks if check.passed is False), Failure.OK)


def report(checks: list[Check]) -> int:
    """Print one line per check (``name: ok|FAILED|skipped (detail)``) and return the exit status."""
    for check in checks:
        print(check.line())
    status = outcome(checks)
    print("verified" if status == Failure.OK else f"NOT verified: {status.name.lower()} (exit status {int(status)})")
    return int(status)
