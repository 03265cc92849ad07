"""The FastAPI application factory: routes, middleware (request ids, auth, body limit, metrics), lifecycle."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fsmllm import __version__
from fsmllm.api.errors import INTERNAL_ERROR, error_response, install_error_handlers
from fsmllm.api.metrics import Metrics, RouteLabels
from fsmllm.api.routes_certificates import router as certificates_router
from fsmllm.api.routes_certify import router as certify_router
from fsmllm.api.routes_openai import document_served_model
from fsmllm.api.routes_openai import router as openai_router
from fsmllm.api.settings import Settings
from fsmllm.engine.runtime import Runtime
from fsmllm.errors import BodyTooLarge
from fsmllm.evidence import open_issuer

log = logging.getLogger("fsmllm.api")

#: the largest seed (int64); FastAPI's OpenAPI model writes a bound as a float, and this one becomes 2**63
INT64_MAX = 2**63 - 1


def exact_int64_bounds(node: Any) -> Any:
    """``node`` (the API schema) with every ``maximum`` that FastAPI rounded from :data:`INT64_MAX` up to the
    float 2**63 written as that integer again: a schema allowing 2**63 is looser than the server (schemathesis
    sends 2**63 + 191, the same float, and the server refuses it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "maximum" and isinstance(value, float) and value == float(INT64_MAX):
                node[key] = INT64_MAX
            else:
                exact_int64_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_int64_bounds(value)
    return node


#: routes that need no API key: probes, scrapers and the API documentation (it describes the API and holds no data,
#: and a browser cannot send a bearer token to load a page; README, "What the server answers")
OPEN_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/redoc",
        "/v1/certificates/keys",  # the public keys that verify certificates
    }
)
#: where /docs and /redoc load their scripts and styles from: files of the fastapi-offline package, not a CDN
DOCS_ASSETS = "/static-offline-docs/"


class BodyLimit:
    """Pure ASGI middleware: a body larger than ``limit`` bytes fails with 413 while it is being read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(runtime: Runtime, settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """An app serving ``runtime``; the runtime's worker starts and stops with the app's lifespan."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.issuer = open_issuer(
            runtime,
            device=settings.device,
            folder=settings.cert_folder,
            store=settings.cert_store,
            retention_days=settings.cert_retention_days,
            signing_key=None if settings.signing_key is None else settings.signing_key.get_secret_value(),
            signing_key_file=settings.signing_key_file,
        )
        runtime.start()
        log.info("serving model %s (encoder %s, booster %s)", runtime.model_name, runtime.encoder.name, runtime.booster)
        try:
            yield
        finally:
            runtime.stop()
            app.state.issuer.store.close()

    app = FastAPIOffline(  # a FastAPI app whose /docs and /redoc work offline (assets under DOCS_ASSETS)
        static_url=DOCS_ASSETS.rstrip("/"),
        title="fsmllm",
        version=__version__,
        description="Certified multimodal inference: answers about images from Gaussian-smoothed visual features, "
        "with a certified lower bound (FCSB) on how far an l2 perturbation can move those features.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(certify_router)
    app.include_router(openai_router)
    generated_openapi = app.openapi
    app.openapi = lambda: exact_int64_bounds(  # type: ignore[method-assign]
        document_served_model(generated_openapi(), runtime.model_name)
    )
    app.include_router(certificates_router)

    # inside request_context: its receive must reach the route unwrapped, so that the 413 raised while the body is
    # read is answered by the error handlers (a BaseHTTPMiddleware in between turns it into an ExceptionGroup)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # the routes' templates: those of the API schema, the documentation's pages and its assets
    route_labels = RouteLabels(lambda: [*app.openapi()["paths"], *sorted(OPEN_PATHS), DOCS_ASSETS + "{asset:path}"])

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id[:64]
        started = time.perf_counter()
        route = request.url.path
        docs_asset = route.startswith(DOCS_ASSETS) and ".." not in route
        if settings.api_key and route not in OPEN_PATHS and not docs_asset:
            supplied = request.headers.get("authorization", "")
            if not secrets.compare_digest(supplied.encode(), f"Bearer {settings.api_key}".encode()):
                response: Response = error_response(
                    request,
                    401,
                    "unauthorized",
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    {"WWW-Authenticate": "Bearer"},
                    code="invalid_api_key",
                )
                response.headers["X-Request-ID"] = request.state.request_id
                return response
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error in %s %s id=%s", request.method, route, request.state.request_id)
            response = error_response(request, 500, "internal_error", INTERNAL_ERROR)
        elapsed = time.perf_counter() - started
        response.headers["X-Request-ID"] = request.state.request_id
        template = route_labels(route)  # not the raw path: one series per route
        metrics.requests.labels(route=template, status=str(response.status_code)).inc()
        metrics.latency.labels(route=template).observe(elapsed)
        metrics.queue_depth.set(runtime.worker.depth)
        # no body and no image data in the log: method, path, status, time, id
        log.info(
            "%s %s %d %.1f ms id=%s",
            request.method,
            route,
            response.status_code,
            elapsed * 1e3,
            request.state.request_id,
        )
        return response

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: models loaded and the device worker running")
    async def ready() -> JSONResponse:
        if runtime.ready:
            return JSONResponse({"status": "ready", "model": runtime.model_name, "encoder": runtime.encoder.name})
        return JSONResponse({"status": "starting"}, status_code=503)

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        """Prometheus's text format, or OpenMetrics when the scraper's Accept header asks for it."""
        metrics.queue_depth.set(runtime.worker.depth)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(metrics.registry), media_type=content_type)

    return app
