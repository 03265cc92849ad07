"""Issuing a certificate: bind it (id, time, image, weights, software), sign it, commit it to the store.

The route renders the certificate (:class:`~fsmllm.api.schemas.certificate.CertificateOut`) and hands its JSON
here; :meth:`Issuer.issue` adds the binding (and the recorded samples when asked), signs the result
(:mod:`fsmllm_client.verify` says what exactly is signed), commits it, and only then returns it for the response.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image

from fsmllm.engine.runtime import Runtime
from fsmllm.evidence.binding import Deployment, pixels_sha256
from fsmllm.evidence.keys import Keyring
from fsmllm.evidence.store import CertificateStore
from fsmllm_client.verify import encode_samples, signing_input

#: what ``image.pixels_sha256`` is the hash of
PIXELS_LAYOUT = "float32 [3, S, S] in [0, 1], C order, little-endian: the image after resize and centre crop"
#: the response header that carries the certificate's id (it survives wrappers that drop body extras)
CERTIFICATE_HEADER = "X-Fsmllm-Certificate-Id"


def samples_record(samples: np.ndarray) -> dict[str, Any]:
    """The recorded c_i [n, T] (or votes ±1 [n]) as little-endian floats, base64: float32 (4 bytes a value) when
    that holds every value exactly, as it does for the c_i (computed in float32, then widened), else float64."""
    values = np.ascontiguousarray(samples, dtype="<f8")
    shape = tuple(int(size) for size in values.shape)
    narrow = values.astype("<f4")
    if np.array_equal(narrow.astype("<f8"), values):  # bit for bit: a float32 widens to exactly this float64
        return encode_samples(narrow.tobytes(), shape, "float32-le-base64")
    return encode_samples(values.tobytes(), shape, "float64-le-base64")


@dataclass(frozen=True)
class Issuance:
    """What a route hands the issuer: the rendered certificate, the image it is about (and the SHA-256 of its bytes
    as received), the recorded samples when asked for, and the chat completion it came with."""

    certificate: dict[str, Any]
    image: Image.Image
    image_sha256: str
    samples: np.ndarray | None = None
    completion_id: str | None = None


class Issuer:
    """Binds, signs and stores the certificates of one deployment."""

    def __init__(self, runtime: Runtime, keyring: Keyring, store: CertificateStore, deployment: Deployment) -> None:
        self.runtime = runtime
        self.keyring = keyring
        self.store = store
        self.deployment = deployment

    def bind(self, issuance: Issuance) -> dict[str, Any]:
        """The certificate with its id, time, image, weights, software, device and (when given) samples, signed."""
        document = {
            **issuance.certificate,
            "id": f"cert-{uuid.uuid4().hex}",
            "issued_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "model": self.runtime.model_name,
            "completion_id": issuance.completion_id,
            "image": {
                "sha256": issuance.image_sha256,
                "pixels_sha256": pixels_sha256(self.runtime.pixels(issuance.image)),
                "pixels": PIXELS_LAYOUT,
            },
            "weights": self.deployment.weights,
            "software": self.deployment.software,
            "device": self.deployment.device,
        }
        if issuance.samples is not None:
            document["samples"] = samples_record(issuance.samples)
        document["signature"] = self.keyring.sign(signing_input(document))
        return document

    def issue_now(self, issuance: Issuance) -> dict[str, Any]:
        """Bind, sign and commit (blocking); the signed certificate."""
        document = self.bind(issuance)
        self.store.put(document, issuance.completion_id)
        return document

    async def issue(self, issuance: Issuance) -> dict[str, Any]:
        """:meth:`issue_now` on a worker thread: returns once the certificate is committed."""
        return await asyncio.to_thread(self.issue_now, issuance)
