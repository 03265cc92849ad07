"""POST /certify: its request and its response."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fsmllm.api.schemas.certificate import CertificateOut, CertificationParams, Timings, certification_rules
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
        examples=[0.05],
    )

    def _stop_targets(self) -> tuple[float | None, float | None]:
        return self.target_cos, self.radius_tolerance


def _certify_examples(schema: dict[str, Any]) -> None:
    """The rules of :func:`certification_rules`, and two whole requests that work: the certified FCSB at three
    radii, and the radius certified at a cosine (the fields' own examples combine into a request asking for
    both stop rules, which the schema excludes)."""
    certification_rules(schema)
    schema["examples"] = [
        {"image": EXAMPLE_IMAGE, "radius": [0.1, 0.25, 0.5], "n": 1000, "seed": 7},
        {"image": EXAMPLE_IMAGE, "target_cos": 0.5, "radius_tolerance": 0.05, "n": 1000, "seed": 7},
    ]


class CertifyRequest(CertifyParams):
    """POST /certify as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    model_config = ConfigDict(json_schema_extra=_certify_examples)

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
