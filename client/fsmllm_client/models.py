"""Typed results of the fsmllm server, mirroring its JSON responses (server/fsmllm/api/schemas/).

The client does not import the server package: these models are written against the HTTP API. Unknown
fields are kept (``extra="allow"``) so a newer server does not break an older client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    """Base of every result: tolerant of fields added by newer servers."""

    model_config = ConfigDict(extra="allow")


class _Issued(_Model):
    """What an issued certificate, feature or answer, has of its own (docs/certificates.md): the id
    (GET /v1/certificates/{id}), when, the signature, and with record_samples the recorded values
    (fsmllm_client.verify checks them); the rest of the binding is kept as extra fields."""

    id: str | None = None
    issued_at: str | None = None
    signature: str | None = None
    samples: dict[str, Any] | None = None


class RadiusBound(_Model):
    """The bounds at one l2 radius. ``certified_fcsb`` is the certificate on the smoothed encoder F,
    ``served_fcsb`` the same for the features the language model read; ``None`` means nothing certified."""

    radius: float
    certified_fcsb: float | None
    served_fcsb: float | None = None
    estimated_fcsb: float


class TokenBound(_Model):
    """One token's values in a token-level certificate (``per_token``)."""

    token: int
    score_estimate: float
    score_lower: float
    served_angle: float
    certified_fcsb: list[float | None]


class CertifiedRadius(_Model):
    """The largest radius whose certified FCSB is at least ``target_cos`` (``None``: not even radius 0)."""

    target_cos: float
    radius: float | None


class Timings(_Model):
    """Where the server spent the request's time, in milliseconds."""

    queue_ms: float = 0.0
    certify_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


class Certificate(_Issued):
    """A complete certificate: every number can be reproduced from these fields and the image."""

    encoder: str
    booster: str
    input_size: int
    norm: str
    statement: str = ""
    granularity: str = "global"
    worst_token: int | None = None
    tokens: list[TokenBound] | None = None
    sigma: float
    n0: int
    n: int
    n_budget: int | None = None
    stopped_by: str = "budget"
    alpha: float
    bound: str
    seed: int
    score_estimate: float
    score_lower: float
    served_angle: float | None = None
    abstain: bool
    radii: list[RadiusBound]
    certified_radius: CertifiedRadius | None = None
    cached: bool = False


class CertifyResult(_Model):
    """The answer of ``POST /certify``."""

    id: str
    certificate: Certificate
    timings: Timings


class AnswerVote(_Model):
    answer: str
    normalised: str
    count: int


class AnswerCertificate(_Issued):
    """The certified answer: unless ``abstain``, the smoothed model answers ``answer`` for every image within
    l2 distance ``radius`` (probability ≥ 1 − ``alpha``)."""

    answer: str
    normalised: str
    p_lower: float
    radius: float | None
    abstain: bool
    votes: list[AnswerVote]
    agree: int
    n0: int
    n: int
    n_budget: int
    stopped_by: str
    alpha: float
    sigma: float
    inner: int
    bound: str
    target_radius: float | None = None
    seed: int
    statement: str = ""


class GenerateResult(_Model):
    """The answer of ``POST /generate``: the model's answer and the certificate of the features it read (and,
    with ``certify_answer``, the certified answer)."""

    id: str
    model: str
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    certificate: Certificate
    answer_certificate: AnswerCertificate | None = None
    timings: Timings


class ChatChoiceMessage(_Model):
    """The assistant's message of a chat completion."""

    role: str = "assistant"
    content: str


class ChatChoice(_Model):
    """One choice of a chat completion (the server returns exactly one)."""

    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class Usage(_Model):
    """Token counts of a chat completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Model):
    """The answer of ``POST /v1/chat/completions``, with fsmllm's extra ``certificate`` field."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    certificate: Certificate

    @property
    def content(self) -> str:
        """The text of the first choice."""
        return self.choices[0].message.content


class ModelCard(_Model):
    """The served model and its certification policy (``GET /v1/models``)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "fsmllm"
    encoder: str
    booster: str
    input_size: int
    allowed_sigmas: list[float]
    defaults: dict[str, Any] = Field(default_factory=dict)


class ModelList(_Model):
    """The answer of ``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class Health(_Model):
    """The answer of ``GET /health`` (liveness)."""

    status: str


class Readiness(_Model):
    """The answer of ``GET /ready``: ``status`` is ``ready`` or ``starting`` (the server answered 503)."""

    status: str
    model: str | None = None
    encoder: str | None = None

    @property
    def ready(self) -> bool:
        """True once the models are loaded and the device worker runs."""
        return self.status == "ready"
