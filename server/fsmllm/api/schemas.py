"""Request and response models of the HTTP API (pydantic; they are the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fsmllm.certify import BOUND_METHODS

NORM_NOTE = (
    "sigma and every radius are l2 norms over the encoder's input pixels in [0, 1] "
    "(3 x S x S values after resizing the shorter side to S and centre-cropping)"
)
EXAMPLE_IMAGE = "data:image/png;base64,iVBORw0KGgo..."


class CertificationParams(BaseModel):
    """How to certify. Unset fields take the deployment's defaults (see GET /v1/models)."""

    model_config = ConfigDict(extra="forbid")

    radius: float | list[float] | None = Field(
        None, description="one l2 radius or a list of them (default [0.1, 0.25, 0.5])", examples=[[0.1, 0.25, 0.5]]
    )
    sigma: float | None = Field(None, description="noise level; must be one of the deployment's allowed sigmas")
    n0: int | None = Field(None, ge=1, description="selection samples (fix the smoothed direction)")
    n: int | None = Field(None, ge=2, description="estimation samples (bound the score)")
    alpha: float | None = Field(None, gt=0, lt=1, description="failure probability of the certificate")
    bound: Literal["empirical-bernstein", "hoeffding"] = Field("empirical-bernstein", description="confidence bound")
    seed: int | None = Field(None, ge=0, lt=2**63, description="noise seed; a random one is chosen and returned if unset")
    stream: bool = Field(False, description="answer with a server-sent event stream: progress events, then the result")

    @field_validator("radius")
    @classmethod
    def _radii_non_negative(cls, value: float | list[float] | None) -> float | list[float] | None:
        radii = [value] if isinstance(value, (int, float)) else (value or [])
        if value is not None and not radii:
            raise ValueError("give at least one radius")
        for radius in radii:
            if not radius >= 0 or radius == float("inf"):
                raise ValueError(f"radius must be a finite non-negative l2 norm, got {radius}")
        return value

    def radii(self) -> list[float]:
        if self.radius is None:
            return [0.1, 0.25, 0.5]
        return [float(self.radius)] if isinstance(self.radius, (int, float)) else [float(r) for r in self.radius]


assert set(BOUND_METHODS) == {"empirical-bernstein", "hoeffding"}  # keep the Literal above in step


class CertifyParams(CertificationParams):
    target_cos: float | None = Field(
        None, ge=0, lt=1, description="also return the largest radius whose certified FCSB is at least this cosine"
    )


class CertifyRequest(CertifyParams):
    """POST /certify as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE])


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1, description="largest number of new tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = Field(None, description="stop strings")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class GenerateParams(CertificationParams, GenerationParams):
    prompt: str = Field(..., min_length=1, description="the question about the image", examples=["What is this?"])


class GenerateRequest(GenerateParams):
    """POST /generate as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE])


class RadiusBound(BaseModel):
    radius: float
    certified_fcsb: float | None = Field(
        description="with probability >= 1 - alpha, cos(F(x), F(x')) >= this for all ||x' - x|| <= radius; null = abstain"
    )
    direction_fcsb: float | None = Field(description="the same bound for <F(x'), u>, u the published smoothed direction")
    estimated_fcsb: float = Field(description="the paper's FCSB at the estimated score: an estimate, not a certificate")


class CertifiedRadius(BaseModel):
    target_cos: float
    radius: float | None = Field(description="largest certified radius; null when not even radius 0 is certified")


class Timings(BaseModel):
    queue_ms: float = 0.0
    certify_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


class CertificateOut(BaseModel):
    """A complete certificate: every number can be reproduced from the fields of this object and the image."""

    encoder: str
    booster: str
    input_size: int
    norm: str = NORM_NOTE
    sigma: float
    n0: int
    n: int
    alpha: float
    bound: str
    seed: int
    score_estimate: float = Field(description="estimate of the Gaussian robustness score S = ||F(x)||")
    score_lower: float = Field(description="(1 - alpha) lower confidence bound on S")
    abstain: bool = Field(description="true when no radius is certified (score_lower <= 0)")
    radii: list[RadiusBound]
    certified_radius: CertifiedRadius | None = None
    cached: bool = False


class CertifyResponse(BaseModel):
    id: str
    certificate: CertificateOut
    timings: Timings


class GenerateResponse(BaseModel):
    id: str
    model: str
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    certificate: CertificateOut
    timings: Timings


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- OpenAI-compatible chat ------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(description="a data:image/...;base64, URL (remote URLs are not fetched)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class ChatCompletionRequest(GenerationParams):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n=1, user, ...)

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    max_tokens: int = Field(64, ge=1)
    certification: CertificationParams | None = Field(None, description="fsmllm extension: certification parameters")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    certificate: CertificateOut = Field(description="fsmllm extension: the certificate of the image's features")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fsmllm"
    encoder: str
    booster: str
    input_size: int
    allowed_sigmas: list[float]
    defaults: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
