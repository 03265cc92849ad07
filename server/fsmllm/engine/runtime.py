"""Everything one deployment serves: the encoder on its device worker, the language model, the policy.

The HTTP layer (``fsmllm.api``) only translates requests into calls on :class:`Runtime`; the runtime owns the
devices: the encoder's through the :class:`~fsmllm.engine.worker.DeviceWorker`, the language model's
through an executor of ``model.max_concurrency`` threads. A generation whose caller goes away (the awaiting
task is cancelled: client disconnect, timeout) is cancelled in the language model too, so it stops holding the
LM's thread and memory instead of decoding on to ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from PIL import Image

from fsmllm.certify import Certificate, SmoothingConfig, StopRule, new_seed
from fsmllm.certify.answers import AnswerCertificate, AnswerConfig, AnswerVoting, chunk_seed, vote_chunks
from fsmllm.certify.bounds import BoundMethod
from fsmllm.certify.config import Granularity
from fsmllm.encoders.base import VisionEncoder
from fsmllm.encoders.precision import compiled, precision_of
from fsmllm.engine.certifier import Certifier, CertifyOutcome
from fsmllm.engine.jobs import ProgressCallback, VoteProgressCallback
from fsmllm.engine.worker import DeviceWorker
from fsmllm.errors import CertificatesOnly, PolicyError, as_request_error
from fsmllm.images import to_pixels
from fsmllm.lm.base import Generation, GenerationCancelled, SamplingParams, TextStream


class VisionLanguageModel(Protocol):
    """A language model that answers from smoothed visual tokens [T, W] (the encoder's token layout)."""

    name: str

    @property
    def max_concurrency(self) -> int:
        """Generations run at once (1 for the transformers backend; vLLM batches many)."""
        ...

    @property
    def precision(self) -> str:
        """The precision the language model computes in; a certified answer is for it as computed so."""
        ...

    def generate(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> Generation: ...

    def stream(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> TextStream: ...

    def generate_batch(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> list[Generation]: ...


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
        self,
        sigma: float | None,
        n0: int | None,
        n: int | None,
        alpha: float | None,
        bound: BoundMethod,
        granularity: Granularity = "global",
    ) -> SmoothingConfig:
        sigma = self.default_sigma if sigma is None else sigma
        if not any(math.isclose(sigma, allowed) for allowed in self.allowed_sigmas):
            raise PolicyError(
                f"sigma {sigma} is not offered by this deployment; choose one of {list(self.allowed_sigmas)}"
            )
        n0 = self.default_n0 if n0 is None else n0
        n = self.default_n if n is None else n
        if n0 + n > self.max_n:
            raise PolicyError(f"n0 + n = {n0 + n} samples exceeds this deployment's maximum of {self.max_n}")
        alpha = self.default_alpha if alpha is None else alpha
        with as_request_error():
            return SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, bound=bound, granularity=granularity)

    def answer_config(
        self, sigma: float, n0: int, n: int, alpha: float, inner: int = 1, radius: float | None = None
    ) -> AnswerConfig:
        """The parameters of a certified answer; each vote is a generation of ``inner`` samples' features."""
        samples = (n0 + n) * inner
        if samples > self.max_n:
            raise PolicyError(
                f"a certified answer of (n0 + n) x inner = {samples} samples exceeds this deployment's maximum of "
                f"{self.max_n}"
            )
        with as_request_error():
            return AnswerConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, inner=inner, radius=radius)

    def radii(self, radii: list[float]) -> list[float]:
        if len(radii) > self.max_radii:
            raise PolicyError(f"{len(radii)} radii requested; at most {self.max_radii} per request")
        return radii

    def sampling(
        self, max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: list[str]
    ) -> SamplingParams:
        if max_tokens > self.max_tokens:
            raise PolicyError(
                f"max_tokens {max_tokens} exceeds this deployment's limit of {self.max_tokens}", param="max_tokens"
            )
        with as_request_error():
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
        compile: bool = False,
        batch_size: int = 32,
        queue_capacity: int = 32,
        timeout_s: float = 600.0,
        cache_size: int = 256,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_generation: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_batch(samples, batch_size, seconds)`` after each encoder batch and ``on_generation(event,
        tokens)`` when a generation starts ("started", 0) and when it ends ("completed", "cancelled" or "failed",
        with the tokens it generated) feed the metrics. With ``compile`` the worker runs ``torch.compile(encoder)``
        (:func:`~fsmllm.encoders.precision.compiled`)."""
        self.encoder = encoder.to(device).eval()
        self.policy = policy
        self.model = model
        self.model_name = model_name
        self.booster = booster
        self.worker = DeviceWorker(
            compiled(self.encoder) if compile else self.encoder,
            device=device,
            batch_size=batch_size,
            capacity=queue_capacity,
            on_batch=on_batch,
        )
        self.certifier = Certifier(self.worker, timeout_s=timeout_s, cache_size=cache_size)
        self._lm_executor = ThreadPoolExecutor(
            max_workers=model.max_concurrency if model is not None else 1, thread_name_prefix="fsmllm-lm"
        )
        self._on_generation = on_generation
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

    @property
    def encoder_dtype(self) -> str:
        """The precision the encoder computes in (its certificates are for it as computed in that precision)."""
        return precision_of(self.encoder)

    @property
    def lm_dtype(self) -> str | None:
        """The precision the language model computes in (certified answers are for it as computed in that
        precision); None without one."""
        return None if self.model is None else self.model.precision

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The certified input space: the image resized and cropped to the encoder's input (CPU tensor)."""
        return to_pixels(image, self.encoder.image_size)

    async def certify(
        self,
        image: Image.Image,
        config: SmoothingConfig,
        radii: list[float],
        seed: int | None,
        on_progress: ProgressCallback | None = None,
        stop: StopRule | None = None,
    ) -> CertifyOutcome:
        return await self.certifier.certify(self.pixels(image), config, radii, seed, on_progress=on_progress, stop=stop)

    def visual_tokens(self, certificate: Certificate) -> torch.Tensor:
        """The smoothed feature in the encoder's token layout [T, W], as the language model reads it."""
        return certificate.smoothed_feature.reshape(self.encoder.num_tokens, self.encoder.token_dim)

    def language_model(self) -> VisionLanguageModel:
        """The served language model; :class:`~fsmllm.errors.CertificatesOnly` where there is none."""
        if self.model is None:
            raise CertificatesOnly()
        return self.model

    def stream(self, certificate: Certificate, prompt: str, params: SamplingParams) -> TextStream:
        """Open a generation about ``certificate``'s smoothed features; consume it with :meth:`pieces` (which
        runs it on the LM threads)."""
        return self.language_model().stream(self.visual_tokens(certificate), prompt, params)

    async def generate(self, certificate: Certificate, prompt: str, params: SamplingParams) -> Generation:
        """The whole answer, generated on an LM thread; cancelling the awaiting task cancels the generation."""
        stream = self.stream(certificate, prompt, params)
        self._account("started", 0)
        job = self._lm_executor.submit(self._complete, stream)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            stream.cancel()
            if job.cancel():  # it never reached an LM thread, so it ends here
                self._account("cancelled", 0)
            raise

    async def stream_text(self, stream: TextStream) -> AsyncGenerator[str, None]:
        """The text of ``stream`` as generated, each piece computed on an LM thread, then read
        ``stream.result()``. If the consumer stops early (the client went away) the generation is cancelled
        and its end is accounted on an LM thread. Use it inside ``contextlib.aclosing``, right after
        :meth:`stream` (vLLM starts decoding when the stream opens)."""
        loop = asyncio.get_running_loop()
        iterator, finished = iter(stream), object()
        self._account("started", 0)
        complete = False
        try:
            while (piece := await loop.run_in_executor(self._lm_executor, next, iterator, finished)) is not finished:
                yield cast(str, piece)
            complete = True
        finally:
            if complete:
                self._complete(stream)  # already generated: this only accounts it
            else:
                stream.cancel()
                self._lm_executor.submit(self._complete_quietly, stream)

    async def certify_answer(
        self,
        image: Image.Image,
        prompt: str,
        config: AnswerConfig,
        params: SamplingParams,
        seed: int | None = None,
        on_votes: VoteProgressCallback | None = None,
    ) -> AnswerCertificate:
        """CERTIFY on the model's answer (method.md, "Certified answers"): the votes' noisy samples go through
        the device worker (shared batches), their greedy answers are generated in batches on the LM threads, and
        the voting stops early when ``config.radius`` is certified or cannot be. The worker computes the next
        chunk's features while the language model answers the current one. ``on_votes`` hears the votes so far
        after each chunk."""
        self.language_model()
        pixels = self.pixels(image)
        seed = new_seed() if seed is None else seed
        voting = AnswerVoting(config, seed)
        greedy = SamplingParams(params.max_tokens, 0.0, 1.0, None, params.stop)
        chunks = vote_chunks(config.n0, config.n)

        def features(index: int) -> asyncio.Future[torch.Tensor]:
            work = self.certifier.samples(pixels, config.sigma, chunks[index], chunk_seed(seed, index), config.inner)
            return asyncio.ensure_future(work)

        upcoming: asyncio.Future[torch.Tensor] | None = features(0)
        try:
            for index in range(len(chunks)):
                assert upcoming is not None  # the chunk after index was started, or index is the last
                current = await upcoming
                upcoming = features(index + 1) if index + 1 < len(chunks) else None
                tokens = current.reshape(current.shape[0], self.encoder.num_tokens, self.encoder.token_dim)
                voting.add([generation.text for generation in await self._votes(tokens, prompt, greedy)])
                if on_votes is not None:
                    on_votes(voting.progress())
                if voting.done:
                    break
        finally:
            if upcoming is not None:
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await upcoming
        return voting.certificate()

    async def _votes(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> list[Generation]:
        """One chunk of votes, generated in one batch on an LM thread."""
        assert self.model is not None
        job = self._lm_executor.submit(self.model.generate_batch, visual_tokens, prompt, params)
        self._account("started", 0)
        try:
            generations = await asyncio.wrap_future(job)
        except BaseException:
            self._account("failed", 0)
            raise
        self._account("completed", sum(generation.completion_tokens for generation in generations))
        return generations

    def _complete(self, stream: TextStream) -> Generation:
        """On an LM thread: the generation to its end (or its cancellation), accounted for the metrics."""
        try:
            generation = stream.result()
        except GenerationCancelled as cancelled:
            self._account("cancelled", cancelled.tokens)
            raise
        except Exception:
            self._account("failed", 0)
            raise
        self._account("completed", generation.completion_tokens)
        return generation

    def _complete_quietly(self, stream: TextStream) -> None:
        try:
            self._complete(stream)
        except Exception:
            pass

    def _account(self, event: str, tokens: int) -> None:
        if self._on_generation is not None:
            self._on_generation(event, tokens)
