"""Building a runtime from settings and running it under uvicorn (``fsmllm serve``)."""

from __future__ import annotations

import logging

import uvicorn

from fsmllm.api.app import create_app
from fsmllm.api.metrics import Metrics
from fsmllm.api.settings import Settings
from fsmllm.encoders.base import VisionEncoder
from fsmllm.engine.runtime import Policy, Runtime, VisionLanguageModel
from fsmllm.lm.vllm_backend import VllmOptions
from fsmllm.threads import set_threads

log = logging.getLogger("fsmllm.serve")


def policy_from(settings: Settings) -> Policy:
    return Policy(
        allowed_sigmas=tuple(settings.allowed_sigmas),
        default_sigma=settings.default_sigma,
        default_n0=settings.default_n0,
        default_n=settings.default_n,
        default_alpha=settings.default_alpha,
        max_n=settings.max_n,
        max_radii=settings.max_radii,
        max_tokens=settings.max_tokens_limit,
    )


def vllm_options(settings: Settings) -> VllmOptions:
    """The ``vllm_*`` settings as engine options of the vllm backend."""
    return VllmOptions(
        dtype=settings.vllm_dtype,
        max_model_len=settings.vllm_max_model_len,
        kv_cache_bytes=settings.vllm_kv_cache_bytes,
        enforce_eager=settings.vllm_enforce_eager,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
    )


def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load the named model's encoder (or ``settings.encoder`` when given) behind ``settings.booster``, and the
    model's projector and language model."""
    from fsmllm.booster import load_booster
    from fsmllm.encoders import load_encoder
    from fsmllm.encoders.precision import set_precision
    from fsmllm.fastest_dtype import encoder_precision
    from fsmllm.lm.models import load_model, model_spec

    model = None
    encoder_name, image_size = settings.encoder or "dinov2-s", settings.image_size
    if settings.model != "none":
        spec = model_spec(settings.model)
        if settings.encoder is not None and settings.encoder != spec.encoder:
            raise ValueError(
                f"model {spec.name!r} reads the features of encoder {spec.encoder!r}, not {settings.encoder!r}"
            )
        if image_size is not None and image_size != spec.image_size:
            raise ValueError(f"model {spec.name!r} was trained at {spec.image_size} px, not {image_size}")
        encoder_name, image_size = spec.encoder, spec.image_size
        model = load_model(
            settings.model, settings.device, settings.lm_backend, vllm_options(settings), settings.lm_dtype
        )
    encoder = load_encoder(encoder_name, image_size=image_size, device=settings.device)
    precision = encoder_precision(encoder, settings.dtype, settings.device, settings.batch_size)
    # a noise-conditioned booster is bound to the default sigma; load_booster warns when it was not trained there
    encoder = load_booster(settings.booster, set_precision(encoder, precision), sigma=settings.default_sigma)
    return runtime_of(encoder, settings, metrics, model, settings.model, settings.booster)


def runtime_of(
    encoder: VisionEncoder,
    settings: Settings,
    metrics: Metrics,
    model: VisionLanguageModel | None,
    model_name: str,
    booster: str,
) -> Runtime:
    """The runtime serving ``encoder`` (already behind ``booster``, which names it) and ``model`` under
    ``settings``' policy, device and limits, its batches and generations counted in ``metrics``."""
    return Runtime(
        encoder,
        policy_from(settings),
        model=model,
        model_name=model_name,
        booster=booster,
        device=settings.device,
        compile=settings.compile,
        batch_size=settings.batch_size,
        queue_capacity=settings.queue_capacity,
        timeout_s=settings.request_timeout_s,
        cache_size=settings.cache_size,
        on_batch=metrics.record_batch,
        on_generation=metrics.record_generation,
    )


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(settings.threads)  # before the worker's and the language model's threads start
    metrics = Metrics()
    runtime = build_runtime(settings, metrics)
    app = create_app(runtime, settings, metrics)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
