"""POST /certify: its request and its response."""

from __future__ import annotations

from pydantic import BaseModel, Field

from fsmllm.api.schemas.certificate import CertificateOut, CertificationParams, Timings
from fsmllm.api.schemas.common import EXAMPLE_IMAGE
from fsmllm.engine.serving import Certified


class CertifyParams(CertificationParams):
    target_cos: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="also return the largest radius whose certified FCSB is at least this cosine (certified_radius)",
        examples=[0.5],
    )
    radius_tolerance: float | None = Field(
        None,
        gt=0,
        description="with target_cos: stop sampling once the certified radius is within this l2 distance of the "
        "largest radius more samples could certify, e.g. 0.01 (needs bound 'betting'; not with stop_at_fcsb)",
        examples=[None],  # the examples combine into one request, and stop_at_fcsb's excludes this one
    )

    def _stop_targets(self) -> tuple[float | None, float | None]:
        return self.target_cos, self.radius_tolerance


class CertifyRequest(CertifyParams):
    """POST /certify as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(
        ..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE]
    )


class CertifyResponse(BaseModel):
    id: str
    certificate: CertificateOut
    timings: Timings

    @classmethod
    def of(cls, request_id: str, certified: Certified, target_cos: float | None, per_token: bool) -> CertifyResponse:
        return cls(
            id=request_id,
            certificate=CertificateOut.of(certified, target_cos, per_token),
            timings=Timings.of(certified),
        )
