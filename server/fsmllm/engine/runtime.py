"""Everything one deployment serves: the encoder on its device worker, the language model, the policy.

The HTTP layer (``fsmllm.api``) only translates requests into calls on :class:`Runtime`; the runtime owns the
devices: the encoder's through the :class:`~fsmllm.engine.worker.DeviceWorker`, the language model's
through a single-thread executor (one generation at a time per model instance).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from fsmllm.certify import Certificate, SmoothingConfig
from fsmllm.encoders.base import VisionEncoder
from fsmllm.engine.certifier import Certifier, CertifyOutcome
from fsmllm.engine.worker import DeviceWorker
from fsmllm.images import to_pixels
from fsmllm.lm.base import Generation, SamplingParams, TextStream


class VisionLanguageModel(Protocol):
    """A language model that answers from smoothed visual tokens [T, W] (the encoder's token layout)."""

    name: str
    #: generations run at once (1 for the transformers backend; vLLM batches many)
    max_concurrency: int

    def generate(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> Generation: ...

    def stream(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> TextStream: ...


class PolicyError(ValueError):
    """A request asked for something this deployment does not allow (answered with 400/422)."""


@dataclass(frozen=True)
class Policy:
    """What requests may ask for, and the defaults they get."""

    allowed_sigmas: tuple[float, ...]
    default_sigma: float
    default_n0: int
    default_n: int
    default_alpha: float
    max_n: int
    max_radii: int
    max_tokens: int

    def config(
        self, sigma: float | None, n0: int | None, n: int | None, alpha: float | None, bound: str
    ) -> SmoothingConfig:
        sigma = self.default_sigma if sigma is None else sigma
        if not any(math.isclose(sigma, allowed) for allowed in self.allowed_sigmas):
            raise PolicyError(f"sigma {sigma} is not offered by this deployment; choose one of {list(self.allowed_sigmas)}")
        n0 = self.default_n0 if n0 is None else n0
        n = self.default_n if n is None else n
        if n0 + n > self.max_n:
            raise PolicyError(f"n0 + n = {n0 + n} samples exceeds this deployment's maximum of {self.max_n}")
        alpha = self.default_alpha if alpha is None else alpha
        return SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, bound=bound)  # type: ignore[arg-type]

    def radii(self, radii: list[float]) -> list[float]:
        if len(radii) > self.max_radii:
            raise PolicyError(f"{len(radii)} radii requested; at most {self.max_radii} per request")
        return radii

    def sampling(self, max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: list[str]) -> SamplingParams:
        if max_tokens > self.max_tokens:
            raise PolicyError(f"max_tokens {max_tokens} exceeds this deployment's limit of {self.max_tokens}")
        return SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop))


class Runtime:
    """The served encoder (+ booster), its worker, and an optional language model."""

    def __init__(
        self,
        encoder: VisionEncoder,
        policy: Policy,
        *,
        model: VisionLanguageModel | None = None,
        model_name: str = "none",
        booster: str = "none",
        device: str = "cpu",
        batch_size: int = 32,
        queue_capacity: int = 32,
        timeout_s: float = 600.0,
        cache_size: int = 256,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.encoder = encoder.to(device).eval()
        self.policy = policy
        self.model = model
        self.model_name = model_name
        self.booster = booster
        self.worker = DeviceWorker(
            self.encoder, device=device, batch_size=batch_size, capacity=queue_capacity, on_batch=on_batch
        )
        self.certifier = Certifier(self.worker, timeout_s=timeout_s, cache_size=cache_size)
        self._lm_executor = ThreadPoolExecutor(
            max_workers=model.max_concurrency if model is not None else 1, thread_name_prefix="fsmllm-lm"
        )
        self.ready = False

    def start(self) -> None:
        self.worker.start()
        self.ready = True

    def stop(self) -> None:
        """Graceful: stop admitting, finish accepted jobs, then release the threads."""
        self.ready = False
        self.worker.stop(drain=True)
        self._lm_executor.shutdown(wait=True)

    @property
    def input_size(self) -> int:
        return self.encoder.image_size

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The certified input space: the image resized and cropped to the encoder's input (CPU tensor)."""
        return to_pixels(image, self.encoder.image_size)

    async def certify(
        self,
        image: Image.Image,
        config: SmoothingConfig,
        radii: list[float],
        seed: int | None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> CertifyOutcome:
        return await self.certifier.certify(self.pixels(image), config, radii, seed, on_progress=on_progress)

    def visual_tokens(self, certificate: Certificate) -> torch.Tensor:
        """The smoothed feature in the encoder's token layout [T, W], as the language model reads it."""
        return certificate.smoothed_feature.reshape(self.encoder.num_tokens, self.encoder.token_dim)

    async def generate(self, certificate: Certificate, prompt: str, params: SamplingParams) -> Generation:
        if self.model is None:
            raise PolicyError("this deployment serves certificates only (model 'none'); use POST /certify")
        loop = asyncio.get_running_loop()
        tokens = self.visual_tokens(certificate)
        return await loop.run_in_executor(self._lm_executor, self.model.generate, tokens, prompt, params)

    def stream(self, certificate: Certificate, prompt: str, params: SamplingParams) -> TextStream:
        """Token text as generated (consumed on the LM thread by the caller's iterator)."""
        if self.model is None:
            raise PolicyError("this deployment serves certificates only (model 'none'); use POST /certify")
        return self.model.stream(self.visual_tokens(certificate), prompt, params)

    @property
    def lm_executor(self) -> ThreadPoolExecutor:
        return self._lm_executor
