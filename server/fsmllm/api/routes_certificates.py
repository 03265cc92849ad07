"""The certificate store over HTTP: GET /v1/certificates/keys (the JWKS that verifies signatures, open to all),
GET /v1/certificates/{id} (by certificate id or chat completion id) and GET /v1/certificates (filtered list)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from fsmllm.api.errors import ERRORS
from fsmllm.errors import CertificateNotFound, RequestError
from fsmllm.evidence import Issuer

router = APIRouter(prefix="/v1/certificates", tags=["certificates"])
#: the most certificates one list answer holds
MAX_LIST = 100


def _issuer(request: Request) -> Issuer:
    return request.app.state.issuer


@router.get("/keys", summary="The public keys that verify certificate signatures (JWKS, RFC 7517)")
async def keys(request: Request) -> dict[str, Any]:
    return _issuer(request).keyring.jwks()


@router.get(
    "/{certificate_id}",
    responses=ERRORS,
    summary="A stored certificate, by its id or by the id of the chat completion it came with",
)
async def certificate(request: Request, certificate_id: str) -> dict[str, Any]:
    document = await asyncio.to_thread(_issuer(request).store.get, certificate_id)
    if document is None:
        raise CertificateNotFound(f"no certificate has id {certificate_id!r} (nor a chat completion of that id)")
    return document


@router.get("", responses=ERRORS, summary="Stored certificates, newest first, filtered")
async def certificates(
    request: Request,
    image_sha256: Annotated[str | None, Query(description="SHA-256 of the image's bytes (hex)")] = None,
    model: Annotated[str | None, Query(description="the served model")] = None,
    since: Annotated[datetime | None, Query(description="issued at or after (ISO 8601; naive = UTC)")] = None,
    until: Annotated[datetime | None, Query(description="issued before (ISO 8601; naive = UTC)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description=f"at most this many (1 to {MAX_LIST})")] = 20,
) -> dict[str, Any]:
    if since is not None and until is not None and until < since:  # since == until: an empty range, no error
        raise RequestError(f"until ({until.isoformat()}) comes before since ({since.isoformat()}): swap them")
    found = await asyncio.to_thread(_issuer(request).store.list, image_sha256, model, since, until, limit)
    return {"object": "list", "data": found}
