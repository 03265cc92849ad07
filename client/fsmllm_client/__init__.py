"""Python client for the fsmllm server: certified answers about images, and their certificates.

>>> from fsmllm_client import Client
>>> with Client("http://127.0.0.1:8000") as client:
...     result = client.certify("cat.png", radius=[0.1, 0.25], seed=7)   # doctest: +SKIP
"""

from fsmllm_client._protocol import CertificationOptions, CertifyOptions, GenerateOptions, user_message
from fsmllm_client.client import AsyncClient, Client
from fsmllm_client.errors import AuthError, BadRequest, FsmllmError, Overloaded, ServerError, Unreachable
from fsmllm_client.models import (
    AnswerCertificate,
    Certificate,
    CertifiedRadius,
    CertifyResult,
    ChatCompletion,
    GenerateResult,
    Health,
    ModelCard,
    ModelList,
    RadiusBound,
    Readiness,
    Timings,
)

__all__ = [
    "AnswerCertificate",
    "AsyncClient",
    "AuthError",
    "BadRequest",
    "Certificate",
    "CertificationOptions",
    "CertifiedRadius",
    "CertifyOptions",
    "CertifyResult",
    "ChatCompletion",
    "Client",
    "FsmllmError",
    "GenerateOptions",
    "GenerateResult",
    "Health",
    "ModelCard",
    "ModelList",
    "Overloaded",
    "RadiusBound",
    "Readiness",
    "ServerError",
    "Timings",
    "Unreachable",
    "user_message",
]
