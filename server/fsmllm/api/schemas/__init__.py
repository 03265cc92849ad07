"""Request and response models of the HTTP API (pydantic; they are the OpenAPI schema, and the only code that
writes the API's JSON), a module per endpoint as the routes are:

* :mod:`~fsmllm.api.schemas.common` — the request base, validation messages, the error body;
* :mod:`~fsmllm.api.schemas.certificate` — the certification fields and the served certificate (every endpoint);
* :mod:`~fsmllm.api.schemas.certify` — POST /certify;
* :mod:`~fsmllm.api.schemas.generate` — POST /generate and the certified answer;
* :mod:`~fsmllm.api.schemas.openai` — POST /v1/chat/completions and GET /v1/models.
"""

from fsmllm.api.schemas.certificate import (
    CertificateOut,
    CertificationParams,
    CertifiedAt,
    CertifiedRadius,
    InterimCertificateOut,
    PredictionOut,
    RadiusBound,
    SamplesRecord,
    Timings,
    TokenBound,
)
from fsmllm.api.schemas.certify import CertifyParams, CertifyRequest, CertifyResponse
from fsmllm.api.schemas.common import (
    ABSTAIN,
    ALIASES,
    EXAMPLE_IMAGE,
    NORM_NOTE,
    STATEMENT,
    ErrorBody,
    ErrorResponse,
    RequestModel,
    refuse_unknown_fields,
    suggestion,
    validation_message,
)
from fsmllm.api.schemas.generate import (
    ANSWER_STATEMENT,
    AnswerCertificateOut,
    AnswerCertification,
    AnsweringParams,
    AnswerParams,
    AnswerVote,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    GenerationParams,
    VotesEvent,
)
from fsmllm.api.schemas.openai import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ImagePart,
    ImageURL,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorResponse,
    TextPart,
    Usage,
)
from fsmllm.certify import DEFAULT_RADII

__all__ = [
    "ABSTAIN",
    "ALIASES",
    "ANSWER_STATEMENT",
    "DEFAULT_RADII",
    "EXAMPLE_IMAGE",
    "NORM_NOTE",
    "STATEMENT",
    "AnswerCertificateOut",
    "AnswerCertification",
    "AnswerParams",
    "AnswerVote",
    "AnsweringParams",
    "CertificateOut",
    "CertificationParams",
    "CertifiedAt",
    "CertifiedRadius",
    "CertifyParams",
    "CertifyRequest",
    "CertifyResponse",
    "ChatChoice",
    "ChatChoiceMessage",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ErrorBody",
    "ErrorResponse",
    "GenerateParams",
    "GenerateRequest",
    "GenerateResponse",
    "GenerationParams",
    "ImagePart",
    "ImageURL",
    "InterimCertificateOut",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorResponse",
    "PredictionOut",
    "RadiusBound",
    "SamplesRecord",
    "RequestModel",
    "refuse_unknown_fields",
    "TextPart",
    "Timings",
    "TokenBound",
    "Usage",
    "VotesEvent",
    "suggestion",
    "validation_message",
]
