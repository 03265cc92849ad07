"""Issuing a request's certificates: what the routes hand the :class:`~fsmllm.evidence.Issuer` (bound, signed and
committed before the response is sent; docs/certificates.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image

from fsmllm.api.schemas import AnswerCertificateOut
from fsmllm.certify.answers import AnswerCertificate
from fsmllm.engine.serving import Certified
from fsmllm.evidence import Issuance, Issuer


@dataclass(frozen=True)
class Issuing:
    """One request's image (and the SHA-256 of its bytes as received), whether it asked for the samples to be
    recorded, and the chat completion it answers, if any."""

    request: Request
    image: Image.Image
    image_sha256: str
    record_samples: bool
    completion_id: str | None = None

    @property
    def issuer(self) -> Issuer:
        issuer: Issuer = self.request.app.state.issuer
        return issuer

    async def certificate(self, rendered: dict[str, Any], certified: Certified) -> dict[str, Any]:
        """The rendered feature certificate bound, signed and committed (returns once committed); with
        ``record_samples`` it carries the c_i its bound was computed from. The completion id is its key too."""
        samples = certified.certificate.samples if self.record_samples else None
        issuance = Issuance(rendered, self.image, self.image_sha256, samples, self.completion_id)
        return await self.issuer.issue(issuance)

    async def answer(self, voted: AnswerCertificate, certified: Certified, feature_id: str) -> dict[str, Any]:
        """The certified answer issued on its own, naming the feature certificate ``feature_id`` issued with it
        (``certified``: that certification, whose encoder the votes read); with ``record_samples`` it carries its
        estimation votes (±1)."""
        rendered = AnswerCertificateOut.from_certificate(voted, certified.provenance).model_dump()
        rendered["feature_certificate_id"] = feature_id
        samples = voted.samples if self.record_samples else None
        return await self.issuer.issue(Issuance(rendered, self.image, self.image_sha256, samples))

    async def both(
        self, rendered: dict[str, Any], certified: Certified, voted: AnswerCertificate | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The feature certificate issued, then the certified answer (when there is one) naming it."""
        signed = await self.certificate(rendered, certified)
        return signed, None if voted is None else await self.answer(voted, certified, signed["id"])
